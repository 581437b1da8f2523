//! Pure parsing of libvirt's XML into host facts. Malformed XML is an error;
//! an unexpected or missing field is skipped (and reported in `skipped`),
//! never a panic.

use thiserror::Error;
use virtkube_api::node::{HostCpu, HugePages, NumaCell, PciDevice};
use virtkube_api::quantity::format_bytes;

/// XML that does not parse at all.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what} XML from libvirt does not parse: {message}")]
pub struct XmlError {
    /// Which document.
    pub what: &'static str,
    /// The parser's message.
    pub message: String,
}

fn parse<'a>(what: &'static str, xml: &'a str) -> Result<roxmltree::Document<'a>, XmlError> {
    roxmltree::Document::parse(xml).map_err(|e| XmlError {
        what,
        message: e.to_string(),
    })
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|c| c.text()).map(str::trim)
}

/// What the host capabilities say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capabilities {
    /// Host architecture.
    pub arch: Option<String>,
    /// Host CPU model, vendor and features.
    pub cpu: HostCpu,
    /// NUMA cells.
    pub numa: Vec<NumaCell>,
    /// Domain types offered for host-arch hvm guests (qemu, kvm, test).
    pub domain_types: Vec<String>,
    /// Machine types offered for host-arch hvm guests.
    pub machine_types: Vec<String>,
    /// Fields that were present but not understood.
    pub skipped: Vec<String>,
}

/// The host's `<cpu>` element of capabilities XML, as text (for libvirt's
/// CPU baseline, which expands its model into every feature).
pub fn host_cpu_xml(capabilities_xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(capabilities_xml).ok()?;
    let host = child(doc.root_element(), "host")?;
    let cpu = child(host, "cpu")?;
    Some(capabilities_xml[cpu.range()].to_owned())
}

/// The features a baseline CPU (with EXPAND_FEATURES) requires: every
/// feature of the host CPU, not only those beyond its model.
pub fn parse_expanded_features(baseline_xml: &str) -> Result<Vec<String>, XmlError> {
    let doc = parse("baseline CPU", baseline_xml)?;
    Ok(doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("feature") && c.attribute("policy").is_none_or(|p| p == "require"))
        .filter_map(|c| c.attribute("name").map(str::to_owned))
        .collect())
}

/// Parses `virConnectGetCapabilities` XML.
pub fn parse_capabilities(xml: &str) -> Result<Capabilities, XmlError> {
    let doc = parse("capabilities", xml)?;
    let mut caps = Capabilities::default();
    let root = doc.root_element();
    if let Some(host) = child(root, "host") {
        if let Some(cpu) = child(host, "cpu") {
            caps.arch = text(cpu, "arch").map(str::to_owned);
            caps.cpu.model = text(cpu, "model").map(str::to_owned);
            caps.cpu.vendor = text(cpu, "vendor").map(str::to_owned);
            caps.cpu.features = cpu
                .children()
                .filter(|c| c.has_tag_name("feature"))
                .filter_map(|c| c.attribute("name").map(str::to_owned))
                .collect();
        }
        if let Some(cells) = child(host, "topology").and_then(|t| child(t, "cells")) {
            for cell in cells.children().filter(|c| c.has_tag_name("cell")) {
                let Some(id) = cell.attribute("id").and_then(|v| v.parse().ok()) else {
                    caps.skipped.push("a NUMA cell without a numeric id".into());
                    continue;
                };
                let memory = child(cell, "memory").and_then(|m| {
                    let kib: u64 = m.text()?.trim().parse().ok()?;
                    (m.attribute("unit").unwrap_or("KiB") == "KiB")
                        .then(|| kib.checked_mul(1024).map(format_bytes))
                        .flatten()
                });
                let cpus = child(cell, "cpus")
                    .and_then(|c| c.attribute("num"))
                    .and_then(|n| n.parse().ok());
                let hugepages = cell
                    .children()
                    .filter(|c| c.has_tag_name("pages"))
                    .filter_map(|p| {
                        let size_kib: u64 = p.attribute("size")?.parse().ok()?;
                        let count: u64 = p.text()?.trim().parse().ok()?;
                        // The base page size is not a huge page.
                        (size_kib > 4).then_some(HugePages {
                            size_kib,
                            count,
                            free: None,
                        })
                    })
                    .collect();
                caps.numa.push(NumaCell {
                    id,
                    memory,
                    cpus,
                    hugepages,
                });
            }
        }
    } else {
        caps.skipped.push("no <host> element".into());
    }
    let host_arch = caps.arch.clone();
    for guest in root.children().filter(|c| c.has_tag_name("guest")) {
        if text(guest, "os_type") != Some("hvm") {
            continue;
        }
        for arch in guest.children().filter(|c| c.has_tag_name("arch")) {
            if arch.attribute("name") != host_arch.as_deref() {
                continue;
            }
            for node in arch.children() {
                let value = if node.has_tag_name("domain") {
                    node.attribute("type").map(|t| (&mut caps.domain_types, t.to_owned()))
                } else if node.has_tag_name("machine") {
                    node.text().map(|t| (&mut caps.machine_types, t.trim().to_owned()))
                } else {
                    None
                };
                if let Some((list, v)) = value
                    && !list.contains(&v)
                {
                    list.push(v);
                }
            }
        }
    }
    caps.machine_types.sort();
    Ok(caps)
}

/// What the domain capabilities say for one virt type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainCapabilities {
    /// The virt type they describe (`kvm`, `qemu`).
    pub domain: Option<String>,
    /// The default machine type.
    pub machine: Option<String>,
    /// The host-model CPU's model name.
    pub host_model: Option<String>,
    /// CPU models usable with mode custom.
    pub usable_models: Vec<String>,
}

/// Parses `virConnectGetDomainCapabilities` XML.
pub fn parse_domain_capabilities(xml: &str) -> Result<DomainCapabilities, XmlError> {
    let doc = parse("domain capabilities", xml)?;
    let root = doc.root_element();
    let mut out = DomainCapabilities {
        domain: text(root, "domain").map(str::to_owned),
        machine: text(root, "machine").map(str::to_owned),
        ..Default::default()
    };
    if let Some(cpu) = child(root, "cpu") {
        for mode in cpu.children().filter(|c| c.has_tag_name("mode")) {
            if mode.attribute("supported") != Some("yes") {
                continue;
            }
            match mode.attribute("name") {
                Some("host-model") => out.host_model = text(mode, "model").map(str::to_owned),
                Some("custom") => {
                    out.usable_models = mode
                        .children()
                        .filter(|m| m.has_tag_name("model") && m.attribute("usable") == Some("yes"))
                        .filter_map(|m| m.text().map(|t| t.trim().to_owned()))
                        .collect();
                }
                _ => {}
            }
        }
    }
    out.usable_models.sort();
    out.usable_models.dedup();
    Ok(out)
}

/// Parses one node device's XML; `None` when it is not a PCI device.
pub fn parse_pci_device(xml: &str) -> Result<Option<PciDevice>, XmlError> {
    let doc = parse("node device", xml)?;
    let root = doc.root_element();
    let Some(cap) = root
        .children()
        .find(|c| c.has_tag_name("capability") && c.attribute("type") == Some("pci"))
    else {
        return Ok(None);
    };
    let number = |name: &str| text(cap, name).and_then(|t| t.parse::<u32>().ok());
    let (Some(domain), Some(bus), Some(slot), Some(function)) =
        (number("domain"), number("bus"), number("slot"), number("function"))
    else {
        return Ok(None);
    };
    let id_and_name = |name: &str| {
        child(cap, name).map(
            |n| match (n.attribute("id"), n.text().map(str::trim).filter(|t| !t.is_empty())) {
                (Some(id), Some(label)) => format!("{id} {label}"),
                (Some(id), None) => id.to_owned(),
                (None, Some(label)) => label.to_owned(),
                (None, None) => String::new(),
            },
        )
    };
    Ok(Some(PciDevice {
        address: format!("{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"),
        vendor: id_and_name("vendor"),
        product: id_and_name("product"),
        class: text(cap, "class").map(str::to_owned),
        driver: child(root, "driver").and_then(|d| text(d, "name")).map(str::to_owned),
        iommu_group: child(cap, "iommuGroup")
            .and_then(|g| g.attribute("number"))
            .and_then(|n| n.parse().ok()),
    }))
}

/// virtkube's owner metadata of a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub uid: Option<String>,
    /// Template name.
    pub template: Option<String>,
}

/// Reads virtkube's `<metadata>` from a domain's XML; `None` for domains
/// virtkube did not create (or that lack a namespace and pod).
pub fn parse_owner(domain_xml: &str) -> Result<Option<Owner>, XmlError> {
    let doc = parse("domain", domain_xml)?;
    let Some(instance) = doc
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(virtkube_api::METADATA_XMLNS) && n.tag_name().name() == "instance")
    else {
        return Ok(None);
    };
    let field = |name: &str| {
        instance
            .children()
            .find(|c| c.tag_name().name() == name && c.tag_name().namespace() == Some(virtkube_api::METADATA_XMLNS))
            .and_then(|c| c.text())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let (Some(namespace), Some(pod)) = (field("namespace"), field("pod")) else {
        return Ok(None);
    };
    Ok(Some(Owner {
        namespace,
        pod,
        uid: field("uid"),
        template: field("template"),
    }))
}

/// The most disks a VirtDomain lists, and the longest value it copies: the
/// metadata is written by the VM's own pod, so what is published is bounded.
pub const MAX_LISTED_DISKS: usize = 64;
/// See [`MAX_LISTED_DISKS`].
pub const MAX_DISK_FIELD: usize = 1024;
const RECORDED_SOURCES: [&str; 5] = ["containerFile", "file", "imageFile", "network", "cloudInit"];
const RECORDED_WRITES: [&str; 3] = ["readOnly", "privateCopy", "inPlace"];

/// The disks the shim recorded in virtkube's `<metadata>` (target, source,
/// path, writes), for the VirtDomain's status. The pod writes that record,
/// so each must name a disk the domain really has (its `<target dev>`),
/// with known values, and say `readOnly` where the disk is read-only. An
/// error names the record and what is wrong.
pub fn parse_disks(domain_xml: &str) -> Result<Vec<virtkube_api::domain::DomainDisk>, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("the domain XML is not XML: {e}"))?;
    let Some(instance) = doc
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(virtkube_api::METADATA_XMLNS) && n.tag_name().name() == "instance")
    else {
        return Ok(Vec::new());
    };
    let recorded: Vec<_> = instance
        .children()
        .filter(|c| c.tag_name().name() == "disk" && c.tag_name().namespace() == Some(virtkube_api::METADATA_XMLNS))
        .collect();
    // The domain's own disks: target and whether read-only.
    let devices: Vec<(&str, bool)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.tag_name().namespace().is_none())
        .filter_map(|disk| {
            let target = disk.children().find(|c| c.has_tag_name("target"))?.attribute("dev")?;
            let read_only = disk.children().any(|c| c.has_tag_name("readonly"));
            Some((target, read_only))
        })
        .collect();
    if recorded.len() > MAX_LISTED_DISKS {
        return Err(format!(
            "the metadata records {} disks; at most {MAX_LISTED_DISKS} are listed",
            recorded.len()
        ));
    }
    recorded
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let field = |name: &str, required: bool| -> Result<Option<String>, String> {
                match disk.attribute(name) {
                    None if required => Err(format!("recorded disk {index} has no {name}")),
                    None => Ok(None),
                    Some(value) if value.chars().count() > MAX_DISK_FIELD => Err(format!(
                        "recorded disk {index}'s {name} is longer than {MAX_DISK_FIELD} characters"
                    )),
                    Some(value) => Ok(Some(value.to_owned())),
                }
            };
            let listed = virtkube_api::domain::DomainDisk {
                target: field("target", true)?.unwrap_or_default(),
                source: field("source", true)?.unwrap_or_default(),
                path: field("path", false)?,
                writes: field("writes", true)?.unwrap_or_default(),
            };
            if !RECORDED_SOURCES.contains(&listed.source.as_str()) {
                return Err(format!(
                    "recorded disk {index}'s source {:?} is none of {}",
                    listed.source,
                    RECORDED_SOURCES.join(", ")
                ));
            }
            if !RECORDED_WRITES.contains(&listed.writes.as_str()) {
                return Err(format!(
                    "recorded disk {index}'s writes {:?} is none of {}",
                    listed.writes,
                    RECORDED_WRITES.join(", ")
                ));
            }
            let Some(read_only) = devices
                .iter()
                .find(|(target, _)| *target == listed.target)
                .map(|(_, ro)| *ro)
            else {
                return Err(format!(
                    "recorded disk {index} names {:?}, which is none of the domain's disks",
                    listed.target
                ));
            };
            if read_only && listed.writes != "readOnly" {
                return Err(format!(
                    "recorded disk {index} ({}) says {} but the disk is read-only",
                    listed.target, listed.writes
                ));
            }
            Ok(listed)
        })
        .collect()
}

/// The domain's NICs for the VirtDomain's status: each device's type and
/// MAC, and for the pod interface (libvirt's `ethernet`) what the shim
/// recorded in virtkube's `<metadata>`: its binding and the guest's leased
/// address. The pod writes that record, so it must be one, for a pod
/// interface the domain has, with known values.
pub fn parse_interfaces(domain_xml: &str) -> Result<Vec<virtkube_api::domain::DomainInterface>, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("the domain XML is not XML: {e}"))?;
    let recorded: Vec<_> = doc
        .descendants()
        .filter(|n| {
            n.tag_name().namespace() == Some(virtkube_api::METADATA_XMLNS) && n.tag_name().name() == "interface"
        })
        .collect();
    if recorded.len() > 1 {
        return Err(format!(
            "the metadata records {} pod interfaces; a domain has at most one",
            recorded.len()
        ));
    }
    let record = match recorded.first() {
        None => None,
        Some(record) => {
            if record.attribute("type") != Some("pod") || record.attribute("binding") != Some("masquerade") {
                return Err(format!(
                    "the recorded interface is type {:?} binding {:?}; only a pod interface with the masquerade binding is recorded",
                    record.attribute("type").unwrap_or_default(),
                    record.attribute("binding").unwrap_or_default()
                ));
            }
            let guest = record.attribute("guest").unwrap_or_default();
            let valid = guest.split_once('/').is_some_and(|(address, prefix)| {
                address.parse::<std::net::Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
            });
            if !valid {
                return Err(format!(
                    "the recorded guest address {guest:?} is not an IPv4 address/prefix"
                ));
            }
            Some(guest.to_owned())
        }
    };
    let nics: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("interface") && n.tag_name().namespace().is_none())
        .take(MAX_LISTED_DISKS)
        .map(|nic| {
            let kind = nic.attribute("type").unwrap_or_default();
            let mac = nic
                .children()
                .find(|c| c.has_tag_name("mac"))
                .and_then(|m| m.attribute("address"))
                .unwrap_or_default()
                .chars()
                .take(17)
                .collect::<String>();
            let pod = kind == "ethernet" && record.is_some();
            virtkube_api::domain::DomainInterface {
                network: if pod {
                    "pod".into()
                } else {
                    kind.chars().take(16).collect()
                },
                mac,
                binding: pod.then(|| "masquerade".to_owned()),
                guest_address: if pod { record.clone() } else { None },
            }
        })
        .collect();
    if record.is_some() && !nics.iter().any(|n| n.network == "pod") {
        return Err("the metadata records a pod interface the domain does not have".into());
    }
    Ok(nics)
}

/// The XML namespace of virtkube-gate's owner record in a domain's metadata.
pub const GATE_OWNER_XMLNS: &str = "https://virtkube.io/xmlns/gate-owner/1";

/// How many times the gate counted the VM's shim finding its domain again
/// (its owner record's `reattached`); `None` without a record (a domain
/// created around the gate) or with an unreadable count.
pub fn parse_reattachments(domain_xml: &str) -> Option<u32> {
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().namespace() == Some(GATE_OWNER_XMLNS) && n.tag_name().name() == "owner")
        .map(|owner| owner.attribute("reattached").map_or(Some(0), |n| n.parse().ok()))?
}

/// nodeinfo's own mark on a domain it paused because its VirtDomain's
/// `spec.runState` asked: live metadata of the domain itself, so it lasts as
/// long as the domain (no later domain of the same name inherits it) and
/// survives nodeinfo's restarts. The gate admits no metadata of this
/// namespace in a domain a VM pod creates, so a pod cannot forge it.
pub const RUN_STATE_XMLNS: &str = "https://virtkube.io/xmlns/run-state/1";
/// The mark's element (under [`RUN_STATE_XMLNS`], prefix `vkrs`).
pub const PAUSED_BY_REQUEST: &str = "<paused-by-request/>";

/// Whether the domain carries nodeinfo's paused-by-request mark.
pub fn parse_paused_by_request(domain_xml: &str) -> bool {
    roxmltree::Document::parse(domain_xml).is_ok_and(|doc| {
        doc.descendants()
            .any(|n| n.tag_name().namespace() == Some(RUN_STATE_XMLNS) && n.tag_name().name() == "paused-by-request")
    })
}

/// The cgroup a process's `/proc/<pid>/cgroup` names for its memory: the
/// v1 `memory` hierarchy's path, else the unified (v2) one's.
pub fn memory_cgroup(proc_cgroup: &str) -> Option<String> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Some(path.to_owned());
        }
        if controllers.is_empty() {
            unified = Some(path.to_owned());
        }
    }
    unified
}

/// How many processes the kernel killed for memory in a cgroup: the
/// `oom_kill` line of v2 `memory.events` or v1 `memory.oom_control`.
pub fn oom_kills(events_or_oom_control: &str) -> Option<u64> {
    events_or_oom_control
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// The clock ticks per second of `/proc/<pid>/stat`'s times: USER_HZ, fixed
/// at 100 by the kernel's ABI on the architectures virtkube runs on.
const USER_HZ: u64 = 100;

/// How long a process has run, in seconds, from its `/proc/<pid>/stat` and
/// the node's `/proc/uptime`.
pub fn process_uptime_secs(stat: &str, proc_uptime: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its last ')'. Field 22 is the start time.
    let started_ticks: u64 = stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = proc_uptime.split_whitespace().next()?.parse().ok()?;
    // Whole seconds are enough to tell a QEMU that outlived a restart.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let uptime_secs = uptime.max(0.0) as u64;
    Some(uptime_secs.saturating_sub(started_ticks / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_for_memory_and_process_uptime_are_read() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n"), Some(2));
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"), Some(5));
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        // A command name with a space and a parenthesis; started 1000 s after boot.
        let stat =
            "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 0 0 0 0 5 6 0 0 20 0 3 0 100000 1000 10 18446744073709551615";
        assert_eq!(process_uptime_secs(stat, "1600.25 3000.00\n"), Some(600));
        assert_eq!(process_uptime_secs("garbage", "1600.25 3000.00\n"), None);
        assert_eq!(process_uptime_secs(stat, ""), None);
    }

    #[test]
    fn the_gate_s_reattachment_count_is_read_from_the_domain() {
        let xml = format!(
            "<domain><metadata><o:owner xmlns:o='{GATE_OWNER_XMLNS}' pid='1' start='2' caller='pod x' reattached='2'/></metadata></domain>"
        );
        assert_eq!(parse_reattachments(&xml), Some(2));
        let counted_none = format!("<domain><metadata><owner xmlns='{GATE_OWNER_XMLNS}' pid='1'/></metadata></domain>");
        assert_eq!(parse_reattachments(&counted_none), Some(0));
        assert_eq!(parse_reattachments("<domain><metadata/></domain>"), None);
        assert_eq!(
            parse_reattachments(&xml.replace("'2'/>", "'two'/>")),
            None,
            "an unreadable count is not a count"
        );
    }

    #[test]
    fn the_memory_cgroup_of_either_version() {
        let v1 = "12:pids:/kubepods/besteffort/podu/c\n4:memory:/kubepods/besteffort/podu/c\n0::/\n";
        assert_eq!(memory_cgroup(v1).as_deref(), Some("/kubepods/besteffort/podu/c"));
        let v2 = "0::/kubepods.slice/kubepods-pod_u.slice/cri-containerd-c.scope\n";
        assert_eq!(
            memory_cgroup(v2).as_deref(),
            Some("/kubepods.slice/kubepods-pod_u.slice/cri-containerd-c.scope")
        );
        assert_eq!(memory_cgroup("garbage"), None);
    }

    const QEMU_CAPS: &str = include_str!("../tests/fixtures/qemu-capabilities.xml");
    const TEST_CAPS: &str = include_str!("../tests/fixtures/test-capabilities.xml");
    const QEMU_DOMCAPS: &str = include_str!("../tests/fixtures/qemu-domcapabilities.xml");

    #[test]
    fn qemu_capabilities_fixture() {
        let caps = parse_capabilities(QEMU_CAPS).unwrap();
        assert_eq!(caps.arch.as_deref(), Some("x86_64"));
        assert!(caps.cpu.model.is_some() && !caps.cpu.features.is_empty());
        assert_eq!(caps.domain_types, ["qemu"], "KVM is hidden from the test libvirtd");
        assert!(caps.machine_types.iter().any(|m| m == "q35") && caps.machine_types.iter().any(|m| m == "pc"));
        assert_eq!(caps.numa.len(), 1);
        assert_eq!(caps.numa[0].cpus, Some(2));
        assert!(
            caps.numa[0]
                .memory
                .as_deref()
                .is_some_and(|m| m.ends_with("Ki") || m.ends_with("Mi") || m.ends_with("Gi"))
        );
        assert!(caps.numa[0].hugepages.iter().any(|h| h.size_kib == 2048));
        assert!(caps.numa[0].hugepages.iter().all(|h| h.size_kib > 4));
    }

    #[test]
    fn test_driver_capabilities_fixture() {
        let caps = parse_capabilities(TEST_CAPS).unwrap();
        assert_eq!(caps.arch.as_deref(), Some("i686"));
        assert_eq!(caps.domain_types, ["test"]);
    }

    #[test]
    fn domain_capabilities_fixture() {
        let d = parse_domain_capabilities(QEMU_DOMCAPS).unwrap();
        assert_eq!(d.domain.as_deref(), Some("qemu"));
        assert!(d.machine.is_some());
        assert!(d.usable_models.iter().any(|m| m == "qemu64"), "{:?}", d.usable_models);
    }

    #[test]
    fn pci_fixtures() {
        let dev = parse_pci_device(include_str!("../tests/fixtures/qemu-nodedev-pci-driver.xml"))
            .unwrap()
            .unwrap();
        assert_eq!(dev.address, "0000:00:01.0");
        assert_eq!(dev.vendor.as_deref(), Some("0x1af4"));
        assert_eq!(dev.driver.as_deref(), Some("virtio-pci"));
        assert_eq!(dev.class.as_deref(), Some("0xffff00"));
        let bridge = parse_pci_device(include_str!("../tests/fixtures/qemu-nodedev-pci.xml"))
            .unwrap()
            .unwrap();
        assert_eq!(bridge.driver, None);
        let vendor_named = "<device><name>x</name><capability type='pci'><domain>0</domain><bus>3</bus><slot>0</slot><function>1</function><vendor id='0x8086'>Intel Corporation</vendor><iommuGroup number='12'/></capability></device>";
        let dev = parse_pci_device(vendor_named).unwrap().unwrap();
        assert_eq!(
            (dev.address.as_str(), dev.vendor.as_deref(), dev.iommu_group),
            ("0000:03:00.1", Some("0x8086 Intel Corporation"), Some(12))
        );
        assert_eq!(
            parse_pci_device("<device><capability type='usb_device'/></device>").unwrap(),
            None
        );
        assert_eq!(
            parse_pci_device("<device><capability type='pci'><bus>x</bus></capability></device>").unwrap(),
            None
        );
    }

    #[test]
    fn owner_metadata() {
        let xml = format!(
            "<domain type='qemu'><name>ns_vm</name><metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:namespace>ns</virtkube:namespace><virtkube:pod>vm</virtkube:pod><virtkube:uid>u-1</virtkube:uid></virtkube:instance></metadata></domain>",
            virtkube_api::METADATA_XMLNS
        );
        let owner = parse_owner(&xml).unwrap().unwrap();
        assert_eq!(
            (
                owner.namespace.as_str(),
                owner.pod.as_str(),
                owner.uid.as_deref(),
                owner.template
            ),
            ("ns", "vm", Some("u-1"), None)
        );
        assert_eq!(parse_owner("<domain><name>other</name></domain>").unwrap(), None);
        let foreign = "<domain><metadata><x:instance xmlns:x='urn:other'><x:namespace>a</x:namespace><x:pod>b</x:pod></x:instance></metadata></domain>";
        assert_eq!(parse_owner(foreign).unwrap(), None);
    }

    #[test]
    fn interfaces_are_listed_with_the_pod_lease() {
        let domain = |record: &str, nics: &str| {
            format!(
                "<domain><metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:pod>vm</virtkube:pod>{record}</virtkube:instance></metadata><devices>{nics}</devices></domain>",
                virtkube_api::METADATA_XMLNS
            )
        };
        let pod_nic = "<interface type='ethernet'><mac address='52:54:00:aa:bb:cc'/><target dev='vk0' managed='yes'/></interface>";
        let user_nic = "<interface type='user'><mac address='52:54:00:aa:bb:cd'/></interface>";
        let record = "<virtkube:interface type='pod' binding='masquerade' guest='10.0.2.2/24'/>";
        let listed = parse_interfaces(&domain(record, &format!("{pod_nic}{user_nic}"))).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].network, "pod");
        assert_eq!(listed[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(listed[0].binding.as_deref(), Some("masquerade"));
        assert_eq!(listed[0].guest_address.as_deref(), Some("10.0.2.2/24"));
        assert_eq!(listed[1].network, "user");
        assert_eq!(listed[1].guest_address, None);
        assert!(parse_interfaces(&domain("", "")).unwrap().is_empty());
        // What the pod recorded must hold together.
        for (bad, expected) in [
            (domain(record, user_nic), "does not have"),
            (
                domain(&record.replace("10.0.2.2/24", "10.0.2.2"), pod_nic),
                "not an IPv4 address/prefix",
            ),
            (
                domain(&record.replace("10.0.2.2/24", "10.0.2.2/99"), pod_nic),
                "not an IPv4 address/prefix",
            ),
            (domain(&record.replace("masquerade", "bridge"), pod_nic), "masquerade"),
            (domain(&format!("{record}{record}"), pod_nic), "at most one"),
            ("<domain".to_owned(), "not XML"),
        ] {
            let why = parse_interfaces(&bad).unwrap_err();
            assert!(why.contains(expected), "{bad}: {why}");
        }
    }

    #[test]
    fn recorded_disks_are_listed_and_bounded() {
        let with = |disks: &str| {
            format!(
                "<domain><metadata><virtkube:instance xmlns:virtkube='{}'><virtkube:namespace>ns</virtkube:namespace><virtkube:pod>vm</virtkube:pod>{disks}</virtkube:instance></metadata><devices><disk type='file'><target dev='vda'/></disk><disk type='file'><target dev='vdb'/><readonly/></disk></devices></domain>",
                virtkube_api::METADATA_XMLNS
            )
        };
        let listed = parse_disks(&with(
            "<virtkube:disk target='vda' source='containerFile' writes='privateCopy' path='/disk/root.raw'/><virtkube:disk target='vdb' source='cloudInit' writes='readOnly'/>",
        ))
        .unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            (
                listed[0].target.as_str(),
                listed[0].path.as_deref(),
                listed[0].writes.as_str()
            ),
            ("vda", Some("/disk/root.raw"), "privateCopy")
        );
        assert_eq!(
            (listed[1].source.as_str(), listed[1].path.as_deref()),
            ("cloudInit", None)
        );
        let image = parse_disks(&with(
            "<virtkube:disk target='vda' source='imageFile' writes='inPlace' path='virtkube-main/ns_clone-1'/>",
        ))
        .unwrap();
        assert_eq!(image[0].path.as_deref(), Some("virtkube-main/ns_clone-1"));
        assert!(parse_disks("<domain><name>x</name></domain>").unwrap().is_empty());
        let e = parse_disks(&with("<virtkube:disk target='vda' writes='readOnly'/>")).unwrap_err();
        assert_eq!(e, "recorded disk 0 has no source");
        let long = format!(
            "<virtkube:disk target='vda' source='file' writes='inPlace' path='/{}'/>",
            "a".repeat(MAX_DISK_FIELD)
        );
        let e = parse_disks(&with(&long)).unwrap_err();
        assert!(e.contains("path is longer than 1024 characters"), "{e}");
        let many = "<virtkube:disk target='vda' source='file' writes='inPlace'/>".repeat(MAX_LISTED_DISKS + 1);
        let e = parse_disks(&with(&many)).unwrap_err();
        assert!(e.contains("records 65 disks; at most 64"), "{e}");
        // What the pod may not claim: a disk the domain lacks, unknown
        // values, a read-only disk written to.
        for (record, why) in [
            (
                "target='vdz' source='file' writes='inPlace'",
                "names \"vdz\", which is none of the domain's disks",
            ),
            (
                "target='vda' source='nfs' writes='inPlace'",
                "source \"nfs\" is none of",
            ),
            (
                "target='vda' source='file' writes='sometimes'",
                "writes \"sometimes\" is none of",
            ),
            (
                "target='vdb' source='file' writes='inPlace'",
                "says inPlace but the disk is read-only",
            ),
        ] {
            let e = parse_disks(&with(&format!("<virtkube:disk {record}/>"))).unwrap_err();
            assert!(e.contains(why), "{record}: {e}");
        }
    }

    #[test]
    fn malformed_xml_is_an_error_and_odd_xml_is_skipped() {
        for bad in ["", "<capabilities", "<<>>"] {
            let err = parse_capabilities(bad).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("capabilities XML from libvirt does not parse"),
                "{err}"
            );
        }
        assert!(parse_domain_capabilities("<x").is_err());
        assert!(parse_pci_device("nope").is_err());
        assert!(parse_owner("<domain>").is_err());
        let odd = parse_capabilities("<capabilities><guest><os_type>hvm</os_type></guest></capabilities>").unwrap();
        assert_eq!(odd.skipped, ["no <host> element"]);
        let cells = parse_capabilities("<capabilities><host><cpu><arch>x86_64</arch></cpu><topology><cells><cell id='x'/><cell id='1'><memory unit='KiB'>nope</memory></cell></cells></topology></host></capabilities>").unwrap();
        assert_eq!(cells.skipped, ["a NUMA cell without a numeric id"]);
        assert_eq!(
            cells.numa,
            [NumaCell {
                id: 1,
                memory: None,
                cpus: None,
                hugepages: vec![]
            }]
        );
    }
}
