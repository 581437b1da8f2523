//! The shim's Kubernetes inputs against kube-rs's mock service (tower-test):
//! the exact requests, and 403/404 turned into messages that say what to do.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use virtkube_shim::cluster;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers one request: checks method and path, replies with `status` and `body`.
async fn answer(handle: &mut Handle, path: &str, status: StatusCode, body: Value) {
    let (request, send) = handle.next_request().await.expect("the client sent no request");
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(request.uri().path(), path);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

const TEMPLATE_PATH: &str = "/apis/virtkube.io/v1alpha1/namespaces/prod/virttemplates/tiny";

#[tokio::test]
async fn template_by_name() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let template = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtTemplate",
            "metadata": {"name": "tiny", "namespace": "prod"},
            "spec": {"memory": "192Mi", "cpu": {"count": 2}}});
        answer(&mut handle, TEMPLATE_PATH, StatusCode::OK, template).await;
    });
    let t = cluster::fetch_template(&client, "prod", "tiny").await.unwrap();
    server.await.unwrap();
    assert_eq!((t.memory_bytes, t.vcpus), (192 << 20, 2));
    assert_eq!(t.name.as_deref(), Some("tiny"));
}

#[tokio::test]
async fn missing_template_says_how_to_fix_it() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let body = status(404, "NotFound", "virttemplates.virtkube.io \"tiny\" not found");
        answer(&mut handle, TEMPLATE_PATH, StatusCode::NOT_FOUND, body).await;
    });
    let err = cluster::fetch_template(&client, "prod", "tiny").await.unwrap_err();
    server.await.unwrap();
    assert!(
        err.contains("VirtTemplate \"tiny\" not found in namespace prod")
            && err.contains("virtkube.io/template annotation"),
        "{err}"
    );
}

#[tokio::test]
async fn forbidden_template_names_the_role() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let body = status(
            403,
            "Forbidden",
            "virttemplates.virtkube.io \"tiny\" is forbidden: User \"system:serviceaccount:prod:default\" cannot get resource",
        );
        answer(&mut handle, TEMPLATE_PATH, StatusCode::FORBIDDEN, body).await;
    });
    let err = cluster::fetch_template(&client, "prod", "tiny").await.unwrap_err();
    server.await.unwrap();
    assert!(
        err.contains("may not read VirtTemplate \"tiny\" in namespace prod")
            && err.contains(
                "kubectl create rolebinding virtkube-vm --clusterrole=virtkube-vm --serviceaccount=prod:default -n prod"
            ),
        "{err}"
    );
}

#[tokio::test]
async fn an_invalid_template_from_the_api_names_the_field() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let template = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "VirtTemplate",
            "metadata": {"name": "tiny", "namespace": "prod"}, "spec": {"memory": "lots"}});
        answer(&mut handle, TEMPLATE_PATH, StatusCode::OK, template).await;
    });
    let err = cluster::fetch_template(&client, "prod", "tiny").await.unwrap_err();
    server.await.unwrap();
    assert!(
        err.contains("VirtTemplate prod/tiny") && err.contains("spec.memory: \"lots\""),
        "{err}"
    );
}

#[tokio::test]
async fn own_pod_facts() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "vm-0", "namespace": "prod", "uid": "0b0e1d8a-1111-4222-8333-444455556666",
                         "annotations": {"virtkube.io/template": "tiny", "virtkube.io/memory": "1Gi"}},
            "spec": {"containers": [{"name": "vm", "image": "vm"}]},
            "status": {"hostIP": "10.1.2.3"}});
        answer(&mut handle, "/api/v1/namespaces/prod/pods/vm-0", StatusCode::OK, pod).await;
    });
    let facts = cluster::fetch_pod(&client, "prod", "vm-0").await.unwrap();
    server.await.unwrap();
    assert_eq!(facts.uid.as_deref(), Some("0b0e1d8a-1111-4222-8333-444455556666"));
    assert_eq!(facts.annotations["virtkube.io/memory"], "1Gi");
    assert_eq!(facts.host_ip.as_deref(), Some("10.1.2.3"));
}

#[tokio::test]
async fn forbidden_pod_read_is_explained() {
    let (client, mut handle) = mock();
    let server = tokio::spawn(async move {
        let body = status(403, "Forbidden", "pods \"vm-0\" is forbidden");
        answer(
            &mut handle,
            "/api/v1/namespaces/prod/pods/vm-0",
            StatusCode::FORBIDDEN,
            body,
        )
        .await;
    });
    let err = cluster::fetch_pod(&client, "prod", "vm-0").await.unwrap_err();
    server.await.unwrap();
    assert!(err.contains("may not read pod \"vm-0\" in namespace prod"), "{err}");
}
