//! Publishing by server-side apply, each kind of data under its own field
//! manager, so what nodeinfo stops saying (a label, a field) disappears.
//! Conflicts (409), server errors (5xx) and transport errors are retried
//! with backoff; other errors are returned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;
use virtkube_api::node::VirtNodeStatus;
use virtkube_api::{VirtDomain, VirtNode};

use crate::model::NODE_LABEL;

/// Field manager of VirtNode and VirtDomain.
pub const MANAGER: &str = "virtkube-nodeinfo";
/// Field manager of the Node labels (separate, so labels and nothing else are owned).
pub const LABELS_MANAGER: &str = "virtkube-nodeinfo-labels";

/// Publishes one node's data.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    node: String,
    recorder: Recorder,
    attempts: u32,
    backoff: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("node", &self.node).finish()
    }
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

impl Publisher {
    /// A publisher for `node`.
    pub fn new(client: Client, node: impl Into<String>) -> Publisher {
        let node = node.into();
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(node.clone()),
        };
        Publisher {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node,
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }

    /// Sets the retry policy (tests use a short one).
    pub fn with_retry(mut self, attempts: u32, backoff: Duration) -> Publisher {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if transient(&e) && attempt < self.attempts => {
                    warn!(attempt, "{what}: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn apply(manager: &str) -> PatchParams {
        PatchParams::apply(manager).force()
    }

    /// Applies the VirtNode (spec, then status).
    pub async fn apply_node(&self, status: &VirtNodeStatus) -> Result<(), kube::Error> {
        let api: Api<VirtNode> = Api::all(self.client.clone());
        let name = self.node.as_str();
        let object = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode",
                            "metadata": {"name": name}, "spec": {"nodeName": name}});
        let params = Self::apply(MANAGER);
        let patch = Patch::Apply(&object);
        self.retry("apply VirtNode", || api.patch(name, &params, &patch))
            .await?;
        let status = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode",
                            "metadata": {"name": name}, "status": status});
        let patch = Patch::Apply(&status);
        self.retry("apply VirtNode status", || api.patch_status(name, &params, &patch))
            .await?;
        Ok(())
    }

    /// Publishes an event on a VM's pod (`kubectl describe pod` shows it).
    pub async fn pod_event(&self, pod: &crate::model::Seen, event: &crate::model::PodEvent) -> Result<(), kube::Error> {
        self.event_on_pod(&pod.namespace, &pod.pod, pod.uid.clone(), event)
            .await
    }

    /// Publishes an event on pod `namespace/name` (UID `uid`, when known).
    pub async fn event_on_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        event: &crate::model::PodEvent,
    ) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            uid,
            ..ObjectReference::default()
        };
        let event = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.into(),
            note: Some(event.note.clone()),
            action: "Observe".into(),
            secondary: None,
        };
        self.retry("publish pod event", || self.recorder.publish(&event, &reference))
            .await
    }

    /// Applies the Node's virtkube labels; labels left out are removed. A
    /// Node that does not exist is not created (apply would): returns false.
    pub async fn apply_labels(&self, labels: &BTreeMap<String, String>) -> Result<bool, kube::Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        if self.retry("get Node", || api.get_opt(&self.node)).await?.is_none() {
            return Ok(false);
        }
        let object = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": labels}});
        let params = Self::apply(LABELS_MANAGER);
        let patch = Patch::Apply(&object);
        self.retry("apply Node labels", || api.patch(&self.node, &params, &patch))
            .await?;
        Ok(true)
    }

    /// Applies a VirtDomain (from [`crate::model::virt_domain`]): the object
    /// without its status, then the status. One without a namespace or name
    /// (the model always sets both) has nowhere to go and is skipped.
    pub async fn apply_domain(&self, object: &VirtDomain) -> Result<(), kube::Error> {
        let (Some(namespace), Some(name)) = (object.metadata.namespace.as_deref(), object.metadata.name.as_deref())
        else {
            return Ok(());
        };
        let api: Api<VirtDomain> = Api::namespaced(self.client.clone(), namespace);
        // The derived serializer writes apiVersion and kind, which an apply
        // patch must carry; the status goes to its own subresource.
        let mut main = object.clone();
        let status = main.status.take();
        let params = Self::apply(MANAGER);
        let patch = Patch::Apply(&main);
        self.retry("apply VirtDomain", || api.patch(name, &params, &patch))
            .await?;
        if let Some(status) = status {
            // Only the status, so that this manager's status entry owns no spec
            // field (a typed VirtDomain would bring its spec along).
            let body = json!({"apiVersion": VirtDomain::api_version(&()), "kind": VirtDomain::kind(&()),
                              "metadata": {"name": name, "namespace": namespace}, "status": status});
            let patch = Patch::Apply(&body);
            self.retry("apply VirtDomain status", || api.patch_status(name, &params, &patch))
                .await?;
        }
        Ok(())
    }

    /// Deletes one VirtDomain (its domain is gone); absent is fine.
    pub async fn delete_domain(&self, namespace: &str, name: &str) -> Result<(), kube::Error> {
        let api: Api<VirtDomain> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams::default();
        match self.retry("delete VirtDomain", || api.delete(name, &params)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes this node's VirtDomains that are not in `keep` (namespace, name).
    pub async fn delete_stale(&self, keep: &BTreeSet<(String, String)>) -> Result<Vec<(String, String)>, kube::Error> {
        let api: Api<VirtDomain> = Api::all(self.client.clone());
        let selector = format!("{NODE_LABEL}={}", self.node);
        let params = ListParams::default().labels(&selector);
        let list = self.retry("list VirtDomains", || api.list(&params)).await?;
        let mut deleted = Vec::new();
        for domain in list {
            let key = (domain.namespace().unwrap_or_default(), domain.name_any());
            if !keep.contains(&key) {
                self.delete_domain(&key.0, &key.1).await?;
                deleted.push(key);
            }
        }
        Ok(deleted)
    }
}
