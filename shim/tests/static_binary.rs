//! The release shim is statically linked (it runs in a FROM-scratch image):
//! built by scripts/build-shim.sh, checked with ldd, and run with an empty
//! environment.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

#[test]
fn the_release_shim_is_static_and_runs_alone() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/build-shim.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-shim.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = format!("{root}/{}", String::from_utf8(out.stdout).unwrap().trim());
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "ldd says: {text}"
    );
    let size = std::fs::metadata(&bin).unwrap().len();
    println!("static shim: {bin}, {size} bytes");
    assert!(size < 8 << 20, "the shim grew to {size} bytes");
    let version = Command::new(&bin).arg("--version").env_clear().output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("virtkube-shim "));
}
