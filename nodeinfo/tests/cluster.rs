//! nodeinfo end to end against the real libvirtd (test driver) and the real
//! API server (KUBECONFIG; k8s-local in CI): the VirtNode appears with its
//! facts, the Node gets its labels and loses one that no longer holds, a
//! domain with owner metadata gets its VirtDomain, destroying the domain
//! removes it, and deleting the Pod garbage-collects it.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use serde_json::json;
use virtkube_api::{VirtDomain, VirtNode};

const URI: &str = "test+unix:///default";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn domain_xml(name: &str, ns: &str, pod: &str, uid: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory>131072</memory><vcpu>2</vcpu><os><type>hvm</type></os>\
         <metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:namespace>{ns}</virtkube:namespace>\
         <virtkube:pod>{pod}</virtkube:pod><virtkube:uid>{uid}</virtkube:uid><virtkube:template>tiny</virtkube:template>\
         </virtkube:instance></metadata></domain>",
        virtkube_api::METADATA_XMLNS
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Kubernetes API server (KUBECONFIG) and libvirtd: scripts/test.sh runs it"]
async fn publishes_node_labels_and_domains_and_cleans_up() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: run scripts/test.sh or point it at a cluster"
    );
    let client = Client::try_from(Config::infer().await.unwrap()).unwrap();
    let apply = PatchParams::apply("virtkube-nodeinfo-test").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in virtkube_api::crds::all() {
        crds.patch(crd.metadata.name.as_deref().unwrap(), &apply, &Patch::Apply(&crd))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let id = std::process::id();
    let node_name = format!("virtkube-ni-node-{id}");
    let ns = format!("virtkube-ni-{id}");
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": node_name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    // A label nodeinfo set earlier that no longer holds.
    let stale = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name, "labels": {"cpu-model.virtkube.io/Bogus": "true"}}});
    nodes
        .patch(
            &node_name,
            &PatchParams::apply("virtkube-nodeinfo-labels").force(),
            &Patch::Apply(&stale),
        )
        .await
        .unwrap();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "vm-0"},
        "spec": {"nodeName": node_name, "automountServiceAccountToken": false, "containers": [{"name": "vm", "image": "virtkube/tiny:latest"}]}})).unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();

    // The test driver keeps its domains while a connection is open.
    let conn = virt::connect::Connect::open(Some(URI)).unwrap();
    let domain_name = format!("{ns}_vm-0");
    let dom = conn
        .create_domain_xml(&domain_xml(&domain_name, &ns, "vm-0", &uid), 0)
        .unwrap();

    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
            .args(["--node", &node_name, "--uri", URI, "--resync", "2"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let virtnodes: Api<VirtNode> = Api::all(client.clone());
    let status = eventually("the VirtNode's status", Duration::from_secs(30), || async {
        virtnodes
            .get_opt(&node_name)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.status)
    })
    .await;
    assert_eq!(status.arch.as_deref(), Some("i686"));
    assert_eq!(status.kvm, Some(false));
    assert!(status.cpus.is_some_and(|c| c > 0) && status.memory.is_some());
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True" && c.last_heartbeat_time.is_some())
    );

    let labels = eventually("the Node labels", Duration::from_secs(30), || async {
        let labels = nodes.get(&node_name).await.ok()?.metadata.labels.unwrap_or_default();
        (labels.get("virtkube.io/arch").map(String::as_str) == Some("i686")).then_some(labels)
    })
    .await;
    assert_eq!(labels.get("virtkube.io/kvm").map(String::as_str), Some("false"));
    assert!(
        !labels.contains_key("cpu-model.virtkube.io/Bogus"),
        "a label that no longer holds stayed: {labels:?}"
    );

    let domains: Api<VirtDomain> = Api::namespaced(client.clone(), &ns);
    let vd = eventually("the VirtDomain", Duration::from_secs(30), || async {
        domains
            .get_opt("vm-0")
            .await
            .ok()
            .flatten()
            .filter(|d| d.status.is_some())
    })
    .await;
    assert_eq!(vd.spec.node, node_name);
    assert_eq!(vd.spec.domain_name, domain_name);
    assert_eq!(vd.spec.template.as_deref(), Some("tiny"));
    assert_eq!(vd.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
    let st = vd.status.unwrap();
    assert_eq!(
        (st.state.as_deref(), st.vcpus, st.memory.as_deref()),
        (Some("Running"), Some(2), Some("128Mi"))
    );

    // The domain goes away: so does its VirtDomain (by event, well before a resync would matter).
    dom.destroy().unwrap();
    eventually(
        "the VirtDomain's deletion after destroy",
        Duration::from_secs(10),
        || async { domains.get_opt("vm-0").await.ok().flatten().is_none().then_some(()) },
    )
    .await;

    // Back again; then without nodeinfo, deleting the Pod garbage-collects the VirtDomain.
    let _dom = conn
        .create_domain_xml(&domain_xml(&domain_name, &ns, "vm-0", &uid), 0)
        .unwrap();
    eventually("the VirtDomain's return", Duration::from_secs(15), || async {
        domains.get_opt("vm-0").await.ok().flatten().map(|_| ())
    })
    .await;
    drop(daemon);
    pods.delete(
        "vm-0",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually(
        "garbage collection of the VirtDomain",
        Duration::from_secs(90),
        || async { domains.get_opt("vm-0").await.ok().flatten().is_none().then_some(()) },
    )
    .await;

    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
    let _ = virtnodes.delete(&node_name, &DeleteParams::default()).await;
}
