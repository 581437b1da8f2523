//! The shim's start, before any VM exists: hostile environments and files,
//! signals while it waits, and what it leaves in its log and termination
//! message. No libvirtd is needed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Shim;

fn shim_command(dir: &std::path::Path) -> Command {
    let template = dir.join("template.yaml");
    std::fs::write(&template, "memory: 64Mi\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtkube-shim"));
    cmd.env_clear()
        .env("VIRTKUBE_TEMPLATE_FILE", &template)
        .env("VIRTKUBE_ANNOTATIONS_FILE", dir.join("none"))
        .env("POD_NAMESPACE", "ns")
        .env("POD_NAME", "vm");
    cmd
}

#[test]
fn a_variable_that_is_not_utf8_is_ignored_unless_the_shim_reads_it() {
    let dir = support::scratch("not-utf8");
    let bad = OsString::from_vec(vec![b'x', 0xff, 0xfe]);
    let out = shim_command(&dir)
        .env("SOMEONE_ELSES", &bad)
        .arg("--print-xml")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("exit 0: printed the domain XML"), "{stderr}");
    let out = shim_command(&dir)
        .env("VIRTKUBE_SHUTDOWN_TIMEOUT", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable VIRTKUBE_SHUTDOWN_TIMEOUT is not valid UTF-8"),
        "{stderr}"
    );
}

#[test]
fn signals_are_handled_while_startup_waits_and_sighup_is_ignored() {
    // A template file that is a FIFO nobody writes: the read never returns.
    let dir = support::scratch("fifo-start");
    let fifo = dir.join("fifo.yaml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut shim = Shim::start(
        "fifo-start-shim",
        "",
        &[
            ("VIRTKUBE_TEMPLATE_FILE", fifo.to_str().unwrap()),
            ("POD_NAME", "vm"),
            ("POD_NAMESPACE", "ns"),
        ],
        &[],
        false,
    );
    std::thread::sleep(Duration::from_millis(500));
    shim.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        shim.stderr().contains("SIGHUP ignored"),
        "SIGHUP before the VM started: {}",
        shim.stderr()
    );
    let stop = Instant::now();
    shim.signal(libc::SIGTERM);
    shim.expect_exit(143, Duration::from_secs(3));
    assert!(stop.elapsed() < Duration::from_secs(2), "{:?}", stop.elapsed());
}

#[test]
fn an_endless_file_is_read_only_up_to_its_limit() {
    let mut shim = Shim::start(
        "dev-zero",
        "",
        &[
            ("VIRTKUBE_TEMPLATE_FILE", "/dev/zero"),
            ("POD_NAME", "vm"),
            ("POD_NAMESPACE", "ns"),
        ],
        &["--print-xml"],
        false,
    );
    shim.expect_exit(1, Duration::from_secs(10));
    assert!(
        shim.stderr().contains("larger than the 1048576 bytes the shim reads"),
        "{}",
        shim.stderr()
    );
}

#[test]
fn hostile_text_cannot_forge_log_lines_or_overflow_the_termination_message() {
    let value = format!(
        "two\n[virtkube-shim] exit 0: the guest stopped\x1b[2K{}",
        "9".repeat(100_000)
    );
    let dir = support::scratch("forged-annotations");
    let annotations = dir.join("annotations");
    std::fs::write(&annotations, format!("virtkube.io/cpus={value:?}\n")).unwrap();
    let mut shim = Shim::start(
        "forged-shim",
        "memory: 64Mi\n",
        &[
            ("VIRTKUBE_ANNOTATIONS_FILE", annotations.to_str().unwrap()),
            ("POD_NAME", "vm"),
            ("POD_NAMESPACE", "ns"),
        ],
        &["--print-xml"],
        false,
    );
    let code = shim.wait_exit(Duration::from_secs(10));
    assert_ne!(code, 0);
    let stderr = shim.stderr();
    assert!(
        !stderr.lines().any(|l| l.starts_with("[virtkube-shim] exit 0")),
        "a forged exit line: {stderr}"
    );
    assert!(!stderr.contains('\x1b'), "an escape sequence reached stderr");
    assert!(stderr.lines().all(|l| l.len() <= 2200), "a log line is unbounded");
    let message = shim.termination_message();
    assert!(message.len() < 4096, "termination message of {} bytes", message.len());
    assert_eq!(message.matches('\n').count(), 1, "{message:?}");
}

#[test]
fn a_bare_pod_uid_is_normalised_and_characters_xml_cannot_carry_are_refused() {
    let mut shim = Shim::start(
        "bare-uid",
        "memory: 64Mi\n",
        &[
            ("POD_NAME", "vm"),
            ("POD_NAMESPACE", "ns"),
            ("POD_UID", "4B7D3E625B2F4C3A9A8E0C1D2E3F4A5B"),
        ],
        &["--print-xml"],
        false,
    );
    shim.expect_exit(0, Duration::from_secs(10));
    assert!(
        shim.stdout()
            .contains("<uuid>4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b</uuid>"),
        "{}",
        shim.stdout()
    );
    let mut shim = Shim::start(
        "xml-char",
        "memory: 64Mi\n",
        &[("POD_NAME", "vm\u{FFFE}"), ("POD_NAMESPACE", "ns")],
        &["--print-xml"],
        false,
    );
    shim.expect_exit(1, Duration::from_secs(10));
    assert!(shim.stderr().contains("contains U+FFFE"), "{}", shim.stderr());
}

#[test]
fn a_template_named_beside_a_baked_one_outside_a_cluster_is_an_error() {
    let mut shim = Shim::start(
        "named-and-baked",
        "memory: 64Mi\n",
        &[
            ("POD_NAME", "vm"),
            ("POD_NAMESPACE", "ns"),
            ("VIRTKUBE_TEMPLATE", "other"),
        ],
        &["--print-xml"],
        false,
    );
    shim.expect_exit(1, Duration::from_secs(10));
    assert!(
        shim.stderr().contains("template \"other\" is named") && shim.stderr().contains("remove the name"),
        "{}",
        shim.stderr()
    );
}
