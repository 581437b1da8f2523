//! The gate, not a libvirt connection, owns "a VM never outlives its
//! container", on the real libvirtd (qemu driver, the tiny guest): a SIGKILL
//! of the gate leaves running VMs running, a new gate takes them over (and a
//! SIGKILL of their container still ends them within 2 s), and a container
//! killed while the gate was down has its domain destroyed within 10 s of the
//! gate's return.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

mod support;

use support::{Cleanup, domstate};

/// A probe in a pod cgroup of its own, with its domain running.
struct Vm {
    probe: Child,
    name: String,
    _stdin: std::process::ChildStdin,
}

fn start_vm(dir: &Path, socket: &Path, log: &Path, tag: u32, cleanup: &mut Cleanup) -> Vm {
    let uid = format!("5c8e4f73-6c3a-4d4b-8b9f-{:06x}{tag:06x}", std::process::id());
    let name = format!("gate-lifetime-{}-{tag}", std::process::id());
    let golden =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shim/tests/golden/tiny.xml")).unwrap();
    let xml = golden
        .replace("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", &uid)
        .replace("virtkube-golden_tiny-0", &name);
    let xml_file = dir.join(format!("vm-{tag}.xml"));
    std::fs::write(&xml_file, xml).unwrap();
    let cgroup = support::pod_cgroup("/virtkube-test", "besteffort", &uid, &format!("{tag:064x}"));
    let (cg, domain) = (cgroup.clone(), name.clone());
    cleanup.0.push(Box::new(move || {
        let _ = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &domain])
            .output();
        // QEMU leaves the cgroup when it dies; the directories go after it.
        for _ in 0..50 {
            if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(pod) = cg.parent() {
            let _ = std::fs::remove_dir(pod);
        }
    }));
    let (probe, stdin, _rx, lines) = support::run_probe(socket, &uid, &xml_file, &cgroup, log);
    // (The hostile test judges the refusals; here only the VM matters.)
    assert!(lines.iter().any(|l| l == "create own domain\tALLOWED"), "{lines:#?}");
    assert_eq!(domstate(&name).as_deref(), Some("running"));
    Vm {
        probe,
        name,
        _stdin: stdin,
    }
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    let _ = child.wait();
}

/// Waits until domain `name` is gone; fails after `limit`. Returns how long it took.
fn gone_within(name: &str, since: Instant, limit: Duration, what: &str, log: &Path) -> Duration {
    while domstate(name).is_some() {
        assert!(
            since.elapsed() < limit,
            "{what}: domain {name} still there after {limit:?}; gate log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    since.elapsed()
}

#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn vms_outlive_the_gate_and_not_their_containers() {
    let dir = std::env::temp_dir().join(format!("virtkube-gate-lifetime-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup(Vec::new());
    let gate_binary = env!("CARGO_BIN_EXE_virtkube-gate");
    let (gate, socket, log) = support::start_gate(gate_binary, &dir, "/virtkube-test");
    let first_gate = std::sync::Arc::new(std::sync::Mutex::new(gate));
    let held = first_gate.clone();
    cleanup.0.push(Box::new(move || {
        let _ = held.lock().map(|mut g| kill(&mut g));
    }));

    let mut kept = start_vm(&dir, &socket, &log, 1, &mut cleanup);
    let mut orphaned = start_vm(&dir, &socket, &log, 2, &mut cleanup);
    let qemu_pid = |name: &str| std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
    let kept_qemu = qemu_pid(&kept.name);

    // The gate dies: the VMs do not.
    kill(&mut first_gate.lock().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    for vm in [&kept, &orphaned] {
        assert_eq!(
            domstate(&vm.name).as_deref(),
            Some("running"),
            "{} without the gate",
            vm.name
        );
    }
    // A container dies while the gate is away: nothing can end its VM yet.
    kill(&mut orphaned.probe);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(domstate(&orphaned.name).as_deref(), Some("running"));

    // The gate returns: it destroys the orphan and keeps the other.
    let _ = std::fs::remove_file(&socket);
    let returned = Instant::now();
    let (gate, _, log) = support::start_gate(gate_binary, &dir, "/virtkube-test");
    let mut gate = Some(gate);
    cleanup.0.push(Box::new(move || {
        if let Some(mut g) = gate.take() {
            kill(&mut g);
        }
    }));
    let took = gone_within(
        &orphaned.name,
        returned,
        Duration::from_secs(10),
        "a container killed while the gate was down",
        &log,
    );
    eprintln!("orphan destroyed {took:?} after the gate's return");
    assert_eq!(
        domstate(&kept.name).as_deref(),
        Some("running"),
        "the VM whose container lives"
    );
    assert_eq!(qemu_pid(&kept.name), kept_qemu, "the same QEMU");

    // The new gate watches the container it took over: SIGKILL ends its VM.
    let killed = Instant::now();
    kill(&mut kept.probe);
    let took = gone_within(
        &kept.name,
        killed,
        Duration::from_secs(2),
        "a container killed after its VM was taken over",
        &log,
    );
    eprintln!("taken-over domain gone {took:?} after SIGKILL of its container");
}
