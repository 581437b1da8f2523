//! nodeinfo at scale, on libvirtd's test driver with a custom node of 1000
//! virtkube domains and the real API server (KUBECONFIG):
//!   - time from start until every VirtDomain is published (goal ≤ 10 s),
//!   - lifecycle event → patch sent latency, p50/p99 (goal p99 ≤ 1 s),
//!   - nodeinfo's RSS (goal ≤ 30 MiB) and idle CPU.
//!
//!     KUBECONFIG=… cargo bench -p virtkube-nodeinfo --bench publish [-- DOMAINS]
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Config};
use serde_json::json;
use virtkube_api::VirtDomain;

fn uuid(i: usize) -> String {
    format!("6f1c2b3a-4d5e-4f60-8a7b-{i:012x}")
}

fn proc_field(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("set KUBECONFIG (e.g. /var/lib/k8s-local/admin.kubeconfig)");
        std::process::exit(1);
    }
    let client = Client::try_from(Config::infer().await.unwrap()).unwrap();
    let id = std::process::id();
    let ns = format!("virtkube-bench-{id}");
    let node = format!("virtkube-bench-node-{id}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();

    // Owner pods (API objects only), so the garbage collector keeps the VirtDomains.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let mut uids = vec![String::new(); count];
    for chunk in (0..count).collect::<Vec<_>>().chunks(50) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let pods = pods.clone();
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("vm-{i}")},
                    "spec": {"nodeName": node, "automountServiceAccountToken": false, "containers": [{"name": "vm", "image": "virtkube/tiny:latest"}]}})).unwrap();
                (i, pods.create(&PostParams::default(), &pod).await.unwrap().metadata.uid.unwrap())
            }));
        }
        for t in tasks {
            let (i, uid) = t.await.unwrap();
            uids[i] = uid;
        }
    }
    println!(
        "setup: {count} owner pods created in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A test-driver node with `count` running virtkube domains.
    let mut xml = String::from("<node>\n");
    for (i, uid) in uids.iter().enumerate() {
        xml.push_str(&format!(
            "<domain type='test'><name>{ns}_vm-{i}</name><uuid>{}</uuid><memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
             <metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:namespace>{ns}</virtkube:namespace><virtkube:pod>vm-{i}</virtkube:pod><virtkube:uid>{uid}</virtkube:uid></virtkube:instance></metadata></domain>\n",
            uuid(i),
            virtkube_api::METADATA_XMLNS
        ));
    }
    xml.push_str("</node>\n");
    let path = std::env::temp_dir().join(format!("virtkube-bench-{id}.xml"));
    std::fs::write(&path, xml).unwrap();
    let uri = format!("test+unix://{}", path.display());
    // (nodeinfo opens its own connection: a custom-file node is private to it.)

    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let t0 = Instant::now();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
        .args(["--node", &node, "--uri", &uri, "--resync", "600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = daemon.id();
    let stderr = daemon.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let domains: Api<VirtDomain> = Api::namespaced(client.clone(), &ns);
    let all_published = loop {
        let n = domains
            .list_metadata(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if n >= count {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(300) {
            println!("only {n} of {count} VirtDomains after 300 s");
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rss_kib = proc_field(pid, "VmRSS:").unwrap_or(0);
    let hwm_kib = proc_field(pid, "VmHWM:").unwrap_or(0);

    // Idle CPU over 10 s.
    let ticks_before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (cpu_ticks(pid) - ticks_before) as f64 / 100.0 / 10.0 * 100.0;

    // Lifecycle events. A custom-file test node is private to each connection,
    // so events are measured on test:///default (shared by all connections):
    // a second nodeinfo watches 100 domains there; destroying them one by one,
    // it logs how long each took from the event to the patch (delete) being sent
    // (at debug level, read here as JSON lines).
    let _ = daemon.kill();
    let _ = daemon.wait();
    let events = 100.min(count);
    let shared = "test+unix:///default";
    let default_conn = virt::connect::Connect::open(Some(shared)).unwrap();
    for (i, uid) in uids.iter().enumerate().take(events) {
        let xml = format!(
            "<domain type='test'><name>{ns}_vm-{i}</name><memory>131072</memory><os><type>hvm</type></os>\
             <metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:namespace>{ns}</virtkube:namespace><virtkube:pod>vm-{i}</virtkube:pod><virtkube:uid>{uid}</virtkube:uid></virtkube:instance></metadata></domain>",
            virtkube_api::METADATA_XMLNS
        );
        default_conn.create_domain_xml(&xml, 0).unwrap();
    }
    let node2 = format!("{node}-events");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
        .args([
            "--node",
            &node2,
            "--uri",
            shared,
            "--resync",
            "600",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info,virtkube_nodeinfo=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = daemon.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mine = domains
            .list(&ListParams::default())
            .await
            .map(|l| l.items.iter().filter(|d| d.spec.node == node2).count())
            .unwrap_or(0);
        if mine >= events || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lines.lock().unwrap().clear();
    for i in 0..events {
        let dom = default_conn.lookup_domain_by_name(&format!("{ns}_vm-{i}")).unwrap();
        dom.destroy().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut latencies: Vec<f64> = lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|event| event["message"] == "event published")
        .filter_map(|event| event["elapsed"].as_str().and_then(parse_duration_ms))
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());

    println!("virtkube-nodeinfo, test driver with {count} virtkube domains, real API server:");
    println!(
        "  all {count} VirtDomains published after {:.2} s (goal ≤ 10 s)",
        all_published.as_secs_f64()
    );
    if latencies.is_empty() {
        println!("  no event latencies logged");
    } else {
        let p = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "  event → patch sent: {} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 ≤ 1000 ms)",
            latencies.len(),
            p(0.5),
            p(0.99),
            p(1.0)
        );
    }
    println!(
        "  RSS {:.1} MiB (peak {:.1} MiB; goal ≤ 30 MiB), idle CPU {:.2} % of one core",
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0,
        idle_cpu
    );

    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let virtnodes: Api<virtkube_api::VirtNode> = Api::all(client.clone());
    for name in [&node, &node2] {
        let _ = virtnodes.delete(name, &DeleteParams::default()).await;
    }
    let _ = std::fs::remove_file(&path);
}

/// Rust's Debug format of a Duration: `12.3ms`, `850µs`, `1.2s`, `40ns`.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "s" => v * 1000.0,
        "ms" => v,
        "µs" => v / 1000.0,
        "ns" => v / 1e6,
        _ => return None,
    })
}
