//! virtkube-nodeinfo: publishes what this host can run (VirtNode, Node labels)
//! and what its VMs do (VirtDomain). `--once --output yaml` prints what it
//! would publish, without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use virt::connect::Connect;
use virtkube_api::VirtNodeStatus;
use virtkube_nodeinfo::collect;
use virtkube_nodeinfo::model;
use virtkube_nodeinfo::publish::Publisher;

/// VirtDomains published at once during a full sync.
const PUBLISH_CONCURRENCY: usize = 16;

const USAGE: &str = "\
usage: virtkube-nodeinfo [--once [--output yaml|json]] [--node NAME] [--uri URI] [--resync SECONDS]
                         [--log-format text|json]

  --once        read libvirt once, print the VirtNode and VirtDomains it would publish, exit
  --output      yaml (default) or json, with --once
  --node        node name (default: $NODE_NAME, else the hostname)
  --uri         libvirt URI (default: $VIRTKUBE_LIBVIRT_URI, else qemu:///system)
  --resync      seconds between full resyncs (default 30)
  --log-format  the log on stderr, text or json (default: $VIRTKUBE_LOG_FORMAT, else text);
                $RUST_LOG filters it (default info)

The repository manager (ImageRepository, ImageFile; docs/images.md) runs when
$VIRTKUBE_DAEMONSET names the virthost DaemonSet whose pods mount the
repositories, in namespace $POD_NAMESPACE, container $VIRTKUBE_CONTAINER
(default virthost).
";

/// How the log on stderr is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

impl LogFormat {
    /// `from` names where the value came from, for the usage error.
    fn parse(value: &str, from: &str) -> Result<LogFormat> {
        match value {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => bail!("{from} {other:?}: use text or json"),
        }
    }
}

struct Args {
    once: bool,
    json: bool,
    node: String,
    uri: String,
    resync: Duration,
    log_format: LogFormat,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        once: false,
        json: false,
        node: std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            }),
        uri: std::env::var("VIRTKUBE_LIBVIRT_URI").unwrap_or_else(|_| "qemu:///system".into()),
        resync: Duration::from_secs(30),
        log_format: LogFormat::Text,
    };
    let mut log_format = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--once" => out.once = true,
            "--output" => match value("--output")?.as_str() {
                "yaml" => out.json = false,
                "json" => out.json = true,
                other => bail!("--output {other:?}: use yaml or json"),
            },
            "--node" => out.node = value("--node")?,
            "--uri" => out.uri = value("--uri")?,
            "--resync" => {
                let v = value("--resync")?;
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .with_context(|| format!("--resync {v:?}: a number of seconds, e.g. 30"))?;
                out.resync = Duration::from_secs(secs);
            }
            "--log-format" => log_format = Some(LogFormat::parse(&value("--log-format")?, "--log-format")?),
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if out.node.is_empty() {
        bail!("no node name: set NODE_NAME (downward API spec.nodeName) or --node");
    }
    // The flag wins over the environment, whose value is only checked when used.
    out.log_format = match log_format {
        Some(format) => format,
        None => match std::env::var("VIRTKUBE_LOG_FORMAT") {
            Ok(v) if !v.is_empty() => LogFormat::parse(&v, "VIRTKUBE_LOG_FORMAT")?,
            _ => LogFormat::Text,
        },
    };
    Ok(out)
}

/// The log goes to stderr (stdout carries `--once`'s output), filtered by
/// `RUST_LOG` (default `info`; invalid directives are reported and ignored).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // Fields at the top level next to the message, as log collectors expect.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs libvirt calls on tokio's blocking pool: each waits for libvirtd (as
/// long as it takes to answer, or to time out when it hangs), which must not
/// hold up the runtime's two workers. `Connect` is `Send + Sync`, so the pool
/// thread shares it through the `Arc`; unlike `block_in_place`, this works on
/// whichever thread polls the caller.
async fn libvirt<T, F>(conn: &Arc<Connect>, call: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Connect) -> T + Send + 'static,
{
    let conn = Arc::clone(conn);
    tokio::task::spawn_blocking(move || call(&conn))
        .await
        .context("a libvirt call panicked")
}

fn now() -> String {
    // RFC 3339 in UTC from the system clock, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = virtkube_api::civil::civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virtkube-nodeinfo: {e:#}");
            std::process::exit(2);
        }
    };
    init_logging(args.log_format);
    // libvirt's default handler prints every error on stderr, past the log's
    // format and filter; nodeinfo logs the errors it gets, with context.
    virt::error::clear_error_callback();
    let result = if args.once { once(&args) } else { daemon(&args) };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn once(args: &Args) -> Result<()> {
    let conn = Connect::open(Some(&args.uri)).with_context(|| format!("cannot connect to libvirt at {}", args.uri))?;
    let host = collect::host(&conn).map_err(anyhow::Error::msg)?;
    let (domains, _) = collect::domains(&conn).map_err(anyhow::Error::msg)?;
    let status = model::node_status(&host, &now());
    let mut docs: Vec<Value> = vec![json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "VirtNode",
        "metadata": {"name": args.node, "labels": model::node_labels(&status)},
        "spec": {"nodeName": args.node}, "status": status,
    })];
    for object in domains.iter().filter_map(|d| model::virt_domain(&args.node, d, None)) {
        docs.push(serde_json::to_value(object)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&docs)?);
    } else {
        for doc in docs {
            print!("---\n{}", serde_saphyr::to_string(&doc)?);
        }
    }
    Ok(())
}

fn daemon(args: &Args) -> Result<()> {
    collect::start_event_loop().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API")?;
        let publisher = Publisher::new(client.clone(), args.node.clone());
        let mut backoff = Duration::from_millis(500);
        let mut last_status: Option<VirtNodeStatus> = None;
        // Kept across reconnects: a domain unreadable in the first sync after
        // one must still be recognised as published, not deleted as stale.
        let mut published = Published::new();
        loop {
            match serve(args, &client, &publisher, &mut last_status, &mut published).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The VirtNode says libvirtd does not answer (until it does
                    // again), also when nodeinfo never reached it since it started.
                    let last = last_status.take();
                    let down = model::with_ready(
                        last.clone().unwrap_or_default(),
                        false,
                        "LibvirtUnreachable",
                        &format!("{e:#}"),
                        &now(),
                        last.as_ref(),
                    );
                    if let Err(e) = publisher.apply_node(&down).await {
                        warn!(node = %args.node, "VirtNode not marked unready: {e}");
                    }
                    last_status = Some(down);
                    warn!(uri = %args.uri, "{e:#}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    })
}

/// What nodeinfo published and remembers, by domain name; and since when it
/// runs (a QEMU much older than that outlived a virthost restart).
struct Published {
    domains: BTreeMap<String, model::Seen>,
    started: Instant,
}

impl Published {
    fn new() -> Published {
        Published {
            domains: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// The VirtDomain of `d`, as published now.
    fn virt_domain(&self, node: &str, d: &model::DomainSnapshot) -> Option<virtkube_api::VirtDomain> {
        let start = self.start_of(&d.name);
        model::virt_domain(node, d, Some(&start))
    }

    /// The VirtDomain start time of domain `name`: when first seen.
    fn start_of(&self, name: &str) -> String {
        self.domains.get(name).map_or_else(now, |seen| seen.start.clone())
    }

    /// Remembers `d`, and returns the events the look at it adds to its pod's story.
    fn look(&mut self, d: &model::DomainSnapshot) -> (model::Seen, Vec<model::PodEvent>) {
        let before = self.domains.get(&d.name);
        let events = model::events_on_sight(before, d, self.started.elapsed().as_secs(), collect::oom_kills_in);
        let seen = model::Seen::of(d, self.start_of(&d.name));
        self.domains.insert(d.name.clone(), seen.clone());
        (seen, events)
    }
}

/// Tells a pod's story: each event is published on the pod (best effort:
/// a failure is logged, the VirtDomain is what matters).
async fn tell(publisher: &Publisher, seen: &model::Seen, events: Vec<model::PodEvent>) {
    for event in events {
        if let Err(e) = publisher.pod_event(seen, &event).await {
            warn!(namespace = %seen.namespace, pod = %seen.pod, reason = event.reason, "event not published: {e}");
        }
    }
}

/// The end of domain `name`, last seen as `seen`: its pod's last event.
async fn tell_end(publisher: &Publisher, name: &str, seen: &model::Seen) {
    let oom_kills_now = match &seen.memory {
        Some((cgroup, _)) => {
            let cgroup = cgroup.clone();
            tokio::task::spawn_blocking(move || collect::oom_kills_in(&cgroup))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    tell(publisher, seen, model::events_on_end(seen, name, oom_kills_now)).await;
}

/// The repository manager's settings, when the environment asks for it.
fn images_settings(node: &str, resync: Duration) -> Option<virtkube_nodeinfo::images::Settings> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Some(virtkube_nodeinfo::images::Settings {
        node: node.to_owned(),
        daemonset: var("VIRTKUBE_DAEMONSET")?,
        namespace: var("POD_NAMESPACE").unwrap_or_else(|| "virtkube-system".into()),
        container: var("VIRTKUBE_CONTAINER").unwrap_or_else(|| "virthost".into()),
        heartbeat_limit: virtkube_nodeinfo::storage::heartbeat_limit(resync),
    })
}

/// Runs until libvirt goes away (an error to reconnect after) or SIGTERM (Ok).
async fn serve(
    args: &Args,
    client: &kube::Client,
    publisher: &Publisher,
    last_status: &mut Option<VirtNodeStatus>,
    published: &mut Published,
) -> Result<()> {
    let uri = args.uri.clone();
    let conn = Arc::new(
        tokio::task::spawn_blocking(move || Connect::open(Some(&uri)))
            .await?
            .with_context(|| format!("cannot connect to libvirt at {}", args.uri))?,
    );
    // ImageRepositories and ImageFiles, on this connection while it lasts.
    let images = images_settings(&args.node, args.resync)
        .map(|settings| tokio::spawn(virtkube_nodeinfo::images::run(client.clone(), settings, conn.clone())));
    // spec.runState, carried out on this connection while it lasts.
    let run_states = tokio::spawn(virtkube_nodeinfo::runstate::run(
        client.clone(),
        args.node.clone(),
        conn.clone(),
        publisher.clone(),
    ));
    let result = serve_on(&conn, args, publisher, last_status, published).await;
    run_states.abort();
    let _ = run_states.await;
    if let Some(images) = images {
        images.abort();
        let _ = images.await;
    }
    // The last reference closes the connection, a call to libvirtd too.
    if tokio::task::spawn_blocking(move || drop(conn)).await.is_err() {
        warn!(uri = %args.uri, "closing the libvirt connection failed");
    }
    result
}

async fn serve_on(
    conn: &Arc<Connect>,
    args: &Args,
    publisher: &Publisher,
    last_status: &mut Option<VirtNodeStatus>,
    published: &mut Published,
) -> Result<()> {
    // Bounded, so that an event storm while publishing is slow cannot grow
    // memory without limit: past it, events are dropped and `dropped` asks
    // for a full resync, which reads every domain anyway.
    let (events_tx, mut events) = mpsc::channel(collect::EVENT_CAPACITY);
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    libvirt(conn, move |c| collect::register_lifecycle_events(c, events_tx, flag))
        .await?
        .map_err(anyhow::Error::msg)?;
    info!(uri = %args.uri, node = %args.node, "connected to libvirt; publishing the node");
    let mut resync = tokio::time::interval(args.resync);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = resync.tick() => full_sync(conn, args, publisher, published, last_status).await?,
            Some(event) = events.recv() => {
                let started = Instant::now();
                // Whose it is, before the change: a shut-down domain is gone after it.
                let seen = published.domains.get(&event.name).cloned();
                if let (Some(happened), Some(seen)) = (event.happened, &seen) {
                    tell(publisher, seen, vec![happened.event()]).await;
                }
                domain_changed(conn, args, publisher, published, &event.name).await?;
                if let (Some(happened), None) = (event.happened, &seen)
                    && let Some(seen) = published.domains.get(&event.name)
                {
                    tell(publisher, seen, vec![happened.event()]).await;
                }
                debug!(domain = %event.name, elapsed = ?started.elapsed(), "event published");
            }
            _ = term.recv() => {
                info!("SIGTERM: stopping");
                return Ok(());
            }
        }
        if dropped.swap(false, Ordering::Acquire) {
            warn!(
                capacity = collect::EVENT_CAPACITY,
                "lifecycle events dropped (the queue was full): resyncing everything now"
            );
            // The resync reads every domain: what is queued until now adds nothing.
            while events.try_recv().is_ok() {}
            full_sync(conn, args, publisher, published, last_status).await?;
            resync.reset();
        }
        if !libvirt(conn, |c| c.is_alive().unwrap_or(false)).await? {
            bail!("lost the connection to libvirtd");
        }
    }
}

async fn full_sync(
    conn: &Arc<Connect>,
    args: &Args,
    publisher: &Publisher,
    published: &mut Published,
    last_status: &mut Option<VirtNodeStatus>,
) -> Result<()> {
    let started = Instant::now();
    let (host, (domains, unreadable)) = libvirt(conn, |c| {
        Ok::<_, collect::Error>((collect::host(c)?, collect::domains(c)?))
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    let heartbeat = now();
    let status = model::with_ready(
        model::node_status(&host, &heartbeat),
        true,
        "LibvirtReachable",
        "nodeinfo reads libvirtd",
        &heartbeat,
        last_status.as_ref(),
    );
    if let Err(e) = publisher.apply_node(&status).await {
        warn!(node = %args.node, "VirtNode not published: {e}");
    }
    *last_status = Some(status.clone());
    match publisher.apply_labels(&model::node_labels(&status)).await {
        Ok(true) => {}
        Ok(false) => warn!(
            node = %args.node,
            "no Node {} in the API: labels not published (is NODE_NAME right?)",
            args.node
        ),
        Err(e) => warn!(node = %args.node, "Node labels not published: {e}"),
    }
    let mut keep = BTreeSet::new();
    let mut seen = BTreeMap::new();
    // A domain that exists but could not be read this time keeps its VirtDomain.
    // One nodeinfo never read cannot be told from a stale one: then nothing is
    // deleted this round.
    let mut may_delete = true;
    for name in &unreadable {
        match published.domains.get(name) {
            Some(entry) => {
                keep.insert((entry.namespace.clone(), entry.pod.clone()));
                seen.insert(name.clone(), entry.clone());
            }
            None => may_delete = false,
        }
    }
    // Publish in parallel (bounded): each VirtDomain is two API calls, and a
    // thousand of them one by one takes too long.
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed = 0;
    let mut count = |joined: Option<Result<bool, tokio::task::JoinError>>| {
        if matches!(joined, Some(Ok(false) | Err(_))) {
            failed += 1;
        }
    };
    for d in &domains {
        if let Some(object) = published.virt_domain(&args.node, d) {
            keep.insert((d.owner.namespace.clone(), d.owner.pod.clone()));
            let (remembered, events) = published.look(d);
            seen.insert(d.name.clone(), remembered.clone());
            tell(publisher, &remembered, events).await;
            if tasks.len() >= PUBLISH_CONCURRENCY {
                count(tasks.join_next().await);
            }
            let publisher = publisher.clone();
            tasks.spawn(async move {
                let result = publisher.apply_domain(&object).await;
                if let Err(e) = &result {
                    warn!(
                        namespace = object.metadata.namespace.as_deref(),
                        pod = object.metadata.name.as_deref(),
                        "VirtDomain not published: {e}"
                    );
                }
                result.is_ok()
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        count(Some(joined));
    }
    // Domains gone since the last look whose end no event reported.
    let gone: Vec<(String, model::Seen)> = std::mem::replace(&mut published.domains, seen)
        .into_iter()
        .filter(|(name, _)| !published.domains.contains_key(name))
        .collect();
    for (name, last) in &gone {
        tell_end(publisher, name, last).await;
    }
    let deleted = if !may_delete {
        warn!("stale VirtDomains not cleaned this round: a domain could not be read");
        0
    } else {
        match publisher.delete_stale(&keep).await {
            Ok(deleted) => {
                for (ns, pod) in &deleted {
                    info!(namespace = %ns, pod = %pod, "deleted stale VirtDomain {ns}/{pod}");
                }
                deleted.len()
            }
            Err(e) => {
                warn!("stale VirtDomains not cleaned: {e}");
                0
            }
        }
    };
    info!(
        node = %args.node,
        domains = domains.len(),
        virtdomains = published.domains.len(),
        failed,
        unreadable = unreadable.len(),
        deleted,
        elapsed = ?started.elapsed(),
        "resync done"
    );
    Ok(())
}

async fn domain_changed(
    conn: &Arc<Connect>,
    args: &Args,
    publisher: &Publisher,
    published: &mut Published,
    name: &str,
) -> Result<()> {
    // Only libvirt saying the domain is gone deletes its VirtDomain; an error
    // reading it leaves it as published for the next event or resync.
    let owned = name.to_owned();
    let snapshot = match libvirt(conn, move |c| collect::domain_by_name(c, &owned)).await? {
        Ok(snapshot) => snapshot,
        Err(e) => {
            warn!(domain = %name, "domain {name} could not be read (kept as published): {e}");
            return Ok(());
        }
    };
    match snapshot {
        Some(d) => {
            if let Some(object) = published.virt_domain(&args.node, &d) {
                let (remembered, events) = published.look(&d);
                tell(publisher, &remembered, events).await;
                if let Err(e) = publisher.apply_domain(&object).await {
                    warn!(
                        domain = %name,
                        namespace = %d.owner.namespace,
                        pod = %d.owner.pod,
                        "VirtDomain not published: {e}"
                    );
                }
            }
        }
        None => {
            if let Some(last) = published.domains.remove(name) {
                tell_end(publisher, name, &last).await;
                let (ns, pod) = (&last.namespace, &last.pod);
                if let Err(e) = publisher.delete_domain(ns, pod).await {
                    warn!(domain = %name, namespace = %ns, pod = %pod, "VirtDomain not deleted: {e}");
                } else {
                    info!(domain = %name, namespace = %ns, pod = %pod, "domain is gone: deleted its VirtDomain");
                }
            }
        }
    }
    Ok(())
}
