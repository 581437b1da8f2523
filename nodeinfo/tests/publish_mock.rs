//! The exact server-side-apply requests nodeinfo sends, against kube-rs's mock
//! service (tower-test): VirtNode spec and status, Node labels under their own
//! field manager, VirtDomain with its owner, stale deletion, and retries.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use virtkube_api::VirtDomain;
use virtkube_api::node::VirtNodeStatus;
use virtkube_nodeinfo::publish::Publisher;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Publisher, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let publisher = Publisher::new(Client::new(service, "default"), "node-1").with_retry(3, Duration::from_millis(1));
    (publisher, handle)
}

struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

async fn expect(handle: &mut Handle, status: StatusCode, reply: Value) -> Seen {
    let (request, send) = handle.next_request().await.expect("no request");
    let (parts, body) = request.into_parts();
    let bytes = http_body_util_collect(body).await;
    let seen = Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
    };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    seen
}

async fn http_body_util_collect(body: Body) -> Vec<u8> {
    body.collect_bytes().await.unwrap().to_vec()
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": reason, "reason": reason, "code": code})
}

fn echo(body: &Value) -> Value {
    body.clone()
}

#[tokio::test]
async fn virtnode_is_applied_spec_then_status_with_its_field_manager() {
    let (publisher, mut handle) = mock();
    let status = VirtNodeStatus {
        arch: Some("x86_64".into()),
        kvm: Some(false),
        cpus: Some(2),
        ..Default::default()
    };
    let task = tokio::spawn(async move { publisher.apply_node(&status).await });
    let spec = expect(
        &mut handle,
        StatusCode::OK,
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode", "metadata": {"name": "node-1"}, "spec": {}}),
    )
    .await;
    assert_eq!(spec.method, Method::PATCH);
    assert_eq!(spec.path, "/apis/virtkube.io/v1alpha1/virtnodes/node-1");
    let mut params: Vec<&str> = spec.query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort();
    assert_eq!(params, ["fieldManager=virtkube-nodeinfo", "force=true"]);
    assert_eq!(spec.content_type, "application/apply-patch+yaml");
    assert_eq!(
        spec.body,
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode", "metadata": {"name": "node-1"}, "spec": {"nodeName": "node-1"}})
    );
    let st = expect(
        &mut handle,
        StatusCode::OK,
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode", "metadata": {"name": "node-1"}, "spec": {}}),
    )
    .await;
    assert_eq!(st.path, "/apis/virtkube.io/v1alpha1/virtnodes/node-1/status");
    assert_eq!(st.body["status"], json!({"arch": "x86_64", "kvm": false, "cpus": 2}));
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn labels_have_their_own_field_manager_and_a_conflict_is_retried() {
    let (publisher, mut handle) = mock();
    let labels = BTreeMap::from([
        ("virtkube.io/kvm".to_owned(), "false".to_owned()),
        ("cpu-model.virtkube.io/qemu64".to_owned(), "true".to_owned()),
    ]);
    let task = tokio::spawn(async move { publisher.apply_labels(&labels).await });
    let get = expect(
        &mut handle,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
    )
    .await;
    assert_eq!((get.method, get.path.as_str()), (Method::GET, "/api/v1/nodes/node-1"));
    let first = expect(&mut handle, StatusCode::CONFLICT, status(409, "Conflict")).await;
    assert_eq!(first.path, "/api/v1/nodes/node-1");
    assert!(
        first.query.contains("fieldManager=virtkube-nodeinfo-labels"),
        "{}",
        first.query
    );
    assert_eq!(
        first.body,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"virtkube.io/kvm": "false", "cpu-model.virtkube.io/qemu64": "true"}}})
    );
    let second = expect(
        &mut handle,
        StatusCode::INTERNAL_SERVER_ERROR,
        status(500, "InternalError"),
    )
    .await;
    assert_eq!(second.body, first.body);
    let third = expect(
        &mut handle,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
    )
    .await;
    assert_eq!(third.body, first.body);
    assert!(task.await.unwrap().unwrap());
}

#[tokio::test]
async fn labels_never_create_a_missing_node() {
    let (publisher, mut handle) = mock();
    let task = tokio::spawn(async move { publisher.apply_labels(&BTreeMap::new()).await });
    let get = expect(&mut handle, StatusCode::NOT_FOUND, status(404, "NotFound")).await;
    assert_eq!(get.method, Method::GET);
    assert!(
        !task.await.unwrap().unwrap(),
        "reported labels as published on a missing Node"
    );
}

#[tokio::test]
async fn a_forbidden_patch_is_not_retried() {
    let (publisher, mut handle) = mock();
    let task = tokio::spawn(async move { publisher.apply_labels(&BTreeMap::new()).await });
    expect(
        &mut handle,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
    )
    .await;
    expect(&mut handle, StatusCode::FORBIDDEN, status(403, "Forbidden")).await;
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("Forbidden"), "{err}");
}

#[tokio::test]
async fn virtdomain_is_applied_with_owner_then_status() {
    let (publisher, mut handle) = mock();
    let object = json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomain",
        "metadata": {"name": "vm-0", "namespace": "prod", "labels": {"virtkube.io/node": "node-1"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "vm-0", "uid": "u-1",
                                          "blockOwnerDeletion": false, "controller": false}]},
        "spec": {"node": "node-1", "domainName": "prod_vm-0"},
        "status": {"state": "Running"}
    });
    let sent: VirtDomain = serde_json::from_value(object.clone()).unwrap();
    let task = tokio::spawn(async move { publisher.apply_domain(&sent).await });
    let main = expect(&mut handle, StatusCode::OK, echo(&object)).await;
    assert_eq!(main.method, Method::PATCH);
    assert_eq!(main.path, "/apis/virtkube.io/v1alpha1/namespaces/prod/virtdomains/vm-0");
    let mut params: Vec<&str> = main.query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort();
    assert_eq!(params, ["fieldManager=virtkube-nodeinfo", "force=true"]);
    assert_eq!(main.content_type, "application/apply-patch+yaml");
    // The typed object as sent: apiVersion and kind (apply needs them), its
    // owner and label, and no status (that goes to the status subresource).
    let mut without_status = object.clone();
    without_status.as_object_mut().unwrap().remove("status");
    assert_eq!(main.body, without_status);
    let st = expect(&mut handle, StatusCode::OK, echo(&object)).await;
    assert_eq!(
        st.path,
        "/apis/virtkube.io/v1alpha1/namespaces/prod/virtdomains/vm-0/status"
    );
    assert!(st.query.contains("fieldManager=virtkube-nodeinfo"), "{}", st.query);
    assert_eq!(
        st.body,
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomain",
               "metadata": {"name": "vm-0", "namespace": "prod"}, "status": {"state": "Running"}}),
        "only the status, without the spec"
    );
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn stale_virtdomains_of_this_node_are_deleted() {
    let (publisher, mut handle) = mock();
    let keep = BTreeSet::from([("prod".to_owned(), "alive".to_owned())]);
    let task = tokio::spawn(async move { publisher.delete_stale(&keep).await });
    let item = |ns: &str, name: &str| json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomain", "metadata": {"name": name, "namespace": ns}, "spec": {"node": "node-1", "domainName": format!("{ns}_{name}")}});
    let list = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtDomainList", "metadata": {}, "items": [item("prod", "alive"), item("prod", "gone"), item("dev", "gone2")]});
    let listed = expect(&mut handle, StatusCode::OK, list).await;
    assert_eq!(listed.method, Method::GET);
    assert_eq!(listed.path, "/apis/virtkube.io/v1alpha1/virtdomains");
    assert!(
        listed.query.contains("labelSelector=virtkube.io%2Fnode%3Dnode-1"),
        "{}",
        listed.query
    );
    let d1 = expect(&mut handle, StatusCode::OK, item("prod", "gone")).await;
    assert_eq!(
        (d1.method, d1.path.as_str()),
        (
            Method::DELETE,
            "/apis/virtkube.io/v1alpha1/namespaces/prod/virtdomains/gone"
        )
    );
    // Already gone: a 404 is fine.
    let d2 = expect(&mut handle, StatusCode::NOT_FOUND, status(404, "NotFound")).await;
    assert_eq!(d2.path, "/apis/virtkube.io/v1alpha1/namespaces/dev/virtdomains/gone2");
    let deleted = task.await.unwrap().unwrap();
    assert_eq!(
        deleted,
        [
            ("prod".to_owned(), "gone".to_owned()),
            ("dev".to_owned(), "gone2".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_pod_event_is_created_on_the_pod_by_nodeinfo_of_this_node() {
    let (publisher, mut handle) = mock();
    let seen = virtkube_nodeinfo::model::Seen {
        namespace: "prod".into(),
        pod: "vm-0".into(),
        uid: Some("4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b".into()),
        start: "2026-11-23T10:00:00Z".into(),
        qemu_pid: Some(42),
        memory: None,
        reattachments: 1,
    };
    let event = virtkube_nodeinfo::model::PodEvent {
        warning: true,
        reason: "OOMKilled",
        note: "the kernel killed QEMU".into(),
    };
    let task = tokio::spawn(async move { publisher.pod_event(&seen, &event).await });
    let created = expect(&mut handle, StatusCode::CREATED, json!({})).await;
    assert_eq!(created.method, Method::POST);
    assert_eq!(created.path, "/apis/events.k8s.io/v1/namespaces/prod/events");
    let body = &created.body;
    assert_eq!(body["type"], "Warning");
    assert_eq!(body["reason"], "OOMKilled");
    assert_eq!(body["note"], "the kernel killed QEMU");
    assert_eq!(body["regarding"]["kind"], "Pod");
    assert_eq!(body["regarding"]["name"], "vm-0");
    assert_eq!(body["regarding"]["uid"], "4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b");
    assert_eq!(body["reportingController"], "virtkube-nodeinfo");
    assert_eq!(body["reportingInstance"], "node-1");
    task.await.unwrap().unwrap();
}
