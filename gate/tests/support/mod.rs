//! Shared by the gate's tests and benchmark: a pod's cgroup made with the
//! kernel's cgroup filesystem, and a gate started in front of libvirtd.
#![allow(clippy::unwrap_used, dead_code)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// libvirtd's own socket (scripts/libvirtd-up.sh).
pub const LIBVIRTD: &str = "/var/run/libvirt/libvirt-sock";

/// Makes a pod's cgroup as the kubelet's cgroupfs driver names it
/// (`<root>/kubepods/<qos>/pod<uid>/<container>`), in a v1 hierarchy or the
/// v2 one where there is no v1. `root` must not be `/`: a kubelet on the
/// machine kills what it finds in pod cgroups it does not know under its own
/// `/kubepods`. The gate is told `root` with `--kubepods-parent`.
pub fn pod_cgroup(root: &str, qos: &str, uid: &str, container: &str) -> PathBuf {
    let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists())
        .expect("no writable cgroup hierarchy");
    let dir = base
        .join(root.trim_start_matches('/'))
        .join("kubepods")
        .join(qos)
        .join(format!("pod{uid}"))
        .join(container);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Removes a container cgroup made by [`pod_cgroup`] and its pod's, with
/// QEMU's v2 leaf: each once empty (a process leaves its cgroup only when
/// reaped, so this waits up to 5 s).
pub fn remove_pod_cgroup(container: &Path) {
    let pod = container.parent().unwrap();
    for dir in [container.to_path_buf(), pod.join("virtkube-qemu"), pod.to_path_buf()] {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// This test process as a pod's container: a fresh scratch directory
/// `<tmp>/<tag>-<pid>`, a pod UID made of `uid_prefix` (its first four
/// groups) and the PID, and a besteffort pod cgroup under `/virtkube-test`
/// that this process enters. Returns the directory, the UID and the cgroup.
pub fn this_process_in_a_pod(tag: &str, uid_prefix: &str) -> (PathBuf, String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uid = format!("{uid_prefix}-{:012x}", std::process::id());
    let cgroup = pod_cgroup(
        "/virtkube-test",
        "besteffort",
        &uid,
        &format!("{:064x}", std::process::id()),
    );
    enter(&cgroup, std::process::id());
    (dir, uid, cgroup)
}

/// Moves process `pid` into `cgroup`.
pub fn enter(cgroup: &Path, pid: u32) {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
}

/// Starts the gate on `dir/gate.sock` in front of libvirtd, pods' cgroups
/// under `kubepods_parent`, logging to `dir/gate.log`.
pub fn start_gate(gate: &str, dir: &Path, kubepods_parent: &str) -> (Child, PathBuf, PathBuf) {
    start_gate_with(gate, dir, kubepods_parent, &[])
}

/// [`start_gate`] with more flags.
pub fn start_gate_with(gate: &str, dir: &Path, kubepods_parent: &str, extra: &[&str]) -> (Child, PathBuf, PathBuf) {
    let socket = dir.join("gate.sock");
    let log = dir.join("gate.log");
    let child = Command::new(gate)
        .args(["--listen", socket.to_str().unwrap(), "--libvirtd", LIBVIRTD])
        .args(["--kubepods-parent", kubepods_parent])
        .args(extra)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the gate did not listen: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, socket, log)
}

/// The shim binary of this workspace (the same profile as this test), built
/// if it is not there yet.
pub fn shim_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap().to_owned();
    let shim = profile_dir.join("virtkube-shim");
    if !shim.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "virtkube-shim"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "cannot build the shim");
    }
    shim
}

/// The shim as pod `pod` (UID `uid`) of namespace `namespace`, on the gate's
/// `socket`, running the tiny guest (its template written into `dir`);
/// `cmdline` is the guest's kernel command line. Callers add stdio.
pub fn shim_command(
    shim: &Path,
    dir: &Path,
    socket: &Path,
    (namespace, pod, uid): (&str, &str, &str),
    cmdline: &str,
) -> Command {
    let template = dir.join("template.yaml");
    std::fs::write(
        &template,
        format!(
            "memory: 128Mi\ndomainType: qemu\ninterfaces: []\nboot:\n  kernel: /var/lib/virtkube/images/tiny/vmlinuz\n  initrd: /var/lib/virtkube/images/tiny/initrd.gz\n  cmdline: {cmdline}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(shim);
    command
        .env_clear()
        .env("VIRTKUBE_TEMPLATE_FILE", &template)
        .env("VIRTKUBE_ANNOTATIONS_FILE", dir.join("none"))
        .env(
            "VIRTKUBE_LIBVIRT_URI",
            format!("qemu+unix:///system?socket={}", socket.display()),
        )
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", pod)
        .env("POD_UID", uid);
    command
}

/// A child process killed and reaped when dropped, also when a test panics:
/// a daemon left running would hold the test harness's output open.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs its closures, last first, when dropped (also when a test panics).
pub struct Cleanup(pub Vec<Box<dyn FnMut()>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in self.0.iter_mut().rev() {
            f();
        }
    }
}

/// The state `virsh domstate` gives for domain `name`, `None` if there is none.
pub fn domstate(name: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "domstate", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs the probe in `cgroup` against the gate's `socket` and reads its
/// report up to `ready`: the process, its stdin, its further lines, the report.
/// The caller ends the process (if a panic here fails the test first, the
/// probe ends when its stdin closes).
#[allow(clippy::zombie_processes)]
pub fn run_probe(
    socket: &Path,
    uid: &str,
    xml_file: &Path,
    cgroup: &Path,
    log: &Path,
) -> (Child, ChildStdin, mpsc::Receiver<String>, Vec<String>) {
    let mut probe = Command::new(env!("CARGO_BIN_EXE_virtkube-gate-probe"))
        .args([socket.to_str().unwrap(), uid, xml_file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    enter(cgroup, probe.id());
    let mut stdin = probe.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = probe.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!(
                    "the probe did not finish; so far: {lines:#?}\ngate log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        if line == "ready" {
            return (probe, stdin, rx, lines);
        }
        lines.push(line);
    }
}

/// The tiny guest's golden domain XML without its pod interface (NIC and
/// metadata record): a domain for tests whose callers have no network
/// namespace of their own, or that rename the domain (the tap's name follows
/// the domain's).
pub fn tiny_golden_without_network() -> String {
    let golden = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shim/tests/golden/tiny.xml"))
        .unwrap_or_else(|e| panic!("the golden XML: {e}"));
    virtkube_gate::probe_report::without_pod_interface(&golden).expect("the golden XML has no pod interface any more")
}
