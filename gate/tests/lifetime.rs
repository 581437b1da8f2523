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
    let golden = support::tiny_golden_without_network();
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
        support::remove_pod_cgroup(&cg);
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

/// `/proc/<pid>/stat`'s start time (clock ticks since boot).
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    virtkube_gate::identity::start_ticks(&stat).unwrap()
}

/// The tiny guest's golden XML as domain `name`, owned by `pid` (started at
/// `start`) as the gate records it, created straight on libvirtd: what a
/// break between a create and its hand-over leaves (the gate or the
/// connection gone before the gate watched the owner).
fn create_recorded(name: &str, uuid: &str, pid: u32, start: u64, dir: &Path) {
    make_recorded("create", name, uuid, pid, start, dir);
}

/// `virsh VERB` (create or define) of the tiny guest with an owner record.
fn make_recorded(verb: &str, name: &str, uuid: &str, pid: u32, start: u64, dir: &Path) {
    let golden = support::tiny_golden_without_network();
    let record = format!(
        r#"<owner xmlns="{}" pid="{pid}" start="{start}" caller="test"/></metadata>"#,
        virtkube_gate::keeper::OWNER_NAMESPACE
    );
    let xml = golden
        .replace("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", uuid)
        .replace("virtkube-golden_tiny-0", name)
        .replacen("</metadata>", &record, 1);
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", verb, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Two owners for recorded domains: a process that lives (`sleep`), and one
/// that has exited; each with its start time.
struct Owners {
    living: std::process::Child,
    living_start: u64,
    exited: u32,
    exited_start: u64,
}

fn two_owners() -> Owners {
    let living = std::process::Command::new("sleep").arg("120").spawn().unwrap();
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    let exited_start = start_ticks(exited.id());
    exited.wait().unwrap();
    Owners {
        living_start: start_ticks(living.id()),
        living,
        exited: exited.id(),
        exited_start,
    }
}

/// `virsh VERB NAME` for each name when `cleanup` runs.
fn virsh_at_cleanup(cleanup: &mut Cleanup, verb: &'static str, names: [&String; 2]) {
    for name in names {
        let name = name.clone();
        cleanup.0.push(Box::new(move || {
            let _ = std::process::Command::new("virsh")
                .args(["-c", "qemu:///system", verb, &name])
                .output();
        }));
    }
}

/// The gate in front of libvirtd, killed when `cleanup` runs; its log.
fn gate_until_cleanup(cleanup: &mut Cleanup, dir: &Path) -> std::path::PathBuf {
    let (gate, _socket, log) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), dir, "/virtkube-test");
    let mut gate = Some(gate);
    cleanup.0.push(Box::new(move || {
        if let Some(mut g) = gate.take() {
            kill(&mut g);
        }
    }));
    log
}

#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn the_gate_sweeps_up_domains_left_between_create_and_hand_over() {
    let dir = std::env::temp_dir().join(format!("virtkube-gate-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup(Vec::new());
    let (living, dead) = (
        format!("gate-sweep-living-{}", std::process::id()),
        format!("gate-sweep-dead-{}", std::process::id()),
    );
    virsh_at_cleanup(&mut cleanup, "destroy", [&living, &dead]);
    let mut owners = two_owners();
    // Made while the gate runs (its periodic sweep finds them), after its first sweep.
    let log = gate_until_cleanup(&mut cleanup, &dir);
    std::thread::sleep(Duration::from_secs(1));
    let tag = format!("{:012x}", std::process::id());
    create_recorded(
        &living,
        &format!("7d1e2f3a-4b5c-4d6e-8f70-{tag}"),
        owners.living.id(),
        owners.living_start,
        &dir,
    );
    create_recorded(
        &dead,
        &format!("7d1e2f3a-4b5c-4d6e-8f71-{tag}"),
        owners.exited,
        owners.exited_start,
        &dir,
    );
    // The dead owner's domain goes; the live one's is kept while it lives.
    let created = Instant::now();
    let took = gone_within(
        &dead,
        created,
        Duration::from_secs(10),
        "a domain whose owner has exited",
        &log,
    );
    eprintln!("domain of an exited owner swept up {took:?} after it was created");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        domstate(&living).as_deref(),
        Some("running"),
        "the living owner's domain"
    );
    let killed = Instant::now();
    kill(&mut owners.living);
    let took = gone_within(
        &living,
        killed,
        Duration::from_secs(2),
        "a swept-up domain whose owner exits",
        &log,
    );
    eprintln!("swept-up domain gone {took:?} after its owner's SIGKILL");
}

/// Definitions the gate made and never started (left when the gate stopped
/// between a define and its start): undefined once their owner has exited,
/// kept while it lives.
#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn the_gate_sweeps_up_definitions_whose_owner_has_exited() {
    let dir = std::env::temp_dir().join(format!("virtkube-gate-sweep-defs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup(Vec::new());
    let (living, dead) = (
        format!("gate-defs-living-{}", std::process::id()),
        format!("gate-defs-dead-{}", std::process::id()),
    );
    virsh_at_cleanup(&mut cleanup, "undefine", [&living, &dead]);
    let mut owners = two_owners();
    let tag = format!("{:012x}", std::process::id());
    make_recorded(
        "define",
        &living,
        &format!("7d1e2f3a-4b5c-4d6e-8f72-{tag}"),
        owners.living.id(),
        owners.living_start,
        &dir,
    );
    make_recorded(
        "define",
        &dead,
        &format!("7d1e2f3a-4b5c-4d6e-8f73-{tag}"),
        owners.exited,
        owners.exited_start,
        &dir,
    );
    assert_eq!(domstate(&dead).as_deref(), Some("shut off"), "defined, not started");
    let log = gate_until_cleanup(&mut cleanup, &dir);
    let started = Instant::now();
    let took = gone_within(
        &dead,
        started,
        Duration::from_secs(10),
        "a definition whose owner has exited",
        &log,
    );
    eprintln!("definition of an exited owner undefined {took:?} after the gate started");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        domstate(&living).as_deref(),
        Some("shut off"),
        "the living owner's definition"
    );
    let killed = Instant::now();
    kill(&mut owners.living);
    gone_within(
        &living,
        killed,
        Duration::from_secs(10),
        "a definition whose owner exits",
        &log,
    );
}
