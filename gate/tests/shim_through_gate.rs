//! The shim, unchanged, through the gate: this test process moves itself into
//! a pod's cgroup (so it is a separate test binary), starts the gate in front
//! of the real libvirtd and runs the shim with the gate's socket as its
//! libvirt socket. The VM boots and its console reaches the shim's stdout.
//! Then the gate is SIGKILLed and started again: the VM runs on (the same
//! QEMU), the shim reattaches and the console answers typed input again.
//! SIGTERM ends it cleanly (exit 0).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn the_shim_runs_its_vm_through_the_gate_unchanged() {
    let shim = support::shim_binary();
    let (dir, uid, cgroup) = support::this_process_in_a_pod("virtkube-shim-gate", "5c6d7e8f-0a1b-4c2d-8e3f");
    let (gate, socket, log) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), &dir, "/virtkube-test");
    let gate = support::KillOnDrop(gate);
    let pod = format!("through-gate-{}", std::process::id());
    let mut child = support::shim_command(
        &shim,
        &dir,
        &socket,
        ("gate-test", &pod, &uid),
        "console=ttyS0 panic=-1",
    )
    .env("VIRTKUBE_SHUTDOWN_TIMEOUT", "20")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    let mut console_input = child.stdin.take().unwrap();
    let pump = |mut from: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        buf
    };
    let stdout = pump(Box::new(child.stdout.take().unwrap()));
    let stderr = pump(Box::new(child.stderr.take().unwrap()));
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    let report = || {
        format!(
            "--- shim stderr ---\n{}\n--- shim stdout ---\n{}\n--- gate log ---\n{}",
            text(&stderr),
            text(&stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !text(&stdout).contains("virtkube-tiny: ready") {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot through the gate\n{}",
            report()
        );
        assert!(child.try_wait().unwrap().is_none(), "the shim exited\n{}", report());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The gate dies and comes back: the VM runs on, the shim reattaches.
    let gate_log = std::fs::read_to_string(&log).unwrap();
    let name = gate_log
        .lines()
        .find_map(|l| l.split("domain=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no admitted domain in the gate's log\n{}", report()))
        .to_owned();
    let qemu_pid = || std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap_or_default();
    let qemu_before = qemu_pid();
    let mut gate = gate;
    gate.0.kill().unwrap();
    let _ = gate.0.wait();
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_file(&socket);
    std::fs::rename(&log, dir.join("gate-before-restart.log")).unwrap();
    let (gate, _, _) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), &dir, "/virtkube-test");
    let gate = support::KillOnDrop(gate);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text(&stderr).contains("reattached to domain") {
        assert!(Instant::now() < deadline, "the shim did not reattach\n{}", report());
        assert!(child.try_wait().unwrap().is_none(), "the shim exited\n{}", report());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qemu_pid(), qemu_before, "the same QEMU runs on\n{}", report());
    // The console answers again: typed into the guest's shell.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text(&stdout).contains("after-reattach-42") {
        assert!(
            Instant::now() < deadline,
            "the console did not answer after reattaching\n{}",
            report()
        );
        console_input.write_all(b"echo after-reattach-$((6*7))\n").unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    // SAFETY: kill(2) with the pid of a child we spawned and a valid signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the shim did not stop\n{}", report());
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(gate);
    assert_eq!(status.code(), Some(0), "{}", report());
    let gate_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        gate_log.contains("kept=1 ended=0"),
        "the new gate should have taken the domain over:\n{gate_log}"
    );
    let before = std::fs::read_to_string(dir.join("gate-before-restart.log")).unwrap();
    assert!(before.contains("domain admitted"), "{before}");
    for log in [&before, &gate_log] {
        assert!(!log.contains("refused"), "the shim's own calls were refused:\n{log}");
    }
    // Out of the pod's cgroup again, so the directory can go.
    if let Some(root) = cgroup.ancestors().nth(5) {
        let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
    }
    support::remove_pod_cgroup(&cgroup);
}
