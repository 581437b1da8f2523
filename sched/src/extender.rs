//! The scheduler extender protocol (`k8s.io/kube-scheduler/extender/v1`),
//! with `nodeCacheCapable: true`: the scheduler sends the pod and candidate
//! node names; the extender answers which pass (and why the others fail) or
//! how each scores. Pure: the cluster's state comes in as lookups.
//!
//! The Go types carry no JSON tags, so kube-scheduler writes `Pod`,
//! `NodeNames`, … and reads field names in any case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use virtkube_api::VirtTemplateSpec;
use virtkube_api::node::VirtNodeStatus;

use crate::filter;
use crate::requirements::{self, Requirements};

/// A filter or prioritize call.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod", default)]
    pub pod: Option<PodView>,
    #[serde(rename = "NodeNames", alias = "nodenames", alias = "nodeNames", default)]
    pub node_names: Option<Vec<String>>,
    /// Full nodes (`nodeCacheCapable: false`): only their names are used.
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<NodeListView>,
}

/// As much of a pod as the extender reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodView {
    #[serde(default)]
    pub metadata: MetaView,
}

/// A node list (`nodeCacheCapable: false`): the nodes are kept as they
/// came, to be sent back whole.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeListView {
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
}

fn node_name(node: &serde_json::Value) -> Option<&str> {
    node.pointer("/metadata/name").and_then(serde_json::Value::as_str)
}

/// Object metadata: what the extender reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MetaView {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A filter call's answer: the passing nodes as the call gave them (names,
/// or whole nodes under `Nodes` without `nodeCacheCapable`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExtenderFilterResult {
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<serde_json::Value>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error", skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One node's score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// The cluster as the extender sees it (reflector stores in the daemon).
pub trait Cluster {
    /// `f` of the VirtNode of node `name`, if one is published (borrowed:
    /// a call looks at a hundred of them).
    fn with_virt_node<R>(&self, name: &str, f: impl FnOnce(Option<&VirtNodeStatus>) -> R) -> R;
    /// VirtTemplate `name` in `namespace`.
    fn template(&self, namespace: &str, name: &str) -> Option<VirtTemplateSpec>;
    /// Seconds since the epoch.
    fn now(&self) -> i64;
}

impl ExtenderArgs {
    fn candidates(&self) -> Vec<String> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => names.clone(),
            (None, Some(nodes)) => nodes
                .items
                .iter()
                .filter_map(|n| node_name(n).map(str::to_owned))
                .collect(),
            (None, None) => Vec::new(),
        }
    }

    /// The answer with `passing` nodes, in the form the call came in.
    fn answer(&self, passing: Vec<String>, failed_nodes: BTreeMap<String, String>) -> ExtenderFilterResult {
        match (&self.node_names, &self.nodes) {
            (None, Some(nodes)) => {
                let items: Vec<serde_json::Value> = nodes
                    .items
                    .iter()
                    .filter(|n| node_name(n).is_some_and(|name| passing.iter().any(|p| p == name)))
                    .cloned()
                    .collect();
                ExtenderFilterResult {
                    nodes: Some(serde_json::json!({ "items": items })),
                    failed_nodes,
                    ..ExtenderFilterResult::default()
                }
            }
            _ => ExtenderFilterResult {
                node_names: Some(passing),
                failed_nodes,
                ..ExtenderFilterResult::default()
            },
        }
    }

    fn needs(&self, cluster: &impl Cluster) -> Result<Requirements, String> {
        let Some(pod) = &self.pod else {
            return Err("the call names no pod".into());
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        requirements::of_pod(namespace, &pod.metadata.annotations, |ns, name| {
            cluster.template(ns, name)
        })
        .map_err(|e| e.to_string())
    }
}

/// Answers a filter call. A pod that needs nothing (not a VM pod) passes
/// every candidate without a look at them.
pub fn filter(args: &ExtenderArgs, cluster: &impl Cluster) -> ExtenderFilterResult {
    let candidates = args.candidates();
    let needs = match args.needs(cluster) {
        Ok(needs) if needs.is_empty() => return args.answer(candidates, BTreeMap::new()),
        Ok(needs) => needs,
        // The pod's own mistake: every node says it, so FailedScheduling does.
        Err(why) => {
            let failed = candidates.into_iter().map(|n| (n, why.clone())).collect();
            return args.answer(Vec::new(), failed);
        }
    };
    let now = cluster.now();
    let (mut passing, mut failed) = (Vec::new(), BTreeMap::new());
    for name in candidates {
        match cluster.with_virt_node(&name, |node| filter::check(&needs, node, now)) {
            Ok(()) => passing.push(name),
            Err(why) => {
                failed.insert(name, why);
            }
        }
    }
    args.answer(passing, failed)
}

/// Answers a prioritize call: [`filter::score`] per candidate (0 for all
/// when the pod is not a VM pod, so the extender does not sway it).
pub fn prioritize(args: &ExtenderArgs, cluster: &impl Cluster) -> Vec<HostPriority> {
    let vm = args.needs(cluster).is_ok_and(|needs| !needs.is_empty());
    args.candidates()
        .into_iter()
        .map(|host| HostPriority {
            score: if vm {
                cluster.with_virt_node(&host, filter::score)
            } else {
                0
            },
            host,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use virtkube_api::node::Condition;

    use super::*;

    struct Fixture {
        nodes: BTreeMap<String, VirtNodeStatus>,
        templates: BTreeMap<(String, String), VirtTemplateSpec>,
    }

    impl Cluster for Fixture {
        fn with_virt_node<R>(&self, name: &str, f: impl FnOnce(Option<&VirtNodeStatus>) -> R) -> R {
            f(self.nodes.get(name))
        }
        fn template(&self, namespace: &str, name: &str) -> Option<VirtTemplateSpec> {
            self.templates.get(&(namespace.to_owned(), name.to_owned())).cloned()
        }
        fn now(&self) -> i64 {
            1_795_341_600
        }
    }

    fn ready_node(kvm: bool, domains: u32) -> VirtNodeStatus {
        VirtNodeStatus {
            arch: Some("x86_64".into()),
            kvm: Some(kvm),
            cpus: Some(4),
            domains: Some(domains),
            conditions: vec![Condition {
                kind: "Ready".into(),
                status: "True".into(),
                last_heartbeat_time: Some("2026-11-22T09:59:30Z".into()),
                ..Condition::default()
            }],
            ..VirtNodeStatus::default()
        }
    }

    fn fixture() -> Fixture {
        Fixture {
            nodes: BTreeMap::from([
                ("tcg".to_owned(), ready_node(false, 0)),
                ("kvm".to_owned(), ready_node(true, 4)),
            ]),
            templates: BTreeMap::from([(
                ("team".to_owned(), "fast".to_owned()),
                serde_json::from_value(serde_json::json!({"domainType": "kvm", "memory": "1Gi"})).unwrap(),
            )]),
        }
    }

    fn args(json: serde_json::Value) -> ExtenderArgs {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_vm_pod_is_kept_off_nodes_that_cannot_run_it_with_each_reason() {
        let call = args(serde_json::json!({
            "Pod": {"metadata": {"name": "vm", "namespace": "team", "annotations": {"virtkube.io/template": "fast"}}},
            "NodeNames": ["tcg", "kvm", "bare"]
        }));
        let result = filter(&call, &fixture());
        assert_eq!(result.node_names, Some(vec!["kvm".to_owned()]));
        assert!(result.failed_nodes["tcg"].contains("needs KVM"), "{result:?}");
        assert!(result.failed_nodes["bare"].contains("no virthost"), "{result:?}");
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["NodeNames"], serde_json::json!(["kvm"]));
        assert!(json["FailedNodes"]["tcg"].is_string());
        assert!(json.get("Error").is_none());
    }

    #[test]
    fn a_pod_that_is_not_a_vm_passes_everywhere_at_once() {
        let call = args(serde_json::json!({
            "Pod": {"metadata": {"name": "web", "namespace": "team"}},
            "NodeNames": ["tcg", "kvm", "bare"]
        }));
        let result = filter(&call, &fixture());
        assert_eq!(result.node_names, Some(vec!["tcg".into(), "kvm".into(), "bare".into()]));
        assert!(result.failed_nodes.is_empty());
        assert!(prioritize(&call, &fixture()).iter().all(|p| p.score == 0));
    }

    #[test]
    fn a_pods_own_mistake_is_every_nodes_reason() {
        let call = args(serde_json::json!({
            "pod": {"metadata": {"name": "vm", "namespace": "team", "annotations": {"virtkube.io/requires": "gpu"}}},
            "nodenames": ["tcg", "kvm"]
        }));
        let result = filter(&call, &fixture());
        assert_eq!(result.node_names, Some(Vec::new()));
        assert!(
            result
                .failed_nodes
                .values()
                .all(|why| why.contains("virtkube.io/requires")),
            "{result:?}"
        );
        let missing = args(serde_json::json!({
            "Pod": {"metadata": {"name": "vm", "namespace": "team", "annotations": {"virtkube.io/template": "gone"}}},
            "NodeNames": ["kvm"]
        }));
        assert!(filter(&missing, &fixture()).failed_nodes["kvm"].contains("team/gone"));
    }

    #[test]
    fn full_nodes_are_read_by_name_and_idle_nodes_score_higher() {
        let call = args(serde_json::json!({
            "Pod": {"metadata": {"namespace": "team", "annotations": {"virtkube.io/requires": "arch=x86_64"}}},
            "Nodes": {"items": [{"metadata": {"name": "tcg"}}, {"metadata": {"name": "kvm"}}]}
        }));
        // Whole nodes in, whole nodes out (kube-scheduler reads Nodes then).
        let result = filter(&call, &fixture());
        assert_eq!(result.node_names, None);
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["Nodes"]["items"][1]["metadata"]["name"], "kvm");
        assert!(json.get("NodeNames").is_none());
        let kvm_only = args(serde_json::json!({
            "Pod": {"metadata": {"namespace": "team", "annotations": {"virtkube.io/requires": "kvm"}}},
            "Nodes": {"items": [{"metadata": {"name": "tcg"}, "spec": {}}, {"metadata": {"name": "kvm"}, "spec": {"podCIDR": "x"}}]}
        }));
        let json = serde_json::to_value(filter(&kvm_only, &fixture())).unwrap();
        assert_eq!(
            json["Nodes"]["items"],
            serde_json::json!([{"metadata": {"name": "kvm"}, "spec": {"podCIDR": "x"}}])
        );
        assert!(json["FailedNodes"]["tcg"].is_string());
        let scores = prioritize(&call, &fixture());
        assert_eq!(
            scores,
            vec![
                HostPriority {
                    host: "tcg".into(),
                    score: 10
                },
                HostPriority {
                    host: "kvm".into(),
                    score: 5
                }
            ]
        );
        let json = serde_json::to_value(&scores).unwrap();
        assert_eq!(json[0], serde_json::json!({"Host": "tcg", "Score": 10}));
    }
}
