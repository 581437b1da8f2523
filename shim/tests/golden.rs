//! Golden tests: every example template renders to exactly its checked-in XML.
//! `UPDATE_GOLDEN=1 cargo test -p virtkube-shim --test golden` rewrites them.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use virtkube_shim::render::HostFacts;

#[test]
fn example_templates_render_to_their_golden_xml() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (name, path) in common::example_templates() {
        let xml = common::render_golden(&name, &path, &HostFacts::qemu(false));
        let golden = common::repo_root().join(format!("shim/tests/golden/{name}.xml"));
        if update {
            std::fs::write(&golden, &xml).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", golden.display()));
        if expected != xml {
            mismatches.push(format!(
                "{name}: rendered XML differs from {}:\n{xml}",
                golden.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
