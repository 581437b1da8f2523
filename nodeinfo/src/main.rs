//! virtkube-nodeinfo: publishes what this host can run (VirtNode, Node labels)
//! and what its VMs do (VirtDomain). `--once --output yaml` prints what it
//! would publish, without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use virt::connect::Connect;
use virtkube_api::VirtNodeStatus;
use virtkube_nodeinfo::collect;
use virtkube_nodeinfo::model::{self, DomainSnapshot};
use virtkube_nodeinfo::publish::Publisher;

/// VirtDomains published at once during a full sync.
const PUBLISH_CONCURRENCY: usize = 16;

const USAGE: &str = "\
usage: virtkube-nodeinfo [--once [--output yaml|json]] [--node NAME] [--uri URI] [--resync SECONDS]

  --once       read libvirt once, print the VirtNode and VirtDomains it would publish, exit
  --output     yaml (default) or json, with --once
  --node       node name (default: $NODE_NAME, else the hostname)
  --uri        libvirt URI (default: $VIRTKUBE_LIBVIRT_URI, else qemu:///system)
  --resync     seconds between full resyncs (default 30)
";

struct Args {
    once: bool,
    json: bool,
    node: String,
    uri: String,
    resync: Duration,
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
    };
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
    Ok(out)
}

fn now() -> String {
    // RFC 3339 in UTC from the system clock, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virtkube-nodeinfo: {e:#}");
            std::process::exit(2);
        }
    };
    let result = if args.once { once(&args) } else { daemon(&args) };
    if let Err(e) = result {
        eprintln!("virtkube-nodeinfo: {e:#}");
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
    docs.extend(domains.iter().filter_map(|d| model::virt_domain(&args.node, d, None)));
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
        let publisher = Publisher::new(client, args.node.clone());
        let mut backoff = Duration::from_millis(500);
        let mut last_status: Option<VirtNodeStatus> = None;
        // Kept across reconnects: a domain unreadable in the first sync after
        // one must still be recognised as published, not deleted as stale.
        let mut published = Published::new();
        loop {
            match serve(args, &publisher, &mut last_status, &mut published).await {
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
                        eprintln!("[nodeinfo] VirtNode not marked unready: {e}");
                    }
                    last_status = Some(down);
                    eprintln!("[nodeinfo] {e:#}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    })
}

/// Runs until libvirt goes away (an error to reconnect after) or SIGTERM (Ok).
/// Domain name → (namespace, pod, start time) of each VirtDomain published.
type Published = BTreeMap<String, (String, String, String)>;

async fn serve(
    args: &Args,
    publisher: &Publisher,
    last_status: &mut Option<VirtNodeStatus>,
    published: &mut Published,
) -> Result<()> {
    let uri = args.uri.clone();
    let conn = tokio::task::spawn_blocking(move || Connect::open(Some(&uri)))
        .await?
        .with_context(|| format!("cannot connect to libvirt at {}", args.uri))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    collect::register_lifecycle_events(&conn, events_tx).map_err(anyhow::Error::msg)?;
    eprintln!("[nodeinfo] connected to {}; publishing node {}", args.uri, args.node);
    let mut resync = tokio::time::interval(args.resync);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = resync.tick() => full_sync(&conn, args, publisher, published, last_status).await?,
            Some(name) = events.recv() => {
                let started = Instant::now();
                domain_changed(&conn, args, publisher, published, &name).await?;
                eprintln!("[nodeinfo] event for {name} published in {:?}", started.elapsed());
            }
            _ = term.recv() => return Ok(()),
        }
        if !conn.is_alive().unwrap_or(false) {
            bail!("lost the connection to libvirtd");
        }
    }
}

async fn full_sync(
    conn: &Connect,
    args: &Args,
    publisher: &Publisher,
    published: &mut BTreeMap<String, (String, String, String)>,
    last_status: &mut Option<VirtNodeStatus>,
) -> Result<()> {
    let host = collect::host(conn).map_err(anyhow::Error::msg)?;
    let (domains, unreadable) = collect::domains(conn).map_err(anyhow::Error::msg)?;
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
        eprintln!("[nodeinfo] VirtNode not published: {e}");
    }
    *last_status = Some(status.clone());
    match publisher.apply_labels(&model::node_labels(&status)).await {
        Ok(true) => {}
        Ok(false) => eprintln!(
            "[nodeinfo] no Node {} in the API: labels not published (is NODE_NAME right?)",
            args.node
        ),
        Err(e) => eprintln!("[nodeinfo] Node labels not published: {e}"),
    }
    let mut keep = BTreeSet::new();
    let mut seen = BTreeMap::new();
    // A domain that exists but could not be read this time keeps its VirtDomain.
    // One nodeinfo never read cannot be told from a stale one: then nothing is
    // deleted this round.
    let mut may_delete = true;
    for name in &unreadable {
        match published.get(name) {
            Some(entry) => {
                keep.insert((entry.0.clone(), entry.1.clone()));
                seen.insert(name.clone(), entry.clone());
            }
            None => may_delete = false,
        }
    }
    // Publish in parallel (bounded): each VirtDomain is two API calls, and a
    // thousand of them one by one takes too long.
    let mut tasks = tokio::task::JoinSet::new();
    for d in &domains {
        let start = published.get(&d.name).map(|p| p.2.clone()).unwrap_or_else(now);
        if let Some(object) = model::virt_domain(&args.node, d, Some(&start)) {
            keep.insert((d.owner.namespace.clone(), d.owner.pod.clone()));
            seen.insert(d.name.clone(), (d.owner.namespace.clone(), d.owner.pod.clone(), start));
            if tasks.len() >= PUBLISH_CONCURRENCY {
                tasks.join_next().await;
            }
            let publisher = publisher.clone();
            tasks.spawn(async move {
                if let Err(e) = publisher.apply_domain(&object).await {
                    eprintln!(
                        "[nodeinfo] VirtDomain {}/{} not published: {e}",
                        object["metadata"]["namespace"], object["metadata"]["name"]
                    );
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    *published = seen;
    if !may_delete {
        eprintln!("[nodeinfo] stale VirtDomains not cleaned this round: a domain could not be read");
        return Ok(());
    }
    match publisher.delete_stale(&keep).await {
        Ok(deleted) => deleted
            .iter()
            .for_each(|(ns, n)| eprintln!("[nodeinfo] deleted stale VirtDomain {ns}/{n}")),
        Err(e) => eprintln!("[nodeinfo] stale VirtDomains not cleaned: {e}"),
    }
    Ok(())
}

async fn domain_changed(
    conn: &Connect,
    args: &Args,
    publisher: &Publisher,
    published: &mut BTreeMap<String, (String, String, String)>,
    name: &str,
) -> Result<()> {
    // Only libvirt saying the domain is gone deletes its VirtDomain; an error
    // reading it leaves it as published for the next event or resync.
    let snapshot: Option<DomainSnapshot> = match conn.lookup_domain_by_name(name) {
        Err(e) if collect::is_no_domain(&e) => None,
        Err(e) => {
            eprintln!("[nodeinfo] domain {name} could not be looked up (kept as published): {e}");
            return Ok(());
        }
        Ok(dom) => match collect::domain(&dom) {
            Ok(snapshot) if !collect::is_gone(&dom) => snapshot,
            Ok(_) => None,
            Err(_) if collect::is_gone(&dom) => None,
            Err(e) => {
                eprintln!("[nodeinfo] domain {name} could not be read (kept as published): {e}");
                return Ok(());
            }
        },
    };
    match snapshot {
        Some(d) => {
            let start = published.get(&d.name).map(|p| p.2.clone()).unwrap_or_else(now);
            if let Some(object) = model::virt_domain(&args.node, &d, Some(&start)) {
                published.insert(d.name.clone(), (d.owner.namespace.clone(), d.owner.pod.clone(), start));
                if let Err(e) = publisher.apply_domain(&object).await {
                    eprintln!(
                        "[nodeinfo] VirtDomain {}/{} not published: {e}",
                        d.owner.namespace, d.owner.pod
                    );
                }
            }
        }
        None => {
            if let Some((ns, pod, _)) = published.remove(name) {
                if let Err(e) = publisher.delete_domain(&ns, &pod).await {
                    eprintln!("[nodeinfo] VirtDomain {ns}/{pod} not deleted: {e}");
                } else {
                    eprintln!("[nodeinfo] domain {name} is gone: deleted VirtDomain {ns}/{pod}");
                }
            }
        }
    }
    Ok(())
}
