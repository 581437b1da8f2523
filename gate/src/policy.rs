//! What a VM container may ask of libvirtd through the gate. Pure: the calls
//! allowed (exactly those the shim makes), and the domain XML admitted
//! (exactly the shapes the shim's renderer produces, for the caller's own
//! identity, with files only under the configured roots).

use std::path::{Component, Path, PathBuf};

use libvirt_wire::protocol::procedure;
use virtkube_api::podnet;

use crate::identity::Identity;

/// The version of [`ALLOWED_CALLS`]; raise it when the list changes, so a
/// shim and a gate can say which list they speak.
pub const ALLOWED_CALLS_VERSION: u32 = 4;

/// Every remote procedure the shim makes (shim/src/runtime.rs), and no other.
pub const ALLOWED_CALLS: &[(i32, &str)] = &[
    (procedure::AUTH_LIST, "AUTH_LIST"),
    (procedure::CONNECT_OPEN, "CONNECT_OPEN"),
    (procedure::CONNECT_SUPPORTS_FEATURE, "CONNECT_SUPPORTS_FEATURE"),
    (procedure::CONNECT_GET_CAPABILITIES, "CONNECT_GET_CAPABILITIES"),
    (procedure::DOMAIN_CREATE_XML, "DOMAIN_CREATE_XML"),
    // v2: a shim that lost its connection finds its domain again.
    (procedure::DOMAIN_LOOKUP_BY_UUID, "DOMAIN_LOOKUP_BY_UUID"),
    // v3: disks passed as file descriptors: define, associate, start, and
    // make the running domain transient.
    (procedure::DOMAIN_DEFINE_XML_FLAGS, "DOMAIN_DEFINE_XML_FLAGS"),
    (procedure::DOMAIN_FD_ASSOCIATE, "DOMAIN_FD_ASSOCIATE"),
    (procedure::DOMAIN_CREATE_WITH_FLAGS, "DOMAIN_CREATE_WITH_FLAGS"),
    (procedure::DOMAIN_UNDEFINE_FLAGS, "DOMAIN_UNDEFINE_FLAGS"),
    (
        procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
        "CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY",
    ),
    (procedure::DOMAIN_OPEN_CONSOLE, "DOMAIN_OPEN_CONSOLE"),
    (procedure::DOMAIN_GET_STATE, "DOMAIN_GET_STATE"),
    (procedure::DOMAIN_SHUTDOWN_FLAGS, "DOMAIN_SHUTDOWN_FLAGS"),
    (procedure::DOMAIN_DESTROY_FLAGS, "DOMAIN_DESTROY_FLAGS"),
    (procedure::CONNECT_CLOSE, "CONNECT_CLOSE"),
    // v4: operations on the running VM (`virtkube-shim reboot|reset|
    // screenshot`) and its graphical console, passed back as a descriptor.
    (procedure::DOMAIN_REBOOT, "DOMAIN_REBOOT"),
    (procedure::DOMAIN_RESET, "DOMAIN_RESET"),
    (procedure::DOMAIN_SCREENSHOT, "DOMAIN_SCREENSHOT"),
    (procedure::DOMAIN_OPEN_GRAPHICS_FD, "DOMAIN_OPEN_GRAPHICS_FD"),
];

/// The name of an allowed procedure, or `None` for one the gate refuses.
pub fn allowed_call(procedure: i32) -> Option<&'static str> {
    ALLOWED_CALLS
        .iter()
        .find(|(p, _)| *p == procedure)
        .map(|(_, name)| *name)
}

/// The node's rules (a virthost setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Directories whose files a domain may use (kernels, initrds, disks).
    pub roots: Vec<PathBuf>,
    /// Most memory one domain may have, in KiB.
    pub max_memory_kib: u64,
    /// Most vCPUs one domain may have.
    pub max_vcpus: u32,
    /// Interface types a domain may use (`pod`, `user`, `network`, `bridge`).
    pub interface_types: Vec<String>,
    /// Connection URIs a caller may open.
    pub uris: Vec<String>,
    /// Whether network disks (nbd, rbd, iscsi) are allowed: they reach the
    /// network with the node's identity (its Ceph keyring, its iSCSI
    /// initiator), so they are off unless the node's operator allows them.
    pub network_disks: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            roots: vec![PathBuf::from("/var/lib/virtkube/images")],
            max_memory_kib: 64 * 1024 * 1024,
            max_vcpus: 64,
            interface_types: vec!["pod".into(), "user".into(), "network".into()],
            uris: vec!["qemu:///system".into()],
            network_disks: false,
        }
    }
}

/// Why the gate refused: told to the caller in libvirt's "access denied"
/// error and logged once at the gate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

fn deny<T>(why: impl Into<String>) -> Result<T, Denied> {
    Err(Denied(why.into()))
}

/// Resolves a path as the filesystem sees it (symbolic links followed), for
/// the root check; an I/O concern kept out of the pure policy.
pub trait Paths {
    /// The canonical path, or `None` when it does not exist.
    fn canonical(&self, path: &Path) -> Option<PathBuf>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealPaths;

impl Paths for RealPaths {
    fn canonical(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }
}

/// The domain a create call admitted: later calls may name only it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Its name.
    pub name: String,
    /// Its UUID, when the XML gives one.
    pub uuid: Option<[u8; 16]>,
}

/// What an admitted domain XML says that the gate goes on to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The domain, which later calls may name.
    pub domain: Admitted,
    /// Its memory, in KiB (checked against the cgroup QEMU will join).
    pub memory_kib: u64,
    /// The descriptor groups its disks name (each must be associated with
    /// descriptors before it starts).
    pub fd_groups: Vec<String>,
    /// The tap of its `pod` interface, which the gate moves into the
    /// caller's network namespace before the guest runs.
    pub pod_tap: Option<String>,
    /// ImageFile volumes it writes and may not share, as (pool, volume): no
    /// other running domain may be using them when it starts.
    pub exclusive_volumes: Vec<(String, String)>,
}

/// A libvirt storage volume: (pool, volume).
pub type PoolVolume = (String, String);

/// What a caller may do with one ImageFile's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeGrant {
    /// The volume's format (`raw` or `qcow2`): the disk must say exactly this.
    pub format: String,
    /// The disk must be read-only (the ImageFile is readOnly, or clones
    /// are made from it).
    pub read_only: bool,
    /// Several running VMs may write it.
    pub shareable: bool,
}

/// The ImageFiles the gate knows (from the Kubernetes API).
pub trait Volumes: std::fmt::Debug {
    /// How `who` may use volume `volume` of pool `pool`, or why not at all.
    fn grant(&self, who: &Identity, pool: &str, volume: &str) -> Result<VolumeGrant, Denied>;
}

/// Whether a (live) domain XML has a disk on volume `volume` of `pool`.
pub fn uses_volume(domain_xml: &str, pool: &str, volume: &str) -> bool {
    roxmltree::Document::parse(domain_xml).is_ok_and(|doc| {
        doc.descendants().any(|n| {
            n.has_tag_name("source")
                && n.parent().is_some_and(|p| p.has_tag_name("disk"))
                && n.attribute("pool") == Some(pool)
                && n.attribute("volume") == Some(volume)
        })
    })
}

/// A gate without the Kubernetes API knows no ImageFile.
#[derive(Debug)]
pub struct NoVolumes;

impl Volumes for NoVolumes {
    fn grant(&self, _: &Identity, pool: &str, volume: &str) -> Result<VolumeGrant, Denied> {
        deny(format!(
            "volume {pool}/{volume}: ImageFile disks need a gate that reads ImageFiles from the Kubernetes API, and this one does not"
        ))
    }
}

/// virtkube's metadata namespace (virtkube-api's `METADATA_XMLNS`, which the
/// gate does not link: that crate carries the Kubernetes client types).
const METADATA_NS: &str = "https://virtkube.io/xmlns/domain/v1alpha1";

/// Elements the renderer produces, by their path from `<domain>`. Anything
/// else (`hostdev`, `filesystem`, `qemu:commandline`, `seclabel`, `loader`,
/// `nvram`, …) is refused.
const ELEMENTS: &[&str] = &[
    "domain",
    "domain/name",
    "domain/uuid",
    "domain/metadata",
    "domain/memory",
    "domain/vcpu",
    "domain/os",
    "domain/os/type",
    "domain/os/kernel",
    "domain/os/initrd",
    "domain/os/cmdline",
    "domain/features",
    "domain/features/acpi",
    "domain/features/apic",
    "domain/cpu",
    "domain/cpu/model",
    "domain/cpu/topology",
    "domain/cpu/feature",
    "domain/clock",
    "domain/on_poweroff",
    "domain/on_reboot",
    "domain/on_crash",
    "domain/devices",
    "domain/devices/controller",
    "domain/devices/disk",
    "domain/devices/disk/driver",
    "domain/devices/disk/source",
    "domain/devices/disk/source/host",
    "domain/devices/disk/target",
    "domain/devices/disk/readonly",
    "domain/devices/disk/boot",
    "domain/devices/interface",
    "domain/devices/interface/mac",
    "domain/devices/interface/source",
    "domain/devices/interface/model",
    "domain/devices/interface/target",
    "domain/devices/interface/boot",
    "domain/devices/serial",
    "domain/devices/serial/target",
    "domain/devices/console",
    "domain/devices/console/target",
    "domain/devices/panic",
    "domain/devices/graphics",
    "domain/devices/graphics/listen",
];

/// The attributes the renderer writes, by element path; any other attribute
/// (a `<host transport='unix' socket=…>`, a `<driver iothread=…>`, a
/// `<source startupPolicy=…>`) is refused.
const ATTRIBUTES: &[(&str, &[&str])] = &[
    ("domain", &["type"]),
    ("domain/memory", &["unit"]),
    ("domain/vcpu", &["placement"]),
    ("domain/os", &["firmware"]),
    ("domain/os/type", &["arch", "machine"]),
    ("domain/cpu", &["mode", "match"]),
    ("domain/cpu/model", &["fallback"]),
    ("domain/cpu/topology", &["sockets", "dies", "cores", "threads"]),
    ("domain/cpu/feature", &["policy", "name"]),
    ("domain/clock", &["offset"]),
    ("domain/devices/controller", &["type", "index", "model"]),
    ("domain/devices/disk", &["type", "device"]),
    ("domain/devices/disk/driver", &["name", "type"]),
    (
        "domain/devices/disk/source",
        &["file", "protocol", "name", "fdgroup", "pool", "volume"],
    ),
    ("domain/devices/disk/source/host", &["name", "port"]),
    ("domain/devices/disk/target", &["dev", "bus"]),
    ("domain/devices/disk/boot", &["order"]),
    ("domain/devices/interface", &["type"]),
    ("domain/devices/interface/mac", &["address"]),
    ("domain/devices/interface/source", &["network", "bridge"]),
    ("domain/devices/interface/model", &["type"]),
    ("domain/devices/interface/target", &["dev", "managed"]),
    ("domain/devices/interface/boot", &["order"]),
    ("domain/devices/serial", &["type"]),
    ("domain/devices/serial/target", &["port"]),
    ("domain/devices/console", &["type"]),
    ("domain/devices/console/target", &["type", "port"]),
    ("domain/devices/panic", &["model"]),
    ("domain/devices/graphics", &["type"]),
    ("domain/devices/graphics/listen", &["type"]),
];

/// Network disk protocols the renderer writes; each reaches a remote host by
/// name and port only.
const NETWORK_PROTOCOLS: &[&str] = &["nbd", "rbd", "iscsi"];

/// Elements that may appear more than once under the same parent; every other
/// one is single (a second `<os>` or `<uuid>` is a place where the gate and
/// libvirt could read different values).
const REPEATABLE: &[&str] = &[
    "domain/devices/disk",
    "domain/devices/interface",
    "domain/devices/controller",
    "domain/cpu/feature",
    "domain/devices/disk/source/host",
];

/// Lifecycle actions allowed (no core dumps onto the node's disk).
const LIFECYCLE_ACTIONS: &[&str] = &["destroy", "restart", "preserve", "rename-restart"];

/// The only children `<metadata>` may have: virtkube's own instance record.
const METADATA_ELEMENTS: &[&str] = &["instance", "namespace", "pod", "uid", "template", "disk", "interface"];

/// Checks a domain XML from `who` against `policy`.
pub fn check_domain_xml(xml: &str, who: &Identity, policy: &Policy, paths: &impl Paths) -> Result<Admission, Denied> {
    check_domain_xml_with(xml, who, policy, paths, &NoVolumes)
}

/// [`check_domain_xml`], knowing ImageFiles through `volumes`.
pub fn check_domain_xml_with(
    xml: &str,
    who: &Identity,
    policy: &Policy,
    paths: &impl Paths,
    volumes: &dyn Volumes,
) -> Result<Admission, Denied> {
    // The renderer writes none of these, and each is a place where this parser
    // and libvirt's could read different text (a comment splitting a path, an
    // encoding declaration, a DOCTYPE).
    if let Some(construct) = ["<!", "<?"].into_iter().find(|c| xml.contains(c)) {
        return deny(format!(
            "the domain XML holds {construct:?} (a comment, CDATA, DOCTYPE or processing instruction); virtkube's renderer writes none"
        ));
    }
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 10_000,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options)
        .or_else(|e| deny(format!("the domain XML does not parse: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return deny("the document is not a <domain>");
    }
    for node in root.descendants().filter(roxmltree::Node::is_element) {
        check_element(node)?;
    }
    match root.attribute("type") {
        Some("qemu" | "kvm" | "test") => {}
        other => return deny(format!("domain type {other:?} is not allowed (qemu or kvm)")),
    }
    let name = child_text(root, "name").ok_or(Denied("the domain has no <name>".into()))?;
    let uuid = match child_text(root, "uuid") {
        Some(text) => {
            Some(libvirt_wire::protocol::parse_uuid(text).ok_or(Denied(format!("<uuid> {text:?} is not a UUID")))?)
        }
        None => None,
    };
    check_owner(root, who, name, uuid.as_ref())?;
    let memory_kib = check_sizes(root, policy)?;
    let (fd_groups, exclusive_volumes) = check_devices(root, who, policy, paths, volumes)?;
    let pod_tap = check_interfaces(root, name, policy)?;
    check_graphics(root)?;
    if fd_groups.len() > MAX_FD_GROUPS {
        return deny(format!(
            "{} disks passed as descriptors; at most {MAX_FD_GROUPS}",
            fd_groups.len()
        ));
    }
    Ok(Admission {
        domain: Admitted {
            name: name.to_owned(),
            uuid,
        },
        memory_kib,
        fd_groups,
        pod_tap,
        exclusive_volumes,
    })
}

fn path_of(node: roxmltree::Node<'_, '_>) -> String {
    let mut names: Vec<&str> = node
        .ancestors()
        .filter(roxmltree::Node::is_element)
        .map(|n| n.tag_name().name())
        .collect();
    names.reverse();
    names.join("/")
}

fn check_element(node: roxmltree::Node<'_, '_>) -> Result<(), Denied> {
    let in_metadata = node
        .ancestors()
        .skip(1)
        .any(|a| a.is_element() && a.tag_name().name() == "metadata" && a.tag_name().namespace().is_none());
    if in_metadata {
        if node.tag_name().namespace() != Some(METADATA_NS) || !METADATA_ELEMENTS.contains(&node.tag_name().name()) {
            return deny(format!(
                "<metadata> may hold only virtkube's instance record; <{}> is not allowed",
                node.tag_name().name()
            ));
        }
        return Ok(());
    }
    if let Some(ns) = node.tag_name().namespace() {
        return deny(format!(
            "<{}> of namespace {ns} is not allowed (no QEMU command-line or other extensions)",
            node.tag_name().name()
        ));
    }
    let path = path_of(node);
    if !ELEMENTS.contains(&path.as_str()) {
        return deny(format!(
            "<{}> (at {path}) is not allowed: VM pods get only what virtkube's templates describe",
            node.tag_name().name()
        ));
    }
    if !REPEATABLE.contains(&path.as_str())
        && node
            .prev_siblings()
            .skip(1) // the node itself
            .filter(roxmltree::Node::is_element)
            .any(|sibling| sibling.tag_name() == node.tag_name())
    {
        return deny(format!(
            "<{}> (at {path}) appears more than once",
            node.tag_name().name()
        ));
    }
    if matches!(node.tag_name().name(), "on_poweroff" | "on_reboot" | "on_crash")
        && !LIFECYCLE_ACTIONS.contains(&node.text().unwrap_or_default().trim())
    {
        return deny(format!(
            "<{}> may be {} only",
            node.tag_name().name(),
            LIFECYCLE_ACTIONS.join(", ")
        ));
    }
    let allowed = ATTRIBUTES.iter().find(|(p, _)| *p == path).map_or(&[][..], |(_, a)| *a);
    for attribute in node.attributes() {
        if attribute.namespace().is_some() || !allowed.contains(&attribute.name()) {
            return deny(format!(
                "attribute {}={:?} on <{}> (at {path}) is not allowed",
                attribute.name(),
                attribute.value(),
                node.tag_name().name()
            ));
        }
    }
    Ok(())
}

fn child<'a, 'input>(node: roxmltree::Node<'a, 'input>, name: &str) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|c| c.text()).map(str::trim)
}

/// The domain must be the caller's: a pod's carries the pod's UID as its UUID
/// and in virtkube's metadata; a Docker container's is named after the
/// container (its default hostname, the first 12 digits of its ID) and claims
/// no pod.
fn check_owner(
    root: roxmltree::Node<'_, '_>,
    who: &Identity,
    name: &str,
    uuid: Option<&[u8; 16]>,
) -> Result<(), Denied> {
    let claimed_uid = root
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.tag_name().name() == "uid")
        .and_then(|n| n.text())
        .map(str::trim);
    match who {
        Identity::Pod { uid } => {
            let own = libvirt_wire::protocol::parse_uuid(uid);
            if uuid.is_none() || uuid != own.as_ref() {
                return deny(format!(
                    "the domain's <uuid> must be the calling pod's UID {uid} (the shim sets it from POD_UID)"
                ));
            }
            if claimed_uid.and_then(libvirt_wire::protocol::parse_uuid) != own {
                return deny(format!(
                    "the domain's virtkube metadata must name the calling pod's UID {uid}, not {claimed_uid:?}"
                ));
            }
        }
        Identity::Container { id } => {
            if let Some(claimed) = claimed_uid {
                return deny(format!(
                    "a Docker container may not claim pod UID {claimed:?} in the domain's metadata"
                ));
            }
            let short = id.get(..12).unwrap_or(id);
            if name != short {
                return deny(format!(
                    "a Docker container's domain must be named after the container ({short}), not {name:?}"
                ));
            }
            if uuid.is_some() {
                return deny("a Docker container's domain may not choose its <uuid>; libvirt assigns one");
            }
        }
    }
    Ok(())
}

/// Checks memory and vCPUs against the policy; returns the memory in KiB.
fn check_sizes(root: roxmltree::Node<'_, '_>, policy: &Policy) -> Result<u64, Denied> {
    let memory = child(root, "memory").ok_or(Denied("the domain has no <memory>".into()))?;
    if memory.attribute("unit").unwrap_or("KiB") != "KiB" {
        return deny("<memory> must be in KiB");
    }
    let kib: u64 = memory
        .text()
        .and_then(|t| t.trim().parse().ok())
        .ok_or(Denied("<memory> is not a number of KiB".into()))?;
    if kib > policy.max_memory_kib {
        return deny(format!(
            "<memory> {kib} KiB is more than this node allows a VM ({} KiB)",
            policy.max_memory_kib
        ));
    }
    let vcpus: u32 = child_text(root, "vcpu")
        .and_then(|t| t.parse().ok())
        .ok_or(Denied("<vcpu> is missing or not a number".into()))?;
    if vcpus > policy.max_vcpus {
        return deny(format!(
            "<vcpu> {vcpus} is more than this node allows a VM ({})",
            policy.max_vcpus
        ));
    }
    Ok(kib)
}

/// Where the renderer names a disk passed as descriptors: a path that exists
/// on no node (libvirt opens only the descriptors; the name appears in
/// QEMU's block-job metadata at most). The shim's renderer uses the same.
pub const FD_DISK_PREFIX: &str = "/virtkube-fd/";

/// Most descriptor groups (disks passed as descriptors) one domain may have.
pub const MAX_FD_GROUPS: usize = 16;

/// A descriptor group's name: the shim's disk names, `[a-z0-9-]`, 1–63.
fn check_fd_disk(group: &str, file: &str) -> Result<(), Denied> {
    if group.is_empty()
        || group.len() > 63
        || !group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return deny(format!(
            "descriptor group {group:?} is not a disk name (1–63 of a-z, 0-9, -)"
        ));
    }
    if file != format!("{FD_DISK_PREFIX}{group}") {
        return deny(format!(
            "a disk passed as descriptors must be named {FD_DISK_PREFIX}{group}, not {file:?}"
        ));
    }
    Ok(())
}

/// Checks the devices; returns the descriptor groups the disks name.
/// Checks the disks and character devices; returns the descriptor groups
/// and the volumes written exclusively.
fn check_devices(
    root: roxmltree::Node<'_, '_>,
    who: &Identity,
    policy: &Policy,
    paths: &impl Paths,
    volumes: &dyn Volumes,
) -> Result<(Vec<String>, Vec<PoolVolume>), Denied> {
    let mut groups: Vec<String> = Vec::new();
    let mut exclusive: Vec<(String, String)> = Vec::new();
    let mut seen_volumes: Vec<(String, String)> = Vec::new();
    if let Some(os) = child(root, "os") {
        if os.attribute("firmware").is_some_and(|f| f != "efi") {
            return deny("<os firmware> may only be efi");
        }
        for name in ["kernel", "initrd"] {
            if let Some(path) = child_text(os, name) {
                check_file(&format!("<{name}>"), path, policy, paths)?;
            }
        }
    }
    // (virtkube's metadata has <disk> records too, in its own namespace.)
    for disk in root
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.tag_name().namespace().is_none())
    {
        let source = child(disk, "source");
        match disk.attribute("type") {
            Some("file") => {
                let file = source
                    .and_then(|s| s.attribute("file"))
                    .ok_or(Denied("a file disk needs <source file>".into()))?;
                match source.and_then(|s| s.attribute("fdgroup")) {
                    Some(group) => {
                        check_fd_disk(group, file)?;
                        // A qcow2 image's header may name a backing or data
                        // file, which QEMU would open on the node, and the
                        // caller may rewrite it after any check the gate
                        // makes (the file stays the caller's): raw only.
                        let format = child(disk, "driver").and_then(|d| d.attribute("type"));
                        if format != Some("raw") {
                            return deny(format!(
                                "a disk passed as descriptors must be raw, not {}",
                                format.unwrap_or("unset")
                            ));
                        }
                        if groups.iter().any(|g| g == group) {
                            return deny(format!("descriptor group {group:?} is named by two disks"));
                        }
                        groups.push(group.to_owned());
                    }
                    None => check_file("a disk", file, policy, paths)?,
                }
            }
            Some("volume") => {
                let source = source.ok_or(Denied("a volume disk needs <source pool volume>".into()))?;
                let (Some(pool), Some(volume)) = (source.attribute("pool"), source.attribute("volume")) else {
                    return deny("a volume disk needs <source pool volume>");
                };
                if source.attributes().count() != 2 {
                    return deny("a volume disk's <source> names a pool and a volume only");
                }
                let grant = volumes.grant(who, pool, volume)?;
                // The format decides how QEMU reads the file: qcow2 over a
                // raw volume would make guest-written bytes a header naming
                // any file of the node.
                let format = child(disk, "driver").and_then(|d| d.attribute("type"));
                if format != Some(grant.format.as_str()) {
                    return deny(format!(
                        "volume {pool}/{volume} is {}; the disk's <driver type> must say {}, not {}",
                        grant.format,
                        grant.format,
                        format.unwrap_or("nothing")
                    ));
                }
                let read_only = child(disk, "readonly").is_some() || disk.attribute("device") == Some("cdrom");
                if grant.read_only && !read_only {
                    return deny(format!(
                        "volume {pool}/{volume} may be attached read-only only (its ImageFile is readOnly or has clones)"
                    ));
                }
                let key = (pool.to_owned(), volume.to_owned());
                if seen_volumes.contains(&key) {
                    return deny(format!("volume {pool}/{volume} is named by two disks"));
                }
                seen_volumes.push(key.clone());
                if !read_only && !grant.shareable {
                    exclusive.push(key);
                }
            }
            Some("network") if !policy.network_disks => {
                return deny(
                    "network disks are not allowed on this node (they reach the network with the node's credentials)",
                );
            }
            Some("network") => {
                let protocol = source.and_then(|s| s.attribute("protocol")).unwrap_or_default();
                if !NETWORK_PROTOCOLS.contains(&protocol) {
                    return deny(format!(
                        "network disk protocol {protocol:?} is not allowed ({})",
                        NETWORK_PROTOCOLS.join(", ")
                    ));
                }
            }
            other => {
                return deny(format!(
                    "disk type {other:?} is not allowed (file, volume or network; no host block devices)"
                ));
            }
        }
        if disk.attribute("type") != Some("file") && source.is_some_and(|s| s.has_attribute("fdgroup")) {
            return deny("only a file disk may be passed as descriptors");
        }
        if let Some(source) = source
            && disk.attribute("type") != Some("volume")
            && (source.has_attribute("dev")
                || source.has_attribute("dir")
                || source.has_attribute("pool")
                || source.has_attribute("volume"))
        {
            return deny("a disk <source> may name a file under the images directory or a network volume only");
        }
    }
    for chardev in root
        .descendants()
        .filter(|n| n.has_tag_name("serial") || n.has_tag_name("console"))
    {
        if chardev.attribute("type") != Some("pty") {
            return deny(format!(
                "<{}> must be of type pty (no host files, sockets or devices)",
                chardev.tag_name().name()
            ));
        }
    }
    Ok((groups, exclusive))
}

/// Checks the NICs; returns the tap of the pod interface, if any. A pod
/// interface is libvirt's `ethernet` type: a tap libvirt creates, which the
/// gate then moves into the caller's namespace. Its name is the one
/// [`podnet::tap_name`] gives the domain, so a caller can neither take an
/// existing device of the node (another VM's tap, a host link: `managed='no'`
/// or a chosen name) nor make libvirt run a script or set host addresses
/// (no `<script>`, `<ip>`, `<route>`: not in the element allow-list).
fn check_interfaces(root: roxmltree::Node<'_, '_>, name: &str, policy: &Policy) -> Result<Option<String>, Denied> {
    let mut pod_tap = None;
    // (virtkube's metadata has an <interface> record too, in its own namespace.)
    for nic in root
        .descendants()
        .filter(|n| n.has_tag_name("interface") && n.tag_name().namespace().is_none())
    {
        let kind = match nic.attribute("type").unwrap_or_default() {
            "ethernet" => "pod",
            other => other,
        };
        if !policy.interface_types.iter().any(|t| t == kind) {
            return deny(format!(
                "interface type {kind:?} is not allowed on this node (allowed: {})",
                policy.interface_types.join(", ")
            ));
        }
        let target = child(nic, "target");
        if kind != "pod" {
            if target.is_some() {
                return deny(format!(
                    "a {kind:?} interface may not name its host device (<target>); libvirt picks it"
                ));
            }
            continue;
        }
        let own = podnet::tap_name(name);
        let Some(target) = target else {
            return deny(format!(
                "a pod interface must name its tap: <target dev='{own}' managed='yes'/>"
            ));
        };
        if target.attribute("dev") != Some(own.as_str()) {
            return deny(format!(
                "a pod interface's tap must be {own:?} (derived from the domain's name), not {:?}: a VM pod may not use another device of the node",
                target.attribute("dev").unwrap_or_default()
            ));
        }
        if target.attribute("managed") != Some("yes") {
            return deny(format!(
                "a pod interface's tap must be created by libvirt (managed='yes'), not an existing device (managed={:?})",
                target.attribute("managed").unwrap_or_default()
            ));
        }
        if child(nic, "source").is_some() {
            return deny("a pod interface has no <source>");
        }
        if pod_tap.replace(own).is_some() {
            return deny("a domain may have one pod interface (the pod has one network)");
        }
    }
    Ok(pod_tap)
}

/// A display is VNC that listens nowhere (`<listen type='none'/>`): its VM
/// container reaches it through DOMAIN_OPEN_GRAPHICS_FD and serves it inside
/// the pod. A listening address or socket would put it on the node, where
/// anyone who reaches the node could watch and type.
fn check_graphics(root: roxmltree::Node<'_, '_>) -> Result<(), Denied> {
    // Every one (the element allow-list already refuses a second), and
    // every <listen> of each.
    for graphics in root.descendants().filter(|n| n.has_tag_name("graphics")) {
        if graphics.attribute("type") != Some("vnc") {
            return deny(format!(
                "graphics type {:?} is not allowed (vnc, served in the pod)",
                graphics.attribute("type").unwrap_or_default()
            ));
        }
        let listens: Vec<_> = graphics.children().filter(|n| n.has_tag_name("listen")).collect();
        if listens.is_empty() {
            return deny(
                "a VNC display must listen nowhere on the node (<listen type='none'/>; the VM container serves it in the pod), not at libvirt's default address",
            );
        }
        if let Some(listen) = listens.iter().find(|l| l.attribute("type") != Some("none")) {
            return deny(format!(
                "a VNC display must listen nowhere on the node (<listen type='none'/>; the VM container serves it in the pod), not {:?}",
                listen.attribute("type").unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// A file a domain uses must be an absolute path under one of the roots, with
/// no `..`, and must stay under it with symbolic links followed.
fn check_file(what: &str, path: &str, policy: &Policy, paths: &impl Paths) -> Result<(), Denied> {
    let p = Path::new(path);
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return deny(format!("{what} {path:?} must be an absolute path without . or .."));
    }
    let Some(root) = policy.roots.iter().find(|root| p.starts_with(root)) else {
        return deny(format!(
            "{what} {path:?} is outside the directories VM files may come from ({})",
            policy
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let canonical_root = paths.canonical(root).unwrap_or_else(|| root.clone());
    match paths.canonical(p) {
        Some(real) if real.starts_with(&canonical_root) => Ok(()),
        Some(real) => deny(format!(
            "{what} {path:?} leads to {} through a symbolic link, outside {}",
            real.display(),
            root.display()
        )),
        // A file that does not exist cannot escape; libvirt reports it missing.
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const UID: &str = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b";

    struct FakePaths(BTreeMap<PathBuf, PathBuf>);

    impl Paths for FakePaths {
        fn canonical(&self, path: &Path) -> Option<PathBuf> {
            self.0.get(path).cloned().or_else(|| Some(path.to_owned()))
        }
    }

    fn no_links() -> FakePaths {
        FakePaths(BTreeMap::new())
    }

    fn pod() -> Identity {
        Identity::Pod { uid: UID.into() }
    }

    fn golden(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../shim/tests/golden/{name}.xml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn server_policy() -> Policy {
        Policy {
            interface_types: vec!["user".into(), "network".into()],
            network_disks: true,
            ..Policy::default()
        }
    }

    #[track_caller]
    fn denied(xml: &str, who: &Identity, expected: &str) {
        match check_domain_xml(xml, who, &server_policy(), &no_links()) {
            Ok(a) => panic!("admitted {a:?}:\n{xml}"),
            Err(Denied(why)) => assert!(why.contains(expected), "expected {expected:?}, got {why:?}"),
        }
    }

    /// Grants `ns_clone` (qcow2, writable) and `ns_golden` (raw, read-only).
    #[derive(Debug)]
    struct FakeVolumes;

    impl Volumes for FakeVolumes {
        fn grant(&self, _: &Identity, pool: &str, volume: &str) -> Result<VolumeGrant, Denied> {
            match (pool, volume) {
                ("virtkube-main", "ns_clone") => Ok(VolumeGrant {
                    format: "qcow2".into(),
                    read_only: false,
                    shareable: false,
                }),
                ("virtkube-main", "ns_golden") => Ok(VolumeGrant {
                    format: "raw".into(),
                    read_only: true,
                    shareable: false,
                }),
                _ => deny(format!("volume {pool}/{volume}: not granted")),
            }
        }
    }

    #[test]
    fn a_volume_disk_is_admitted_as_its_image_file_allows_only() {
        let xml = golden("server");
        let file_disk = "<disk type=\"file\" device=\"disk\">\n      <driver name=\"qemu\" type=\"qcow2\"/>\n      <source file=\"/var/lib/virtkube/images/server/root.qcow2\"/>";
        assert!(xml.contains(file_disk));
        let with = |disk: &str| xml.replace(file_disk, disk);
        let check = |xml: &str| check_domain_xml_with(xml, &pod(), &server_policy(), &no_links(), &FakeVolumes);
        let clone = with(
            "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='virtkube-main' volume='ns_clone'/>",
        );
        let admitted = check(&clone).unwrap();
        assert_eq!(
            admitted.exclusive_volumes,
            vec![("virtkube-main".to_owned(), "ns_clone".to_owned())]
        );
        let refused = |xml: &str, expected: &str| match check(xml) {
            Ok(a) => panic!("admitted {a:?}"),
            Err(Denied(why)) => assert!(why.contains(expected), "expected {expected:?}, got {why:?}"),
        };
        // The format is the volume's: raw bytes read as qcow2 could name any file.
        refused(
            &with(
                "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='virtkube-main' volume='ns_clone'/>",
            ),
            "must say qcow2, not raw",
        );
        refused(
            &with("<disk type='volume' device='disk'><source pool='virtkube-main' volume='ns_clone'/>"),
            "must say qcow2, not nothing",
        );
        refused(
            &with(
                "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='virtkube-main' volume='ns_golden'/>",
            ),
            "read-only only",
        );
        let golden_read_only = with(
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='virtkube-main' volume='ns_golden'/><readonly/>",
        );
        assert!(check(&golden_read_only).unwrap().exclusive_volumes.is_empty());
        refused(
            &with(
                "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='virtkube-main' volume='ns_other'/>",
            ),
            "not granted",
        );
        refused(
            &with(
                "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='virtkube-main' volume='ns_clone' file='/etc/shadow'/>",
            ),
            "names a pool and a volume only",
        );
        refused(
            &with("<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='virtkube-main'/>"),
            "needs <source pool volume>",
        );
        refused(
            &with(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/virtkube/images/x' volume='ns_clone'/>",
            ),
            "under the images directory or a network volume only",
        );
        // A backing chain is the volume's own, never the caller's.
        refused(
            &with(
                "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='virtkube-main' volume='ns_clone'/><backingStore type='file'><source file='/etc/shadow'/></backingStore>",
            ),
            "backingStore",
        );
        // Without the API, no ImageFile is known.
        let Denied(why) = check_domain_xml(&clone, &pod(), &server_policy(), &no_links()).unwrap_err();
        assert!(
            why.contains("ImageFile disks need a gate that reads ImageFiles"),
            "{why}"
        );
        assert!(uses_volume(&clone, "virtkube-main", "ns_clone"));
        assert!(!uses_volume(&clone, "virtkube-main", "ns_golden"));
    }

    #[test]
    fn what_the_renderer_produces_for_the_caller_is_admitted() {
        let admitted = check_domain_xml(&golden("server"), &pod(), &server_policy(), &no_links()).unwrap();
        assert_eq!(admitted.domain.name, "virtkube-golden_server-0");
        assert_eq!(admitted.domain.uuid, libvirt_wire::protocol::parse_uuid(UID));
        assert_eq!(admitted.memory_kib, 2 * 1024 * 1024);
    }

    #[test]
    fn a_display_is_admitted_only_when_it_listens_nowhere_on_the_node() {
        let served_in_pod = "<graphics type=\"vnc\">\n      <listen type=\"none\"/>\n    </graphics>";
        assert!(golden("server").contains(served_in_pod));
        for (display, expected) in [
            (
                "<graphics type=\"vnc\" autoport=\"yes\">\n      <listen type=\"address\" address=\"0.0.0.0\"/>\n    </graphics>",
                "autoport",
            ),
            (
                "<graphics type=\"vnc\">\n      <listen type=\"address\"/>\n    </graphics>",
                "must listen nowhere on the node",
            ),
            (
                "<graphics type=\"vnc\">\n      <listen type=\"socket\"/>\n    </graphics>",
                "must listen nowhere on the node",
            ),
            ("<graphics type=\"vnc\"/>", "must listen nowhere on the node"),
            (
                "<graphics type=\"spice\">\n      <listen type=\"none\"/>\n    </graphics>",
                "graphics type \"spice\" is not allowed",
            ),
            (
                "<graphics type=\"vnc\" socket=\"/run/x\">\n      <listen type=\"none\"/>\n    </graphics>",
                "attribute socket",
            ),
        ] {
            denied(&golden("server").replace(served_in_pod, display), &pod(), expected);
        }
    }

    #[test]
    fn another_pods_domain_is_refused() {
        let other = Identity::Pod {
            uid: "11111111-2222-3333-4444-555555555555".into(),
        };
        denied(&golden("server"), &other, "must be the calling pod's UID");
        // Forged: the UUID is the caller's but the metadata names another pod.
        let forged = golden("server").replace(
            &format!("<virtkube:uid>{UID}</virtkube:uid>"),
            "<virtkube:uid>11111111-2222-3333-4444-555555555555</virtkube:uid>",
        );
        denied(&forged, &pod(), "metadata must name the calling pod's UID");
        // No UUID at all.
        let no_uuid = golden("server").replace(&format!("<uuid>{UID}</uuid>"), "");
        denied(&no_uuid, &pod(), "must be the calling pod's UID");
    }

    #[test]
    fn host_access_and_extensions_are_refused() {
        let xml = golden("server");
        let with = |extra: &str| xml.replace("<devices>", &format!("<devices>{extra}"));
        denied(
            &with("<hostdev mode='subsystem' type='pci'><source><address bus='0'/></source></hostdev>"),
            &pod(),
            "<hostdev>",
        );
        denied(
            &with("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
            &pod(),
            "<filesystem>",
        );
        denied(
            &xml.replace(
                "</devices>",
                "</devices><qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-x'/></qemu:commandline>",
            ),
            &pod(),
            "namespace http://libvirt.org/schemas/domain/qemu/1.0",
        );
        denied(
            &xml.replace("</devices>", "</devices><seclabel type='none'/>"),
            &pod(),
            "<seclabel>",
        );
        denied(
            &with("<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz'/></disk>"),
            &pod(),
            "dev=\"/dev/sda\"",
        );
        denied(
            &xml.replace(
                "<serial type=\"pty\">",
                "<serial type=\"file\"><source path='/etc/shadow'/>",
            ),
            &pod(),
            "<source> (at domain/devices/serial/source)",
        );
        denied(
            &xml.replace("<interface type=\"user\">", "<interface type=\"direct\">"),
            &pod(),
            "interface type \"direct\"",
        );
        denied(
            &xml.replace("<metadata>", "<metadata><evil xmlns='urn:x'/>"),
            &pod(),
            "may hold only virtkube's instance record",
        );
        denied(
            &xml.replace("<os>", "<os><loader>/etc/shadow</loader>"),
            &pod(),
            "<loader>",
        );
    }

    #[test]
    fn constructs_where_parsers_could_disagree_are_refused() {
        let xml = golden("server");
        denied(
            &xml.replace("/var/lib/virtkube/images/server/root.qcow2", "<!---->/etc/shadow"),
            &pod(),
            "a comment, CDATA, DOCTYPE or processing instruction",
        );
        denied(
            &format!("<?xml version='1.0' encoding='UTF-7'?>{xml}"),
            &pod(),
            "processing instruction",
        );
        denied(
            &xml.replace("</devices>", "</devices><os><kernel>/etc/shadow</kernel></os>"),
            &pod(),
            "<os> (at domain/os) appears more than once",
        );
        denied(
            &xml.replace("<on_crash>destroy</on_crash>", "<on_crash>coredump-restart</on_crash>"),
            &pod(),
            "<on_crash> may be",
        );
        let no_network = check_domain_xml(&xml, &pod(), &Policy::default(), &no_links()).unwrap_err();
        assert!(no_network.0.contains("network disks are not allowed"), "{no_network}");
    }

    #[test]
    fn attributes_the_renderer_never_writes_are_refused() {
        let xml = golden("server");
        denied(
            &xml.replace(
                "<host name=\"nbd.storage.example\" port=\"10809\"/>",
                "<host transport=\"unix\" socket=\"/var/run/libvirt/libvirt-sock\"/>",
            ),
            &pod(),
            "attribute transport=\"unix\" on <host>",
        );
        denied(
            &xml.replace("protocol=\"nbd\"", "protocol=\"http\""),
            &pod(),
            "network disk protocol \"http\" is not allowed",
        );
        denied(
            &xml.replace(
                "<driver name=\"qemu\" type=\"qcow2\"/>",
                "<driver name=\"qemu\" type=\"qcow2\" iothread=\"1\"/>",
            ),
            &pod(),
            "attribute iothread",
        );
        denied(
            &xml.replace(
                "<domain type=\"qemu\">",
                "<domain type=\"qemu\" xmlns:x=\"urn:x\" x:evil=\"1\">",
            ),
            &pod(),
            "attribute evil",
        );
    }

    #[test]
    fn files_must_stay_under_the_roots() {
        let xml = golden("server");
        let disk = |path: &str| xml.replace("/var/lib/virtkube/images/server/root.qcow2", path);
        denied(
            &disk("/etc/shadow"),
            &pod(),
            "outside the directories VM files may come from",
        );
        denied(
            &disk("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            &pod(),
            "outside the directories",
        );
        denied(
            &disk("/var/lib/virtkube/images/../../../etc/shadow"),
            &pod(),
            "without . or ..",
        );
        denied(&disk("relative/disk.qcow2"), &pod(), "must be an absolute path");
        denied(
            &disk("/var/lib/virtkube/imagesX/disk"),
            &pod(),
            "outside the directories",
        );
        // A symbolic link in the images directory that points out.
        let links = FakePaths(BTreeMap::from([(
            PathBuf::from("/var/lib/virtkube/images/server/root.qcow2"),
            PathBuf::from("/etc/shadow"),
        )]));
        let err = check_domain_xml(&xml, &pod(), &server_policy(), &links).unwrap_err();
        assert!(err.0.contains("through a symbolic link"), "{err}");
        // Kernels too.
        let tiny = golden("tiny").replace("/var/lib/virtkube/images/tiny/vmlinuz", "/boot/vmlinuz");
        let tiny_pod = Identity::Pod {
            uid: libvirt_wire::protocol::format_uuid(
                &libvirt_wire::protocol::parse_uuid(
                    roxmltree::Document::parse(&tiny)
                        .ok()
                        .and_then(|d| {
                            d.descendants()
                                .find(|n| n.has_tag_name("uuid"))
                                .and_then(|n| n.text())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default()
                        .as_str(),
                )
                .unwrap_or([0; 16]),
            ),
        };
        denied(&tiny, &tiny_pod, "<kernel> \"/boot/vmlinuz\" is outside");
    }

    #[test]
    fn sizes_over_the_nodes_maxima_are_refused() {
        let xml = golden("server");
        denied(
            &xml.replace(
                "<memory unit=\"KiB\">2097152</memory>",
                "<memory unit=\"KiB\">999999999999</memory>",
            ),
            &pod(),
            "more than this node allows",
        );
        denied(
            &xml.replace("<vcpu placement=\"static\">4</vcpu>", "<vcpu>4096</vcpu>"),
            &pod(),
            "<vcpu> 4096",
        );
        denied(
            &xml.replace("unit=\"KiB\">2097152", "unit=\"GiB\">2"),
            &pod(),
            "must be in KiB",
        );
    }

    #[test]
    fn a_docker_container_may_create_only_a_domain_named_after_it() {
        let id = "0123456789ab".to_owned() + &"c".repeat(52);
        let container = Identity::Container { id };
        let xml = golden("tiny");
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}"));
        let name = doc
            .descendants()
            .find(|n| n.has_tag_name("name"))
            .and_then(|n| n.text())
            .unwrap_or_default()
            .to_owned();
        let unclaimed = {
            let mut s = xml.clone();
            if let (Some(a), Some(b)) = (s.find("<metadata>"), s.find("</metadata>")) {
                s.replace_range(a..b + "</metadata>".len(), "");
            }
            s
        };
        denied(
            &unclaimed,
            &container,
            "must be named after the container (0123456789ab)",
        );
        // (Renamed, its pod tap takes the new name's too.)
        let renamed = unclaimed
            .replace(&format!("<name>{name}</name>"), "<name>0123456789ab</name>")
            .replace(&podnet::tap_name(&name), &podnet::tap_name("0123456789ab"));
        denied(&renamed, &container, "may not choose its <uuid>");
        let uuid_text = doc
            .descendants()
            .find(|n| n.has_tag_name("uuid"))
            .and_then(|n| n.text())
            .unwrap_or_default();
        let without_uuid = renamed.replace(&format!("<uuid>{uuid_text}</uuid>"), "");
        assert!(check_domain_xml(&without_uuid, &container, &Policy::default(), &no_links()).is_ok());
        denied(
            &xml.replace(&format!("<name>{name}</name>"), "<name>0123456789ab</name>"),
            &container,
            "may not claim pod UID",
        );
    }

    #[test]
    fn not_xml_or_not_a_domain_is_refused() {
        denied("<domain", &pod(), "does not parse");
        denied("<network/>", &pod(), "not a <domain>");
        denied("<!DOCTYPE d [<!ENTITY x 'y'>]><domain/>", &pod(), "DOCTYPE");
    }

    #[test]
    fn a_pod_interface_is_admitted_only_as_the_domains_own_new_tap() {
        let xml = golden("tiny");
        let own = podnet::tap_name("virtkube-golden_tiny-0");
        let policy = Policy::default();
        let admitted = check_domain_xml(&xml, &pod(), &policy, &no_links()).unwrap();
        assert_eq!(admitted.pod_tap.as_deref(), Some(own.as_str()));
        let target = format!("<target dev=\"{own}\" managed=\"yes\"/>");
        assert!(xml.contains(&target), "the renderer writes {target}");
        let refused = |xml: &str, expected: &str| match check_domain_xml(xml, &pod(), &policy, &no_links()) {
            Ok(a) => panic!("admitted {a:?}:\n{xml}"),
            Err(Denied(why)) => assert!(why.contains(expected), "expected {expected:?}, got {why:?}"),
        };
        // Another VM's tap, a host link, or a name of the caller's choosing.
        let other = podnet::tap_name("virtkube-golden_other-0");
        for dev in [other.as_str(), "eth0", "docker0", "vnet0"] {
            refused(&xml.replace(&own, dev), "a VM pod may not use another device");
        }
        // An existing device by its own name, or libvirt's default.
        refused(&xml.replace("managed=\"yes\"", "managed=\"no\""), "managed='yes'");
        refused(&xml.replace(" managed=\"yes\"", ""), "managed='yes'");
        refused(&xml.replace(&target, ""), "must name its tap");
        // Host-side set-up libvirt would do as root: a script, host addresses and routes.
        for extra in [
            "<script path='/tmp/x.sh'/>",
            "<ip address='192.168.1.1' prefix='24'/>",
            "<route address='0.0.0.0' gateway='10.0.0.1'/>",
            "<backend tap='/dev/net/tun'/>",
            "<source bridge='br0'/>",
        ] {
            match check_domain_xml(
                &xml.replace(&target, &format!("{target}{extra}")),
                &pod(),
                &policy,
                &no_links(),
            ) {
                Ok(a) => panic!("admitted {extra} as {a:?}"),
                Err(Denied(why)) => assert!(
                    why.contains("not allowed") || why.contains("no <source>"),
                    "{extra}: {why}"
                ),
            }
        }
        // Two pod interfaces; a target on another type; a node that allows none.
        let nic = xml
            .split("<interface")
            .nth(1)
            .unwrap()
            .split("</interface>")
            .next()
            .unwrap();
        let twice = xml.replace("<serial", &format!("<interface{nic}</interface><serial"));
        refused(
            &twice.replace(
                "52:54:00:b9:a3:7e\"/>\n      <target",
                "52:54:00:b9:a3:7f\"/>\n      <target",
            ),
            "one pod interface",
        );
        refused(
            &xml.replace("type=\"ethernet\"", "type=\"user\""),
            "may not name its host device",
        );
        let no_pod = Policy {
            interface_types: vec!["user".into()],
            ..Policy::default()
        };
        let why = check_domain_xml(&xml, &pod(), &no_pod, &no_links()).unwrap_err();
        assert!(why.0.contains("interface type \"pod\" is not allowed"), "{why}");
    }

    #[test]
    fn the_allow_list_is_exactly_the_shims_calls() {
        assert_eq!(allowed_call(procedure::DOMAIN_CREATE_XML), Some("DOMAIN_CREATE_XML"));
        // v2: a reconnecting shim finds its domain by UUID (the relay checks whose it is).
        assert_eq!(
            allowed_call(procedure::DOMAIN_LOOKUP_BY_UUID),
            Some("DOMAIN_LOOKUP_BY_UUID")
        );
        // define, list, lookup by name or ID, XML, metadata, node devices,
        // secrets, storage, sysinfo, resume: refused.
        for refused in [
            11, 12, 14, 22, 23, 25, 26, 28, 34, 35, 55, 56, 74, 77, 146, 203, 213, 249, 264, 265, 273,
        ] {
            assert_eq!(allowed_call(refused), None, "procedure {refused}");
        }
        assert_eq!(ALLOWED_CALLS.len(), 20);
        // v4: operations on the VM and its display; pausing is not the
        // container's (spec.runState, done by nodeinfo), nor is handing
        // QEMU a socket of the caller's (DOMAIN_OPEN_GRAPHICS, 249).
        for (call, name) in [
            (procedure::DOMAIN_REBOOT, "DOMAIN_REBOOT"),
            (procedure::DOMAIN_RESET, "DOMAIN_RESET"),
            (procedure::DOMAIN_SCREENSHOT, "DOMAIN_SCREENSHOT"),
            (procedure::DOMAIN_OPEN_GRAPHICS_FD, "DOMAIN_OPEN_GRAPHICS_FD"),
        ] {
            assert_eq!(allowed_call(call), Some(name));
        }
        // v3: disks passed as descriptors.
        for (call, name) in [
            (procedure::DOMAIN_DEFINE_XML_FLAGS, "DOMAIN_DEFINE_XML_FLAGS"),
            (procedure::DOMAIN_FD_ASSOCIATE, "DOMAIN_FD_ASSOCIATE"),
            (procedure::DOMAIN_CREATE_WITH_FLAGS, "DOMAIN_CREATE_WITH_FLAGS"),
            (procedure::DOMAIN_UNDEFINE_FLAGS, "DOMAIN_UNDEFINE_FLAGS"),
        ] {
            assert_eq!(allowed_call(call), Some(name));
        }
    }

    /// The server template with its system disk (raw) passed as descriptors.
    fn with_fd_disk(source: &str) -> String {
        golden("server")
            .replacen(
                r#"<driver name="qemu" type="qcow2"/>"#,
                r#"<driver name="qemu" type="raw"/>"#,
                1,
            )
            .replace(r#"<source file="/var/lib/virtkube/images/server/root.qcow2"/>"#, source)
    }

    #[test]
    fn disks_passed_as_descriptors_name_their_group_and_no_host_file() {
        let admitted = check_domain_xml(
            &with_fd_disk(r#"<source file="/virtkube-fd/root" fdgroup="root"/>"#),
            &pod(),
            &server_policy(),
            &no_links(),
        )
        .unwrap();
        assert_eq!(admitted.fd_groups, ["root"]);
        // No group: an ordinary host file, under the roots as ever.
        assert_eq!(
            check_domain_xml(&golden("server"), &pod(), &server_policy(), &no_links())
                .unwrap()
                .fd_groups,
            Vec::<String>::new()
        );
        for (source, why) in [
            (
                r#"<source file="/etc/shadow" fdgroup="root"/>"#,
                "must be named /virtkube-fd/root",
            ),
            (
                r#"<source file="/virtkube-fd/../etc" fdgroup="../etc"/>"#,
                "is not a disk name",
            ),
            (r#"<source file="/virtkube-fd/" fdgroup=""/>"#, "is not a disk name"),
            (
                r#"<source file="/virtkube-fd/Root" fdgroup="Root"/>"#,
                "is not a disk name",
            ),
        ] {
            denied(&with_fd_disk(source), &pod(), why);
        }
        // Two disks cannot share a group.
        let twice = with_fd_disk(r#"<source file="/virtkube-fd/root" fdgroup="root"/>"#).replace(
            r#"<source file="/var/lib/virtkube/images/server/install.iso"/>"#,
            r#"<source file="/virtkube-fd/root" fdgroup="root"/>"#,
        );
        denied(&twice, &pod(), "named by two disks");
        // qcow2 could name a backing file on the node, rewritten at will.
        let qcow2 = golden("server").replace(
            r#"<source file="/var/lib/virtkube/images/server/root.qcow2"/>"#,
            r#"<source file="/virtkube-fd/root" fdgroup="root"/>"#,
        );
        denied(&qcow2, &pod(), "must be raw, not qcow2");
    }
}
