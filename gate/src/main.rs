//! virtkube-gate: see docs/gate.md for the flags, the policy and what it refuses.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use std::net::SocketAddr;
use tokio::net::{TcpListener, UnixListener};
use virtkube_gate::config::{self, GateConfig};
use virtkube_gate::relay::{self, Gate};

const USAGE: &str = "\
virtkube-gate: lets each VM container create and control its own libvirt domain, and nothing else.

usage: virtkube-gate [--config FILE] [--listen PATH] [--libvirtd PATH] [--proc PATH] [--images-root DIR]...
                     [--max-memory-kib N] [--max-vcpus N] [--interface-types LIST] [--uri URI]...
                     [--kubepods-parent PATH] [--network-disks allow|deny]
                     [--max-connections-per-caller N] [--qemu-overhead-mib N]
                     [--listen-tcp ADDRESS:PORT [--node NAME]]

  --config FILE           the policy file (YAML, see docs/gate.md); flags override it
  --listen PATH           the socket VM containers mount (default /var/run/virtkube/libvirt-sock)
  --libvirtd PATH         libvirtd's own socket (default /var/run/libvirt/libvirt-sock)
  --proc PATH             the host's /proc (the gate needs the host's PID namespace; default /proc)
  --images-root DIR       a directory VM files may come from; repeatable (default /var/lib/virtkube/images)
  --max-memory-kib N      most memory one VM may have (default 67108864: 64 GiB)
  --max-vcpus N           most vCPUs one VM may have (default 64)
  --interface-types LIST  comma-separated interface types VMs may use (default pod,user,network)
  --uri URI               a connection URI VMs may open; repeatable (default qemu:///system)
  --kubepods-parent PATH  the cgroup the kubelet's kubepods cgroup is under (its --cgroup-root; default /)
  --network-disks allow|deny  whether VMs may use nbd/rbd/iscsi disks with the node's credentials (default deny)
  --max-connections-per-caller N  connections one pod or container may hold at once (default 4)
  --qemu-overhead-mib N   QEMU's memory beyond the guest's: a VM's pod (or Docker container) must allow
                          guest memory + N MiB, or its create is refused (default 128)
  --listen-tcp ADDRESS:PORT   also serve VM pods over TCP (e.g. 0.0.0.0:16509), each known by its pod IP
                          among the pods of this node, read from the Kubernetes API (in-cluster config)
  --node NAME             the node whose pods may call over TCP (default: $NODE_NAME)

Logs go to stderr; RUST_LOG filters them (default info).
";

struct Args {
    listen: PathBuf,
    /// Where to serve VM pods over TCP, and the node whose pods they are.
    tcp: Option<(SocketAddr, String)>,
    /// This node (to watch its pods for ImageFile disks).
    node: Option<String>,
    gate: Gate,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args> {
    let mut listen = PathBuf::from("/var/run/virtkube/libvirt-sock");
    let mut gate = Gate::default();
    let (mut roots, mut uris) = (Vec::new(), Vec::new());
    let (mut listen_tcp, mut node) = (None, std::env::var("NODE_NAME").ok());
    let args: Vec<String> = args.into_iter().collect();
    // The policy file first, wherever --config stands: flags override it.
    if let Some(at) = args.iter().position(|a| a == "--config") {
        let path = args
            .get(at + 1)
            .context("--config needs a value; run with --help for usage")?;
        let text = read_config(path)?;
        GateConfig::parse(&text)
            .and_then(|config| config.apply(&mut gate))
            .with_context(|| format!("--config {path}"))?;
    }
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            print!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value; run with --help for usage"))?;
        let number = |what: &str| {
            value
                .parse::<u64>()
                .with_context(|| format!("{what} {value:?} is not a whole number"))
        };
        match flag.as_str() {
            "--config" => {}
            "--listen" => listen = value.into(),
            "--listen-tcp" => {
                listen_tcp = Some(
                    value
                        .parse::<SocketAddr>()
                        .with_context(|| format!("--listen-tcp {value:?} is not ADDRESS:PORT (e.g. 0.0.0.0:16509)"))?,
                )
            }
            "--node" => node = Some(value),
            "--libvirtd" => gate.libvirtd = value.into(),
            "--proc" => gate.proc_root = value.into(),
            "--images-root" => roots.push(PathBuf::from(value)),
            "--max-memory-kib" => gate.policy.max_memory_kib = number("--max-memory-kib")?,
            "--max-vcpus" => {
                gate.policy.max_vcpus = u32::try_from(number("--max-vcpus")?).context("--max-vcpus is too large")?
            }
            "--interface-types" => {
                gate.policy.interface_types = value.split(',').map(|t| t.trim().to_owned()).collect()
            }
            "--uri" => uris.push(value),
            "--max-connections-per-caller" => {
                gate.max_connections_per_caller = match number("--max-connections-per-caller")? {
                    0 => bail!("--max-connections-per-caller 0 would refuse every VM container"),
                    n => usize::try_from(n).context("--max-connections-per-caller is too large")?,
                }
            }
            "--kubepods-parent" => gate.kubepods_parent = value,
            "--qemu-overhead-mib" => {
                gate.qemu_overhead = number("--qemu-overhead-mib")?
                    .checked_mul(1024 * 1024)
                    .context("--qemu-overhead-mib is too large")?
            }
            "--network-disks" => {
                gate.policy.network_disks = config::network_disks(&value).map_err(anyhow::Error::msg)?
            }
            other => bail!("unknown flag {other:?}; run with --help for usage"),
        }
    }
    if !roots.is_empty() {
        gate.policy.roots = config::checked_roots(roots).map_err(|e| anyhow::anyhow!("--images-root: {e}"))?;
    }
    if !uris.is_empty() {
        gate.policy.uris = uris;
    }
    let node = node.filter(|n| !n.is_empty());
    let tcp = match (listen_tcp, node.clone()) {
        (Some(address), Some(node)) => Some((address, node)),
        (Some(_), None) => bail!("--listen-tcp needs the node's name: --node NAME or $NODE_NAME"),
        (None, _) => None,
    };
    Ok(Args {
        listen,
        tcp,
        node,
        gate,
    })
}

/// The policy file's text, refusing a huge one before reading it all.
fn read_config(path: &str) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open the policy file {path}"))?;
    let mut bytes = Vec::new();
    file.take(config::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the policy file {path}"))?;
    if bytes.len() > config::MAX_CONFIG_BYTES {
        return Err(config::ConfigError::TooLarge(bytes.len()).into());
    }
    String::from_utf8(bytes).with_context(|| format!("the policy file {path} is not UTF-8 text"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("virtkube-gate: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

/// Each VM container holds two descriptors (its connection and the gate's
/// to libvirtd): the soft limit of 1024 would cap a node at about 500.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the valid `limit` struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the descriptor limit; staying at the soft limit");
            }
        }
    }
}

fn run(args: Args) -> Result<()> {
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // A socket left by an earlier gate would make bind fail.
        let _ = std::fs::remove_file(&args.listen);
        // Any process may connect: who it is, not its file mode, decides what
        // it may do. The mode comes from the umask at bind time, not from a
        // chmod of the path afterwards, which a process sharing the directory
        // could have replaced with a link by then.
        // SAFETY: umask only sets this process's file creation mask.
        let previous = unsafe { libc::umask(0o111) };
        let bound = UnixListener::bind(&args.listen);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(previous) };
        let listener = bound.with_context(|| format!("cannot listen on {}", args.listen.display()))?;
        tracing::info!(
            listen = %args.listen.display(),
            libvirtd = %args.gate.libvirtd.display(),
            policy = ?args.gate.policy,
            "virtkube-gate ready"
        );
        let gate = Arc::new(args.gate);
        // In a cluster: this node's pods (who calls over TCP; a caller's
        // namespace) and the ImageFiles (which volumes a pod may use).
        let pods = match (in_cluster().await, &args.node) {
            (Some(client), Some(node)) => {
                let pods = watch_node_pods(client.clone(), node);
                let files = watch_image_files(client);
                let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (both, flag) = ((pods.clone(), files.clone()), listed.clone());
                tokio::spawn(async move {
                    if both.0.wait_until_ready().await.is_ok() && both.1.wait_until_ready().await.is_ok() {
                        flag.store(true, std::sync::atomic::Ordering::Release);
                    }
                });
                let catalog = virtkube_gate::volumes::Catalog {
                    pods: pods.clone(),
                    files,
                    listed,
                };
                let _ = gate.volumes.set(Arc::new(catalog));
                tracing::info!(%node, "reading this node's pods and the ImageFiles from the Kubernetes API");
                Some(pods)
            }
            _ => None,
        };
        // The TCP listener failing (its port taken, no API) must not take the
        // socket, and the VM containers on it, down with it.
        let tcp = async {
            if let Some((address, node)) = args.tcp
                && let Err(e) = serve_tcp(address, node, gate.clone(), pods).await
            {
                tracing::error!("not serving VM pods over TCP: {e:#}");
            }
            std::future::pending::<Result<()>>().await
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = relay::serve(listener, gate.clone()) => result.context("accepting VM containers failed"),
            result = tcp => result,
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                Ok(())
            }
        }
    })
}

/// A client of the Kubernetes API, when the gate runs in a cluster (or is
/// given a kubeconfig).
async fn in_cluster() -> Option<kube::Client> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() && std::env::var_os("KUBECONFIG").is_none() {
        return None;
    }
    match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API: ImageFile disks and TCP callers are refused");
            None
        }
    }
}

/// A reflector over `api` (kept while the gate runs), logging its errors as `what`.
fn reflect<K>(api: kube::Api<K>, config: kube::runtime::watcher::Config, what: &'static str) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    use futures_util::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (store, writer) = reflector::store();
    let watch = watcher(api, config)
        .default_backoff()
        .modify(|object| object.meta_mut().managed_fields = None)
        .reflect(writer)
        .for_each(move |event| {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching {what} failed; retrying");
            }
            std::future::ready(())
        });
    tokio::spawn(watch);
    store
}

fn watch_node_pods(client: kube::Client, node: &str) -> Store<Pod> {
    let config = kube::runtime::watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    reflect(kube::Api::<Pod>::all(client), config, "this node's pods")
}

fn watch_image_files(client: kube::Client) -> Store<virtkube_api::ImageFile> {
    reflect(
        kube::Api::all(client),
        kube::runtime::watcher::Config::default(),
        "the ImageFiles",
    )
}

/// Serves VM pods over TCP, knowing each by its pod IP among this node's
/// pods (a reflector over the API, kept while the gate runs).
async fn serve_tcp(address: SocketAddr, node: String, gate: Arc<Gate>, pods: Option<Store<Pod>>) -> Result<()> {
    let store = pods.context("--listen-tcp needs the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on TCP {address}"))?;
    tracing::info!(%address, %node, "serving this node's pods over TCP");
    relay::serve_tcp(listener, gate, Arc::new(relay::NodePods::new(node, store)))
        .await
        .context("accepting VM pods over TCP failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Args> {
        parse_args(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn flags_override_the_policy_file_wherever_it_stands() {
        let file = std::env::temp_dir().join(format!("virtkube-gate-args-{}.yaml", std::process::id()));
        std::fs::write(&file, "maxVcpus: 2\nmaxMemoryKib: 1024\n").unwrap();
        let path = file.to_str().unwrap();
        for args in [
            ["--max-vcpus", "8", "--config", path],
            ["--config", path, "--max-vcpus", "8"],
        ] {
            let parsed = parsed(&args).unwrap();
            assert_eq!(parsed.gate.policy.max_vcpus, 8, "{args:?}");
            assert_eq!(parsed.gate.policy.max_memory_kib, 1024, "{args:?}");
        }
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        for (args, needle) in [
            (vec!["--network-disks", "maybe"], "use allow or deny"),
            (vec!["--max-vcpus", "lots"], "not a whole number"),
            (vec!["--listen-tcp", "16509"], "not ADDRESS:PORT"),
            (
                vec!["--max-connections-per-caller", "0"],
                "would refuse every VM container",
            ),
            (vec!["--images-root", "images"], "not an absolute path"),
            (
                vec!["--config", "/nonexistent/gate.yaml"],
                "cannot open the policy file",
            ),
            (vec!["--bogus", "1"], "unknown flag"),
            (vec!["--listen"], "needs a value"),
        ] {
            let e = format!("{:#}", parsed(&args).err().unwrap());
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
