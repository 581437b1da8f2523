//! The gate's cost, in one run on the real libvirtd (this process moves
//! itself into a pod's cgroup first, so the gate knows it as a pod):
//!
//! - exec of the shim → domain running (qemu driver, the tiny guest), through
//!   the gate and directly on libvirtd's socket, alternating;
//! - DOMAIN_GET_STATE calls per second, through the gate and directly;
//! - the gate's RSS with 100 connected VM containers;
//! - SIGKILL of a VM container (the shim, through the gate) → its domain gone,
//!   100 times (`KILL_RUNS`), against the 2 s bound.
//!
//! Run: `cargo bench -p virtkube-gate --bench relay` (root, libvirtd from
//! scripts/libvirtd-up.sh, the tiny guest from scripts/build-tiny-guest.sh).
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libvirt_wire::{Client, Options};

#[path = "../tests/support/mod.rs"]
mod support;

use support::LIBVIRTD;
const RUNS: usize = 10;
const CALLS: usize = 2000;

fn domain_gone(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "domstate", name])
            .output()
            .unwrap();
        if !out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "domain {name} did not go");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// exec of the shim → "started domain" on `socket`; the shim is then killed
/// and its (AUTODESTROY) domain awaited gone.
fn shim_start(shim: &Path, dir: &Path, socket: &Path, uid: &str, pod: &str) -> Duration {
    let started = Instant::now();
    let mut child = spawn_shim(shim, dir, socket, uid, pod);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut elapsed = None;
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("started domain") {
            elapsed = Some(started.elapsed());
            break;
        }
        seen.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    domain_gone(&format!("bench_{pod}"));
    elapsed.unwrap_or_else(|| panic!("the shim did not start its domain:\n{}", seen.join("\n")))
}

/// The shim on `socket` as pod `pod` of namespace `bench`, stderr piped.
fn spawn_shim(shim: &Path, dir: &Path, socket: &Path, uid: &str, pod: &str) -> std::process::Child {
    support::shim_command(shim, dir, socket, ("bench", pod, uid), "console=ttyS0 panic=-1 quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let uid = format!("6a7b8c9d-0e1f-4a2b-8c3d-{:012x}", std::process::id());
    let dir = std::env::temp_dir().join(format!("virtkube-gate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cgroup = support::pod_cgroup("/virtkube-bench", "besteffort", &uid, "bench");
    support::enter(&cgroup, std::process::id());
    // One process holds all 100 connections here: lift the per-caller limit.
    let (mut gate, socket, _log) = support::start_gate_with(
        env!("CARGO_BIN_EXE_virtkube-gate"),
        &dir,
        "/virtkube-bench",
        &["--max-connections-per-caller", "1000"],
    );
    let shim = support::shim_binary();

    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        through.push(shim_start(&shim, &dir, &socket, &uid, &format!("gate-{run}")));
        direct.push(shim_start(
            &shim,
            &dir,
            Path::new(LIBVIRTD),
            &uid,
            &format!("direct-{run}"),
        ));
    }
    let (through, direct) = (p50(through), p50(direct));
    println!("shim exec → domain running, {RUNS} runs each, alternating (qemu driver, tiny guest):");
    println!("  through the gate: p50 {:.1} ms", through.as_secs_f64() * 1e3);
    println!("  directly:         p50 {:.1} ms", direct.as_secs_f64() * 1e3);
    println!(
        "  ratio gate / direct: {:.2}x   (goal ≤ 1.05x)",
        through.as_secs_f64() / direct.as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Calls per second: the gate checks every one (the tiny guest on the
        // qemu driver; the gate requires AUTODESTROY, which the test driver refuses).
        let golden =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shim/tests/golden/tiny.xml")).unwrap();
        let xml = golden
            .replace("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", &uid)
            .replace("virtkube-golden_tiny-0", "bench_calls");
        let create = libvirt_wire::flags::START_AUTODESTROY | libvirt_wire::flags::START_VALIDATE;
        for (label, uri) in [
            (
                "through the gate",
                format!("qemu+unix:///system?socket={}", socket.display()),
            ),
            ("directly", format!("qemu+unix:///system?socket={LIBVIRTD}")),
        ] {
            let client = Client::connect(&uri, Options::default()).await.unwrap();
            let domain = client.create_xml(&xml, create).await.unwrap();
            let started = Instant::now();
            for _ in 0..CALLS {
                client.get_state(&domain).await.unwrap();
            }
            let rate = CALLS as f64 / started.elapsed().as_secs_f64();
            client.destroy(&domain, 0).await.unwrap();
            drop(client);
            domain_gone("bench_calls");
            println!("DOMAIN_GET_STATE {label}: {rate:.0} calls/s ({CALLS} calls, one connection)");
        }
        let idle = rss_kib(gate.id());
        let mut clients = Vec::new();
        for _ in 0..100 {
            clients.push(
                Client::connect(
                    &format!("qemu+unix:///system?socket={}", socket.display()),
                    Options::default(),
                )
                .await
                .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_kib(gate.id());
        println!(
            "gate RSS: {:.1} MiB idle, {:.1} MiB with 100 connected VM containers ({:.0} KiB each)",
            idle as f64 / 1024.0,
            loaded as f64 / 1024.0,
            (loaded.saturating_sub(idle)) as f64 / 100.0
        );
        drop(clients);
    });

    let runs: usize = std::env::var("KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut gone_after = Vec::new();
    for run in 0..runs {
        gone_after.push(kill_and_time(&shim, &dir, &socket, &uid, &format!("kill-{run}")));
    }
    let within = gone_after.iter().filter(|d| **d <= Duration::from_secs(2)).count();
    let max = gone_after.iter().max().copied().unwrap_or_default();
    println!(
        "SIGKILL of the VM container → domain gone: {within}/{runs} within 2 s; p50 {:.0} ms, max {:.0} ms",
        p50(gone_after).as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    let _ = gate.kill();
    let _ = gate.wait();
}

/// The shim through the gate, killed with SIGKILL once its domain runs: how
/// long until libvirtd no longer lists the domain.
fn kill_and_time(shim: &Path, dir: &Path, socket: &Path, uid: &str, pod: &str) -> Duration {
    let mut child = spawn_shim(shim, dir, socket, uid, pod);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("started domain") {
            break;
        }
        seen.push(line);
    }
    let name = format!("bench_{pod}");
    let killed = Instant::now();
    child.kill().unwrap();
    let _ = child.wait();
    loop {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "domstate", &name])
            .output()
            .unwrap();
        if !out.status.success() {
            return killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "domain {name} outlived its shim by 30 s (shim said: {})",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
