//! No value from a template, an annotation or the pod can add, close or
//! rename elements in the domain XML: every value comes back out of an XML
//! parser exactly as it went in.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use virtkube_api::Overrides;
use virtkube_api::resolve::parse_yaml;
use virtkube_shim::render::{HostFacts, Instance, render};

const HOSTILE: &str =
    "</cmdline><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><cmdline>&amp;\"'";

/// Element paths, and the text and attributes at each path, as a parser sees them.
fn parse(xml: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let mut elements = Vec::new();
    let mut texts = BTreeMap::new();
    for node in doc.descendants().filter(|n| n.is_element()) {
        let mut names: Vec<&str> = node
            .ancestors()
            .filter(|n| n.is_element())
            .map(|n| n.tag_name().name())
            .collect();
        names.reverse();
        let path = names.join("/");
        if let Some(text) = node.text().filter(|t| !t.trim().is_empty()) {
            texts.insert(path.clone(), text.to_owned());
        }
        for attr in node.attributes() {
            texts.insert(format!("{path}@{}", attr.name()), attr.value().to_owned());
        }
        elements.push(path);
    }
    (elements, texts)
}

#[test]
fn hostile_values_are_escaped_not_interpreted() {
    let template_yaml = format!(
        "boot:\n  kernel: {kernel:?}\n  cmdline: {HOSTILE:?}\ndisks:\n  - file: {disk:?}\n",
        kernel = format!("/k\"/><evil/>{HOSTILE}"),
        disk = format!("/d'{HOSTILE}"),
    );
    let template = parse_yaml(&template_yaml).unwrap();
    let instance = Instance {
        domain_name: "ns_pod<evil>&\"'".into(),
        uuid: None,
        namespace: Some(HOSTILE.into()),
        pod_name: Some(format!("</virtkube:pod><evil/>{HOSTILE}")),
        pod_uid: Some(HOSTILE.into()),
        template_name: Some(HOSTILE.into()),
    };
    let xml = render(&template, &instance, &HostFacts::qemu(false)).unwrap();
    let (elements, texts) = parse(&xml);

    assert!(
        !elements.iter().any(|e| e.ends_with("evil")),
        "injected element in:\n{xml}"
    );
    assert_eq!(
        elements.iter().filter(|e| *e == "domain/devices/disk").count(),
        1,
        "{xml}"
    );
    assert_eq!(texts["domain/metadata/instance/disk@path"], format!("/d'{HOSTILE}"));
    assert_eq!(elements.iter().filter(|e| *e == "domain/devices").count(), 1, "{xml}");
    assert_eq!(texts["domain/name"], "ns_pod<evil>&\"'");
    assert_eq!(texts["domain/os/cmdline"], HOSTILE);
    assert_eq!(texts["domain/os/kernel"], format!("/k\"/><evil/>{HOSTILE}"));
    assert_eq!(texts["domain/devices/disk/source@file"], format!("/d'{HOSTILE}"));
    assert_eq!(
        texts["domain/metadata/instance/pod"],
        format!("</virtkube:pod><evil/>{HOSTILE}")
    );
    assert_eq!(texts["domain/metadata/instance/namespace"], HOSTILE);
}

#[test]
fn hostile_cmdline_annotation_is_escaped() {
    let mut template = parse_yaml("boot: {kernel: /k, cmdline: quiet}").unwrap();
    let annotations = BTreeMap::from([("virtkube.io/cmdline".to_owned(), HOSTILE.to_owned())]);
    Overrides::from_annotations(&annotations)
        .unwrap()
        .apply(&mut template)
        .unwrap();
    let instance = Instance {
        domain_name: "vm".into(),
        ..Default::default()
    };
    let xml = render(&template, &instance, &HostFacts::qemu(false)).unwrap();
    let (elements, texts) = parse(&xml);
    assert!(!elements.iter().any(|e| e.contains("disk")), "{xml}");
    assert_eq!(texts["domain/os/cmdline"], HOSTILE);
}
