//! The shim against `virsh create`, in one run on libvirtd's qemu driver with
//! the tiny guest (scripts/build-tiny-guest.sh; libvirtd from scripts/libvirtd-up.sh):
//!
//! - exec of the shim → "started domain" (CREATE_XML returned: the domain
//!   runs), against `virsh create` of the XML the shim renders for the same
//!   instance (the command returns once the domain runs); runs alternate;
//! - the shim's peak RSS (VmHWM) after its VM has run and streamed its console
//!   for a few seconds;
//! - the size of the static shim (scripts/build-shim.sh), and of one built
//!   without Kubernetes support if present (see the README).
//!
//! Run: `cargo bench -p virtkube-shim --bench vs_virsh`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";
const RUNS: usize = 10;
const TEMPLATE: &str = "memory: 128Mi\ndomainType: qemu\nboot:\n  kernel: /var/lib/virtkube/images/tiny/vmlinuz\n  initrd: /var/lib/virtkube/images/tiny/initrd.gz\n  cmdline: console=ttyS0 panic=-1 quiet\n";
const STATIC_SHIM: &str = "target/x86_64-unknown-linux-gnu/release/virtkube-shim";
const NO_KUBE_SHIM: &str = "target/nokube/x86_64-unknown-linux-gnu/release/virtkube-shim";

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    assert!(
        Path::new("/var/lib/virtkube/images/tiny/vmlinuz").exists(),
        "the tiny guest is missing: run scripts/build-tiny-guest.sh"
    );
    let static_shim = root.join(STATIC_SHIM);
    let shim = match std::env::var_os("SHIM_BINARY") {
        Some(path) => PathBuf::from(path),
        None if static_shim.exists() => static_shim.clone(),
        None => PathBuf::from(env!("CARGO_BIN_EXE_virtkube-shim")),
    };
    let dir = std::env::temp_dir().join(format!("virtkube-shim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("template.yaml");
    std::fs::write(&template, TEMPLATE).unwrap();
    println!("shim vs virsh create, {RUNS} runs each, alternating, on {URI} (TCG, tiny guest)");
    println!("shim binary: {}", shim.display());

    let (mut shim_times, mut virsh_times, mut peaks, mut splits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let mut run_virsh = || virsh_times.push(virsh_create(&shim, &template, &dir, i));
        let mut run_shim = || {
            let (took, peak, split) = shim_start(&shim, &template, i);
            shim_times.push(took);
            peaks.push(peak);
            splits.push(split);
        };
        if i % 2 == 0 {
            run_shim();
            run_virsh();
        } else {
            run_virsh();
            run_shim();
        }
    }
    let (shim_p50, virsh_p50) = (p50(&shim_times), p50(&virsh_times));
    println!(
        "exec of the shim → domain running: p50 {:7.1} ms  mean {:7.1} ms  max {:7.1} ms",
        ms(shim_p50),
        ms(mean(&shim_times)),
        ms(*shim_times.iter().max().unwrap())
    );
    println!(
        "virsh create of the same XML:      p50 {:7.1} ms  mean {:7.1} ms  max {:7.1} ms",
        ms(virsh_p50),
        ms(mean(&virsh_times)),
        ms(*virsh_times.iter().max().unwrap())
    );
    println!(
        "ratio shim / virsh (p50): {:.2}x   (goal ≤ 1.10x)",
        shim_p50.as_secs_f64() / virsh_p50.as_secs_f64()
    );
    println!(
        "shim peak RSS (VmHWM) with its VM running: max {:.2} MiB over {RUNS} runs   (goal ≤ 4 MiB; KubeVirt's per-VM launcher: 240 MiB)",
        *peaks.iter().max().unwrap() as f64 / 1024.0
    );
    let (anon, file) = splits.iter().max_by_key(|(a, f)| a + f).unwrap();
    println!(
        "  of which (largest sample): {:.2} MiB anonymous (heap, stacks), {:.2} MiB file-backed (the binary's clean text pages, mapped in 64 KiB fault-around blocks)",
        *anon as f64 / 1024.0,
        *file as f64 / 1024.0
    );
    for (what, path) in [
        ("static shim (with Kubernetes support)", static_shim),
        ("static shim without Kubernetes support", root.join(NO_KUBE_SHIM)),
    ] {
        match std::fs::metadata(&path) {
            Ok(meta) => println!(
                "{what}: {} bytes ({:.2} MiB)",
                meta.len(),
                meta.len() as f64 / 1048576.0
            ),
            Err(_) => println!("{what}: not built ({})", path.display()),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `virsh create` of the XML the shim renders for pod `virsh-<i>`.
fn virsh_create(shim: &Path, template: &Path, dir: &Path, i: usize) -> Duration {
    let name = format!("virsh-{i}");
    let out = Command::new(shim)
        .arg("--print-xml")
        .env("VIRTKUBE_TEMPLATE_FILE", template)
        .env("POD_NAMESPACE", "bench")
        .env("POD_NAME", &name)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "--print-xml failed");
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, &out.stdout).unwrap();
    let started = Instant::now();
    let status = Command::new("virsh")
        .args(["-c", URI, "create"])
        .arg(&file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "virsh create {}", file.display());
    let domain = format!("bench_{name}");
    let status = Command::new("virsh")
        .args(["-c", URI, "destroy", &domain])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "virsh destroy {domain}");
    took
}

/// Starts the shim for pod `shim-<i>`; returns exec → "started domain", its
/// VmHWM after the guest has run for 3 s, and then its (RssAnon, RssFile), all
/// in KiB. Stops it with SIGQUIT (destroy).
fn shim_start(shim: &Path, template: &Path, i: usize) -> (Duration, u64, (u64, u64)) {
    let started = Instant::now();
    let mut child = Command::new(shim)
        .env("VIRTKUBE_TEMPLATE_FILE", template)
        .env("VIRTKUBE_LIBVIRT_URI", URI)
        .env("VIRTKUBE_ANNOTATIONS_FILE", "/nonexistent")
        .env("POD_NAMESPACE", "bench")
        .env("POD_NAME", format!("shim-{i}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let mut log = String::new();
    let running_at = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((at, line)) if line.contains("started domain") => break at,
            Ok((_, line)) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => panic!("the shim did not start its domain:\n{log}"),
        }
    };
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", child.id()))
    };
    let (hwm, split) = (kib("VmHWM:"), (kib("RssAnon:"), kib("RssFile:")));
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
    child.wait().unwrap();
    (running_at - started, hwm, split)
}

fn p50(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len() as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
