//! Inputs from the Kubernetes API (cargo feature `kube`): the VirtTemplate by
//! name, and the shim's own pod (UID, annotations, node IP) when the downward
//! API did not provide them. Uses the pod's service account.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use virtkube_api::{ResolvedTemplate, VirtTemplate, resolve};

/// Where the service account's namespace is mounted.
pub use crate::startup::NAMESPACE_FILE;

pub use crate::startup::PodFacts;

/// Whether the process runs in a Kubernetes pod with a service account.
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && std::path::Path::new(NAMESPACE_FILE).exists()
}

/// Where the service account's token is mounted.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where the cluster's CA certificate is mounted.
pub const CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// A client from the in-cluster service account, and only that: kube's own
/// TLS and auth set-up also carries kubeconfig and exec-plugin support (a YAML
/// parser, JSONPath, regex), about 1 MiB more in the static shim and more of it
/// resident. The shim reads the API only while it starts, so the token and CA
/// are read once.
pub async fn client() -> Result<Client, String> {
    use kube::client::ConfigExt;
    use tower::ServiceExt;
    let failed =
        |e: &dyn std::fmt::Display| format!("cannot use the pod's service account to reach the Kubernetes API: {e}");
    let config = kube::Config::incluster().map_err(|e| failed(&e))?;
    let token = std::fs::read_to_string(TOKEN_FILE).map_err(|e| failed(&format!("{TOKEN_FILE}: {e}")))?;
    let mut bearer = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        .map_err(|_| failed(&format!("{TOKEN_FILE} does not hold a usable token")))?;
    bearer.set_sensitive(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config().map_err(|e| failed(&e))?)
        .https_only()
        .enable_http1()
        .build();
    let http_client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_request(move |mut request: http::Request<kube::client::Body>| {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, bearer.clone());
            request
        })
        .service(http_client)
        .map_err(tower::BoxError::from);
    Ok(Client::new(service, config.default_namespace))
}

/// TLS that trusts the cluster's CA only.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(CA_FILE).map_err(|e| format!("{CA_FILE}: {e}"))? {
        let cert = cert.map_err(|e| format!("{CA_FILE}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{CA_FILE}: {e}"))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
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
        _ => format!("cannot read {what} from the Kubernetes API: {}", describe(&e)),
    }
}

/// The errors a GET through [`client`]'s stack can give, described without
/// `kube::Error`'s own Display: that one also formats kubeconfig and exec-auth
/// errors, whose code (a YAML parser's error reports, JSONPath, regex) would
/// otherwise stay in the static shim although this client never makes them.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({}, HTTP {})", status.message, status.reason, status.code),
        kube::Error::HyperError(e) => format!("HTTP: {e}"),
        kube::Error::Service(e) => format!("connection: {e}"),
        kube::Error::HttpError(e) => format!("HTTP request: {e}"),
        kube::Error::SerdeError(e) => format!("unexpected reply: {e}"),
        kube::Error::BuildRequest(e) => format!("request: {e}"),
        kube::Error::RustlsTls(e) => format!("TLS: {e}"),
        kube::Error::ReadEvents(e) => format!("reading the reply: {e}"),
        _ => "an error this client does not make (kubeconfig, auth plugin or discovery)".to_owned(),
    }
}

/// Reads and validates the VirtTemplate `name` in `namespace`.
pub async fn fetch_template(client: &Client, namespace: &str, name: &str) -> Result<ResolvedTemplate, String> {
    let api: Api<VirtTemplate> = Api::namespaced(client.clone(), namespace);
    let template = within_timeout(api.get(name), &format!("VirtTemplate {namespace}/{name}"))
        .await?
        .map_err(|e| {
            explain(
                e,
                &format!("VirtTemplate {name:?}"),
                namespace,
                "create it (kubectl apply -f your-template.yaml) or fix the virtkube.io/template annotation",
            )
        })?;
    resolve::resolve(Some(name.to_owned()), &template.spec).map_err(|e| format!("VirtTemplate {namespace}/{name}: {e}"))
}

/// Reads ImageFile `name` in `namespace`.
pub async fn fetch_image_file(client: &Client, namespace: &str, name: &str) -> Result<virtkube_api::ImageFile, String> {
    let api: Api<virtkube_api::ImageFile> = Api::namespaced(client.clone(), namespace);
    within_timeout(api.get(name), &format!("ImageFile {namespace}/{name}"))
        .await?
        .map_err(|e| {
            explain(
                e,
                &format!("ImageFile {name:?}"),
                namespace,
                "create it (docs/images.md) or fix the disk's imageFile",
            )
        })
}

/// Longest one request to the Kubernetes API may take.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn within_timeout<T>(request: impl Future<Output = T>, what: &str) -> Result<T, String> {
    tokio::time::timeout(API_TIMEOUT, request).await.map_err(|_| {
        format!(
            "the Kubernetes API did not answer within {} s when reading {what}; is the API server reachable from this pod?",
            API_TIMEOUT.as_secs()
        )
    })
}

/// Reads the shim's own pod.
pub async fn fetch_pod(client: &Client, namespace: &str, name: &str) -> Result<PodFacts, String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = within_timeout(api.get(name), &format!("pod {namespace}/{name}"))
        .await?
        .map_err(|e| {
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
