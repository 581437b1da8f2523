//! The gate against a hostile VM container, on the real libvirtd (qemu
//! driver, the tiny guest): the probe runs in a pod's cgroup (made here with
//! the kernel's cgroup filesystem, as the kubelet makes it) and tries what a
//! VM container must not do; every attempt must be refused with a reason and
//! a gate log line, and nothing may reach libvirtd. Then it creates its own
//! domain, which a SIGKILL of the probe must end. A host process
//! (no pod, no container) is refused with the reason.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn a_hostile_vm_container_gets_nothing_but_its_own_domain() {
    let dir = std::env::temp_dir().join(format!("virtkube-gate-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = support::Cleanup(Vec::new());
    let (gate, socket, log) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), &dir, "/virtkube-test");
    let mut gate = Some(gate);
    cleanup.0.push(Box::new(move || {
        if let Some(mut g) = gate.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }));
    let link = PathBuf::from("/var/lib/virtkube/images/gate-probe-link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    cleanup.0.push(Box::new(move || {
        let _ = std::fs::remove_file("/var/lib/virtkube/images/gate-probe-link");
    }));

    let uid = format!("4b7d3e62-5b2f-4c3a-9a8e-{:012x}", std::process::id());
    let name = format!("gate-hostile-{}", std::process::id());
    let golden = support::tiny_golden_without_network();
    let own_xml = golden
        .replace("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", &uid)
        .replace("virtkube-golden_tiny-0", &name);
    let xml_file = dir.join("own.xml");
    std::fs::write(&xml_file, &own_xml).unwrap();

    let cgroup = support::pod_cgroup(
        "/virtkube-test",
        "burstable",
        &uid,
        &format!("{:064x}", std::process::id()),
    );
    let cg = cgroup.clone();
    cleanup.0.push(Box::new(move || {
        support::remove_pod_cgroup(&cg);
    }));
    let (mut probe, _stdin, rx, lines) = support::run_probe(&socket, &uid, &xml_file, &cgroup, &log);
    let report = lines.join("\n");
    let refusals = virtkube_gate::probe_report::judge(&lines).unwrap_or_else(|e| panic!("{e}"));
    assert!(refusals >= 23, "fewer attempts than expected:\n{report}");
    for (attempt, why) in [
        ("create: another pod's UUID", "must be the calling pod's UID"),
        ("create: hostdev", "<hostdev>"),
        ("create: /etc/shadow as a kernel", "outside the directories"),
        (
            "create: a symlink out of the images directory",
            "through a symbolic link",
        ),
        ("create: a ../ escape", "without . or .."),
        ("list all domains", "allow-list"),
        ("events of every domain", "name your own domain"),
        ("another domain by UUID", "is not this container's"),
        ("open test:///default", "connection URI"),
        (
            "create: without VALIDATE (XML libvirt has not checked)",
            "must be created with VALIDATE",
        ),
        ("find another domain by UUID", "keeps no domain"),
        ("find a second domain after creating one", "already has its domain"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{attempt}\t")) && l.contains(why)),
            "{attempt}: expected a refusal naming {why:?}:\n{report}"
        );
    }
    let gate_log = std::fs::read_to_string(&log).unwrap();
    let logged = gate_log.lines().filter(|l| l.contains("refused")).count();
    assert!(
        logged >= refusals - 1,
        "{logged} refusals logged for {refusals}:\n{gate_log}"
    );
    assert_eq!(
        support::domstate(&name).as_deref(),
        Some("running"),
        "the probe's own domain"
    );

    // Its QEMU was moved into the probe's pod's cgroup (v2: a leaf under it),
    // whose limit includes the RuntimeClass's overhead.
    let qemu = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
    let qemu_cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", qemu.trim())).unwrap();
    let pod_dir = cgroup.parent().unwrap().to_str().unwrap();
    let pod_path = format!("/virtkube-test/{}", pod_dir.split("/virtkube-test/").nth(1).unwrap());
    assert!(
        qemu_cgroups.contains(&format!("{pod_path}\n"))
            || qemu_cgroups.contains(&format!("{pod_path}/virtkube-qemu\n")),
        "QEMU should be in the pod's cgroup {pod_path}:\n{qemu_cgroups}"
    );

    // Another process of the same pod cannot take the domain over,
    let uuid = rx
        .recv_timeout(Duration::from_secs(5))
        .ok()
        .and_then(|l| l.strip_prefix("uuid ").map(str::to_owned))
        .expect("the probe prints its domain's UUID after ready");
    // Nor can a process of another pod.
    let other_pod = support::pod_cgroup(
        "/virtkube-test",
        "burstable",
        "9e8d7c6b-5a49-4382-9716-0f1e2d3c4b5a",
        &format!("{:064x}", std::process::id() + 1),
    );
    let op = other_pod.clone();
    cleanup.0.push(Box::new(move || {
        let _ = std::fs::remove_dir(&op);
        if let Some(pod) = op.parent() {
            let _ = std::fs::remove_dir(pod);
        }
    }));
    for (from, whose) in [(&cgroup, "the same pod"), (&other_pod, "another pod")] {
        let mut intruder = Command::new(env!("CARGO_BIN_EXE_virtkube-gate-probe"))
            .args(["--find", socket.to_str().unwrap(), &uuid])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        support::enter(from, intruder.id());
        intruder.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let taken = String::from_utf8_lossy(&intruder.wait_with_output().unwrap().stdout).into_owned();
        assert!(
            taken.starts_with("take over another process's domain\tREFUSED\t")
                && taken.contains("belongs to another process"),
            "a process of {whose}: {taken}"
        );
    }

    // SIGKILL of the VM container: its domain is gone within 2 s.
    let killed = Instant::now();
    probe.kill().unwrap();
    let _ = probe.wait();
    while support::domstate(&name).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the domain outlived its container by 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("domain gone {:?} after SIGKILL of its container", killed.elapsed());

    // A VM container that hands its connection to another process and exits:
    // the VM ends with the process that connected, not with the last copy.
    let (_probe, mut stdin, rx, _) = support::run_probe(&socket, &uid, &xml_file, &cgroup, &log);
    assert_eq!(
        support::domstate(&name).as_deref(),
        Some("running"),
        "the second probe's domain"
    );
    stdin.write_all(b"handover\n").unwrap();
    let handed = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(10)).ok())
        .find(|l| !l.starts_with("uuid "))
        .unwrap_or_default();
    let heir: i32 = handed
        .strip_prefix("handed over ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("the probe did not hand over: {handed}"));
    cleanup.0.push(Box::new(move || {
        // SAFETY: signalling the test's own `sleep` child.
        unsafe { libc::kill(heir, libc::SIGKILL) };
    }));
    let exited = Instant::now();
    while support::domstate(&name).is_some() {
        assert!(
            exited.elapsed() < Duration::from_secs(2),
            "the domain outlived the process that created it by 2 s, its connection held by another"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signal 0 only checks that the process exists.
    let heir_alive = unsafe { libc::kill(heir, 0) } == 0;
    assert!(heir_alive, "the heir should still hold the connection");
    eprintln!(
        "domain gone {:?} after its creator exited, its connection inherited",
        exited.elapsed()
    );

    // A host process is no VM container.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = runtime
        .block_on(libvirt_wire::Client::connect(
            &format!("qemu+unix:///system?socket={}", socket.display()),
            libvirt_wire::Options::default(),
        ))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("access denied by virtkube-gate")
            && message.contains("not in a Kubernetes pod or Docker container cgroup"),
        "{message}"
    );
}
