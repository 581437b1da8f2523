//! The shim against a libvirtd that misbehaves (calls it never answers, a
//! console flood) and a stdout nobody reads: a stop must still go ACPI →
//! destroy → the documented exit code within the shutdown timeout plus a few
//! seconds, and a healthy daemon must never be declared dead.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use libvirt_wire::protocol::procedure;
use support::Shim;
use support::fake_libvirtd::{FakeLibvirtd, Script};

// No NIC: a pod interface needs the gate, and these tests talk to a fake libvirtd.
const TEMPLATE: &str = "memory: 64Mi\ninterfaces: []\n";
/// The shim's own state poll interval (runtime::STATE_POLL) plus slack.
const FIRST_POLL: Duration = Duration::from_secs(8);

fn env<'a>(uri: &'a str, pod: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("VIRTKUBE_LIBVIRT_URI", uri),
        ("VIRTKUBE_SHUTDOWN_TIMEOUT", "2"),
        ("VIRTKUBE_CONNECT_TIMEOUT", "0"),
        ("POD_NAMESPACE", "stuck"),
        ("POD_NAME", pod),
    ]
}

#[test]
fn a_stop_is_not_held_up_by_calls_libvirtd_never_answers() {
    let dir = support::scratch("fake-stuck-calls");
    let fake = FakeLibvirtd::start(
        &dir,
        Script {
            ignore_get_state: true,
            ignore_destroy: true,
            ..Script::default()
        },
    );
    let uri = fake.uri();
    let mut shim = Shim::start("stuck-calls", TEMPLATE, &env(&uri, "stuck-calls"), &[], false);
    shim.wait_for_stderr("started domain", Duration::from_secs(10));
    // A state check is now pending and will never be answered.
    assert!(
        fake.wait_call(procedure::DOMAIN_GET_STATE, FIRST_POLL).is_some(),
        "the shim never polled the domain's state"
    );
    let stop = Instant::now();
    shim.signal(libc::SIGTERM);
    let acpi = fake
        .wait_call(procedure::DOMAIN_SHUTDOWN_FLAGS, Duration::from_secs(2))
        .expect("SIGTERM waited behind the unanswered state check: no ACPI request");
    assert!(
        acpi - stop < Duration::from_secs(1),
        "ACPI request {:?} after SIGTERM",
        acpi - stop
    );
    // The guest ignores ACPI: after the 2 s timeout the shim destroys it; the
    // destroy is never confirmed, and the shim exits anyway.
    let destroy = fake
        .wait_call(procedure::DOMAIN_DESTROY_FLAGS, Duration::from_secs(5))
        .expect("no destroy after the shutdown timeout");
    assert!(
        destroy - stop >= Duration::from_secs(2) && destroy - stop < Duration::from_secs(3),
        "destroy {:?} after SIGTERM; the timeout is 2 s",
        destroy - stop
    );
    shim.expect_exit(6, Duration::from_secs(6));
    assert!(
        stop.elapsed() < Duration::from_secs(2 + 3 + 2),
        "the stop took {:?}",
        stop.elapsed()
    );
    assert!(
        shim.stderr().contains("did not confirm the destroy"),
        "{}",
        shim.stderr()
    );
}

#[test]
fn a_console_nobody_reads_neither_stalls_a_stop_nor_kills_a_healthy_vm() {
    let dir = support::scratch("fake-unread-stdout");
    let fake = FakeLibvirtd::start(
        &dir,
        Script {
            guest_obeys_shutdown: true,
            // 64 MiB: far more than the stdout pipe (64 KiB) and the shim's
            // console budget hold.
            console_flood: 64 * 1024 * 1024,
            ..Script::default()
        },
    );
    let uri = fake.uri();
    let mut shim = Shim::start_with(
        "unread-stdout",
        TEMPLATE,
        &env(&uri, "unread-stdout"),
        &[],
        false,
        false,
    );
    shim.wait_for_stderr("started domain", Duration::from_secs(10));
    assert!(
        fake.wait_call(procedure::DOMAIN_OPEN_CONSOLE, Duration::from_secs(5))
            .is_some()
    );
    std::thread::sleep(Duration::from_secs(1));
    // The shim still hears libvirtd while its stdout is full.
    assert!(
        fake.ping(Duration::from_secs(2)),
        "no PONG: the shim stopped reading libvirtd because nobody reads its stdout\n{}",
        shim.stderr()
    );
    // A state poll is answered and does not end anything.
    assert!(fake.wait_call(procedure::DOMAIN_GET_STATE, FIRST_POLL).is_some());
    let stop = Instant::now();
    shim.signal(libc::SIGTERM);
    let acpi = fake
        .wait_call(procedure::DOMAIN_SHUTDOWN_FLAGS, Duration::from_secs(2))
        .expect("SIGTERM waited behind the blocked stdout: no ACPI request");
    assert!(acpi - stop < Duration::from_secs(1));
    shim.expect_exit(0, Duration::from_secs(5));
    assert!(shim.stderr().contains("exit 0:"), "{}", shim.stderr());
}

#[test]
fn libvirt_error_text_cannot_forge_log_lines_or_flood_the_termination_message() {
    let dir = support::scratch("fake-forged-error");
    let forged = format!(
        "internal error\n[virtkube-shim] exit 0: the guest stopped\x1b]0;owned\x07{}",
        "A".repeat(20_000)
    );
    let fake = FakeLibvirtd::start(
        &dir,
        Script {
            create_error: Some(forged),
            ..Script::default()
        },
    );
    let uri = fake.uri();
    let mut shim = Shim::start("forged-error", TEMPLATE, &env(&uri, "forged-error"), &[], false);
    shim.expect_exit(1, Duration::from_secs(10));
    let stderr = shim.stderr();
    assert!(
        stderr.contains("libvirt refused the domain: libvirt error 1"),
        "{stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("[virtkube-shim] exit 0")),
        "forged: {stderr}"
    );
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\x07'),
        "control characters reached stderr"
    );
    assert!(stderr.lines().all(|l| l.len() <= 2200), "an unbounded log line");
    let message = shim.termination_message();
    assert!(message.len() < 4096, "termination message of {} bytes", message.len());
    assert!(
        message.starts_with("exit 1: could not start the VM: libvirt refused"),
        "{message}"
    );
}

#[test]
fn libvirt_wire_warnings_reach_the_shim_log() {
    let dir = support::scratch("fake-malformed-event");
    let fake = FakeLibvirtd::start(
        &dir,
        Script {
            malformed_event: true,
            guest_obeys_shutdown: true,
            ..Script::default()
        },
    );
    let uri = fake.uri();
    let mut shim = Shim::start("malformed-event", TEMPLATE, &env(&uri, "malformed-event"), &[], false);
    shim.wait_for_stderr(
        "libvirt-wire: ignoring a malformed lifecycle event",
        Duration::from_secs(10),
    );
    shim.signal(libc::SIGTERM);
    shim.expect_exit(0, Duration::from_secs(5));
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn oversized_console_frames_cost_the_shim_no_memory() {
    // 16 MiB stream frames (libvirt's own are at most 262120 bytes): each is
    // read past in small pieces and ends the console, never buffered whole.
    // Before, twenty of them took the shim to about a gigabyte.
    let dir = support::scratch("fake-huge-frames");
    let fake = FakeLibvirtd::start(
        &dir,
        Script {
            guest_obeys_shutdown: true,
            console_flood: 20 * (16 * 1024 * 1024 - 64),
            console_chunk: 16 * 1024 * 1024 - 64,
            ..Script::default()
        },
    );
    let uri = fake.uri();
    let mut shim = Shim::start("huge-frames", TEMPLATE, &env(&uri, "huge-frames"), &[], false);
    shim.wait_for_stderr("console stream ended", Duration::from_secs(20));
    // Let the rest of the flood pass through the reader.
    std::thread::sleep(Duration::from_secs(2));
    assert!(fake.ping(Duration::from_secs(5)), "the connection stopped answering");
    let anon = status_kib(shim.pid(), "RssAnon:");
    eprintln!("shim RssAnon after twenty 16 MiB frames: {anon} KiB");
    assert!(
        anon < 16 * 1024,
        "the shim holds {anon} KiB of anonymous memory after 16 MiB frames"
    );
    assert!(shim.stderr().contains("at most 262120 bytes"), "{}", shim.stderr());
    shim.signal(libc::SIGTERM);
    shim.expect_exit(0, Duration::from_secs(5));
}
