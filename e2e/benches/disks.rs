//! Disks from the VM container against the same disk as a file on the node,
//! side by side in one run (the virthost container of
//! scripts/virthost-up.sh, the images of scripts/build-images.sh). Prints
//! numbers; asserts only that every VM booted and read its disk.
//!
//! For a `SIZE_MIB` (default 64) raw disk, `RUNS` (default 3) times each:
//! - **host file**: the disk is a file on the node (`disks[].file`);
//! - **container, read-only**: the image's file, passed as a descriptor;
//! - **container, private copy**: the image's file copied for the guest's
//!   writes (the default mode), passed as a descriptor.
//!
//! For each: `docker run` → the guest's first disk line (boot to a readable
//! disk), and the guest reading the whole disk (`dd` of `/dev/vda`) in MB/s.
//! Then the shim's RSS with 4 disks passed as descriptors.
//!
//! Run: `cargo bench -p virtkube-e2e --bench disks`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use virtkube_e2e::{p50_secs, run};

const DOCKER: &str = "/usr/bin/docker";
const SOCKET_DIR: &str = "/var/run/virtkube";
const HOST_DIR: &str = "/var/lib/virtkube/images";

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn template(disks: &[&str], cmdline: &str) -> String {
    let disks: String = disks.iter().map(|d| format!("    - {d}\n")).collect();
    format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {{name: bench}}\nspec:\n  memory: 128Mi\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet {cmdline}\n  disks:\n{disks}"
    )
}

/// A raw disk of `mib` MiB whose first line the guest prints.
fn write_disk(path: &Path, mib: usize) {
    let mut disk = b"virtkube-disk:BENCH\n".to_vec();
    disk.resize(mib * 1024 * 1024, 0xa5);
    std::fs::write(path, disk).unwrap();
}

/// One VM: `docker run` to the disk line and the guest's read time (ms).
fn boot(tag: &str, template_file: &str, extra: &[&str]) -> (Duration, u64) {
    let name = format!("virtkube-bench-disks-{}", std::process::id());
    let _ = run(DOCKER, &["rm", "-f", &name], None);
    let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let env = format!("VIRTKUBE_TEMPLATE_FILE={template_file}");
    let mut args = vec!["run", "-d", "--name", &name, "-v", &volume, "-e", &env];
    args.extend_from_slice(extra);
    args.push(tag);
    let started = Instant::now();
    let (ok, out) = run(DOCKER, &args, None);
    assert!(ok, "docker run: {out}");
    let deadline = started + Duration::from_secs(120);
    let (mut to_disk, mut read_ms) = (None, None);
    while read_ms.is_none() {
        assert!(Instant::now() < deadline, "{}", run(DOCKER, &["logs", &name], None).1);
        let logs = run(DOCKER, &["logs", &name], None).1;
        if to_disk.is_none() && logs.contains("vda says: virtkube-disk:BENCH") {
            to_disk = Some(started.elapsed());
        }
        read_ms = logs
            .lines()
            .find_map(|l| l.strip_prefix("virtkube-tiny: read vda in "))
            .and_then(|rest| rest.strip_suffix(" ms"))
            .and_then(|ms| ms.trim().parse().ok());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = run(DOCKER, &["rm", "-f", &name], None);
    (to_disk.unwrap(), read_ms.unwrap())
}

fn main() {
    assert!(
        Path::new(&format!("{SOCKET_DIR}/libvirt-sock")).exists(),
        "no virthost socket in {SOCKET_DIR}: run scripts/build-images.sh and scripts/virthost-up.sh"
    );
    let (mib, runs) = (count("SIZE_MIB", 64), count("RUNS", 3));
    let dir = std::env::temp_dir().join(format!("virtkube-bench-disks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_disk(&dir.join("root.raw"), mib);
    let host_disk = format!("{HOST_DIR}/bench-disk-{}.raw", std::process::id());
    write_disk(Path::new(&host_disk), mib);
    // The node's file must be readable by QEMU (libvirt does not chown here).
    std::fs::set_permissions(&host_disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let read = "virtkube.ddread virtkube.poweroff";
    let four: Vec<String> = (0..4)
        .map(|_| "{containerFile: /disk/root.raw, readOnly: true}".to_owned())
        .collect();
    for (file, text) in [
        (
            "host.yaml",
            template(&[&format!("{{file: {host_disk}, readOnly: true}}")], read),
        ),
        (
            "readonly.yaml",
            template(&["{containerFile: /disk/root.raw, readOnly: true}"], read),
        ),
        ("copy.yaml", template(&["containerFile: /disk/root.raw"], read)),
        (
            "four.yaml",
            template(&four.iter().map(String::as_str).collect::<Vec<_>>(), ""),
        ),
    ] {
        std::fs::write(dir.join(file), text).unwrap();
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM virtkube/tiny:latest\nCOPY root.raw /disk/root.raw\nCOPY host.yaml readonly.yaml copy.yaml four.yaml /etc/virtkube/\n",
    )
    .unwrap();
    let tag = format!("virtkube/bench-disks:{}", std::process::id());
    virtkube_e2e::disk_image::build_context(&dir, &tag);

    println!("disk: {mib} MiB raw; {runs} runs each; p50 (all runs)");
    println!("{:<28} {:>16} {:>16}", "source", "run→disk line s", "guest read MB/s");
    for (label, file) in [
        ("host file (disks[].file)", "/etc/virtkube/host.yaml"),
        ("container, read-only", "/etc/virtkube/readonly.yaml"),
        ("container, private copy", "/etc/virtkube/copy.yaml"),
    ] {
        let mut to_disk = Vec::new();
        let mut rates = Vec::new();
        for _ in 0..runs {
            let (boot_time, read_ms) = boot(&tag, file, &[]);
            to_disk.push(boot_time);
            #[allow(clippy::cast_precision_loss)]
            rates.push(mib as f64 / (read_ms.max(1) as f64 / 1000.0));
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "{label:<28} {:>16.2} {:>16.1}   (runs: {})",
            p50_secs(&to_disk),
            rates[rates.len() / 2],
            to_disk
                .iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    // The shim's memory with 4 disks passed as descriptors (PID 1 of its container).
    let name = format!("virtkube-bench-disks-four-{}", std::process::id());
    let _ = run(DOCKER, &["rm", "-f", &name], None);
    let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let (ok, out) = run(
        DOCKER,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "-v",
            &volume,
            "-e",
            "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/four.yaml",
            &tag,
        ],
        None,
    );
    assert!(ok, "docker run: {out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run(DOCKER, &["logs", &name], None).1.contains("virtkube-tiny: ready") {
        assert!(Instant::now() < deadline, "{}", run(DOCKER, &["logs", &name], None).1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = run(DOCKER, &["inspect", "-f", "{{.State.Pid}}", &name], None).1;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let rss = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: ?");
    println!(
        "shim with 4 disks passed as descriptors, guest up: {}",
        rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    );
    let _ = run(DOCKER, &["rm", "-f", &name], None);
    let _ = run(DOCKER, &["rmi", "-f", &tag], None);
    let _ = std::fs::remove_file(&host_disk);
    let _ = std::fs::remove_dir_all(&dir);
}
