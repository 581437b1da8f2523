//! A VM image that carries its disk, for the Docker and cluster tests: the
//! tiny guest (which prints its first disk's first line and, asked on its
//! command line, writes `virtkube-disk:SCRIBBLED` there and powers off) with
//! `/disk/root.raw` in the image and three templates:
//! `/etc/virtkube/template.yaml` (the image's disk, a private copy),
//! `/etc/virtkube/volume.yaml` (`/data/data.raw`, persistent) and
//! `/etc/virtkube/misplaced.yaml` (the image's disk, persistent: refused),
//! `/etc/virtkube/cloud-init.yaml` (the image's disk and a cloud-init seed
//! from the directory `/seed`).
#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::path::Path;

/// What the disk holds at first: its first line, then zeros to 1 MiB.
pub fn original_disk() -> Vec<u8> {
    let mut disk = b"virtkube-disk:ORIGINAL\n".to_vec();
    disk.resize(1024 * 1024, 0);
    disk
}

fn template(source: &str) -> String {
    format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {{name: disk}}\nspec:\n  memory: 128Mi\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet virtkube.scribble virtkube.poweroff\n  disks:\n    - {source}\n"
    )
}

/// Writes the build context into `dir` and builds it as `tag` (`docker build`).
pub fn build(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("root.raw"), original_disk()).unwrap();
    // Readable by all: an ImageFile's import pod reads it as an unprivileged user.
    std::fs::set_permissions(
        dir.join("root.raw"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    for (file, source) in [
        ("image.yaml", "containerFile: /disk/root.raw"),
        ("volume.yaml", "{containerFile: /data/data.raw, persistent: true}"),
        ("misplaced.yaml", "{containerFile: /disk/root.raw, persistent: true}"),
    ] {
        std::fs::write(dir.join(file), template(source)).unwrap();
    }
    std::fs::write(
        dir.join("cloud-init.yaml"),
        template("containerFile: /disk/root.raw") + "  cloudInit: {directory: /seed}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM virtkube/tiny:latest\nCOPY root.raw /disk/root.raw\nCOPY image.yaml /etc/virtkube/template.yaml\nCOPY volume.yaml misplaced.yaml cloud-init.yaml /etc/virtkube/\n",
    )
    .unwrap();
    build_context(dir, tag);
}

/// `docker build -q -t TAG DIR` (the classic builder: no registry here).
pub fn build_context(dir: &Path, tag: &str) {
    let out = std::process::Command::new("/usr/bin/docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
