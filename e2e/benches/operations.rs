//! Operations on a running VM and its screen, on Docker (the virthost
//! container of scripts/virthost-up.sh, the images of
//! scripts/build-images.sh): prints numbers, asserts none.
//!
//! One `virtkube/tiny` VM with a display. Side by side, `RUNS` times each:
//! - a screenshot through the shim (`docker exec VM /virtkube-shim
//!   screenshot`: a second shim process, PID 1, the gate, libvirtd) against
//!   `virsh screenshot` run in the virthost on libvirtd's own socket (C
//!   libvirt, no gate). Both pay the same `docker exec`.
//! - a viewer's first full screen update, from connecting until the last
//!   pixel, as RFB on 5900 and RFB over WebSocket on 6080, through the
//!   container's 127.0.0.1 (socat + nsenter, as dockershim's port-forward).
//! - a reset requested with `docker exec VM /virtkube-shim reset`, until the
//!   command returns.
//!
//! Run: `cargo bench -p virtkube-e2e --bench operations`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use virtkube_e2e::{Forward, display, max_secs, p50_secs, run, virthost_virsh};

const DOCKER: &str = "/usr/bin/docker";
const RUNS: usize = 20;

fn timed(mut f: impl FnMut()) -> Vec<Duration> {
    (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect()
}

fn report(what: &str, samples: &[Duration]) {
    println!(
        "{what:<58} p50 {:>7.1} ms   max {:>7.1} ms   ({} runs)",
        p50_secs(samples) * 1000.0,
        max_secs(samples) * 1000.0,
        samples.len()
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("virtkube-bench-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vnc.yaml"),
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: vnc}\nspec:\n  memory: 128Mi\n  graphics: {type: vnc}\n  interfaces: []\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet\n",
    )
    .unwrap();
    let name = format!("virtkube-bench-ops-{}", std::process::id());
    let template = format!("{}:/etc/virtkube/vnc.yaml:ro", dir.join("vnc.yaml").display());
    let (ok, out) = run(
        DOCKER,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "-v",
            "/var/run/virtkube:/var/run/libvirt:ro",
            "-v",
            &template,
            "-e",
            "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/vnc.yaml",
            "virtkube/tiny:latest",
        ],
        None,
    );
    assert!(ok, "docker run: {out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run(DOCKER, &["logs", &name], None).1.contains("virtkube-tiny: ready") {
        assert!(Instant::now() < deadline, "the VM did not boot");
        std::thread::sleep(Duration::from_millis(200));
    }
    let domain = run(DOCKER, &["inspect", "-f", "{{.Config.Hostname}}", &name], None)
        .1
        .trim()
        .to_owned();
    println!("operations on one virtkube/tiny VM with a 720x400 VGA text screen (TCG), Docker");

    let through_shim = timed(|| {
        let out = Command::new(DOCKER)
            .args(["exec", &name, "/virtkube-shim", "screenshot"])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stdout.starts_with(b"\x89PNG"));
    });
    let with_virsh = timed(|| {
        let (ok, out) = virthost_virsh("virtkube-virthost", &["screenshot", &domain, "/tmp/bench-shot"]);
        assert!(ok, "{out}");
    });
    report("screenshot: docker exec VM virtkube-shim screenshot", &through_shim);
    report("screenshot: docker exec virthost virsh screenshot", &with_virsh);

    let rfb = Forward::into_container(&name, 5900);
    let samples = timed(|| {
        display::first_update(rfb.address).unwrap();
    });
    report("first full update: VNC (RFB) through 127.0.0.1:5900", &samples);
    let websocket = Forward::into_container(&name, 6080);
    let samples = timed(|| {
        display::first_update_over_websocket(websocket.address).unwrap();
    });
    report("first full update: RFB over WebSocket through :6080", &samples);
    drop((rfb, websocket));

    let mut resets = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (ok, out) = run(DOCKER, &["exec", &name, "/virtkube-shim", "reset"], None);
        resets.push(started.elapsed());
        assert!(ok, "{out}");
        std::thread::sleep(Duration::from_secs(3));
    }
    report("reset: docker exec VM virtkube-shim reset", &resets);
    let empty = timed(|| {
        let (ok, out) = run(DOCKER, &["exec", &name, "/virtkube-shim", "--version"], None);
        assert!(ok, "{out}");
    });
    report("(docker exec VM virtkube-shim --version: exec's own cost)", &empty);

    let _ = run(DOCKER, &["rm", "-f", &name], None);
    let _ = std::fs::remove_dir_all(&dir);
}
