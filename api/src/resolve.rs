//! From YAML to a validated, fully defaulted [`ResolvedTemplate`].
//!
//! Every error names the field path and the offending value and says what is
//! accepted, e.g. `spec.memory: "12 GB" is not a Kubernetes quantity (e.g. 512Mi, 2Gi)`.
//! Validation collects every problem it finds rather than stopping at the first.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use crate::quantity::{self, QuantityError};
use crate::template::{
    Arch, CloudInitSpec, CpuFeaturePolicy, CpuMode, CpuTopology, DiskBus, DiskDevice, DiskFormat, DiskSpec, DomainType,
    Firmware, GraphicsType, InterfaceSpec, InterfaceType, LifecycleAction, NetworkDiskProtocol, NicModel, VirtTemplate,
    VirtTemplateSpec,
};

/// Most vCPUs a template may ask for.
pub const MAX_VCPUS: u32 = 1024;
/// Least memory a template may ask for.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// Most memory a template may ask for: 4 PiB, the 52-bit physical address
/// space of x86_64 and aarch64 (libvirt's KiB field would take more, and
/// then overflow when QEMU is asked for it in bytes).
pub const MAX_MEMORY_BYTES: u64 = 1 << 52;
/// Memory when the template says nothing.
pub const DEFAULT_MEMORY: &str = "256Mi";

/// One problem in a template, at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.cpu.count`.
    pub field: String,
    /// What is wrong and what is accepted; includes the quoted value.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a template cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// Not YAML, or not the shape of a VirtTemplate.
    #[error("template is not a valid VirtTemplate: {0}")]
    Parse(FieldError),
    /// A whole resource of another kind or API version.
    #[error("template has {field} {found:?}, expected {expected:?}")]
    WrongKind {
        /// `kind` or `apiVersion`.
        field: &'static str,
        /// What the document says.
        found: String,
        /// What a VirtTemplate says.
        expected: &'static str,
    },
    /// Well-formed, but values that cannot run.
    #[error("template is invalid: {}", join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A file on the virthost.
    File(String),
    /// A file inside the VM container, passed as a file descriptor.
    Container {
        /// Its path in the container.
        path: String,
        /// The guest writes to it in place (else to a private copy).
        persistent: bool,
    },
    /// The cloud-init `cidata` disk the shim builds (read-only, last).
    CloudInit(CloudInitSource),
    /// An ImageFile of the pod's namespace, by name; the shim looks it up
    /// and makes it a [`DiskSource::Volume`].
    ImageFile(String),
    /// A libvirt storage volume (an ImageFile's, once looked up).
    Volume {
        /// The storage pool.
        pool: String,
        /// The volume in it.
        volume: String,
    },
    /// A network block device.
    Network {
        /// Protocol.
        protocol: NetworkDiskProtocol,
        /// Export, image or target name.
        name: Option<String>,
        /// Servers as (host, port).
        hosts: Vec<(String, u16)>,
    },
}

/// Where the cloud-init data comes from: at least one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInitSource {
    /// A directory in the VM container (`user-data`, optional `meta-data`,
    /// `network-config`, `vendor-data`).
    pub directory: Option<String>,
    /// The user-data itself; it replaces the directory's `user-data`.
    pub user_data: Option<String>,
}

/// Checks a path in the VM container: absolute, no `..`, no control
/// characters; `example` shows the expected form.
fn check_container_path(problems: &mut Problems, field: &str, path: &str, example: &str) {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        problems.add(
            field,
            format!("{path:?} is not an absolute path inside the VM container (no ..), e.g. {example}"),
        );
    } else if path.chars().any(char::is_control) {
        problems.add(field, format!("{path:?} contains a control character"));
    }
}

/// A validated disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDisk {
    /// Data source.
    pub source: DiskSource,
    /// Image format.
    pub format: DiskFormat,
    /// Disk or cdrom.
    pub device: DiskDevice,
    /// Bus.
    pub bus: DiskBus,
    /// Read-only (always true for cdroms).
    pub read_only: bool,
    /// Boot order, if bootable.
    pub boot_order: Option<u32>,
}

/// A validated network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInterface {
    /// Kind.
    pub kind: InterfaceType,
    /// Network or bridge name.
    pub source: Option<String>,
    /// NIC model.
    pub model: NicModel,
    /// MAC address given by the template or an annotation; `None`: derived per instance.
    pub mac: Option<MacAddr>,
    /// Boot order, if bootable.
    pub boot_order: Option<u32>,
}

/// A unicast MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), rejecting multicast addresses.
    pub fn parse(s: &str) -> Result<MacAddr, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        let mut bytes = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address (e.g. 52:54:00:12:34:56)"));
        }
        for (byte, part) in bytes.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address (e.g. 52:54:00:12:34:56)"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (e.g. 52:54:00:12:34:56)"))?;
        }
        if bytes[0] & 1 == 1 {
            return Err(format!(
                "{s:?} is a multicast MAC address; a NIC needs a unicast one (first byte even, e.g. 52:54:00:12:34:56)"
            ));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Where a VM's VNC display is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VncDisplay {
    /// In the VM's pod, by its shim (127.0.0.1:5900, RFB, and :6080, RFB over
    /// WebSocket): QEMU listens nowhere and each viewer's connection is
    /// opened by libvirt and handed to the shim. The default.
    InPod,
    /// On the node, at this address (`spec.graphics.listen`): only with a
    /// plain libvirtd; the gate refuses it.
    OnNode(String),
}

/// A VirtTemplate after validation, with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTemplate {
    /// `metadata.name` when the YAML was a whole resource.
    pub name: Option<String>,
    /// Guest architecture.
    pub arch: Arch,
    /// Machine type; `None`: the hypervisor's default.
    pub machine: Option<String>,
    /// Requested hypervisor.
    pub domain_type: DomainType,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU mode; `None`: the hypervisor's default model.
    pub cpu_mode: Option<CpuMode>,
    /// CPU model (mode custom).
    pub cpu_model: Option<String>,
    /// CPU features and their policies.
    pub cpu_features: Vec<(String, CpuFeaturePolicy)>,
    /// Topology; its product equals `vcpus`.
    pub topology: Option<CpuTopology>,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Kernel for direct kernel boot.
    pub kernel: Option<String>,
    /// Initrd.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Firmware.
    pub firmware: Firmware,
    /// Disks in order.
    pub disks: Vec<ResolvedDisk>,
    /// Interfaces in order.
    pub interfaces: Vec<ResolvedInterface>,
    /// Serial console present.
    pub serial: bool,
    /// The VNC display, when graphics are on.
    pub vnc: Option<VncDisplay>,
    /// ACPI on.
    pub acpi: bool,
    /// APIC on.
    pub apic: bool,
    /// A pvpanic device (x86 only).
    pub pvpanic: bool,
    /// Action on guest poweroff.
    pub on_poweroff: LifecycleAction,
    /// Action on guest reboot.
    pub on_reboot: LifecycleAction,
    /// Action on guest crash.
    pub on_crash: LifecycleAction,
}

/// Largest template text accepted, in bytes: a VM's template is a page of
/// YAML; anything near this limit is a mistake or an attack.
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;

/// Limits on the YAML parser's work, far above any real template: nesting
/// depth, parser events and nodes (so a small document cannot cost seconds of
/// CPU), and aliases (so an alias bomb cannot expand).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = 32;
    budget.max_events = 200_000;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = MAX_TEMPLATE_BYTES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    options
}

/// Top-level fields of a whole VirtTemplate resource.
const RESOURCE_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
/// Fields of Kubernetes' ObjectMeta (as `kubectl get -o yaml` writes them).
const METADATA_FIELDS: &[&str] = &[
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

fn document_error(message: String) -> TemplateError {
    TemplateError::Parse(FieldError {
        field: "(document)".into(),
        message,
    })
}

/// Parses a VirtTemplate from YAML — a whole resource (`apiVersion`, `kind`,
/// `metadata`, `spec`) or the spec alone — and validates it. The text, the
/// parser's work and every field are bounded; unknown fields are errors at
/// every level.
pub fn parse_yaml(text: &str) -> Result<ResolvedTemplate, TemplateError> {
    if text.len() > MAX_TEMPLATE_BYTES {
        return Err(document_error(format!(
            "is {} bytes; a template may be at most {MAX_TEMPLATE_BYTES} bytes (1 MiB)",
            text.len()
        )));
    }
    let value: serde_json::Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| document_error(format!("not valid YAML: {e}")))?;
    let Some(mapping) = value.as_object() else {
        return Err(document_error(
            "is not a mapping; expected a whole VirtTemplate (apiVersion, kind, metadata, spec) or its spec alone"
                .into(),
        ));
    };
    let is_resource = mapping.contains_key("kind") || mapping.contains_key("apiVersion");
    if is_resource {
        for (field, expected) in [("apiVersion", "virtkube.io/v1alpha1"), ("kind", "VirtTemplate")] {
            let found = value.get(field).and_then(|v| v.as_str()).unwrap_or_default();
            if found != expected {
                return Err(TemplateError::WrongKind {
                    field,
                    found: found.to_owned(),
                    expected,
                });
            }
        }
        unknown_fields(mapping, RESOURCE_FIELDS, "")?;
        if let Some(metadata) = mapping.get("metadata").and_then(|m| m.as_object()) {
            unknown_fields(metadata, METADATA_FIELDS, "metadata.")?;
        }
        let resource: VirtTemplate = deserialize(value, "")?;
        resolve(resource.metadata.name.clone(), &resource.spec)
    } else {
        let spec: VirtTemplateSpec = deserialize(value, "spec")?;
        resolve(None, &spec)
    }
}

fn unknown_fields(
    mapping: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
    prefix: &str,
) -> Result<(), TemplateError> {
    match mapping.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(TemplateError::Parse(FieldError {
            field: format!("{prefix}{key}"),
            message: format!("is not a field here; expected one of {}", known.join(", ")),
        })),
        None => Ok(()),
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(value: serde_json::Value, prefix: &str) -> Result<T, TemplateError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (prefix, inner.as_str()) {
            (p, ".") => {
                if p.is_empty() {
                    "(document)".to_owned()
                } else {
                    p.to_owned()
                }
            }
            ("", i) => i.to_owned(),
            (p, i) => format!("{p}.{i}"),
        };
        TemplateError::Parse(FieldError {
            field,
            message: e.into_inner().to_string(),
        })
    })
}

/// Collects field errors during validation.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Validates a spec and applies every default.
pub fn resolve(name: Option<String>, spec: &VirtTemplateSpec) -> Result<ResolvedTemplate, TemplateError> {
    let mut problems = Problems::default();
    check_xml_text(&mut problems, name.as_deref(), spec);

    if let Some(machine) = &spec.machine {
        check_token(
            &mut problems,
            "spec.machine",
            machine,
            "a machine type such as q35, pc or virt",
        );
    }

    let cpu = spec.cpu.clone().unwrap_or_default();
    let vcpus = resolve_vcpus(&mut problems, cpu.count, cpu.topology.as_ref());
    let cpu_mode = match (cpu.mode, &cpu.model) {
        (None, Some(_)) => Some(CpuMode::Custom),
        (Some(CpuMode::Custom), None) => {
            problems.add(
                "spec.cpu.model",
                "is required when spec.cpu.mode is \"custom\" (e.g. qemu64, Skylake-Client)",
            );
            Some(CpuMode::Custom)
        }
        (Some(mode @ (CpuMode::HostModel | CpuMode::HostPassthrough)), Some(model)) => {
            problems.add(
                "spec.cpu.model",
                format!("{model:?} is only allowed with spec.cpu.mode \"custom\" (or with no mode), not {mode:?}"),
            );
            Some(mode)
        }
        (mode, _) => mode,
    };
    if let Some(model) = &cpu.model {
        check_token(
            &mut problems,
            "spec.cpu.model",
            model,
            "a CPU model name such as qemu64 or Skylake-Client",
        );
    }
    if cpu_mode.is_none() && !cpu.features.is_empty() {
        problems.add(
            "spec.cpu.features",
            "needs spec.cpu.mode (host-model, host-passthrough, or custom with a model): features adjust a named CPU model",
        );
    }
    let mut cpu_features = Vec::new();
    let mut seen_features = BTreeSet::new();
    for (i, feature) in cpu.features.iter().enumerate() {
        let field = format!("spec.cpu.features[{i}].name");
        check_token(
            &mut problems,
            &field,
            &feature.name,
            "a CPU feature name such as avx2 or vmx",
        );
        if !seen_features.insert(feature.name.clone()) {
            problems.add(
                field,
                format!("{:?} is listed twice; list each feature once", feature.name),
            );
        }
        cpu_features.push((
            feature.name.clone(),
            feature.policy.unwrap_or(CpuFeaturePolicy::Require),
        ));
    }

    let memory_text = spec.memory.as_deref().unwrap_or(DEFAULT_MEMORY);
    let memory_bytes = match parse_memory(memory_text) {
        Ok(bytes) => bytes,
        Err(message) => {
            problems.add("spec.memory", message);
            0
        }
    };

    let boot = spec.boot.clone().unwrap_or_default();
    if let Some(kernel) = &boot.kernel {
        check_host_path(&mut problems, "spec.boot.kernel", kernel);
    }
    if let Some(initrd) = &boot.initrd {
        check_host_path(&mut problems, "spec.boot.initrd", initrd);
        if boot.kernel.is_none() {
            problems.add(
                "spec.boot.initrd",
                "needs spec.boot.kernel (an initrd is only used with direct kernel boot)",
            );
        }
    }
    if let Some(cmdline) = &boot.cmdline {
        if let Err(message) = check_cmdline(cmdline) {
            problems.add("spec.boot.cmdline", message);
        }
        if boot.kernel.is_none() {
            problems.add(
                "spec.boot.cmdline",
                "needs spec.boot.kernel (a command line is only used with direct kernel boot)",
            );
        }
    }

    let mut boot_orders = BTreeSet::new();
    let mut check_boot_order = |problems: &mut Problems, field: String, order: Option<u32>| {
        if let Some(order) = order {
            if order == 0 {
                problems.add(field, "0 is not a boot position; positions start at 1");
            } else if !boot_orders.insert(order) {
                problems.add(
                    field,
                    format!("{order} is used by another disk or interface; each boot position once"),
                );
            }
        }
    };

    let mut disks = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("spec.disks[{i}]");
        check_boot_order(&mut problems, format!("{field}.bootOrder"), disk.boot_order);
        if let Some(resolved) = resolve_disk(&mut problems, &field, disk) {
            disks.push(resolved);
        }
    }

    if let Some(cloud_init) = &spec.cloud_init
        && let Some(disk) = resolve_cloud_init(&mut problems, cloud_init)
    {
        disks.push(disk);
    }

    let mut interfaces: Vec<ResolvedInterface> = Vec::new();
    let mut macs = BTreeSet::new();
    let declared = match &spec.interfaces {
        Some(declared) => declared.clone(),
        None => vec![InterfaceSpec::pod_default()],
    };
    for (i, nic) in declared.iter().enumerate() {
        let field = format!("spec.interfaces[{i}]");
        check_boot_order(&mut problems, format!("{field}.bootOrder"), nic.boot_order);
        let resolved = resolve_interface(&mut problems, &field, nic);
        if let Some(mac) = resolved.mac
            && !macs.insert(mac.0)
        {
            problems.add(
                format!("{field}.mac"),
                format!("\"{mac}\" is used by another interface; each NIC needs its own"),
            );
        }
        if resolved.kind == InterfaceType::Pod && interfaces.iter().any(|nic| nic.kind == InterfaceType::Pod) {
            problems.add(
                format!("{field}.type"),
                "a second \"pod\" interface: the pod has one network, so a VM may have one pod interface",
            );
        }
        interfaces.push(resolved);
    }

    let graphics = spec.graphics.clone().unwrap_or_default();
    let vnc = match graphics.kind.unwrap_or(GraphicsType::None) {
        GraphicsType::None => {
            if let Some(listen) = &graphics.listen {
                problems.add(
                    "spec.graphics.listen",
                    format!("{listen:?} is only used with spec.graphics.type \"vnc\""),
                );
            }
            None
        }
        GraphicsType::Vnc => match &graphics.listen {
            None => Some(VncDisplay::InPod),
            Some(listen) => {
                if listen.parse::<std::net::IpAddr>().is_err() {
                    problems.add(
                            "spec.graphics.listen",
                            format!(
                                "{listen:?} is not an IP address; use one such as 127.0.0.1, or leave listen out to have the display served in the pod"
                            ),
                        );
                }
                Some(VncDisplay::OnNode(listen.clone()))
            }
        },
    };

    let on_poweroff = spec.on_poweroff.unwrap_or(LifecycleAction::Destroy);
    let on_reboot = spec.on_reboot.unwrap_or(LifecycleAction::Restart);
    let on_crash = spec.on_crash.unwrap_or(LifecycleAction::Destroy);
    for (field, action) in [("spec.onPoweroff", on_poweroff), ("spec.onReboot", on_reboot)] {
        if matches!(
            action,
            LifecycleAction::CoredumpDestroy | LifecycleAction::CoredumpRestart
        ) {
            problems.add(
                field,
                format!(
                    "{:?} is only allowed for spec.onCrash; use destroy, restart, preserve or rename-restart",
                    action.as_str()
                ),
            );
        }
    }

    let features = spec.features.clone().unwrap_or_default();
    let arch = spec.arch.unwrap_or(Arch::X86_64);
    let pvpanic = match (features.pvpanic, arch) {
        (Some(true), Arch::Aarch64) => {
            problems.add(
                "spec.features.pvpanic",
                "true is not available for aarch64 guests yet (x86_64 only); remove it or set it false",
            );
            false
        }
        (requested, Arch::X86_64) => requested.unwrap_or(true),
        (_, Arch::Aarch64) => false,
    };
    if !problems.0.is_empty() {
        return Err(TemplateError::Invalid(problems.0));
    }
    Ok(ResolvedTemplate {
        name,
        arch,
        machine: spec.machine.clone(),
        domain_type: spec.domain_type.unwrap_or(DomainType::Auto),
        vcpus,
        cpu_mode,
        cpu_model: cpu.model.clone(),
        cpu_features,
        topology: cpu.topology.clone(),
        memory_bytes,
        kernel: boot.kernel,
        initrd: boot.initrd,
        cmdline: boot.cmdline,
        firmware: boot.firmware.unwrap_or(Firmware::Bios),
        disks,
        interfaces,
        serial: spec.serial.as_ref().and_then(|s| s.enabled).unwrap_or(true),
        vnc,
        acpi: features.acpi.unwrap_or(true),
        apic: features.apic.unwrap_or(true),
        pvpanic,
        on_poweroff,
        on_reboot,
        on_crash,
    })
}

/// The first character of `text` that XML cannot carry (outside XML 1.0's
/// `Char` production: NUL and most C0 controls, lone surrogates cannot occur
/// in Rust strings, U+FFFE and U+FFFF), if any.
pub fn char_xml_cannot_carry(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
    })
}

/// Every string of the template ends up in the domain XML: one XML cannot
/// carry is reported with its field, instead of libvirt rejecting the XML.
fn check_xml_text(problems: &mut Problems, name: Option<&str>, spec: &VirtTemplateSpec) {
    fn walk(problems: &mut Problems, path: &str, value: &serde_json::Value) {
        match value {
            serde_json::Value::String(text) => {
                if let Some(c) = char_xml_cannot_carry(text) {
                    problems.add(
                        path,
                        format!(
                            "contains U+{:04X}, a character XML cannot carry; remove it",
                            u32::from(c)
                        ),
                    );
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(problems, &format!("{path}[{i}]"), item);
                }
            }
            serde_json::Value::Object(fields) => {
                for (key, item) in fields {
                    walk(problems, &format!("{path}.{key}"), item);
                }
            }
            _ => {}
        }
    }
    if let Some(name) = name {
        walk(problems, "metadata.name", &serde_json::Value::String(name.to_owned()));
    }
    match serde_json::to_value(spec) {
        Ok(value) => walk(problems, "spec", &value),
        Err(e) => problems.add("spec", format!("cannot be checked: {e}")),
    }
}

fn resolve_vcpus(problems: &mut Problems, count: Option<u32>, topology: Option<&CpuTopology>) -> u32 {
    // `None` inside: the product does not fit in a u64 (three u32s can't be
    // multiplied unchecked without wrapping in a release build).
    let product = topology.map(|t| {
        for (name, value) in [("sockets", t.sockets), ("cores", t.cores), ("threads", t.threads)] {
            if value == 0 {
                problems.add(format!("spec.cpu.topology.{name}"), "0 is not allowed; use 1 or more");
            }
        }
        u64::from(t.sockets)
            .checked_mul(u64::from(t.cores))
            .and_then(|p| p.checked_mul(u64::from(t.threads)))
    });
    let too_many =
        |product: &str| format!("sockets × cores × threads = {product}, more than the {MAX_VCPUS} vCPUs a VM may have");
    let vcpus = match (count, product) {
        (Some(count), Some(Some(product))) if u64::from(count) != product => {
            problems.add(
                "spec.cpu.topology",
                format!("sockets × cores × threads = {product}, but spec.cpu.count is {count}; make them equal (or omit count)"),
            );
            return count;
        }
        (_, Some(None)) => {
            problems.add("spec.cpu.topology", too_many("more than 2⁶⁴"));
            return count.unwrap_or(1);
        }
        (None, Some(Some(product))) => {
            // The count comes from the topology: a bad one is the topology's fault.
            match u32::try_from(product).ok().filter(|p| check_vcpus(*p).is_ok()) {
                Some(p) => return p,
                None if product == 0 => return 1, // each zero factor is reported above
                None => {
                    problems.add("spec.cpu.topology", too_many(&product.to_string()));
                    return 1;
                }
            }
        }
        (Some(count), _) => count,
        (None, None) => 1,
    };
    if let Err(message) = check_vcpus(vcpus) {
        problems.add("spec.cpu.count", message);
    }
    vcpus
}

/// Checks a vCPU count.
pub(crate) fn check_vcpus(vcpus: u32) -> Result<(), String> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        Err(format!("{vcpus} is not a vCPU count; use 1 to {MAX_VCPUS}"))
    } else {
        Ok(())
    }
}

/// Parses a memory quantity into bytes, with a message naming the value.
pub(crate) fn parse_memory(text: &str) -> Result<u64, String> {
    match quantity::parse_bytes(text) {
        Ok(bytes) if bytes < MIN_MEMORY_BYTES => {
            Err(format!("{text:?} is less than the minimum of 1Mi (e.g. 512Mi, 2Gi)"))
        }
        Ok(bytes) if bytes > MAX_MEMORY_BYTES => Err(format!(
            "{text:?} is more than the 4Pi (2⁵² bytes) a guest's physical address space can hold (e.g. 512Mi, 2Gi)"
        )),
        Ok(bytes) => Ok(bytes),
        Err(QuantityError::Overflow) => Err(format!("{text:?} is too large (e.g. 512Mi, 2Gi)")),
        Err(e) => Err(format!("{text:?} {e}")),
    }
}

/// Checks a kernel command line: printable, no control characters.
pub(crate) fn check_cmdline(cmdline: &str) -> Result<(), String> {
    if cmdline.chars().any(char::is_control) || char_xml_cannot_carry(cmdline).is_some() {
        Err(format!(
            "{cmdline:?} contains a control character (or U+FFFE/U+FFFF, which XML cannot carry); a kernel command line is one line of printable text"
        ))
    } else if cmdline.len() > 4096 {
        Err(format!(
            "is {} bytes long; the kernel accepts at most 4096",
            cmdline.len()
        ))
    } else {
        Ok(())
    }
}

fn check_token(problems: &mut Problems, field: &str, value: &str, expected: &str) {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if !ok {
        problems.add(
            field,
            format!("{value:?} is not valid; expected {expected} (letters, digits, '.', '_', '-', ':')"),
        );
    }
}

fn check_host_path(problems: &mut Problems, field: &str, path: &str) {
    if !path.starts_with('/') {
        problems.add(
            field,
            format!("{path:?} is not an absolute path; give the file's path on the virthost (as libvirtd sees it), e.g. /var/lib/virtkube/images/vmlinuz"),
        );
    } else if path.chars().any(char::is_control) {
        problems.add(field, format!("{path:?} contains a control character"));
    }
}

/// The path given for a disk described as a descriptor group: a name that
/// exists on no node. The gate admits such a disk only under this prefix.
pub const FD_DISK_PREFIX: &str = "/virtkube-fd/";

fn resolve_cloud_init(problems: &mut Problems, spec: &CloudInitSpec) -> Option<ResolvedDisk> {
    let field = "spec.cloudInit";
    match (&spec.directory, &spec.user_data) {
        (Some(_), Some(_)) => {
            problems.add(
                field,
                "sets both directory and userData; give the user-data in one place (a user-data file in the directory, or userData)",
            );
            return None;
        }
        (None, None) => {
            problems.add(
                field,
                "has neither directory nor userData; set directory (a Secret or ConfigMap volume with user-data) or userData",
            );
            return None;
        }
        (Some(directory), None) => {
            check_container_path(problems, &format!("{field}.directory"), directory, "/etc/cloud-init")
        }
        (None, Some(_)) => {}
    }
    Some(cloud_init_disk(CloudInitSource {
        directory: spec.directory.clone(),
        user_data: spec.user_data.clone(),
    }))
}

/// The `cidata` disk: read-only, virtio (every cloud image's kernel has
/// the driver built in or in its initramfs), never booted from.
pub fn cloud_init_disk(source: CloudInitSource) -> ResolvedDisk {
    ResolvedDisk {
        source: DiskSource::CloudInit(source),
        format: DiskFormat::Raw,
        device: DiskDevice::Disk,
        bus: DiskBus::Virtio,
        read_only: true,
        boot_order: None,
    }
}

fn resolve_disk(problems: &mut Problems, field: &str, disk: &DiskSpec) -> Option<ResolvedDisk> {
    let sources = [
        disk.file.is_some(),
        disk.container_file.is_some(),
        disk.network.is_some(),
        disk.image_file.is_some(),
    ];
    if sources.iter().filter(|set| **set).count() > 1 {
        problems.add(
            field,
            "sets more than one of file, containerFile, network and imageFile; a disk has exactly one source",
        );
        return None;
    }
    if let Some(name) = &disk.image_file {
        if !crate::image::is_dns_subdomain(name) {
            problems.add(
                format!("{field}.imageFile"),
                format!("{name:?} is not an ImageFile name (lowercase letters, digits, '-' and '.', at most 253)"),
            );
        }
        if disk.format.is_some() {
            problems.add(
                format!("{field}.format"),
                "is the ImageFile's own for an imageFile disk; leave it unset",
            );
        }
        if disk.persistent.is_some() {
            problems.add(
                format!("{field}.persistent"),
                "applies to a containerFile disk only (an ImageFile is always written in place)",
            );
        }
        let device = disk.device.unwrap_or(DiskDevice::Disk);
        return Some(ResolvedDisk {
            source: DiskSource::ImageFile(name.clone()),
            format: DiskFormat::Raw,
            device,
            bus: disk.bus.unwrap_or(DiskBus::Virtio),
            read_only: device == DiskDevice::Cdrom || disk.read_only.unwrap_or(false),
            boot_order: disk.boot_order,
        });
    }
    if disk.persistent.is_some() && disk.container_file.is_none() {
        problems.add(
            format!("{field}.persistent"),
            "applies to a containerFile disk only (a file on the virthost or a network disk is always written in place)",
        );
    }
    if let Some(path) = &disk.container_file {
        check_container_path(problems, &format!("{field}.containerFile"), path, "/disk/root.raw");
    }
    if disk.container_file.is_some() && disk.format == Some(DiskFormat::Qcow2) {
        problems.add(
            format!("{field}.format"),
            "qcow2 is not taken from the container (its header may name a backing file, which QEMU would open on the node, and the pod could rewrite it after any check); convert the image to raw: qemu-img convert -O raw IMAGE.qcow2 root.raw",
        );
    }
    let source = match (&disk.file, &disk.network) {
        (None, None) if disk.container_file.is_some() => DiskSource::Container {
            path: disk.container_file.clone().unwrap_or_default(),
            persistent: disk.persistent.unwrap_or(false),
        },
        (Some(file), None) => {
            check_host_path(problems, &format!("{field}.file"), file);
            DiskSource::File(file.clone())
        }
        (None, Some(network)) => {
            if network.hosts.is_empty() {
                problems.add(
                    format!("{field}.network.hosts"),
                    "is empty; give at least one server (name and optional port)",
                );
            }
            let default_port = match network.protocol {
                NetworkDiskProtocol::Nbd => 10809,
                NetworkDiskProtocol::Rbd => 6789,
                NetworkDiskProtocol::Iscsi => 3260,
            };
            let hosts = network
                .hosts
                .iter()
                .enumerate()
                .map(|(i, host)| {
                    check_token(
                        problems,
                        &format!("{field}.network.hosts[{i}].name"),
                        &host.name,
                        "a host name or IP address",
                    );
                    (host.name.clone(), host.port.unwrap_or(default_port))
                })
                .collect();
            if let Some(name) = &network.name
                && (name.is_empty() || name.chars().any(char::is_control))
            {
                problems.add(
                    format!("{field}.network.name"),
                    format!("{name:?} is not a valid export or image name"),
                );
            }
            if network.protocol != NetworkDiskProtocol::Nbd && network.name.is_none() {
                problems.add(
                    format!("{field}.network.name"),
                    format!(
                        "is required for protocol {:?} (rbd: pool/image, iscsi: iqn/lun)",
                        network.protocol.as_str()
                    ),
                );
            }
            DiskSource::Network {
                protocol: network.protocol,
                name: network.name.clone(),
                hosts,
            }
        }
        (Some(_), Some(_)) => {
            problems.add(field, "sets both file and network; a disk has exactly one source");
            return None;
        }
        (None, None) => {
            problems.add(
                field,
                "has no source; set containerFile (a path in the VM container), imageFile (an ImageFile of the pod's namespace), file (a path on the virthost) or network (nbd, rbd, iscsi)",
            );
            return None;
        }
    };
    let device = disk.device.unwrap_or(DiskDevice::Disk);
    Some(ResolvedDisk {
        source,
        format: disk.format.unwrap_or(DiskFormat::Raw),
        device,
        bus: disk.bus.unwrap_or(DiskBus::Virtio),
        read_only: device == DiskDevice::Cdrom || disk.read_only.unwrap_or(false),
        boot_order: disk.boot_order,
    })
}

fn resolve_interface(problems: &mut Problems, field: &str, nic: &InterfaceSpec) -> ResolvedInterface {
    match (nic.kind, &nic.source) {
        (InterfaceType::Network | InterfaceType::Bridge, None) => problems.add(
            format!("{field}.source"),
            format!(
                "is required for type {:?}: the name of the libvirt network or host bridge",
                kind_name(nic.kind)
            ),
        ),
        (InterfaceType::User, Some(source)) => problems.add(
            format!("{field}.source"),
            format!("{source:?} is not allowed for type \"user\" (user-mode networking has no source)"),
        ),
        (InterfaceType::Pod, Some(source)) => problems.add(
            format!("{field}.source"),
            format!("{source:?} is not allowed for type \"pod\" (the interface joins the pod's own network)"),
        ),
        (_, Some(source)) => check_token(
            problems,
            &format!("{field}.source"),
            source,
            "a libvirt network or bridge name",
        ),
        _ => {}
    }
    if nic.kind != InterfaceType::Pod && nic.binding.is_some() {
        problems.add(
            format!("{field}.binding"),
            format!(
                "is only for type \"pod\"; a {:?} interface has no binding",
                kind_name(nic.kind)
            ),
        );
    }
    let mac = nic.mac.as_deref().and_then(|m| match MacAddr::parse(m) {
        Ok(mac) => Some(mac),
        Err(message) => {
            problems.add(format!("{field}.mac"), message);
            None
        }
    });
    ResolvedInterface {
        kind: nic.kind,
        source: nic.source.clone(),
        model: nic.model.unwrap_or(NicModel::Virtio),
        mac,
        boot_order: nic.boot_order,
    }
}

fn kind_name(kind: InterfaceType) -> &'static str {
    match kind {
        InterfaceType::Network => "network",
        InterfaceType::Bridge => "bridge",
        InterfaceType::User => "user",
        InterfaceType::Pod => "pod",
    }
}
