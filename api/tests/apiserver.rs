//! The generated CRDs on a real Kubernetes API server (KUBECONFIG; in CI the
//! control plane of ../shared/k8s-local): installed by server-side apply, then
//! one object of each kind is created, read back through `kubectl get` with
//! its printer columns, and deleted.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use serde_json::json;
use virtkube_api::{VirtDomain, VirtNode, VirtTemplate, crds};

const MANAGER: &str = "virtkube-crd-test";

fn kubeconfig() -> String {
    std::env::var("KUBECONFIG").unwrap_or_else(|_| {
        panic!("KUBECONFIG is not set: start a cluster (NO_KUBELET=1 ../shared/k8s-local/up.sh) and export KUBECONFIG, or run scripts/test.sh")
    })
}

fn kubectl(args: &[&str]) -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(&kubectl)
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {kubectl}: {e} (set KUBECTL)"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn client() -> Client {
    kubeconfig();
    let config = Config::infer().await.unwrap();
    Client::try_from(config).unwrap()
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply(MANAGER).force();
    for crd in crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("the API server refused CRD {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let current = api.get(&name).await.unwrap();
            let established = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not Established after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Header and first row of `kubectl get`, split into columns.
fn get_columns(resource: &str, namespace: Option<&str>, name: &str) -> Vec<(String, String)> {
    let mut args = vec!["get", resource, name];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    let out = kubectl(&args);
    let mut lines = out.lines();
    let (header, row) = (lines.next().unwrap(), lines.next().unwrap());
    // By the header's column positions: a value may be empty (an unset field).
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|(i, c)| !c.is_whitespace() && (*i == 0 || header[..*i].ends_with(' ')))
        .map(|(i, _)| i)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(usize::MAX);
            let cell = |line: &str| line.get(start..end.min(line.len())).unwrap_or("").trim().to_owned();
            (cell(header), cell(row))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Kubernetes API server (KUBECONFIG): scripts/test.sh runs it"]
async fn crds_install_and_serve_each_kind_on_a_real_api_server() {
    let client = client().await;
    install_crds(&client).await;

    let ns_name = format!("virtkube-crd-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let apply = PatchParams::apply(MANAGER).force();

    // VirtTemplate: the tiny example, unchanged.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/tiny.yaml")).unwrap();
    let template: VirtTemplate = serde_saphyr::from_str(&text).unwrap();
    let templates: Api<VirtTemplate> = Api::namespaced(client.clone(), &ns_name);
    templates.patch("tiny", &apply, &Patch::Apply(&template)).await.unwrap();
    let back = templates.get("tiny").await.unwrap();
    assert_eq!(
        back.spec, template.spec,
        "the API server changed the template (pruned a field?)"
    );
    let cols = get_columns("virttemplates", Some(&ns_name), "tiny");
    assert_eq!(
        cols[1..4],
        [
            ("ARCH".into(), "x86_64".into()),
            ("CPUS".into(), "1".into()),
            ("MEMORY".into(), "128Mi".into())
        ]
    );

    // VirtNode: spec by apply, facts through the status subresource.
    let node_name = format!("crd-test-node-{}", std::process::id());
    let nodes: Api<VirtNode> = Api::all(client.clone());
    let node = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode", "metadata": {"name": node_name}, "spec": {"nodeName": node_name}});
    nodes.patch(&node_name, &apply, &Patch::Apply(&node)).await.unwrap();
    let status = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode", "metadata": {"name": node_name},
        "status": {"arch": "x86_64", "kvm": false, "cpus": 2, "memory": "24Gi", "domains": 3,
                   "machineTypes": ["pc", "q35"], "numa": [{"id": 0, "memory": "24Gi", "cpus": 2, "hugepages": [{"sizeKib": 2048, "count": 0}]}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "LibvirtReachable"}]}});
    nodes
        .patch_status(&node_name, &apply, &Patch::Apply(&status))
        .await
        .unwrap();
    let back = nodes.get(&node_name).await.unwrap();
    assert_eq!(
        back.status
            .as_ref()
            .and_then(|s| s.numa.first())
            .and_then(|c| c.hugepages.first())
            .map(|h| h.size_kib),
        Some(2048)
    );
    let cols = get_columns("virtnodes", None, &node_name);
    assert_eq!(
        cols[1..6],
        [
            ("ARCH".into(), "x86_64".into()),
            ("KVM".into(), "false".into()),
            ("CPUS".into(), "2".into()),
            ("MEMORY".into(), "24Gi".into()),
            ("DOMAINS".into(), "3".into())
        ]
    );

    // VirtDomain.
    let domains: Api<VirtDomain> = Api::namespaced(client.clone(), &ns_name);
    let domain = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomain", "metadata": {"name": "vm-0"},
        "spec": {"node": node_name, "domainName": format!("{ns_name}_vm-0"), "uuid": "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", "pod": "vm-0", "template": "tiny"}});
    domains.patch("vm-0", &apply, &Patch::Apply(&domain)).await.unwrap();
    let status = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomain", "metadata": {"name": "vm-0"},
        "status": {"state": "Running", "reason": "Booted", "vcpus": 1, "memory": "128Mi", "cpuTimeNs": 12345}});
    domains
        .patch_status("vm-0", &apply, &Patch::Apply(&status))
        .await
        .unwrap();
    let cols = get_columns("vd", Some(&ns_name), "vm-0");
    assert_eq!(
        cols[1..6],
        [
            ("NODE".into(), node_name.clone()),
            ("STATE".into(), "Running".into()),
            ("RUNSTATE".into(), String::new()),
            ("VCPUS".into(), "1".into()),
            ("MEMORY".into(), "128Mi".into())
        ]
    );

    // A value the schema forbids is refused by the server, not stored.
    let bad = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtTemplate", "metadata": {"name": "bad"}, "spec": {"domainType": "xen"}});
    let err = templates.patch("bad", &apply, &Patch::Apply(&bad)).await.unwrap_err();
    assert!(err.to_string().contains("domainType"), "{err}");

    // Memory as a plain number of bytes (int-or-string, like Kubernetes' own quantities)
    // is stored as a number and read back as the same quantity.
    let numeric = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtTemplate", "metadata": {"name": "numeric"}, "spec": {"memory": 536870912}});
    templates
        .patch("numeric", &apply, &Patch::Apply(&numeric))
        .await
        .unwrap();
    let back = templates.get("numeric").await.unwrap();
    assert_eq!(back.spec.memory.as_deref(), Some("536870912"));
    let resolved = virtkube_api::resolve::resolve(Some("numeric".into()), &back.spec).unwrap();
    assert_eq!(resolved.memory_bytes, 512 << 20);
    templates.delete("numeric", &DeleteParams::default()).await.unwrap();

    templates.delete("tiny", &DeleteParams::default()).await.unwrap();
    domains.delete("vm-0", &DeleteParams::default()).await.unwrap();
    nodes.delete(&node_name, &DeleteParams::default()).await.unwrap();
    assert!(templates.get_opt("tiny").await.unwrap().is_none());
    assert!(nodes.get_opt(&node_name).await.unwrap().is_none());
    namespaces.delete(&ns_name, &DeleteParams::default()).await.unwrap();
}
