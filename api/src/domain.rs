//! `VirtDomain`: what one VM is doing, published by virtkube-nodeinfo.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a virtkube VM is doing: its libvirt domain on a node. Named after the
/// VM's pod and owned by it, so it is garbage-collected with the pod.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    doc = "What a virtkube VM is doing: its libvirt domain, owned by the VM pod.",
    version = "v1alpha1",
    kind = "VirtDomain",
    plural = "virtdomains",
    shortname = "vd",
    namespaced,
    status = "VirtDomainStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"RunState","type":"string","jsonPath":".spec.runState"}"#,
    printcolumn = r#"{"name":"vCPUs","type":"integer","jsonPath":".status.vcpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".status.memory"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtDomainSpec {
    /// Node whose libvirtd runs the domain.
    pub node: String,
    /// libvirt domain name (`<namespace>_<pod>`).
    pub domain_name: String,
    /// libvirt domain UUID (the pod UID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Name of the owning pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Name of the VirtTemplate the VM was made from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Whether the VM's CPUs should run: `Running` (the default) or
    /// `Paused` (stopped where they are; the guest keeps its memory, its
    /// clock stands still). Set by you (`kubectl patch vd NAME --type merge
    /// -p '{"spec":{"runState":"Paused"}}'`), carried out by the node's
    /// virtkube-nodeinfo; the rest of the VirtDomain is nodeinfo's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_state: Option<RunState>,
}

/// Whether a VM's CPUs should run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunState {
    /// The CPUs run.
    #[default]
    Running,
    /// The CPUs are stopped; memory and devices stay.
    Paused,
}

/// The domain's runtime state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtDomainStatus {
    /// libvirt state: `Running`, `Blocked`, `Paused`, `ShuttingDown`,
    /// `Shutoff`, `Crashed`, `PMSuspended` or `NoState`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why the domain is in that state (libvirt's reason, e.g. `Booted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Guest memory as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU time used, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ns: Option<u64>,
    /// When nodeinfo first saw the domain running (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// The VM's QEMU process and where it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuProcess>,
    /// How many times the VM's shim found its domain again after losing
    /// libvirtd (a restart of the virthost, libvirtd or the gate), as the
    /// gate counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reattachments: Option<u32>,
    /// The VM's disks and where each one's data comes from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DomainDisk>,
    /// The VM's network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<DomainInterface>,
    /// The domain is paused because `spec.runState` asked for it (nodeinfo
    /// resumes only what it paused: a domain paused while it starts is the
    /// gate's, not this field's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_by_request: bool,
}

/// One of a VM's network interfaces.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainInterface {
    /// What it is connected to: `pod` (the pod's network), `user`,
    /// `network` or `bridge`.
    pub network: String,
    /// The guest NIC's MAC address.
    pub mac: String,
    /// How a pod interface joins the pod's network (`masquerade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// The address the shim leases the guest by DHCP (a pod interface),
    /// with its prefix length; from outside, the guest answers at the pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_address: Option<String>,
}

/// One of a VM's disks, as its template gave it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainDisk {
    /// The guest's device name (`vda`, `sda`, …).
    pub target: String,
    /// Where the data comes from: `containerFile` (a file in the VM
    /// container, passed by descriptor), `file` (a file on the node),
    /// `imageFile` (an ImageFile's volume; `path` is `pool/volume`),
    /// `network` or `cloudInit` (the seed the shim built).
    pub source: String,
    /// The file's path (in the VM container, or on the node), the network
    /// address, or the cloud-init directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Where the guest's writes go: `readOnly` (nowhere), `privateCopy` (a
    /// copy that goes with the pod) or `inPlace` (the source itself).
    pub writes: String,
}

/// A VM's QEMU process as the node sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QemuProcess {
    /// Its PID on the node.
    pub pid: u32,
    /// Its cgroup (the memory hierarchy's path on cgroup v1, the unified
    /// one's on v2): the VM pod's once the gate has placed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}
