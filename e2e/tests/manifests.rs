//! The manifests under deploy/: every document parses into its k8s-openapi
//! type with no field lost (a typo'd field would be silently dropped by the
//! API server), and the API server accepts them (`kubectl apply
//! --dry-run=server`).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every (key path) of `original` must survive a round trip through `T`.
fn lost_fields(original: &Value, round_trip: &Value, path: &str, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &format!("{path}.{k}"), lost),
                    None if v.is_null() => {}
                    None => lost.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), lost);
            }
        }
        _ => {}
    }
}

fn check<T: DeserializeOwned + Serialize>(doc: &Value, file: &Path) {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{}: fields not in the {} schema: {lost:?}",
        file.display(),
        std::any::type_name::<T>()
    );
}

#[test]
fn every_manifest_parses_into_its_type_without_losing_a_field() {
    let mut kinds = Vec::new();
    for file in yaml_files(&deploy())
        .into_iter()
        .chain(yaml_files(&deploy().join("examples")))
    {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for doc in docs {
            if doc.is_null() {
                continue;
            }
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("(patch)").to_owned();
            match kind.as_str() {
                "Namespace" => check::<Namespace>(&doc, &file),
                "ServiceAccount" => check::<ServiceAccount>(&doc, &file),
                "ConfigMap" => {
                    check::<ConfigMap>(&doc, &file);
                    check_gate_policy(&doc, &file);
                }
                "ClusterRole" => check::<ClusterRole>(&doc, &file),
                "ClusterRoleBinding" => check::<ClusterRoleBinding>(&doc, &file),
                "Role" => check::<Role>(&doc, &file),
                "RoleBinding" => check::<RoleBinding>(&doc, &file),
                "DaemonSet" => check::<DaemonSet>(&doc, &file),
                "Deployment" => check::<Deployment>(&doc, &file),
                "Service" => check::<Service>(&doc, &file),
                "KubeSchedulerConfiguration" => check_scheduler_config(&doc, &file),
                "CustomResourceDefinition" => check::<CustomResourceDefinition>(&doc, &file),
                "VirtTemplate" => check::<virtkube_api::VirtTemplate>(&doc, &file),
                "RuntimeClass" => check::<RuntimeClass>(&doc, &file),
                "(patch)" => check::<DaemonSet>(&doc, &file),
                other => panic!("{}: no test knows kind {other}", file.display()),
            }
            kinds.push(kind);
        }
    }
    for expected in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "DaemonSet",
        "ConfigMap",
        "Deployment",
        "VirtTemplate",
        "RuntimeClass",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "no {expected} under deploy/: {kinds:?}"
        );
    }
}

/// A scheduler configuration (not an API object: no schema here) wires
/// virtkube-sched in as the docs say: both verbs, node names only, ignorable.
fn check_scheduler_config(doc: &Value, file: &Path) {
    let extender = &doc["extenders"][0];
    for (field, expected) in [
        ("filterVerb", Value::from("filter")),
        ("prioritizeVerb", Value::from("prioritize")),
        ("nodeCacheCapable", Value::from(true)),
        ("ignorable", Value::from(true)),
    ] {
        assert_eq!(extender[field], expected, "{}: extenders[0].{field}", file.display());
    }
    assert!(
        extender["urlPrefix"].as_str().is_some_and(|u| u.ends_with(":8888")),
        "{}: the extender's port",
        file.display()
    );
}

/// The gate's policy ConfigMap holds a policy the gate accepts, and it says
/// what the gate would use anyway (the defaults are documented in it).
fn check_gate_policy(doc: &Value, file: &Path) {
    use virtkube_gate::config::GateConfig;
    use virtkube_gate::relay::Gate;
    let Some(text) = doc.pointer("/data/gate.yaml").and_then(Value::as_str) else {
        return;
    };
    let mut gate = Gate::default();
    GateConfig::parse(text)
        .and_then(|c| c.apply(&mut gate))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let shown = |g: &Gate| format!("{:?} {} {}", g.policy, g.kubepods_parent, g.max_connections_per_caller);
    assert_eq!(
        shown(&gate),
        shown(&Gate::default()),
        "{}: the ConfigMap's policy should show the defaults",
        file.display()
    );
}

#[test]
fn a_lost_field_is_detected() {
    let doc =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labelz": {"a": "b"}}});
    let typed: Namespace = serde_json::from_value(doc.clone()).unwrap();
    let mut lost = Vec::new();
    lost_fields(&doc, &serde_json::to_value(&typed).unwrap(), "", &mut lost);
    assert_eq!(lost, [".metadata.labelz"]);
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: run scripts/test.sh or point it at a cluster"
    );
    let out = Command::new(&kubectl)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {kubectl}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
#[ignore = "needs a Kubernetes API server (KUBECONFIG): scripts/test.sh runs it"]
fn the_api_server_accepts_the_manifests() {
    let dir = deploy();
    // The namespace and the CRDs must exist for the namespaced objects and the
    // examples to be checked; applying them is idempotent.
    for file in ["00-namespace.yaml", "01-crds.yaml"] {
        let (ok, out) = kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            dir.join(file).to_str().unwrap(),
        ]);
        assert!(ok, "{file}: {out}");
    }
    let (ok, out) = kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=30s",
        "crd/virttemplates.virtkube.io",
    ]);
    assert!(ok, "{out}");
    // A RuntimeClass's handler cannot change: where the cluster tests made
    // it already (with a dockershim node's handler), that one is checked.
    let handler = kubectl(&["get", "runtimeclass", "virtkube", "-o", "jsonpath={.handler}"]);
    let mut out = String::new();
    for file in yaml_files(&dir) {
        let mut text = std::fs::read_to_string(&file).unwrap();
        if let (true, existing) = &handler
            && !existing.trim().is_empty()
        {
            text = text.replace("\nhandler: runc\n", &format!("\nhandler: {}\n", existing.trim()));
        }
        let (ok, applied) =
            virtkube_e2e::cluster::kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&text));
        assert!(ok, "kubectl apply --dry-run=server -f {}: {applied}", file.display());
        out.push_str(&applied);
    }
    assert!(out.contains("runtimeclass.node.k8s.io/virtkube"), "{out}");
    assert!(
        out.contains("daemonset.apps/virthost") && out.contains("clusterrole.rbac.authorization.k8s.io/virtkube-vm"),
        "{out}"
    );
    for example in [
        "tiny.yaml",
        "server.yaml",
        "storage.yaml",
        "tiny-deployment.yaml",
        "disk-deployment.yaml",
        "vm-rolebinding.yaml",
        "vm-user-rolebindings.yaml",
    ] {
        let path = dir.join("examples").join(example);
        let (ok, out) = kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            path.to_str().unwrap(),
        ]);
        assert!(ok, "{example}: {out}");
    }
    // And a broken manifest is refused, so this test can fail.
    let bad = std::env::temp_dir().join(format!("virtkube-bad-{}.yaml", std::process::id()));
    std::fs::write(&bad, "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: bad, namespace: default}\nspec: {domainType: xen}\n").unwrap();
    let (ok, out) = kubectl(&["apply", "--dry-run=server", "-f", bad.to_str().unwrap()]);
    assert!(!ok, "the API server accepted domainType xen: {out}");
    std::fs::remove_file(&bad).ok();
}
