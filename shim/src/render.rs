//! Renders a [`ResolvedTemplate`] plus the instance's and the host's facts into
//! libvirt domain XML.
//!
//! Written with quick-xml's writer, never by string concatenation: every
//! value, whether from the template, an annotation or the pod's name, goes
//! through the writer's escaping, so no value can add or close elements.

use std::io;

use quick_xml::Writer;
use quick_xml::events::BytesText;
use thiserror::Error;
use virtkube_api::podnet;
use virtkube_api::resolve::{DiskSource, MacAddr, ResolvedDisk, ResolvedInterface, ResolvedTemplate, VncDisplay};
use virtkube_api::template::{
    CpuFeaturePolicy, CpuMode, DiskBus, DiskDevice, DiskFormat, DomainType, Firmware, InterfaceType,
};
use virtkube_api::{METADATA_PREFIX, METADATA_XMLNS};

/// Who this VM is: the facts of one instance of a template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    /// libvirt domain name: `<namespace>_<pod>` in a cluster, the container hostname otherwise.
    pub domain_name: String,
    /// Domain UUID (the pod UID when known); `None` lets libvirt pick one.
    pub uuid: Option<String>,
    /// The pod's namespace.
    pub namespace: Option<String>,
    /// The pod's name.
    pub pod_name: Option<String>,
    /// The pod's UID.
    pub pod_uid: Option<String>,
    /// The VirtTemplate's name.
    pub template_name: Option<String>,
}

/// What the node's libvirt offers, from its capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Domain types the host offers for the guest's architecture, as listed in
    /// its capabilities (`qemu`, `kvm`; the test driver lists `test`).
    /// "kvm" must only be listed where QEMU can actually use KVM.
    pub domain_types: Vec<String>,
}

impl HostFacts {
    /// A host with QEMU (TCG) and, when `kvm`, usable KVM.
    pub fn qemu(kvm: bool) -> HostFacts {
        let mut domain_types = vec!["qemu".to_owned()];
        if kvm {
            domain_types.push("kvm".to_owned());
        }
        HostFacts { domain_types }
    }
}

/// Why a domain cannot be rendered.
#[derive(Debug, Error)]
pub enum RenderError {
    /// The template asks for a hypervisor the node does not offer.
    #[error(
        "the template asks for domainType {requested:?} but this node offers {offered:?}; use domainType \"auto\" or run the VM on a node that has it"
    )]
    DomainTypeUnavailable {
        /// What the template asked for.
        requested: &'static str,
        /// What the node offers.
        offered: Vec<String>,
    },
    /// A bad domain name.
    #[error("domain name {0:?} is not usable: it must be 1 to 200 characters without '/' or control characters")]
    DomainName(String),
    /// A bad UUID.
    #[error("domain UUID {0:?} is not a UUID (e.g. 4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b)")]
    Uuid(String),
    /// An instance fact (pod name, namespace, UID, template name) holds a
    /// character XML cannot carry.
    #[error("{field} {value:?} contains U+{code:04X}, a character XML cannot carry; fix the value")]
    NotXmlText {
        /// Where the value came from.
        field: &'static str,
        /// The value.
        value: String,
        /// The character's code point.
        code: u32,
    },
    /// Writing to the in-memory buffer failed (should not happen).
    #[error("cannot write the domain XML: {0}")]
    Io(#[from] io::Error),
}

/// Renders the domain XML of one instance.
pub fn render(template: &ResolvedTemplate, instance: &Instance, host: &HostFacts) -> Result<String, RenderError> {
    check_instance(instance)?;
    let domain_type = choose_domain_type(template.domain_type, host)?;
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    writer
        .create_element("domain")
        .with_attribute(("type", domain_type.as_str()))
        .write_inner_content(|w| {
            text_element(w, "name", &instance.domain_name)?;
            if let Some(uuid) = &instance.uuid {
                text_element(w, "uuid", uuid)?;
            }
            write_metadata(w, instance, template)?;
            w.create_element("memory")
                .with_attribute(("unit", "KiB"))
                .write_text_content(BytesText::new(&template.memory_bytes.div_ceil(1024).to_string()))?;
            w.create_element("vcpu")
                .with_attribute(("placement", "static"))
                .write_text_content(BytesText::new(&template.vcpus.to_string()))?;
            write_os(w, template)?;
            write_features(w, template)?;
            write_cpu(w, template)?;
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text_element(w, "on_poweroff", template.on_poweroff.as_str())?;
            text_element(w, "on_reboot", template.on_reboot.as_str())?;
            text_element(w, "on_crash", template.on_crash.as_str())?;
            write_devices(w, template, instance)
        })?;
    let mut xml = String::from_utf8(writer.into_inner()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    xml.push('\n');
    Ok(xml)
}

type W = Writer<Vec<u8>>;

fn text_element(w: &mut W, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name).write_text_content(BytesText::new(text))?;
    Ok(())
}

fn check_instance(instance: &Instance) -> Result<(), RenderError> {
    let facts = [
        ("the domain name", Some(&instance.domain_name)),
        ("POD_NAMESPACE", instance.namespace.as_ref()),
        ("POD_NAME", instance.pod_name.as_ref()),
        ("POD_UID", instance.pod_uid.as_ref()),
        ("the template name", instance.template_name.as_ref()),
    ];
    for (field, value) in facts {
        if let Some(value) = value
            && let Some(c) = virtkube_api::resolve::char_xml_cannot_carry(value)
        {
            return Err(RenderError::NotXmlText {
                field,
                value: value.clone(),
                code: u32::from(c),
            });
        }
    }
    let name = &instance.domain_name;
    if name.is_empty() || name.len() > 200 || name.contains('/') || name.chars().any(char::is_control) {
        return Err(RenderError::DomainName(name.clone()));
    }
    if let Some(uuid) = &instance.uuid
        && !is_uuid(uuid)
    {
        return Err(RenderError::Uuid(uuid.clone()));
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    // The same parser the instance facts and libvirt-wire use, in its canonical form only.
    libvirt_wire::protocol::canonical_uuid(s).is_some_and(|canonical| canonical == s)
}

/// Picks the libvirt domain type: `auto` means kvm where offered, else qemu.
/// The test driver offers only "test", which stands in for any request.
pub fn choose_domain_type(requested: DomainType, host: &HostFacts) -> Result<String, RenderError> {
    let offers = |t: &str| host.domain_types.iter().any(|o| o == t);
    if host.domain_types.len() == 1 && offers("test") {
        return Ok("test".to_owned());
    }
    let chosen = match requested {
        DomainType::Auto if offers("kvm") => Some("kvm"),
        DomainType::Auto | DomainType::Qemu if offers("qemu") => Some("qemu"),
        DomainType::Kvm if offers("kvm") => Some("kvm"),
        _ => None,
    };
    chosen
        .map(str::to_owned)
        .ok_or_else(|| RenderError::DomainTypeUnavailable {
            requested: match requested {
                DomainType::Auto => "auto",
                DomainType::Kvm => "kvm",
                DomainType::Qemu => "qemu",
            },
            offered: host.domain_types.clone(),
        })
}

/// Each disk's target, where its data comes from and where the guest's
/// writes go, as the VirtDomain shows them (the domain's own `<source>` of
/// a disk passed by descriptor names only its descriptor group).
pub fn disk_origins(t: &ResolvedTemplate) -> Vec<virtkube_api::domain::DomainDisk> {
    t.disks
        .iter()
        .zip(disk_targets(t))
        .map(|(disk, target)| {
            let read_only = disk.read_only || disk.device == DiskDevice::Cdrom;
            let (source, path, writes) = match &disk.source {
                DiskSource::Container { path, persistent } => (
                    "containerFile",
                    Some(path.clone()),
                    match (read_only, persistent) {
                        (true, _) => "readOnly",
                        (false, true) => "inPlace",
                        (false, false) => "privateCopy",
                    },
                ),
                DiskSource::File(path) => (
                    "file",
                    Some(path.clone()),
                    if read_only { "readOnly" } else { "inPlace" },
                ),
                DiskSource::Network { protocol, name, hosts } => {
                    let hosts: Vec<String> = hosts.iter().map(|(host, port)| format!("{host}:{port}")).collect();
                    let address = format!(
                        "{}://{}/{}",
                        protocol.as_str(),
                        hosts.join(","),
                        name.as_deref().unwrap_or("")
                    );
                    ("network", Some(address), if read_only { "readOnly" } else { "inPlace" })
                }
                DiskSource::CloudInit(seed) => ("cloudInit", seed.directory.clone(), "readOnly"),
                DiskSource::ImageFile(name) => (
                    "imageFile",
                    Some(name.clone()),
                    if read_only { "readOnly" } else { "inPlace" },
                ),
                DiskSource::Volume { pool, volume } => (
                    "imageFile",
                    Some(format!("{pool}/{volume}")),
                    if read_only { "readOnly" } else { "inPlace" },
                ),
            };
            virtkube_api::domain::DomainDisk {
                target,
                source: source.to_owned(),
                path,
                writes: writes.to_owned(),
            }
        })
        .collect()
}

fn write_metadata(w: &mut W, instance: &Instance, t: &ResolvedTemplate) -> io::Result<()> {
    let fields = [
        ("namespace", &instance.namespace),
        ("pod", &instance.pod_name),
        ("uid", &instance.pod_uid),
        ("template", &instance.template_name),
    ];
    let xmlns = format!("xmlns:{METADATA_PREFIX}");
    w.create_element("metadata").write_inner_content(|w| {
        w.create_element(format!("{METADATA_PREFIX}:instance"))
            .with_attribute((xmlns.as_str(), METADATA_XMLNS))
            .write_inner_content(|w| {
                for (name, value) in fields {
                    if let Some(value) = value {
                        text_element(w, &format!("{METADATA_PREFIX}:{name}"), value)?;
                    }
                }
                for disk in disk_origins(t) {
                    let mut element = w.create_element(format!("{METADATA_PREFIX}:disk")).with_attributes([
                        ("target", disk.target.as_str()),
                        ("source", disk.source.as_str()),
                        ("writes", disk.writes.as_str()),
                    ]);
                    if let Some(path) = &disk.path {
                        element = element.with_attribute(("path", path.as_str()));
                    }
                    element.write_empty()?;
                }
                if t.interfaces.iter().any(|nic| nic.kind == InterfaceType::Pod) {
                    // The address the shim leases the guest, for the VirtDomain.
                    let guest = format!("{}/{}", podnet::GUEST, podnet::PREFIX);
                    w.create_element(format!("{METADATA_PREFIX}:interface"))
                        .with_attributes([("type", "pod"), ("binding", "masquerade"), ("guest", guest.as_str())])
                        .write_empty()?;
                }
                Ok(())
            })?;
        Ok(())
    })?;
    Ok(())
}

fn write_os(w: &mut W, t: &ResolvedTemplate) -> io::Result<()> {
    let mut os = w.create_element("os");
    if t.firmware == Firmware::Efi {
        os = os.with_attribute(("firmware", "efi"));
    }
    os.write_inner_content(|w| {
        let mut os_type = w.create_element("type").with_attribute(("arch", t.arch.as_str()));
        if let Some(machine) = &t.machine {
            os_type = os_type.with_attribute(("machine", machine.as_str()));
        }
        os_type.write_text_content(BytesText::new("hvm"))?;
        for (name, value) in [("kernel", &t.kernel), ("initrd", &t.initrd), ("cmdline", &t.cmdline)] {
            if let Some(value) = value {
                text_element(w, name, value)?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn write_features(w: &mut W, t: &ResolvedTemplate) -> io::Result<()> {
    if !t.acpi && !t.apic {
        return Ok(());
    }
    w.create_element("features").write_inner_content(|w| {
        if t.acpi {
            w.create_element("acpi").write_empty()?;
        }
        if t.apic {
            w.create_element("apic").write_empty()?;
        }
        Ok(())
    })?;
    Ok(())
}

fn write_cpu(w: &mut W, t: &ResolvedTemplate) -> io::Result<()> {
    if t.cpu_mode.is_none() && t.topology.is_none() {
        return Ok(());
    }
    let mut cpu = w.create_element("cpu");
    match t.cpu_mode {
        Some(CpuMode::HostModel) => cpu = cpu.with_attribute(("mode", "host-model")),
        Some(CpuMode::HostPassthrough) => cpu = cpu.with_attribute(("mode", "host-passthrough")),
        Some(CpuMode::Custom) => cpu = cpu.with_attributes([("mode", "custom"), ("match", "exact")]),
        None => {}
    }
    cpu.write_inner_content(|w| {
        if let Some(model) = &t.cpu_model {
            w.create_element("model")
                .with_attribute(("fallback", "forbid"))
                .write_text_content(BytesText::new(model))?;
        }
        if let Some(topology) = &t.topology {
            w.create_element("topology")
                .with_attributes([
                    ("sockets", topology.sockets.to_string().as_str()),
                    ("dies", "1"),
                    ("cores", topology.cores.to_string().as_str()),
                    ("threads", topology.threads.to_string().as_str()),
                ])
                .write_empty()?;
        }
        for (name, policy) in &t.cpu_features {
            let policy = match policy {
                CpuFeaturePolicy::Require => "require",
                CpuFeaturePolicy::Optional => "optional",
                CpuFeaturePolicy::Disable => "disable",
                CpuFeaturePolicy::Forbid => "forbid",
                CpuFeaturePolicy::Force => "force",
            };
            w.create_element("feature")
                .with_attributes([("policy", policy), ("name", name.as_str())])
                .write_empty()?;
        }
        Ok(())
    })?;
    Ok(())
}

fn write_devices(w: &mut W, t: &ResolvedTemplate, instance: &Instance) -> io::Result<()> {
    w.create_element("devices").write_inner_content(|w| {
        if t.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
            w.create_element("controller")
                .with_attributes([("type", "scsi"), ("index", "0"), ("model", "virtio-scsi")])
                .write_empty()?;
        }
        for (disk, target) in t.disks.iter().zip(disk_targets(t)) {
            write_disk(w, disk, &target)?;
        }
        for (index, nic) in t.interfaces.iter().enumerate() {
            let mac = nic.mac.unwrap_or_else(|| derived_mac(instance, index));
            write_interface(w, nic, mac, &instance.domain_name)?;
        }
        if t.serial {
            w.create_element("serial")
                .with_attribute(("type", "pty"))
                .write_inner_content(|w| {
                    w.create_element("target").with_attribute(("port", "0")).write_empty()?;
                    Ok(())
                })?;
            w.create_element("console")
                .with_attribute(("type", "pty"))
                .write_inner_content(|w| {
                    w.create_element("target")
                        .with_attributes([("type", "serial"), ("port", "0")])
                        .write_empty()?;
                    Ok(())
                })?;
        }
        if t.pvpanic {
            // QEMU's ISA pvpanic device (ACPI id QEMU0001): a panicking guest kernel
            // writes to it and libvirt reports a crash instead of a silent reboot.
            w.create_element("panic")
                .with_attribute(("model", "isa"))
                .write_empty()?;
        }
        match &t.vnc {
            // Listens nowhere: the shim asks libvirt for each viewer's connection.
            Some(VncDisplay::InPod) => {
                w.create_element("graphics")
                    .with_attribute(("type", "vnc"))
                    .write_inner_content(|w| {
                        w.create_element("listen")
                            .with_attribute(("type", "none"))
                            .write_empty()?;
                        Ok(())
                    })?;
            }
            Some(VncDisplay::OnNode(listen)) => {
                w.create_element("graphics")
                    .with_attributes([("type", "vnc"), ("autoport", "yes")])
                    .write_inner_content(|w| {
                        w.create_element("listen")
                            .with_attributes([("type", "address"), ("address", listen.as_str())])
                            .write_empty()?;
                        Ok(())
                    })?;
            }
            None => {}
        }
        Ok(())
    })?;
    Ok(())
}

fn write_disk(w: &mut W, disk: &ResolvedDisk, target: &str) -> io::Result<()> {
    let (source_type, device) = (
        match disk.source {
            DiskSource::File(_) | DiskSource::Container { .. } | DiskSource::CloudInit(_) => "file",
            DiskSource::Network { .. } => "network",
            DiskSource::ImageFile(_) | DiskSource::Volume { .. } => "volume",
        },
        match disk.device {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
        },
    );
    let bus = match disk.bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
        DiskBus::Scsi => "scsi",
        DiskBus::Ide => "ide",
    };
    w.create_element("disk")
        .with_attributes([("type", source_type), ("device", device)])
        .write_inner_content(|w| {
            let format = match disk.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            w.create_element("driver")
                .with_attributes([("name", "qemu"), ("type", format)])
                .write_empty()?;
            match &disk.source {
                DiskSource::File(path) => {
                    w.create_element("source")
                        .with_attribute(("file", path.as_str()))
                        .write_empty()?;
                }
                // Passed as descriptors, the group named after the target:
                // libvirtd opens nothing by path.
                DiskSource::Container { .. } | DiskSource::CloudInit(_) => {
                    let name = format!("{}{target}", virtkube_api::resolve::FD_DISK_PREFIX);
                    w.create_element("source")
                        .with_attributes([("file", name.as_str()), ("fdgroup", target)])
                        .write_empty()?;
                }
                // An ImageFile not looked up yet (`--print-xml` without the
                // API) names no pool; the gate admits only a looked-up one.
                DiskSource::ImageFile(name) => {
                    w.create_element("source")
                        .with_attributes([("pool", ""), ("volume", name.as_str())])
                        .write_empty()?;
                }
                DiskSource::Volume { pool, volume } => {
                    w.create_element("source")
                        .with_attributes([("pool", pool.as_str()), ("volume", volume.as_str())])
                        .write_empty()?;
                }
                DiskSource::Network { protocol, name, hosts } => {
                    let mut source = w
                        .create_element("source")
                        .with_attribute(("protocol", protocol.as_str()));
                    if let Some(name) = name {
                        source = source.with_attribute(("name", name.as_str()));
                    }
                    source.write_inner_content(|w| {
                        for (host, port) in hosts {
                            w.create_element("host")
                                .with_attributes([("name", host.as_str()), ("port", port.to_string().as_str())])
                                .write_empty()?;
                        }
                        Ok(())
                    })?;
                }
            }
            w.create_element("target")
                .with_attributes([("dev", target), ("bus", bus)])
                .write_empty()?;
            if disk.read_only {
                w.create_element("readonly").write_empty()?;
            }
            write_boot_order(w, disk.boot_order)
        })?;
    Ok(())
}

fn write_interface(w: &mut W, nic: &ResolvedInterface, mac: MacAddr, domain_name: &str) -> io::Result<()> {
    let kind = match nic.kind {
        InterfaceType::Network => "network",
        InterfaceType::Bridge => "bridge",
        InterfaceType::User => "user",
        // A tap libvirt creates under a name the gate recognises; the gate
        // moves it into the pod's network namespace before the guest runs.
        InterfaceType::Pod => "ethernet",
    };
    w.create_element("interface")
        .with_attribute(("type", kind))
        .write_inner_content(|w| {
            w.create_element("mac")
                .with_attribute(("address", mac.to_string().as_str()))
                .write_empty()?;
            if let Some(source) = &nic.source {
                w.create_element("source")
                    .with_attribute((kind, source.as_str()))
                    .write_empty()?;
            }
            if nic.kind == InterfaceType::Pod {
                w.create_element("target")
                    .with_attributes([("dev", podnet::tap_name(domain_name).as_str()), ("managed", "yes")])
                    .write_empty()?;
            }
            w.create_element("model")
                .with_attribute(("type", nic.model.as_str()))
                .write_empty()?;
            write_boot_order(w, nic.boot_order)
        })?;
    Ok(())
}

fn write_boot_order(w: &mut W, order: Option<u32>) -> io::Result<()> {
    if let Some(order) = order {
        w.create_element("boot")
            .with_attribute(("order", order.to_string().as_str()))
            .write_empty()?;
    }
    Ok(())
}

/// The target device name of each disk, in order: `vd*` for virtio, `sd*`
/// for SATA and SCSI, `hd*` for IDE, counted per prefix. A disk passed as
/// descriptors has its target as its descriptor group.
pub fn disk_targets(t: &ResolvedTemplate) -> Vec<String> {
    let mut per_prefix = [0usize; 3];
    t.disks
        .iter()
        .map(|disk| {
            let slot = match disk.bus {
                DiskBus::Virtio => 0,
                DiskBus::Sata | DiskBus::Scsi => 1,
                DiskBus::Ide => 2,
            };
            per_prefix[slot] += 1;
            disk_target_name(["vd", "sd", "hd"][slot], per_prefix[slot] - 1)
        })
        .collect()
}

/// libvirt's disk naming: `vda` … `vdz`, `vdaa` … (like virIndexToDiskName).
pub fn disk_target_name(prefix: &str, index: usize) -> String {
    let mut letters = Vec::new();
    let mut i = index;
    loop {
        letters.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

/// A stable MAC for the instance's `index`-th NIC: QEMU's `52:54:00` prefix
/// plus three bytes of an FNV-1a hash of the pod UID (or the domain name when
/// there is no pod), so a pod keeps its MAC for its whole life and two pods
/// almost never share one.
pub fn derived_mac(instance: &Instance, index: usize) -> MacAddr {
    let identity = instance.pod_uid.as_deref().unwrap_or(&instance.domain_name);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in identity.bytes().chain(*b"/").chain(index.to_string().bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    MacAddr([0x52, 0x54, 0x00, h[5], h[6], h[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_follow_libvirt() {
        assert_eq!(disk_target_name("vd", 0), "vda");
        assert_eq!(disk_target_name("vd", 25), "vdz");
        assert_eq!(disk_target_name("vd", 26), "vdaa");
        assert_eq!(disk_target_name("sd", 27), "sdab");
        assert_eq!(disk_target_name("sd", 701), "sdzz");
        assert_eq!(disk_target_name("sd", 702), "sdaaa");
    }

    #[test]
    fn the_domain_records_each_disk_s_origin() {
        let t = virtkube_api::resolve::parse_yaml(
            "disks:\n  - {containerFile: /disk/root.raw}\n  - {containerFile: /data/d.raw, persistent: true}\n  - {file: /var/lib/virtkube/images/x.iso, device: cdrom, bus: sata}\n  - {network: {protocol: nbd, name: e, hosts: [{name: h}]}}\ncloudInit: {directory: /seed}\n",
        )
        .unwrap();
        let origins: Vec<_> = disk_origins(&t)
            .into_iter()
            .map(|d| format!("{} {} {} {}", d.target, d.source, d.path.unwrap_or_default(), d.writes))
            .collect();
        assert_eq!(
            origins,
            [
                "vda containerFile /disk/root.raw privateCopy",
                "vdb containerFile /data/d.raw inPlace",
                "sda file /var/lib/virtkube/images/x.iso readOnly",
                "vdc network nbd://h:10809/e inPlace",
                "vdd cloudInit /seed readOnly",
            ]
        );
        let instance = Instance {
            domain_name: "ns_vm".into(),
            ..Default::default()
        };
        let xml = render(&t, &instance, &HostFacts::qemu(false)).unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let recorded: Vec<_> = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "disk" && n.tag_name().namespace() == Some(METADATA_XMLNS))
            .map(|n| (n.attribute("target").unwrap(), n.attribute("writes").unwrap()))
            .collect();
        assert_eq!(recorded[0], ("vda", "privateCopy"));
        assert_eq!(recorded.len(), 5);
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_distinct() {
        let a = Instance {
            domain_name: "ns_a".into(),
            pod_uid: Some("0b0e1d8a-0000-4000-8000-000000000001".into()),
            ..Default::default()
        };
        let b = Instance {
            pod_uid: Some("0b0e1d8a-0000-4000-8000-000000000002".into()),
            ..a.clone()
        };
        assert_eq!(derived_mac(&a, 0), derived_mac(&a, 0));
        assert_ne!(derived_mac(&a, 0), derived_mac(&a, 1));
        assert_ne!(derived_mac(&a, 0), derived_mac(&b, 0));
        let mac = derived_mac(&a, 0);
        assert_eq!(&mac.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(mac.0[0] & 1, 0, "unicast");
    }

    #[test]
    fn domain_type_choice() {
        let tcg = HostFacts::qemu(false);
        let kvm = HostFacts::qemu(true);
        let test = HostFacts {
            domain_types: vec!["test".into()],
        };
        assert_eq!(choose_domain_type(DomainType::Auto, &tcg).unwrap(), "qemu");
        assert_eq!(choose_domain_type(DomainType::Auto, &kvm).unwrap(), "kvm");
        assert_eq!(choose_domain_type(DomainType::Qemu, &kvm).unwrap(), "qemu");
        assert_eq!(choose_domain_type(DomainType::Kvm, &test).unwrap(), "test");
        let err = choose_domain_type(DomainType::Kvm, &tcg).unwrap_err().to_string();
        assert!(err.contains("\"kvm\"") && err.contains("[\"qemu\"]"), "{err}");
        assert!(choose_domain_type(DomainType::Auto, &HostFacts::default()).is_err());
    }

    #[test]
    fn bad_instance_facts_are_refused() {
        let t = virtkube_api::resolve::parse_yaml("memory: 64Mi").unwrap();
        let host = HostFacts::qemu(false);
        let with_name = |name: &str| Instance {
            domain_name: name.into(),
            ..Default::default()
        };
        for bad in ["", "a/b", "tab\there"] {
            assert!(
                matches!(render(&t, &with_name(bad), &host), Err(RenderError::DomainName(_))),
                "{bad:?}"
            );
        }
        let bad_uuid = Instance {
            uuid: Some("not-a-uuid".into()),
            ..with_name("vm")
        };
        let err = render(&t, &bad_uuid, &host).unwrap_err();
        assert!(err.to_string().contains("\"not-a-uuid\" is not a UUID"), "{err}");
    }
}
