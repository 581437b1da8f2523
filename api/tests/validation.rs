//! Template parsing, validation, defaults and annotation overrides: every bad
//! value yields an error naming the field path, the value and what is accepted.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use virtkube_api::resolve::{MacAddr, TemplateError, parse_yaml};
use virtkube_api::template::{CpuMode, DiskBus, DomainType, Firmware, LifecycleAction, NicModel};
use virtkube_api::{Overrides, annotations};

fn error_of(yaml: &str) -> String {
    match parse_yaml(yaml) {
        Ok(t) => panic!("accepted {yaml:?} as {t:?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_error(yaml: &str, expected: &str) {
    let message = error_of(yaml);
    assert!(
        message.contains(expected),
        "for {yaml:?}\n  expected: {expected}\n  got:      {message}"
    );
}

#[test]
fn defaults_are_applied_explicitly() {
    let t = parse_yaml("{}").unwrap();
    assert_eq!(t.name, None);
    assert_eq!(t.arch.as_str(), "x86_64");
    assert_eq!(t.machine, None);
    assert_eq!(t.domain_type, DomainType::Auto);
    assert_eq!(t.vcpus, 1);
    assert_eq!(t.cpu_mode, None);
    assert_eq!(t.memory_bytes, 256 << 20);
    assert_eq!(t.firmware, Firmware::Bios);
    assert!(t.serial && t.acpi && t.apic && t.pvpanic);
    assert_eq!(t.vnc, None);
    assert_eq!(
        (t.on_poweroff, t.on_reboot, t.on_crash),
        (
            LifecycleAction::Destroy,
            LifecycleAction::Restart,
            LifecycleAction::Destroy
        )
    );
}

#[test]
fn memory_may_be_a_plain_number_of_bytes_as_in_kubernetes() {
    assert_eq!(parse_yaml("memory: 536870912").unwrap().memory_bytes, 512 << 20);
    assert_eq!(parse_yaml("memory: \"536870912\"").unwrap().memory_bytes, 512 << 20);
    assert_eq!(parse_yaml("memory: ~").unwrap().memory_bytes, 256 << 20);
    assert_error("memory: -5", "spec.memory: \"-5\" is not a Kubernetes quantity");
    assert_error("memory: 1.5", "spec.memory: \"1.5\" is not a whole number of bytes");
    assert_error(
        "memory: [1]",
        "spec.memory: invalid type: sequence, expected a Kubernetes quantity such as 512Mi or 2Gi, or a number of bytes",
    );
}

#[test]
fn the_panic_device_is_x86_only() {
    assert!(!parse_yaml("features: {pvpanic: false}").unwrap().pvpanic);
    assert!(!parse_yaml("arch: aarch64").unwrap().pvpanic);
    assert!(!parse_yaml("arch: aarch64\nfeatures: {pvpanic: false}").unwrap().pvpanic);
    assert_error(
        "arch: aarch64\nfeatures: {pvpanic: true}",
        "spec.features.pvpanic: true is not available for aarch64 guests yet",
    );
}

#[test]
fn whole_resource_and_spec_alone_are_both_accepted() {
    let spec = "memory: 512Mi\ncpu: {count: 2}\n";
    let resource = "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: small}\nspec:\n  memory: 512Mi\n  cpu: {count: 2}\n";
    let a = parse_yaml(spec).unwrap();
    let b = parse_yaml(resource).unwrap();
    assert_eq!(b.name.as_deref(), Some("small"));
    assert_eq!((a.memory_bytes, a.vcpus), (b.memory_bytes, b.vcpus));
    assert_eq!(a.memory_bytes, 512 << 20);
}

#[test]
fn nested_defaults_and_values() {
    let t = parse_yaml(
        "cpu: {model: qemu64, topology: {sockets: 2, cores: 2, threads: 1}}\n\
         disks: [{file: /d.img, bus: scsi}, {file: /cd.iso, device: cdrom}]\n\
         interfaces: [{type: user}]\n\
         graphics: {type: vnc}\n",
    )
    .unwrap();
    assert_eq!(t.cpu_mode, Some(CpuMode::Custom), "a model without a mode means custom");
    assert_eq!(t.vcpus, 4, "count follows the topology");
    assert_eq!(t.disks[0].bus, DiskBus::Scsi);
    assert!(!t.disks[0].read_only);
    assert!(t.disks[1].read_only, "cdroms are read-only");
    assert_eq!(t.interfaces[0].model, NicModel::Virtio);
    assert_eq!(t.vnc, Some(virtkube_api::resolve::VncDisplay::InPod));
}

#[test]
fn bad_values_name_the_field_the_value_and_what_is_accepted() {
    assert_error(
        "memory: 12 GB",
        r#"spec.memory: "12 GB" is not a Kubernetes quantity (e.g. 512Mi, 2Gi)"#,
    );
    assert_error("memory: 512k", r#"spec.memory: "512k" is less than the minimum of 1Mi"#);
    assert_error("memory: '0.5'", r#"spec.memory: "0.5" is not a whole number of bytes"#);
    assert_error(
        "cpu: {count: 0}",
        "spec.cpu.count: 0 is not a vCPU count; use 1 to 1024",
    );
    assert_error("cpu: {count: 5000}", "spec.cpu.count: 5000 is not a vCPU count");
    assert_error(
        "cpu: {count: 3, topology: {sockets: 1, cores: 2, threads: 1}}",
        "spec.cpu.topology: sockets × cores × threads = 2, but spec.cpu.count is 3",
    );
    assert_error(
        "cpu: {topology: {sockets: 0, cores: 1, threads: 1}}",
        "spec.cpu.topology.sockets: 0 is not allowed",
    );
    assert_error(
        "cpu: {mode: custom}",
        "spec.cpu.model: is required when spec.cpu.mode is \"custom\"",
    );
    assert_error(
        "cpu: {mode: host-passthrough, model: qemu64}",
        "spec.cpu.model: \"qemu64\" is only allowed with spec.cpu.mode \"custom\"",
    );
    assert_error(
        "cpu: {features: [{name: avx2}]}",
        "spec.cpu.features: needs spec.cpu.mode",
    );
    assert_error(
        "cpu: {mode: host-model, features: [{name: avx2}, {name: avx2}]}",
        "spec.cpu.features[1].name: \"avx2\" is listed twice",
    );
    assert_error(
        "cpu: {mode: host-model, features: [{name: 'a b'}]}",
        "spec.cpu.features[0].name: \"a b\" is not valid",
    );
    assert_error(
        "machine: 'q35; rm'",
        "spec.machine: \"q35; rm\" is not valid; expected a machine type",
    );
    assert_error(
        "boot: {kernel: vmlinuz}",
        "spec.boot.kernel: \"vmlinuz\" is not an absolute path",
    );
    assert_error("boot: {initrd: /i.gz}", "spec.boot.initrd: needs spec.boot.kernel");
    assert_error("boot: {cmdline: quiet}", "spec.boot.cmdline: needs spec.boot.kernel");
    assert_error(
        "boot: {kernel: /k, cmdline: \"a\\nb\"}",
        "spec.boot.cmdline: \"a\\nb\" contains a control character",
    );
    assert_error("disks: [{}]", "spec.disks[0]: has no source; set containerFile");
    assert_error(
        "disks: [{file: /a, containerFile: /disk/a}]",
        "spec.disks[0]: sets more than one of file, containerFile, network and imageFile",
    );
    assert_error(
        "disks: [{containerFile: disk/a}]",
        "spec.disks[0].containerFile: \"disk/a\" is not an absolute path inside the VM container",
    );
    assert_error(
        "disks: [{containerFile: /disk/../etc/shadow}]",
        "is not an absolute path inside the VM container (no ..)",
    );
    assert_error(
        "disks: [{file: /a, persistent: true}]",
        "spec.disks[0].persistent: applies to a containerFile disk only",
    );
    assert_error(
        "disks: [{file: /a, network: {protocol: nbd, hosts: [{name: h}]}}]",
        "spec.disks[0]: sets more than one of file, containerFile, network and imageFile",
    );
    assert_error(
        "disks: [{imageFile: golden, containerFile: /disk/a}]",
        "spec.disks[0]: sets more than one of file, containerFile, network and imageFile",
    );
    assert_error(
        "disks: [{imageFile: Golden_1}]",
        "spec.disks[0].imageFile: \"Golden_1\" is not an ImageFile name",
    );
    assert_error(
        "disks: [{imageFile: golden, format: qcow2}]",
        "spec.disks[0].format: is the ImageFile's own for an imageFile disk",
    );
    assert_error(
        "disks: [{imageFile: golden, persistent: true}]",
        "spec.disks[0].persistent: applies to a containerFile disk only (an ImageFile",
    );
    assert_error(
        "disks: [{network: {protocol: nbd, hosts: []}}]",
        "spec.disks[0].network.hosts: is empty",
    );
    assert_error(
        "disks: [{network: {protocol: rbd, hosts: [{name: h}]}}]",
        "spec.disks[0].network.name: is required for protocol \"rbd\"",
    );
    assert_error(
        "disks: [{file: /a, bootOrder: 1}, {file: /b, bootOrder: 1}]",
        "spec.disks[1].bootOrder: 1 is used by another disk or interface",
    );
    assert_error(
        "disks: [{file: /a, bootOrder: 0}]",
        "spec.disks[0].bootOrder: 0 is not a boot position",
    );
    assert_error(
        "interfaces: [{type: network}]",
        "spec.interfaces[0].source: is required for type \"network\"",
    );
    assert_error(
        "interfaces: [{type: user, source: br0}]",
        "spec.interfaces[0].source: \"br0\" is not allowed for type \"user\"",
    );
    assert_error(
        "interfaces: [{type: user, mac: '52:54:00:zz:00:01'}]",
        "spec.interfaces[0].mac: \"52:54:00:zz:00:01\" is not a MAC address",
    );
    assert_error(
        "interfaces: [{type: user, mac: '01:00:5e:00:00:01'}]",
        "spec.interfaces[0].mac: \"01:00:5e:00:00:01\" is a multicast MAC address",
    );
    assert_error(
        "interfaces: [{type: user, mac: '52:54:00:00:00:01'}, {type: user, mac: '52:54:00:00:00:01'}]",
        "spec.interfaces[1].mac: \"52:54:00:00:00:01\" is used by another interface",
    );
    assert_error(
        "interfaces: [{type: pod, source: eth0}]",
        "spec.interfaces[0].source: \"eth0\" is not allowed for type \"pod\"",
    );
    assert_error(
        "interfaces: [{type: pod}, {type: pod}]",
        "spec.interfaces[1].type: a second \"pod\" interface",
    );
    assert_error(
        "interfaces: [{type: user, binding: masquerade}]",
        "spec.interfaces[0].binding: is only for type \"pod\"",
    );
    assert_error("interfaces: [{type: pod, binding: bridge}]", "binding");
    assert_error(
        "graphics: {listen: 0.0.0.0}",
        "spec.graphics.listen: \"0.0.0.0\" is only used with spec.graphics.type \"vnc\"",
    );
    assert_error(
        "onReboot: coredump-restart",
        "spec.onReboot: \"coredump-restart\" is only allowed for spec.onCrash",
    );
}

#[test]
fn shape_errors_carry_the_field_path() {
    assert_error(
        "memroy: 1Gi",
        "spec.memroy: unknown field `memroy`, expected one of `arch`",
    );
    assert_error(
        "cpu: {count: two}",
        "spec.cpu.count: invalid type: string \"two\", expected u32",
    );
    assert_error(
        "cpu: {mode: fastest}",
        "spec.cpu.mode: unknown variant `fastest`, expected one of `host-model`, `host-passthrough`, `custom`",
    );
    assert_error(
        "domainType: xen",
        "spec.domainType: unknown variant `xen`, expected one of `auto`, `kvm`, `qemu`",
    );
    assert_error(
        "disks: [{file: /a, bus: usb}]",
        "spec.disks[0].bus: unknown variant `usb`",
    );
    assert_error(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: x}\nspec: {cpu: {count: -1}}",
        "spec.cpu.count: invalid value: integer `-1`, expected u32",
    );
    assert_error("[1, 2]", "(document): is not a mapping; expected a whole VirtTemplate");
    assert_error("", "(document): is not a mapping");
    assert_error("memory: [", "(document): not valid YAML: unclosed bracket");
}

#[test]
fn a_container_file_disk_is_persistent_only_when_asked() {
    use virtkube_api::resolve::DiskSource;
    let t =
        parse_yaml("disks: [{containerFile: /disk/root.raw}, {containerFile: /data/d.raw, persistent: true}]").unwrap();
    assert_eq!(
        t.disks[0].source,
        DiskSource::Container {
            path: "/disk/root.raw".into(),
            persistent: false
        }
    );
    assert_error(
        "disks: [{containerFile: /disk/root.qcow2, format: qcow2}]",
        "spec.disks[0].format: qcow2 is not taken from the container (its header may name a backing file",
    );
    assert_eq!(
        t.disks[1].source,
        DiskSource::Container {
            path: "/data/d.raw".into(),
            persistent: true
        }
    );
}

#[test]
fn cloud_init_becomes_a_last_read_only_disk_and_the_annotation_replaces_its_user_data() {
    use virtkube_api::resolve::{CloudInitSource, DiskSource};
    let mut t =
        parse_yaml("disks: [{containerFile: /disk/root.raw}]\ncloudInit: {directory: /etc/cloud-init}\n").unwrap();
    assert_eq!(t.disks.len(), 2);
    assert!(t.disks[1].read_only && t.disks[1].boot_order.is_none());
    let overrides = Overrides::from_annotations(&annotations(&[(
        annotations::USER_DATA,
        "#cloud-config\nhostname: x\n",
    )]))
    .unwrap();
    overrides.apply(&mut t).unwrap();
    assert_eq!(
        t.disks[1].source,
        DiskSource::CloudInit(CloudInitSource {
            directory: Some("/etc/cloud-init".into()),
            user_data: Some("#cloud-config\nhostname: x\n".into()),
        })
    );
    // Without cloudInit in the template, the annotation adds the disk.
    let mut bare = parse_yaml("{}").unwrap();
    overrides.apply(&mut bare).unwrap();
    assert_eq!(bare.disks.len(), 1);
    assert!(matches!(&bare.disks[0].source, DiskSource::CloudInit(s) if s.directory.is_none()));
    assert_error(
        "cloudInit: {directory: /a, userData: x}",
        "spec.cloudInit: sets both directory and userData",
    );
    assert_error("cloudInit: {}", "spec.cloudInit: has neither directory nor userData");
    assert_error(
        "cloudInit: {directory: etc/ci}",
        "spec.cloudInit.directory: \"etc/ci\" is not an absolute path inside the VM container",
    );
    let message = Overrides::from_annotations(&annotations(&[(annotations::USER_DATA, " \n")]))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("annotation virtkube.io/user-data: is empty"),
        "{message}"
    );
}

#[test]
fn other_kinds_are_refused() {
    let err = parse_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::WrongKind {
                field: "apiVersion",
                ..
            }
        ),
        "{err}"
    );
    assert_error(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtNode\n",
        "template has kind \"VirtNode\", expected \"VirtTemplate\"",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let message = error_of("memory: lots\ncpu: {count: 0}\nboot: {kernel: relative}\n");
    for field in ["spec.memory", "spec.cpu.count", "spec.boot.kernel"] {
        assert!(message.contains(field), "{field} missing from {message}");
    }
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn overrides_apply_to_the_resolved_template() {
    let mut t = parse_yaml("boot: {kernel: /k, cmdline: quiet}\ninterfaces: [{type: user}]\n").unwrap();
    let overrides = Overrides::from_annotations(&annotations(&[
        (annotations::MEMORY, "1Gi"),
        (annotations::CPUS, "3"),
        (annotations::CMDLINE, "console=ttyS0 debug"),
        (annotations::MAC, "52:54:00:01:02:03"),
        (annotations::TEMPLATE, "tiny"),
        ("example.com/unrelated", "whatever"),
    ]))
    .unwrap();
    overrides.apply(&mut t).unwrap();
    assert_eq!(t.memory_bytes, 1 << 30);
    assert_eq!(t.vcpus, 3);
    assert_eq!(t.cmdline.as_deref(), Some("console=ttyS0 debug"));
    assert_eq!(t.interfaces[0].mac, Some(MacAddr([0x52, 0x54, 0, 1, 2, 3])));
}

#[test]
fn bad_overrides_name_the_annotation_and_value() {
    let cases = [
        (
            annotations::MEMORY,
            "12 GB",
            r#"annotation virtkube.io/memory: "12 GB" is not a Kubernetes quantity (e.g. 512Mi, 2Gi)"#,
        ),
        (
            annotations::CPUS,
            "two",
            r#"annotation virtkube.io/cpus: "two" is not a whole number of vCPUs (e.g. 2)"#,
        ),
        (
            annotations::CPUS,
            "0",
            "annotation virtkube.io/cpus: 0 is not a vCPU count; use 1 to 1024",
        ),
        (
            annotations::CMDLINE,
            "a\u{7}b",
            "annotation virtkube.io/cmdline: \"a\\u{7}b\" contains a control character",
        ),
        (
            annotations::MAC,
            "ff:ff:ff:ff:ff:ff",
            "annotation virtkube.io/mac: \"ff:ff:ff:ff:ff:ff\" is a multicast MAC address",
        ),
        (
            "virtkube.io/memroy",
            "1Gi",
            "annotation virtkube.io/memroy: is not a virtkube annotation; known: virtkube.io/template",
        ),
    ];
    // The scheduler's annotation is not the VM's: accepted, changes nothing.
    let scheduler_only = Overrides::from_annotations(&annotations(&[(annotations::REQUIRES, "kvm, gpu")])).unwrap();
    assert_eq!(scheduler_only, Overrides::default());
    for (key, value, expected) in cases {
        let message = Overrides::from_annotations(&annotations(&[(key, value)]))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(expected),
            "{key}={value:?}\n  expected: {expected}\n  got:      {message}"
        );
    }
}

#[test]
fn overrides_that_do_not_fit_the_template_are_refused() {
    let cases = [
        (
            "cpu: {topology: {sockets: 1, cores: 2, threads: 1}}",
            annotations::CPUS,
            "4",
            "does not match the template's topology",
        ),
        ("{}", annotations::CMDLINE, "quiet", "the template has no boot.kernel"),
        (
            "interfaces: []",
            annotations::MAC,
            "52:54:00:01:02:03",
            "the template has no interfaces",
        ),
    ];
    for (yaml, key, value, expected) in cases {
        let mut t = parse_yaml(yaml).unwrap();
        let before = t.clone();
        let overrides = Overrides::from_annotations(&annotations(&[(key, value)])).unwrap();
        let message = overrides.apply(&mut t).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("annotation {key}:")) && message.contains(expected),
            "{message}"
        );
        assert_eq!(t, before, "a refused override must change nothing");
    }
}

#[test]
fn a_template_without_interfaces_is_on_the_pod_network_and_an_empty_list_has_none() {
    let on_pod = parse_yaml("memory: 128Mi").unwrap();
    assert_eq!(on_pod.interfaces.len(), 1);
    assert_eq!(on_pod.interfaces[0].kind, virtkube_api::template::InterfaceType::Pod);
    let none = parse_yaml("interfaces: []").unwrap();
    assert!(none.interfaces.is_empty());
    let explicit = parse_yaml("interfaces: [{type: pod, binding: masquerade, model: e1000}]").unwrap();
    assert_eq!(explicit.interfaces[0].kind, virtkube_api::template::InterfaceType::Pod);
}

#[test]
fn example_templates_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("kind: VirtTemplate") {
            parse_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected the example templates, found {seen}");
}

#[test]
fn hostile_documents_are_refused_quickly_and_say_why() {
    // Size: more than 1 MiB is refused before parsing.
    let huge = format!("memory: 64Mi\n# {}\n", "x".repeat(1024 * 1024));
    assert_error(&huge, "a template may be at most 1048576 bytes");
    // Depth: a deeply nested flow sequence is refused at the parser's depth limit.
    let started = std::time::Instant::now();
    let deep = format!("memory: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_error(&deep, "(document): not valid YAML");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // An alias bomb does not expand.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for level in 1..12 {
        let prev = level - 1;
        bomb.push_str(&format!(
            "b{level}: &b{level} [*{}",
            if prev == 0 { "a".into() } else { format!("b{prev}") }
        ));
        for _ in 0..9 {
            bomb.push_str(&format!(
                ", *{}",
                if prev == 0 { "a".into() } else { format!("b{prev}") }
            ));
        }
        bomb.push_str("]\n");
    }
    let started = std::time::Instant::now();
    assert_error(&bomb, "(document)");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // Unknown fields at the top and in metadata, as in spec.
    assert_error(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: x}\nspec: {}\nextra: 1",
        "extra: is not a field here; expected one of apiVersion, kind, metadata, spec",
    );
    assert_error(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: x, nmae: y}\nspec: {}",
        "metadata.nmae: is not a field here",
    );
}

#[test]
fn numbers_from_outside_cannot_overflow() {
    assert_error("memory: 8Ei", "spec.memory: \"8Ei\" is more than the 4Pi");
    assert_error("memory: 18446744073709551616", "spec.memory");
    let message = error_of("memory: 18446744073709551616");
    assert!(
        !message.contains("not valid YAML"),
        "a big number is valid YAML: {message}"
    );
    // u32::MAX³ must not wrap into an acceptable count (it did: 12884901887 in release builds).
    assert_error(
        "cpu: {topology: {sockets: 4294967295, cores: 4294967295, threads: 4294967295}}",
        "spec.cpu.topology: sockets × cores × threads = more than 2⁶⁴",
    );
    // Without a count, a topology too large is the topology's fault, not count's.
    let message = error_of("cpu: {topology: {sockets: 64, cores: 64, threads: 2}}");
    assert!(
        message.contains("spec.cpu.topology: sockets × cores × threads = 8192, more than the 1024 vCPUs"),
        "{message}"
    );
    assert!(!message.contains("spec.cpu.count"), "{message}");
}

#[test]
fn characters_xml_cannot_carry_are_refused_with_their_field() {
    assert_error(
        "boot: {kernel: /k, cmdline: \"console=ttyS0 \\uFFFE\"}",
        "spec.boot.cmdline",
    );
    assert_error("boot: {kernel: \"/k\\uFFFF\"}", "spec.boot.kernel: contains U+FFFF");
    assert_error(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: \"a\\0b\"}\nspec: {}",
        "metadata.name: contains U+0000",
    );
    assert_error(
        "graphics: {type: vnc, listen: \"a:b:c\"}",
        "spec.graphics.listen: \"a:b:c\" is not an IP address",
    );
    assert!(parse_yaml("graphics: {type: vnc, listen: \"::1\"}").is_ok());
}

#[test]
fn an_annotation_mac_must_not_duplicate_another_nic() {
    let mut t = parse_yaml("interfaces: [{type: user}, {type: user, mac: \"52:54:00:00:00:02\"}]").unwrap();
    let overrides = Overrides::from_annotations(&BTreeMap::from([(
        annotations::MAC.to_owned(),
        "52:54:00:00:00:02".to_owned(),
    )]))
    .unwrap();
    let err = overrides.apply(&mut t).unwrap_err().to_string();
    assert!(err.contains("already the MAC of spec.interfaces[1]"), "{err}");
}
