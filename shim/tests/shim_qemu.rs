//! The shim binary with a real TCG guest on libvirtd's qemu driver (the tiny
//! guest of scripts/build-tiny-guest.sh): the console on stdout and from
//! stdin, poweroff, ACPI shutdown on SIGTERM, a guest that ignores ACPI, a
//! guest kernel panic (pvpanic), and AUTODESTROY when the shim is SIGKILLed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use support::{Shim, domstate};

const URI: &str = "qemu:///system";
const BOOT: Duration = Duration::from_secs(90);

fn template(extra_cmdline: &str) -> String {
    assert!(
        std::path::Path::new("/var/lib/virtkube/images/tiny/vmlinuz").exists(),
        "the tiny guest is missing: run scripts/build-tiny-guest.sh"
    );
    format!(
        "memory: 128Mi\ndomainType: qemu\ninterfaces: []\nboot:\n  kernel: /var/lib/virtkube/images/tiny/vmlinuz\n  initrd: /var/lib/virtkube/images/tiny/initrd.gz\n  cmdline: console=ttyS0 panic=-1 quiet {extra_cmdline}\n"
    )
}

fn start(name: &str, cmdline: &str, timeout_secs: &str, stdin: bool) -> (Shim, String) {
    let pod = format!("{name}-{}", std::process::id());
    let env = [
        ("VIRTKUBE_LIBVIRT_URI", URI),
        ("POD_NAMESPACE", "shimqemu"),
        ("POD_NAME", pod.as_str()),
        ("VIRTKUBE_SHUTDOWN_TIMEOUT", timeout_secs),
    ];
    let shim = Shim::start(&pod, &template(cmdline), &env, &[], stdin);
    (shim, format!("shimqemu_{pod}"))
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn console_reaches_stdout_and_stdin_reaches_the_guest_shell() {
    let (mut shim, _) = start("console", "", "10", true);
    shim.wait_for_stdout("virtkube-tiny: ready", BOOT);
    assert!(shim.stdout().contains("virtkube-tiny: booted"), "{}", shim.stdout());
    let stdin = shim.stdin.as_mut().unwrap();
    stdin.write_all(b"echo sum=$((40+2))\n").unwrap();
    stdin.flush().unwrap();
    shim.wait_for_stdout("sum=42", Duration::from_secs(30));
    // The shim's own lines stay off stdout.
    assert!(!shim.stdout().contains("[virtkube-shim]"));
    shim.stdin.as_mut().unwrap().write_all(b"poweroff -f\n").unwrap();
    shim.expect_exit(0, Duration::from_secs(30));
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn guest_poweroff_exits_0() {
    let (mut shim, domain) = start("poweroff", "virtkube.poweroff", "10", false);
    shim.expect_exit(0, BOOT);
    assert!(
        shim.stdout().contains("powering off as asked"),
        "stdout: {}\nstderr: {}",
        shim.stdout(),
        shim.stderr()
    );
    assert!(shim.stderr().contains("exit 0: the guest stopped"), "{}", shim.stderr());
    assert_eq!(domstate(URI, &domain), None, "domain left behind");
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn a_guest_kernel_panic_exits_3_and_says_so() {
    let (mut shim, domain) = start("panic", "virtkube.panic", "10", false);
    shim.expect_exit(3, BOOT);
    assert!(
        shim.stdout().contains("panicking as asked"),
        "stdout: {}\nstderr: {}",
        shim.stdout(),
        shim.stderr()
    );
    assert!(
        shim.stderr().contains("exit 3: the guest crashed: its kernel panicked"),
        "stderr: {}",
        shim.stderr()
    );
    assert_eq!(domstate(URI, &domain), None, "domain left behind");
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn sigterm_shuts_down_over_acpi_and_exits_0_within_the_timeout() {
    let (mut shim, domain) = start("acpi", "", "20", false);
    shim.wait_for_stdout("virtkube-tiny: ready", BOOT);
    let asked = Instant::now();
    shim.signal(libc::SIGTERM);
    shim.expect_exit(0, Duration::from_secs(30));
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "took {:?}: not a clean ACPI shutdown",
        asked.elapsed()
    );
    assert!(
        shim.stderr().contains("asking the guest to shut down (ACPI)"),
        "{}",
        shim.stderr()
    );
    assert_eq!(domstate(URI, &domain), None);
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn a_guest_ignoring_acpi_is_destroyed_after_the_timeout_with_code_6() {
    let (mut shim, domain) = start("ignore-acpi", "virtkube.ignore-acpi", "3", false);
    shim.wait_for_stdout("virtkube-tiny: ready", BOOT);
    let asked = Instant::now();
    shim.signal(libc::SIGTERM);
    shim.expect_exit(6, Duration::from_secs(30));
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "destroyed before the timeout"
    );
    assert!(
        shim.stderr().contains("did not shut down within 3s"),
        "{}",
        shim.stderr()
    );
    assert_eq!(domstate(URI, &domain), None);
}

#[test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn sigkill_of_the_shim_takes_the_domain_with_it() {
    let (mut shim, domain) = start("sigkill", "", "10", false);
    shim.wait_for_stderr("started domain", BOOT);
    assert_eq!(domstate(URI, &domain).as_deref(), Some("running"));
    shim.signal(libc::SIGKILL);
    shim.expect_exit(128 + 9, Duration::from_secs(5));
    let killed = Instant::now();
    while domstate(URI, &domain).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "domain {domain} outlived the shim by 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
