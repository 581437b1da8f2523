//! Every golden domain XML is accepted by libvirt's schema (virt-xml-validate)
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
//! and by the real libvirtd that scripts/libvirtd-up.sh starts, on both the
//! test driver and the qemu driver (define with VALIDATE, read back, undefine).

mod common;

use std::path::Path;
use std::process::Command;

use virtkube_shim::render::HostFacts;

fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (install libvirt-clients and libxml2-utils: scripts/libvirtd-up.sh)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Defines the XML with --validate, dumps it back, undefines it, all in one
/// virsh session (test:///default forgets everything when its last client goes).
fn define_dump_undefine(uri: &str, xml_path: &Path, domain: &str) -> String {
    let script = format!(
        "define --validate {}; dumpxml {domain}; undefine {domain}",
        xml_path.display()
    );
    run(Command::new("virsh").args(["-q", "-c", uri, &script]))
}

fn check_driver(uri: &str, host: HostFacts, expected_type: &str) {
    let dir = std::env::temp_dir().join(format!("virtkube-accept-{}-{expected_type}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, path) in common::example_templates() {
        let xml = common::render_golden(&name, &path, &host);
        assert!(
            xml.starts_with(&format!("<domain type=\"{expected_type}\">")),
            "{name}: {xml}"
        );
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, &xml).unwrap();
        run(Command::new("virt-xml-validate").arg(&file).arg("domain"));
        let domain = common::golden_instance(&common::load(&path), &name).domain_name;
        let dumped = define_dump_undefine(uri, &file, &domain);
        assert!(
            dumped.contains(virtkube_api::METADATA_XMLNS) && dumped.contains(&format!("{name}-0</virtkube:pod>")),
            "{name} on {uri}: libvirt dropped virtkube's owner metadata:\n{dumped}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs libvirtd and virt-xml-validate: scripts/test.sh runs it"]
fn goldens_are_accepted_by_the_qemu_driver() {
    check_driver("qemu:///system", HostFacts::qemu(false), "qemu");
}

#[test]
#[ignore = "needs libvirtd and virt-xml-validate: scripts/test.sh runs it"]
fn goldens_are_accepted_by_the_test_driver() {
    let host = HostFacts {
        domain_types: vec!["test".into()],
    };
    check_driver("test+unix:///default", host, "test");
}

#[test]
#[ignore = "needs libvirtd and virt-xml-validate: scripts/test.sh runs it"]
fn libvirt_rejects_what_virtkube_must_not_emit() {
    // Proves the checks above can fail: a domain with an unknown device is
    // refused by libvirt's schema validation.
    let dir = std::env::temp_dir().join(format!("virtkube-reject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.xml");
    std::fs::write(&file, "<domain type=\"test\"><name>bad</name><memory>1024</memory><os><type>hvm</type></os><devices><frobnicator/></devices></domain>").unwrap();
    let status = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "virt-xml-validate accepted an invalid domain");
    let output = Command::new("virsh")
        .args([
            "-q",
            "-c",
            "test+unix:///default",
            &format!("define --validate {}", file.display()),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success(), "libvirtd accepted an invalid domain");
    std::fs::remove_dir_all(&dir).ok();
}
