//! Any text as the downward API's annotations file, then as overrides of a
//! template: an error or a result, never a panic; accepted overrides leave a
//! template that still renders to XML that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtkube_api::Overrides;
use virtkube_shim::instance::parse_downward_annotations;
use virtkube_shim::render::{self, HostFacts, Instance};

const TEMPLATE: &str = "memory: 64Mi\nboot: {kernel: /k, cmdline: console=ttyS0}\ninterfaces: [{type: user}, {type: user}]\n";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(annotations) = parse_downward_annotations(text) else { return };
    let Ok(overrides) = Overrides::from_annotations(&annotations) else { return };
    let Ok(mut template) = virtkube_api::resolve::parse_yaml(TEMPLATE) else { panic!("the base template is valid") };
    if overrides.apply(&mut template).is_err() {
        return;
    }
    let instance = Instance {
        domain_name: "fuzz_vm".into(),
        uuid: None,
        namespace: Some("fuzz".into()),
        pod_name: Some("vm".into()),
        pod_uid: None,
        template_name: None,
    };
    if let Ok(xml) = render::render(&template, &instance, &HostFacts::qemu(false)) {
        assert!(roxmltree::Document::parse(&xml).is_ok(), "rendered XML does not parse:\n{xml}");
    }
});
