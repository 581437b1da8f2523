//! `virtkube-nodeinfo --once` against the real qemu driver: the facts a user
//! inspecting a host sees, without a cluster.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

#[test]
#[ignore = "needs libvirtd with QEMU: scripts/test.sh runs it"]
fn once_prints_the_qemu_hosts_facts_as_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
        .args([
            "--once",
            "--output",
            "yaml",
            "--node",
            "inspect",
            "--uri",
            "qemu:///system",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let first = docs.into_iter().next().unwrap();
    assert_eq!(first["kind"], "VirtNode");
    assert_eq!(first["metadata"]["name"], "inspect");
    let status = &first["status"];
    assert_eq!(status["arch"], "x86_64");
    assert_eq!(status["kvm"], false, "KVM is hidden from the test libvirtd");
    assert!(
        status["machineTypes"].as_array().unwrap().iter().any(|m| m == "q35"),
        "{status}"
    );
    assert!(
        status["cpuModels"].as_array().is_some_and(|m| !m.is_empty()),
        "{status}"
    );
    assert!(status["libvirtVersion"].as_str().unwrap().starts_with("9."));
    assert!(status["numa"].as_array().is_some_and(|n| !n.is_empty()));
    // The host CPU's features include those inside its model (sse2 is in
    // every x86-64 model, so capabilities alone never list it).
    let features = status["hostCpu"]["features"].as_array().cloned().unwrap_or_default();
    assert!(features.iter().any(|f| f == "sse2"), "{status}");
    // Each cell's huge pages say how many are free (virNodeGetFreePages).
    let pages = status["numa"][0]["hugepages"].as_array().cloned().unwrap_or_default();
    assert!(
        !pages.is_empty()
            && pages
                .iter()
                .all(|p| p["free"].is_u64() && p["free"].as_u64() <= p["count"].as_u64()),
        "{status}"
    );
    assert_eq!(first["metadata"]["labels"]["machine-type.virtkube.io/q35"], "true");
}

#[test]
#[ignore = "needs libvirtd with QEMU: scripts/test.sh runs it"]
fn bad_flags_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
        .args(["--resync", "often"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resync \"often\""));
    let out = Command::new(env!("CARGO_BIN_EXE_virtkube-nodeinfo"))
        .args(["--once", "--uri", "qemu+unix:///system?socket=/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect to libvirt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
