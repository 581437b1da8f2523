//! Broken frames from an identified VM container (the probe's `--malformed`
//! mode, in a pod's cgroup), against a gate in front of the real libvirtd:
//! oversized and undersized lengths, a truncated frame, garbage XDR, a 3 GiB
//! string, packets the shim never sends, a flood of calls whose answers are
//! never read, and more connections than a caller may hold. Each is closed or
//! refused with a reason, the gate stays up and answers, and its memory stays
//! bounded.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

mod support;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "needs libvirtd (scripts/libvirtd-up.sh) and root for cgroups: scripts/test.sh runs it"]
fn broken_frames_end_only_their_own_connection() {
    let dir = std::env::temp_dir().join(format!("virtkube-gate-malformed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut gate, socket, log) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), &dir, "/virtkube-test");
    let uid = format!("5c8e4f73-6c3a-4d4b-8b9f-{:012x}", std::process::id());
    let cgroup = support::pod_cgroup(
        "/virtkube-test",
        "besteffort",
        &uid,
        &format!("{:064x}", u64::from(std::process::id()) + 1),
    );
    let rss_before = rss_kib(gate.id());

    let mut probe = Command::new(env!("CARGO_BIN_EXE_virtkube-gate-probe"))
        .args(["--malformed", socket.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    support::enter(&cgroup, probe.id());
    probe.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let started = Instant::now();
    let output = probe.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let gate_log = std::fs::read_to_string(&log).unwrap_or_default();
    let result = |attempt: &str| -> String {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{attempt}\t")))
            .unwrap_or_else(|| {
                panic!(
                    "no result for {attempt:?}:\n{report}\ngate log (tail):\n{}",
                    tail(&gate_log)
                )
            })
            .to_owned()
    };
    for closed in [
        "length 0xffffffff",
        "a 4 MiB + 2 KiB frame",
        "a truncated frame",
        "a length below the header",
        "an unknown program",
        "a reply from the client",
    ] {
        assert_eq!(result(closed), "closed", "{closed}:\n{report}");
    }
    for (attempt, why) in [
        ("garbage XDR in CONNECT_OPEN", "malformed"),
        ("a 3 GiB string in CREATE_XML", "malformed"),
        ("a fifth connection", "at most 4"),
    ] {
        let got = result(attempt);
        assert!(
            got.starts_with("denied\taccess denied by virtkube-gate: ") && got.contains(why),
            "{attempt}: {got}"
        );
    }
    assert!(result("a flood of 200000 refused calls, answers unread").starts_with("sent "));
    eprintln!("{report}(in {:?})", started.elapsed());

    // Still up, still answering (a host process gets its reason), memory bounded.
    assert!(
        gate.try_wait().unwrap().is_none(),
        "the gate died:\n{}",
        tail(&gate_log)
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = runtime
        .block_on(libvirt_wire::Client::connect(
            &format!("qemu+unix:///system?socket={}", socket.display()),
            libvirt_wire::Options::default(),
        ))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("access denied by virtkube-gate"), "{refused}");
    let rss_after = rss_kib(gate.id());
    eprintln!("gate RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < 32 * 1024,
        "the gate holds {rss_after} KiB after the attacks"
    );
    for line in ["broke the protocol", "closing a VM container's connection"] {
        assert!(
            gate_log.contains(line),
            "the gate logged no {line:?}:\n{}",
            tail(&gate_log)
        );
    }

    let _ = gate.kill();
    let _ = gate.wait();
    support::remove_pod_cgroup(&cgroup);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
