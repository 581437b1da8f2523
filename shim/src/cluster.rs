//! Inputs from the Kubernetes API (cargo feature `kube`): the VirtTemplate by
//! name, and the shim's own pod (UID, annotations, node IP) when the downward
//! API did not provide them. Uses the pod's service account.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use virtkube_api::{ResolvedTemplate, VirtTemplate, resolve};

/// Where the service account's namespace is mounted.
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// What the API says about the shim's own pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// metadata.uid.
    pub uid: Option<String>,
    /// metadata.annotations.
    pub annotations: BTreeMap<String, String>,
    /// status.hostIP: the node, for reaching its virthost over TCP.
    pub host_ip: Option<String>,
}

/// Whether the process runs in a Kubernetes pod with a service account.
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && std::path::Path::new(NAMESPACE_FILE).exists()
}

/// A client from the in-cluster service account.
pub async fn client() -> Result<Client, String> {
    Client::try_default()
        .await
        .map_err(|e| format!("cannot use the pod's service account to reach the Kubernetes API: {e}"))
}

fn explain(e: kube::Error, what: &str, namespace: &str, fix_missing: &str) -> String {
    match &e {
        kube::Error::Api(status) if status.code == 404 => {
            format!("{what} not found in namespace {namespace}: {fix_missing}")
        }
        kube::Error::Api(status) if status.code == 403 => format!(
            "the pod's service account may not read {what} in namespace {namespace} ({}): bind it to the virtkube-vm ClusterRole of deploy/02-rbac.yaml (kubectl create rolebinding virtkube-vm --clusterrole=virtkube-vm --serviceaccount={namespace}:default -n {namespace})",
            status.message
        ),
        _ => format!("cannot read {what} from the Kubernetes API: {e}"),
    }
}

/// Reads and validates the VirtTemplate `name` in `namespace`.
pub async fn fetch_template(client: &Client, namespace: &str, name: &str) -> Result<ResolvedTemplate, String> {
    let api: Api<VirtTemplate> = Api::namespaced(client.clone(), namespace);
    let template = api.get(name).await.map_err(|e| {
        explain(
            e,
            &format!("VirtTemplate {name:?}"),
            namespace,
            "create it (kubectl apply -f your-template.yaml) or fix the virtkube.io/template annotation",
        )
    })?;
    resolve::resolve(Some(name.to_owned()), &template.spec).map_err(|e| format!("VirtTemplate {namespace}/{name}: {e}"))
}

/// Reads the shim's own pod.
pub async fn fetch_pod(client: &Client, namespace: &str, name: &str) -> Result<PodFacts, String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = api.get(name).await.map_err(|e| {
        explain(
            e,
            &format!("pod {name:?}"),
            namespace,
            "the pod name is taken from the hostname; set POD_NAME and POD_NAMESPACE from the downward API",
        )
    })?;
    Ok(PodFacts {
        uid: pod.metadata.uid,
        annotations: pod.metadata.annotations.unwrap_or_default(),
        host_ip: pod.status.and_then(|s| s.host_ip),
    })
}
