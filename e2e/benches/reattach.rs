//! VMs across a virthost restart (the virthost container of
//! scripts/virthost-up.sh, the images of scripts/build-images.sh): prints
//! numbers, asserts only that every VM survived.
//!
//! `VMS` (default 10) VM containers of `virtkube/tiny`, booted; then
//! `RESTARTS` (default 3) times `docker restart` of the virthost. For each
//! restart and VM: the time from the restart command to the shim's
//! "reattached" line (read from `docker logs --timestamps`), and whether the
//! same QEMU runs the VM (so the guest saw no downtime beyond the pause of
//! its console). Then QEMU's memory beside the guest's: the overhead the
//! VM's pod must ask for on top of its guest memory. Last, a SIGKILL storm:
//! every reattached VM container killed at once, and the orphans counted.
//!
//! Run: `cargo bench -p virtkube-e2e --bench reattach`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::time::{Duration, Instant};

use virtkube_e2e::{max_secs, p50_secs, run};

const DOCKER: &str = "/usr/bin/docker";
const SOCKET_DIR: &str = "/var/run/virtkube";
const STATE_DIR: &str = "/var/run/virtkube-virthost/run/qemu";

fn docker(args: &[&str]) -> (bool, String) {
    run(DOCKER, args, None)
}

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    assert!(
        std::path::Path::new(&format!("{SOCKET_DIR}/libvirt-sock")).exists(),
        "no virthost socket in {SOCKET_DIR}: run scripts/build-images.sh and scripts/virthost-up.sh"
    );
    let (vms, restarts) = (count("VMS", 10), count("RESTARTS", 3));
    let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let names: Vec<String> = (0..vms)
        .map(|i| format!("virtkube-bench-reattach-{}-{i}", std::process::id()))
        .collect();
    for name in &names {
        let _ = docker(&["rm", "-f", name]);
        let (ok, out) = docker(&["run", "-d", "--name", name, "-v", &volume, "virtkube/tiny:latest"]);
        assert!(ok, "docker run: {out}");
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for name in &names {
        while !docker(&["logs", name]).1.contains("virtkube-tiny: ready") {
            assert!(Instant::now() < deadline, "{name} did not boot");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let domain_of = |name: &str| {
        docker(&["inspect", "-f", "{{.Config.Hostname}}", name])
            .1
            .trim()
            .to_owned()
    };
    let qemu_of =
        |name: &str| std::fs::read_to_string(format!("{STATE_DIR}/{}.pid", domain_of(name))).unwrap_or_default();
    let before: Vec<String> = names.iter().map(|n| qemu_of(n)).collect();
    println!("{vms} VMs of virtkube/tiny (TCG) running; {restarts} restarts of the virthost");

    let mut all = Vec::new();
    for round in 1..=restarts {
        let restarted = Instant::now();
        let (ok, out) = docker(&["restart", "-t", "20", "virtkube-virthost"]);
        assert!(ok, "docker restart: {out}");
        let mut times = Vec::new();
        for name in &names {
            loop {
                let logs = docker(&["logs", name]).1;
                if logs.matches("reattached to domain").count() >= round {
                    break;
                }
                assert!(
                    restarted.elapsed() < Duration::from_secs(120),
                    "{name} did not reattach:\n{logs}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            times.push(restarted.elapsed());
        }
        println!(
            "  restart {round}: every shim reattached; from docker restart: p50 {:.2} s, max {:.2} s",
            p50_secs(&times),
            max_secs(&times)
        );
        all.extend(times);
    }
    let after: Vec<String> = names.iter().map(|n| qemu_of(n)).collect();
    let same = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b == a && !b.is_empty())
        .count();
    let running = names
        .iter()
        .filter(|n| docker(&["inspect", "-f", "{{.State.Running}}", n]).1.trim() == "true")
        .count();
    let restarted_containers: usize = names
        .iter()
        .map(|n| {
            docker(&["inspect", "-f", "{{.RestartCount}}", n])
                .1
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum();
    println!(
        "  all restarts: reattached p50 {:.2} s, max {:.2} s; {same}/{vms} VMs in the same QEMU, {running}/{vms} containers running, {restarted_containers} container restarts",
        p50_secs(&all),
        max_secs(&all)
    );
    println!("  (the time includes docker stopping and starting the virthost)");

    // QEMU's overhead: its RSS beside the guest's memory (the template's 128 MiB,
    // of which an idle tiny guest touches little under TCG).
    let rss: Vec<u64> = after.iter().map(|p| rss_kib(p.trim())).collect();
    let mut sorted = rss.clone();
    sorted.sort();
    println!(
        "  QEMU RSS per idle tiny VM (TCG, guest memory 128 MiB): p50 {:.1} MiB, max {:.1} MiB",
        sorted[sorted.len() / 2] as f64 / 1024.0,
        sorted[sorted.len() - 1] as f64 / 1024.0
    );

    // A SIGKILL storm on the reattached VMs: every container at once.
    let domains: Vec<String> = names.iter().map(|n| domain_of(n)).collect();
    let killed = Instant::now();
    let mut kill = vec!["kill", "-s", "KILL"];
    kill.extend(names.iter().map(String::as_str));
    let (ok, out) = docker(&kill);
    assert!(ok, "docker kill: {out}");
    while after.iter().any(|p| virtkube_e2e::process_runs(p)) && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let qemus_ended = killed.elapsed();
    let listed = || virtkube_e2e::virthost_virsh("virtkube-virthost", &["list", "--name"]).1;
    while domains.iter().any(|d| listed().contains(d.as_str())) && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let orphans = domains.iter().filter(|d| listed().contains(d.as_str())).count();
    println!(
        "  SIGKILL of all {vms} reattached VM containers at once: every QEMU ended within {:.2} s; {orphans} orphans after {:.1} s",
        qemus_ended.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );

    for name in &names {
        let _ = docker(&["rm", "-f", name]);
    }
    assert_eq!(same, vms, "a VM did not survive the restarts in its QEMU");
    assert_eq!(orphans, 0, "domains outlived their containers");
}
