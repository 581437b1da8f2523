//! The gate's hostile client (`virtkube-gate-probe`, built with the gate's
//! tests) run inside a real VM container: its report, one line per attempt,
//! must show every attempt refused with a reason except what a VM container
//! may do with its own domain.

use std::path::PathBuf;

/// The probe binary, built by `cargo test` of the gate (debug profile).
pub fn binary() -> PathBuf {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/debug/virtkube-gate-probe"
    ));
    // Canonical: a hostPath volume may not contain "..".
    path.canonicalize().unwrap_or_else(|e| {
        panic!(
            "{}: {e}: cargo test --workspace builds it (or cargo build -p virtkube-gate --bin virtkube-gate-probe)",
            path.display()
        )
    })
}

/// The shim's golden domain XML (without its pod interface, whose tap is
/// named after the domain), owned by `@OWNER@` (the probe fills it in):
/// for a pod, its UID as the UUID and in the metadata; for a Docker
/// container (`pod == false`), its short ID as the name and no UUID or pod UID.
pub fn own_xml(pod: bool) -> String {
    let golden = tiny_golden_without_network();
    let uid = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    if pod {
        return golden.replace(uid, "@OWNER@");
    }
    golden
        .lines()
        .filter(|l| !l.contains(uid))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("virtkube-golden_tiny-0", "@OWNER@")
}

/// Checks the probe's report (its lines before `ready`); returns how many
/// attempts were refused. Panics naming the first attempt that got through,
/// or was refused without the gate's reason.
pub fn check_report(lines: &[String]) -> usize {
    virtkube_gate::probe_report::judge(lines).unwrap_or_else(|e| panic!("{e}"))
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
