//! virtkube-sched: serves kube-scheduler's extender calls (`POST /filter`,
//! `POST /prioritize`, `GET /healthz`) from reflectors of the VirtNodes and
//! VirtTemplates. See docs/scheduling.md.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};
use virtkube_api::node::VirtNodeStatus;
use virtkube_api::{VirtNode, VirtTemplate, VirtTemplateSpec};
use virtkube_sched::extender::{self, Cluster, ExtenderArgs};

/// The largest call read (a full node list, without nodeCacheCapable, of a
/// thousand nodes; with it a call is a few KiB).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections served at once (kube-scheduler keeps one or two).
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const USAGE: &str =
    "usage: virtkube-sched [--listen ADDRESS:PORT]   (default 0.0.0.0:8888; RUST_LOG sets the log level)";

/// The cluster as the reflectors see it.
struct Stores {
    nodes: Store<VirtNode>,
    templates: Store<VirtTemplate>,
}

impl Cluster for Stores {
    fn with_virt_node<R>(&self, name: &str, f: impl FnOnce(Option<&VirtNodeStatus>) -> R) -> R {
        let node = self.nodes.get(&reflector::ObjectRef::new(name));
        f(node.as_ref().and_then(|node| node.status.as_ref()))
    }

    fn template(&self, namespace: &str, name: &str) -> Option<VirtTemplateSpec> {
        self.templates
            .get(&reflector::ObjectRef::new(name).within(namespace))
            .map(|t| t.spec.clone())
    }

    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let mut listen: SocketAddr = ([0, 0, 0, 0], 8888).into();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(value)) => match value.parse() {
                Ok(address) => listen = address,
                Err(e) => {
                    eprintln!("virtkube-sched: --listen {value:?}: {e}\n{USAGE}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("virtkube-sched: unknown argument {arg:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("virtkube-sched: cannot start the async runtime: {e}");
            std::process::exit(1);
        });
    if let Err(e) = runtime.block_on(serve(listen)) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let (nodes, nodes_writer) = reflector::store();
    let (templates, templates_writer) = reflector::store();
    tokio::spawn(
        watcher(kube::Api::<VirtNode>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(nodes_writer)
            .for_each(log_errors("VirtNodes")),
    );
    tokio::spawn(
        watcher(kube::Api::<VirtTemplate>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(templates_writer)
            .for_each(log_errors("VirtTemplates")),
    );
    // Not before the first lists: a call answered from empty stores would
    // refuse every node ("no virthost").
    info!("reading the VirtNodes and VirtTemplates");
    nodes.wait_until_ready().await.context("the VirtNode watch ended")?;
    templates
        .wait_until_ready()
        .await
        .context("the VirtTemplate watch ended")?;
    let stores = Arc::new(Stores { nodes, templates });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(%listen, "virtkube-sched ready: POST /filter, /prioritize");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => {
                info!("SIGTERM: stopping");
                return Ok(());
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!("{MAX_CONNECTIONS} connections are open: refusing another");
            continue;
        };
        let stores = stores.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| answer(request, stores.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            // A client that trickles its request does not hold a connection.
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(io, service);
            if let Err(e) = served.await {
                warn!(error = %e, "a connection failed");
            }
        });
    }
}

/// A watch's errors are logged; the watcher retries with backoff.
fn log_errors<T>(what: &'static str) -> impl FnMut(Result<T, watcher::Error>) -> std::future::Ready<()> {
    move |event| {
        if let Err(e) = event {
            warn!(error = %e, "watching {what} failed; retrying");
        }
        std::future::ready(())
    }
}

async fn answer(request: Request<Incoming>, stores: Arc<Stores>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(response)
    };
    let verb = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => return reply(StatusCode::OK, "\"ok\"".into()),
        (&Method::POST, "/filter") => "filter",
        (&Method::POST, "/prioritize") => "prioritize",
        (method, path) => {
            return reply(
                StatusCode::NOT_FOUND,
                serde_json::json!({"Error": format!("{method} {path}: virtkube-sched serves POST /filter and POST /prioritize")}).to_string(),
            );
        }
    };
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect());
    let body = match read.await {
        Ok(Ok(body)) => body.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({"Error": format!("the {verb} call's body did not arrive within {} s", REQUEST_TIMEOUT.as_secs())}).to_string(),
            );
        }
        Ok(Err(e)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"Error": format!("cannot read the {verb} call: {e}")}).to_string(),
            );
        }
    };
    let args: ExtenderArgs = match serde_json::from_slice(&body) {
        Ok(args) => args,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"Error": format!("the {verb} call is not ExtenderArgs JSON: {e}")}).to_string(),
            );
        }
    };
    let body = if verb == "filter" {
        let result = extender::filter(&args, stores.as_ref());
        if !result.failed_nodes.is_empty() {
            info!(
                pod = args.pod.as_ref().and_then(|p| p.metadata.name.as_deref()).unwrap_or("?"),
                passed = result.node_names.as_ref().map_or(0, Vec::len),
                failed = ?result.failed_nodes,
                "filtered"
            );
        }
        serde_json::to_string(&result)
    } else {
        serde_json::to_string(&extender::prioritize(&args, stores.as_ref()))
    };
    tracing::debug!(verb, elapsed = ?started.elapsed(), "answered");
    match body {
        Ok(body) => reply(StatusCode::OK, body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"Error": e.to_string()}).to_string(),
        ),
    }
}
