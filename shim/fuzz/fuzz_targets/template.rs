//! Any text as a baked template: parse_yaml must return a template or an
//! error, never panic, and stay within its work budget; a template it accepts
//! must render to XML that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtkube_shim::render::{self, HostFacts, Instance};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(template) = virtkube_api::resolve::parse_yaml(text) else { return };
    let instance = Instance {
        domain_name: "fuzz_vm".into(),
        uuid: Some("4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b".into()),
        namespace: Some("fuzz".into()),
        pod_name: Some("vm".into()),
        pod_uid: Some("4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b".into()),
        template_name: template.name.clone(),
    };
    if let Ok(xml) = render::render(&template, &instance, &HostFacts::qemu(false)) {
        assert!(roxmltree::Document::parse(&xml).is_ok(), "rendered XML does not parse:\n{xml}");
    }
});
