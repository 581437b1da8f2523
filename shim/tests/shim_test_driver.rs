//! The shim binary against libvirtd's test driver (which refuses
//! AUTODESTROY, so these run with VIRTKUBE_AUTODESTROY=0): lifecycle, exit
//! codes and error messages, without booting anything.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use support::{DisposableLibvirtd, Shim, domstate, virsh};

const URI: &str = "test+unix:///default";
const TEMPLATE: &str = "memory: 64Mi\ncpu: {count: 2}\n";

fn pod_env<'a>(name: &'a str, uri: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("VIRTKUBE_LIBVIRT_URI", uri),
        ("VIRTKUBE_AUTODESTROY", "0"),
        ("POD_NAMESPACE", "shimtest"),
        ("POD_NAME", name),
    ]
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn creates_a_running_domain_and_exits_5_when_someone_else_destroys_it() {
    let pod = unique("ext-destroy");
    let mut shim = Shim::start(&pod, TEMPLATE, &pod_env(&pod, URI), &[], false);
    shim.wait_for_stderr("started domain", Duration::from_secs(20));
    let domain = format!("shimtest_{pod}");
    assert_eq!(domstate(URI, &domain).as_deref(), Some("running"), "{}", shim.stderr());
    let (_, xml) = virsh(URI, &["dumpxml", &domain]);
    assert!(
        xml.contains("<vcpu placement='static'>2</vcpu>")
            && xml.contains(&format!("<virtkube:pod>{pod}</virtkube:pod>")),
        "{xml}"
    );
    let (ok, out) = virsh(URI, &["destroy", &domain]);
    assert!(ok, "{out}");
    shim.expect_exit(5, Duration::from_secs(15));
    assert!(
        shim.stderr()
            .contains("exit 5: the domain was destroyed by someone else"),
        "{}",
        shim.stderr()
    );
    assert!(
        shim.termination_message().contains("exit 5:"),
        "termination message: {:?}",
        shim.termination_message()
    );
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn sigterm_shuts_the_guest_down_and_exits_0() {
    let pod = unique("sigterm");
    let mut shim = Shim::start(&pod, TEMPLATE, &pod_env(&pod, URI), &[], false);
    shim.wait_for_stderr("started domain", Duration::from_secs(20));
    shim.signal(libc::SIGTERM);
    shim.expect_exit(0, Duration::from_secs(15));
    assert!(
        shim.stderr().contains("asking the guest to shut down (ACPI)"),
        "{}",
        shim.stderr()
    );
    assert_eq!(domstate(URI, &format!("shimtest_{pod}")), None, "domain left behind");
}

/// A VM whose libvirtd is gone: the shim keeps reconnecting, and its exit
/// code says how the outage ended. (libvirt's test driver keeps its domains
/// in the daemon's memory, so a restarted daemon has lost the domain: the
/// gate and QEMU tests show a VM surviving the restart.)
fn outage(name: &str, extra_env: &[(&str, &str)]) -> (DisposableLibvirtd, Shim) {
    let daemon = DisposableLibvirtd::start(name);
    let uri = daemon.uri();
    let pod = unique(name);
    let mut env = pod_env(&pod, &uri);
    env.extend_from_slice(extra_env);
    let shim = Shim::start(&pod, TEMPLATE, &env, &[], false);
    shim.wait_for_stderr("started domain", Duration::from_secs(20));
    (daemon, shim)
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn libvirtd_gone_for_good_exits_4_after_the_reattach_timeout() {
    let (mut daemon, mut shim) = outage("lost", &[("VIRTKUBE_REATTACH_TIMEOUT", "3")]);
    daemon.kill();
    shim.wait_for_stderr("the VM runs on: reconnecting for up to 3 s", Duration::from_secs(10));
    shim.expect_exit(4, Duration::from_secs(15));
    assert!(
        shim.stderr().contains("did not come back within 3 s"),
        "{}",
        shim.stderr()
    );
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn libvirtd_back_without_the_domain_exits_4() {
    let (mut daemon, mut shim) = outage("restarted", &[]);
    daemon.kill();
    shim.wait_for_stderr("reconnecting", Duration::from_secs(10));
    let _back = DisposableLibvirtd::start("restarted");
    shim.expect_exit(4, Duration::from_secs(20));
    assert!(
        shim.stderr().contains("when libvirtd came back the domain was gone"),
        "{}",
        shim.stderr()
    );
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn a_stop_during_the_outage_ends_the_shim_after_its_grace_period() {
    let (mut daemon, mut shim) = outage("stop-away", &[("VIRTKUBE_SHUTDOWN_TIMEOUT", "2")]);
    daemon.kill();
    shim.wait_for_stderr("reconnecting", Duration::from_secs(10));
    shim.signal(libc::SIGTERM);
    shim.wait_for_stderr("stop requested while libvirtd is away", Duration::from_secs(5));
    // No libvirtd to shut the guest down: after the grace period the shim
    // exits as a forced stop, which (through the gate) ends the VM.
    shim.expect_exit(6, Duration::from_secs(10));
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn a_bad_template_exits_1_naming_the_field() {
    let pod = unique("bad-template");
    let mut shim = Shim::start(&pod, "memory: 12 GB\n", &pod_env(&pod, URI), &[], false);
    shim.expect_exit(1, Duration::from_secs(10));
    let err = shim.stderr();
    assert!(
        err.contains(r#"spec.memory: "12 GB" is not a Kubernetes quantity (e.g. 512Mi, 2Gi)"#),
        "{err}"
    );
    assert!(err.contains("template.yaml"), "the message should name the file: {err}");
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn a_bad_annotation_exits_1_naming_it() {
    let pod = unique("bad-annotation");
    let dir = support::scratch(&pod);
    std::fs::write(dir.join("annotations"), "virtkube.io/cpus=\"lots\"\n").unwrap();
    let annotations = dir.join("annotations");
    let mut env = pod_env(&pod, URI);
    let annotations_str = annotations.to_string_lossy().into_owned();
    env.push(("VIRTKUBE_ANNOTATIONS_FILE", &annotations_str));
    let mut shim = Shim::start(&format!("{pod}-run"), TEMPLATE, &env, &[], false);
    shim.expect_exit(1, Duration::from_secs(10));
    assert!(
        shim.stderr()
            .contains(r#"annotation virtkube.io/cpus: "lots" is not a whole number of vCPUs"#),
        "{}",
        shim.stderr()
    );
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn configuration_errors_exit_2() {
    let pod = unique("bad-env");
    let mut env = pod_env(&pod, URI);
    env.push(("VIRTKUBE_SHUTDOWN_TIMEOUT", "soon"));
    let mut shim = Shim::start(&pod, TEMPLATE, &env, &[], false);
    shim.expect_exit(2, Duration::from_secs(10));
    assert!(
        shim.stderr().contains("VIRTKUBE_SHUTDOWN_TIMEOUT=\"soon\""),
        "{}",
        shim.stderr()
    );
    let mut shim = Shim::start(
        &format!("{pod}-flag"),
        TEMPLATE,
        &pod_env(&pod, URI),
        &["--bogus"],
        false,
    );
    shim.expect_exit(2, Duration::from_secs(10));
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn an_unreachable_libvirtd_exits_1_after_the_connect_timeout_and_says_where_it_looked() {
    let pod = unique("unreachable");
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let mut env = pod_env(&pod, uri);
    env.push(("VIRTKUBE_CONNECT_TIMEOUT", "2"));
    let started = std::time::Instant::now();
    let mut shim = Shim::start(&pod, TEMPLATE, &env, &[], false);
    shim.expect_exit(1, Duration::from_secs(10));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up before trying again"
    );
    let stderr = shim.stderr();
    assert!(
        stderr.contains("cannot connect to libvirtd at unix socket /nonexistent/libvirt-sock"),
        "{stderr}"
    );
    assert!(stderr.contains("trying again for up to 2 s"), "{stderr}");
    assert!(stderr.contains(" attempts over 2 s)"), "{stderr}");
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn a_libvirtd_that_comes_up_late_is_waited_for() {
    let pod = unique("late-daemon");
    // Where DisposableLibvirtd::start("late") will put its socket.
    let socket = std::env::temp_dir()
        .join(format!("virtkube-shim-libvirtd-late-{}", std::process::id()))
        .join("libvirt-sock");
    let uri = format!("test+unix:///default?socket={}", socket.display());
    let mut env = pod_env(&pod, &uri);
    env.push(("VIRTKUBE_CONNECT_TIMEOUT", "30"));
    let mut shim = Shim::start(&pod, TEMPLATE, &env, &[], false);
    shim.wait_for_stderr("trying again for up to 30 s", Duration::from_secs(10));
    let daemon = DisposableLibvirtd::start("late");
    assert_eq!(daemon.uri(), uri);
    shim.wait_for_stderr("started domain", Duration::from_secs(20));
    shim.signal(libc::SIGTERM);
    shim.expect_exit(0, Duration::from_secs(15));
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn a_signal_before_the_vm_started_exits_128_plus_n() {
    // A socket that accepts and never answers: the shim waits in its handshake.
    let dir = support::scratch("silent-daemon");
    let socket = dir.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let holder = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(15));
        drop(conn);
    });
    let uri = format!("qemu+unix:///system?socket={}", socket.display());
    let pod = unique("early-signal");
    let mut shim = Shim::start(&pod, TEMPLATE, &pod_env(&pod, &uri), &[], false);
    std::thread::sleep(Duration::from_millis(500));
    shim.signal(libc::SIGTERM);
    shim.expect_exit(128 + 15, Duration::from_secs(10));
    drop(holder);
}

#[test]
#[ignore = "needs libvirtd (its test driver): scripts/test.sh runs it"]
fn print_xml_renders_without_connecting() {
    let pod = unique("print");
    let env = pod_env(&pod, "qemu+unix:///system?socket=/nonexistent/sock");
    let mut shim = Shim::start(&pod, TEMPLATE, &env, &["--print-xml"], false);
    shim.expect_exit(0, Duration::from_secs(10));
    let xml = shim.stdout();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let name = doc
        .descendants()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text());
    assert_eq!(name, Some(format!("shimtest_{pod}").as_str()));
}
