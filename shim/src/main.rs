//! virtkube-shim: the VM's PID 1. See the README's "The shim" section for its
//! contract: environment, flags and exit codes.

use std::collections::HashMap;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use virtkube_api::{Overrides, ResolvedTemplate, resolve};
use virtkube_shim::config::{self, Config, Mode};
use virtkube_shim::endpoint::{self, Endpoint};
use virtkube_shim::exit::Exit;
use virtkube_shim::instance::{self, Facts};
use virtkube_shim::pid1;
use virtkube_shim::render::{self, HostFacts};
use virtkube_shim::runtime::{self, log};

fn main() {
    runtime::install_logger();
    let environment = config::Environment::from_os(std::env::vars_os());
    let config = environment
        .check()
        .and_then(|()| config::args_from_os(std::env::args_os().skip(1)))
        .and_then(|args| config::from_env(|k| environment.get(k), &args));
    let config = match config {
        Ok(config) => config,
        Err(e) => finish(None, Exit::Usage(e)),
    };
    match config.mode {
        Mode::Help => {
            print!("{}", config::USAGE);
            std::process::exit(0);
        }
        Mode::Version => {
            println!("virtkube-shim {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        Mode::Run | Mode::PrintXml => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => finish(
            Some(&config),
            Exit::StartFailed(format!("cannot start the async runtime: {e}")),
        ),
    };
    let exit = runtime.block_on(async_main(&config, environment.into_map()));
    finish(Some(&config), exit)
}

/// Logs why the shim exits, leaves the reason where Kubernetes shows it
/// (`kubectl describe pod`), and exits. Never returns.
fn finish(config: Option<&Config>, exit: Exit) -> ! {
    let line = format!("exit {}: {exit}", exit.code());
    log(&line);
    let line = virtkube_shim::text::printable(&line, virtkube_shim::text::MAX_TERMINATION_MESSAGE);
    let path = config.map_or_else(|| config::DEFAULT_TERMINATION_LOG.into(), |c| c.termination_log.clone());
    // Kubernetes mounts the file; elsewhere (Docker) it does not exist and is not created.
    if path.exists() {
        let _ = std::fs::write(&path, format!("{line}\n"));
    }
    std::process::exit(exit.code())
}

async fn async_main(config: &Config, env: HashMap<String, String>) -> Exit {
    let mut signals = match forward_signals() {
        Ok(rx) => rx,
        Err(e) => return Exit::StartFailed(format!("cannot install signal handlers: {e}")),
    };
    let sys = pid1::Linux;
    match pid1::take_init_duty(&sys) {
        Ok(true) => {}
        Ok(false) => log("not PID 1: reaping orphans as a subreaper"),
        Err(e) => log(format!("cannot become a subreaper ({e}); orphans may stay zombies")),
    }
    tokio::spawn(reap_on_sigchld());

    // Until the VM exists there is nothing to stop: a stop signal ends the
    // shim at once, also while it waits for a file or the Kubernetes API.
    let loaded = tokio::select! {
        loaded = load(config, env) => loaded,
        signal = runtime::stop_signal(&mut signals) => {
            log(format!("signal {signal} before the VM started: exiting"));
            return Exit::Signal(signal);
        }
    };
    let (template, facts, endpoint) = match loaded {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    if config.mode == Mode::PrintXml {
        // Without a connection the node's facts are unknown: assume TCG (no KVM).
        return match render::render(&template, &facts.instance, &HostFacts::qemu(false)) {
            Ok(xml) => {
                print!("{xml}");
                Exit::PrintedXml
            }
            Err(e) => Exit::StartFailed(e.to_string()),
        };
    }
    runtime::run(config, &endpoint, &template, &facts.instance, &mut signals).await
}

/// Most bytes of pod annotations read: Kubernetes allows 256 KiB in all.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Reads a text file of at most `max` bytes (`/dev/zero` must not grow to
/// gigabytes), off the async runtime (a FIFO or a stalled network filesystem
/// must not keep signals from being handled).
async fn read_capped(path: &std::path::Path, max: usize) -> std::io::Result<String> {
    use std::io::Read;
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::fs::File::open(&path)?
            .take(max as u64 + 1)
            .read_to_string(&mut text)?;
        if text.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it is larger than the {max} bytes the shim reads"),
            ));
        }
        Ok(text)
    });
    read.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

async fn load(config: &Config, env: HashMap<String, String>) -> Result<(ResolvedTemplate, Facts, Endpoint), Exit> {
    #[cfg_attr(not(feature = "kube"), allow(unused_mut))]
    let mut annotations = match read_capped(&config.annotations_file, MAX_ANNOTATIONS_BYTES).await {
        Ok(text) => Some(instance::parse_downward_annotations(&text).map_err(Exit::Usage)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Exit::Usage(format!(
                "cannot read the annotations file {}: {e}",
                config.annotations_file.display()
            )));
        }
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    #[cfg_attr(not(feature = "kube"), allow(unused_mut))]
    let mut env = env;
    let socket_mounted = std::path::Path::new(endpoint::DEFAULT_SOCKET).exists();
    #[cfg_attr(not(feature = "kube"), allow(unused_variables))]
    let need_node = config.uri.is_none() && !socket_mounted && !env.contains_key("HOST_IP");
    #[cfg(feature = "kube")]
    let api = cluster_inputs(&mut env, &mut annotations, &hostname, need_node).await?;
    let endpoint = endpoint::choose(&endpoint::Clues {
        explicit_uri: config.uri.as_deref(),
        socket_mounted,
        host_ip: env.get("HOST_IP").map(String::as_str),
    })
    .map_err(|e| Exit::StartFailed(e.to_string()))?;
    if let endpoint::Source::NodeTcp { host_ip } = &endpoint.source {
        log(format!(
            "no libvirt socket at {}: using the virthost of node {host_ip} over TCP ({}, unauthenticated)",
            endpoint::DEFAULT_SOCKET,
            endpoint.uri
        ));
    }
    let facts = instance::gather(
        |k| env.get(k).cloned(),
        annotations.unwrap_or_default(),
        &hostname,
        config.template_name.clone(),
    )
    .map_err(Exit::Usage)?;
    let mut template = match &facts.instance.template_name {
        #[cfg(feature = "kube")]
        Some(name) if virtkube_shim::cluster::in_cluster() => {
            let namespace = facts.instance.namespace.clone().unwrap_or_else(|| "default".into());
            let client = match api {
                Some(client) => client,
                None => virtkube_shim::cluster::client().await.map_err(Exit::StartFailed)?,
            };
            log(format!(
                "reading VirtTemplate {namespace}/{name} from the Kubernetes API"
            ));
            virtkube_shim::cluster::fetch_template(&client, &namespace, name)
                .await
                .map_err(Exit::StartFailed)?
        }
        // The named template wins wherever it can be read; elsewhere naming one
        // is an error, never a silent switch to the baked file under its name.
        Some(name) if !config.template_file.exists() => {
            return Err(Exit::StartFailed(format!(
                "template {name:?} is to be read from the Kubernetes API, but this shim is not running in a pod with a service account; bake the template into the image at {}",
                config.template_file.display()
            )));
        }
        Some(name) => {
            return Err(Exit::StartFailed(format!(
                "template {name:?} is named (VIRTKUBE_TEMPLATE or the virtkube.io/template annotation), but this shim is not running in a pod with a service account, so it cannot be read; the image's baked template {} would run under a name that is not its own: remove the name to use the baked template",
                config.template_file.display()
            )));
        }
        _ => {
            let text = read_capped(&config.template_file, virtkube_api::resolve::MAX_TEMPLATE_BYTES)
                .await
                .map_err(|e| {
                Exit::StartFailed(format!(
                    "cannot read the template file {}: {e} (bake a VirtTemplate into the image there, or set VIRTKUBE_TEMPLATE_FILE)",
                    config.template_file.display()
                ))
            })?;
            resolve::parse_yaml(&text)
                .map_err(|e| Exit::StartFailed(format!("{}: {e}", config.template_file.display())))?
        }
    };
    Overrides::from_annotations(&facts.annotations)
        .and_then(|o| o.apply(&mut template))
        .map_err(|e| Exit::StartFailed(e.to_string()))?;
    let mut facts = facts;
    if facts.instance.template_name.is_none() {
        facts.instance.template_name = template.name.clone();
    }
    Ok((template, facts, endpoint))
}

/// In a pod without downward API settings (bare `kubectl run`), asks the API
/// for the pod's identity and annotations, and for its node's IP when `need_node`
/// (no libvirt socket mounted). Returns the client when it made one.
#[cfg(feature = "kube")]
async fn cluster_inputs(
    env: &mut HashMap<String, String>,
    annotations: &mut Option<std::collections::BTreeMap<String, String>>,
    hostname: &str,
    need_node: bool,
) -> Result<Option<kube::Client>, Exit> {
    use virtkube_shim::cluster;
    let identity_known = env.contains_key("POD_NAME") && annotations.is_some();
    // A client costs memory and time (TLS set-up): only made when something is to be read.
    if !cluster::in_cluster() || (identity_known && !need_node) {
        return Ok(None);
    }
    let client = cluster::client().await.map_err(Exit::StartFailed)?;
    let namespace = match env.get("POD_NAMESPACE") {
        Some(ns) => ns.clone(),
        None => std::fs::read_to_string(cluster::NAMESPACE_FILE)
            .map(|s| s.trim().to_owned())
            .map_err(|e| Exit::Usage(format!("cannot read {}: {e}", cluster::NAMESPACE_FILE)))?,
    };
    let name = env
        .get("POD_NAME")
        .cloned()
        .unwrap_or_else(|| hostname.trim().to_owned());
    let mut pod = match cluster::fetch_pod(&client, &namespace, &name).await {
        Ok(pod) => pod,
        // Only the node's IP was wanted: without it the shim waits for the socket.
        Err(e) if identity_known => {
            log(format!("cannot look up the node for the TCP fallback: {e}"));
            return Ok(Some(client));
        }
        Err(e) => return Err(Exit::StartFailed(e)),
    };
    // The kubelet can start the container before the API has its status.hostIP.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while need_node && pod.host_ip.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match cluster::fetch_pod(&client, &namespace, &name).await {
            Ok(again) => pod = again,
            Err(e) => {
                log(format!("cannot read the pod's hostIP: {e}"));
                break;
            }
        }
    }
    env.entry("POD_NAMESPACE".into()).or_insert(namespace);
    env.entry("POD_NAME".into()).or_insert(name);
    if let Some(uid) = pod.uid {
        env.entry("POD_UID".into()).or_insert(uid);
    }
    if annotations.is_none() {
        *annotations = Some(pod.annotations);
    }
    if let Some(host_ip) = pod.host_ip {
        env.entry("HOST_IP".into()).or_insert(host_ip);
    }
    Ok(Some(client))
}

/// Delivers SIGTERM, SIGINT, SIGQUIT and SIGHUP as numbers.
fn forward_signals() -> std::io::Result<mpsc::Receiver<runtime::Signal>> {
    let (tx, rx) = mpsc::channel(16);
    for (kind, number) in [
        (SignalKind::terminate(), 15),
        (SignalKind::interrupt(), 2),
        (SignalKind::quit(), 3),
        (SignalKind::hangup(), 1),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send((number, tokio::time::Instant::now())).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

async fn reap_on_sigchld() {
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        log("cannot watch SIGCHLD; orphans may stay zombies");
        return;
    };
    loop {
        for (pid, status) in pid1::reap_zombies(&pid1::Linux) {
            log(format!("reaped orphan {pid} (status {status:#x})"));
        }
        // Also wake periodically: SIGCHLDs coalesce.
        let _ = tokio::time::timeout(Duration::from_secs(30), sigchld.recv()).await;
    }
}
