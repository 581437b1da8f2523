//! What happens to running VMs when the virthost container restarts (its own
//! test binary: cargo runs test binaries one at a time, so no other test
//! loses its libvirtd). Today's design: QEMU lives in the virthost container,
//! so the VM dies with it, and the VM container must fail visibly with the
//! "lost libvirtd" code (4), not hang.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

const DOCKER: &str = "/usr/bin/docker";

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new(DOCKER).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// libvirtd answers inside the virthost and the gate's socket is there.
fn virthost_answers() -> bool {
    std::path::Path::new("/var/run/virtkube/libvirt-sock").exists()
        && virtkube_e2e::virthost_virsh("virtkube-virthost", &["version"]).0
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn restarting_the_virthost_fails_running_vm_containers_with_code_4() {
    assert!(
        virthost_answers(),
        "the virthost container is not running: run scripts/virthost-up.sh"
    );
    let name = format!("e2e-virthost-restart-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    let (ok, out) = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-v",
        "/var/run/virtkube:/var/run/libvirt:ro",
        "virtkube/tiny:latest",
    ]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker(&["logs", &name]).1.contains("started domain") {
        assert!(Instant::now() < deadline, "{}", docker(&["logs", &name]).1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out) = docker(&["restart", "-t", "10", "virtkube-virthost"]);
    assert!(ok, "{out}");
    let (ok, code) = docker(&["wait", &name]);
    let logs = docker(&["logs", &name]).1;
    let _ = docker(&["rm", "-f", &name]);
    assert!(ok, "{code}");
    assert_eq!(code.trim(), "4", "{logs}");
    assert!(logs.contains("lost the connection to libvirtd"), "{logs}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virthost_answers() {
        assert!(
            Instant::now() < deadline,
            "the virthost did not come back after its restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn virthost_on_its_own(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("{name}-sock"));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = docker(&["rm", "-f", name]);
    let volume = format!("{}:/run/virtkube", dir.display());
    let (ok, out) = docker(&["run", "-d", "--name", name, "-v", &volume, "virtkube/virthost:latest"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker(&["logs", name]).1.contains("virtkube-gate is up") {
        assert!(Instant::now() < deadline, "{}", docker(&["logs", name]).1);
        std::thread::sleep(Duration::from_millis(200));
    }
    name.to_owned()
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_virthost_exits_non_zero_when_libvirtd_or_the_gate_dies_and_zero_on_sigterm() {
    // libvirtd, and the gate (without it no VM container reaches libvirtd).
    for (which, kill, said) in [
        ("libvirtd", "kill -KILL $(cat /run/libvirtd.pid)", "libvirtd exited"),
        ("gate", "kill -KILL $(pidof virtkube-gate)", "virtkube-gate exited"),
    ] {
        let name = virthost_on_its_own(&format!("virtkube-virthost-{which}-{}", std::process::id()));
        // The container may die (as it should) before `docker exec` reports
        // back, which then fails with no output: the exit code and logs decide.
        let (_, out) = docker(&["exec", &name, "sh", "-c", kill]);
        let (_, code) = docker(&["wait", &name]);
        let logs = docker(&["logs", &name]).1;
        let _ = docker(&["rm", "-f", &name]);
        assert_ne!(code.trim(), "0", "{which}: {logs}\n(docker exec kill: {out})");
        assert!(logs.contains(said), "{which}: {logs}\n(docker exec kill: {out})");
    }

    let name = virthost_on_its_own(&format!("virtkube-virthost-term-{}", std::process::id()));
    let logs = stop_expecting_status_0(&name);
    assert!(logs.contains("[virthost] stopping"), "{logs}");
}

/// nodeinfo holds no VM: when it dies it is restarted inside the virthost,
/// with a back-off, and the virthost (with its VMs) stays up. Here it finds no
/// Kubernetes API and exits at once, again and again; the gate's TCP listener
/// fails the same way and the gate goes on serving its socket.
#[test]
#[ignore = "needs dockerd and the virthost image: scripts/test.sh runs it"]
fn a_dying_nodeinfo_is_restarted_inside_the_virthost() {
    let name = format!("virtkube-virthost-nodeinfo-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("{name}-sock"));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = docker(&["rm", "-f", &name]);
    let volume = format!("{}:/run/virtkube", dir.display());
    let (ok, out) = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-e",
        "KUBERNETES_SERVICE_HOST=127.0.0.1",
        "-e",
        "KUBERNETES_SERVICE_PORT=1",
        "-e",
        "NODE_NAME=docker",
        "-v",
        &volume,
        "virtkube/virthost:latest",
    ]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = docker(&["logs", &name]).1;
        if logs.matches("virtkube-nodeinfo exited").count() >= 2 {
            break logs;
        }
        assert!(Instant::now() < deadline, "nodeinfo was not restarted twice:\n{logs}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        logs.contains("restarting it in 1s") && logs.contains("restarting it in 2s"),
        "{logs}"
    );
    assert!(logs.contains("not serving VM pods over TCP"), "{logs}");
    let (_, running) = docker(&["inspect", "-f", "{{.State.Running}}", &name]);
    assert_eq!(running.trim(), "true", "{logs}");
    assert!(dir.join("libvirt-sock").exists(), "the gate's socket is gone:\n{logs}");
    // SIGTERM still stops everything, promptly, with status 0.
    let stopping = Instant::now();
    stop_expecting_status_0(&name);
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        stopping.elapsed()
    );
}

/// `docker stop` (SIGTERM) of virthost `name`, which must exit with status
/// 0; removes it and returns its logs.
fn stop_expecting_status_0(name: &str) -> String {
    let (ok, out) = docker(&["stop", "-t", "20", name]);
    assert!(ok, "{out}");
    let (_, code) = docker(&["inspect", "-f", "{{.State.ExitCode}}", name]);
    let logs = docker(&["logs", name]).1;
    let _ = docker(&["rm", "-f", name]);
    assert_eq!(code.trim(), "0", "{logs}");
    logs
}
