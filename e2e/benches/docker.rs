//! The Docker path's speed (the virthost container of scripts/virthost-up.sh,
//! the images of scripts/build-images.sh): prints numbers, asserts none.
//!
//! For ten runs of `virtkube/tiny`: `docker run -d` → the first guest console
//! line in `docker logs`, and `docker stop` → the container gone (ACPI
//! shutdown of the guest). Logs are polled every 20 ms.
//!
//! Then `KILL_RUNS` (default 100) times: `docker kill -s KILL` of a VM
//! container whose domain runs → its domain gone from the virthost's libvirtd
//! (through the gate, as deployed), against the 2 s bound.
//!
//! Run: `cargo bench -p virtkube-e2e --bench docker`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::time::{Duration, Instant};

use virtkube_e2e::{max_secs, p50_secs, run, virthost_virsh};

const DOCKER: &str = "/usr/bin/docker";
const SOCKET_DIR: &str = "/var/run/virtkube";
const RUNS: usize = 10;
const SHIM_PREFIX: &str = "[virtkube-shim]";

fn docker(args: &[&str]) -> (bool, String) {
    run(DOCKER, args, None)
}

fn main() {
    assert!(
        std::path::Path::new(&format!("{SOCKET_DIR}/libvirt-sock")).exists(),
        "no virthost socket in {SOCKET_DIR}: run scripts/build-images.sh and scripts/virthost-up.sh"
    );
    let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let (mut to_console, mut to_stopped) = (Vec::new(), Vec::new());
    println!("docker run of virtkube/tiny (TCG), {RUNS} runs");
    for i in 0..RUNS {
        let name = format!("virtkube-bench-{}-{i}", std::process::id());
        let _ = docker(&["rm", "-f", &name]);
        let started = Instant::now();
        let (success, out) = docker(&["run", "-d", "--name", &name, "-v", &volume, "virtkube/tiny:latest"]);
        assert!(success, "docker run: {out}");
        let console = loop {
            let (_, logs) = docker(&["logs", &name]);
            if logs
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with(SHIM_PREFIX))
            {
                break started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no console:\n{logs}");
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the guest reach its shell, so that the stop is a real ACPI shutdown.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker(&["logs", &name]).1.contains("virtkube-tiny: ready") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let stopping = Instant::now();
        let (success, out) = docker(&["stop", "-t", "30", &name]);
        let stopped = stopping.elapsed();
        assert!(success, "docker stop: {out}");
        let (_, code) = docker(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
        println!(
            "  run {:2}: first console line {:5.2} s, docker stop {:5.2} s (exit code {})",
            i + 1,
            console.as_secs_f64(),
            stopped.as_secs_f64(),
            code.trim()
        );
        to_console.push(console);
        to_stopped.push(stopped);
        let _ = docker(&["rm", "-f", &name]);
    }
    println!(
        "docker run → first line of guest console: p50 {:5.2} s   max {:5.2} s",
        p50_secs(&to_console),
        max_secs(&to_console)
    );
    println!(
        "docker stop → container exited (ACPI):     p50 {:5.2} s   max {:5.2} s",
        p50_secs(&to_stopped),
        max_secs(&to_stopped)
    );

    let runs: usize = std::env::var("KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut gone_after = Vec::new();
    for i in 0..runs {
        let name = format!("virtkube-bench-kill-{}-{i}", std::process::id());
        let (success, id) = docker(&["run", "-d", "--name", &name, "-v", &volume, "virtkube/tiny:latest"]);
        assert!(success, "docker run: {id}");
        let domain = &id.trim()[..12];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker(&["logs", &name]).1.contains("started domain") {
            assert!(Instant::now() < deadline, "{name} did not start its domain");
            std::thread::sleep(Duration::from_millis(20));
        }
        let killed = Instant::now();
        let (success, out) = docker(&["kill", "-s", "KILL", &name]);
        assert!(success, "docker kill: {out}");
        while virthost_virsh("virtkube-virthost", &["domstate", domain]).0 {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "{domain} outlived its container by 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        gone_after.push(killed.elapsed());
        let _ = docker(&["rm", "-f", &name]);
    }
    let within = gone_after.iter().filter(|d| **d <= Duration::from_secs(2)).count();
    println!(
        "docker kill -s KILL → domain gone (as seen by docker exec virsh, ~0.1 s each): {within}/{runs} within 2 s; p50 {:5.2} s   max {:5.2} s",
        p50_secs(&gone_after),
        max_secs(&gone_after)
    );
}
