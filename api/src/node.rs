//! `VirtNode`: what one host can run, published by virtkube-nodeinfo.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a host can run, published by the virtkube-nodeinfo daemon of the
/// virthost pod on that node. Named after the Kubernetes Node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    doc = "What a host can run, published by virtkube-nodeinfo on that node.",
    version = "v1alpha1",
    kind = "VirtNode",
    plural = "virtnodes",
    shortname = "vn",
    status = "VirtNodeStatus",
    printcolumn = r#"{"name":"Arch","type":"string","jsonPath":".status.arch"}"#,
    printcolumn = r#"{"name":"KVM","type":"boolean","jsonPath":".status.kvm"}"#,
    printcolumn = r#"{"name":"CPUs","type":"integer","jsonPath":".status.cpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".status.memory"}"#,
    printcolumn = r#"{"name":"Domains","type":"integer","jsonPath":".status.domains"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtNodeSpec {
    /// Name of the Kubernetes Node this VirtNode describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// The host's facts as libvirt reports them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtNodeStatus {
    /// Host architecture (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Whether QEMU can use KVM here (a VM with domainType `auto` runs as `kvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<bool>,
    /// Logical host CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Host memory as a Kubernetes quantity (e.g. `24Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Running domains on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<u32>,
    /// libvirt's version (`9.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// The hypervisor's version (`7.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// Host CPU model name and vendor as libvirt reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpu: Option<HostCpu>,
    /// Machine types the hypervisor offers for the host architecture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_types: Vec<String>,
    /// CPU models usable with mode `custom` on this host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_models: Vec<String>,
    /// NUMA cells.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<NumaCell>,
    /// PCI devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_devices: Vec<PciDevice>,
    /// Conditions; `Ready` is true while nodeinfo reaches libvirtd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The host CPU.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostCpu {
    /// Model name (`Skylake-Client-IBRS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Vendor (`Intel`, `AMD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Features of the host-model CPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// One NUMA cell.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NumaCell {
    /// Cell id.
    pub id: u32,
    /// Memory of the cell as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Logical CPUs in the cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Huge pages available in the cell, per page size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hugepages: Vec<HugePages>,
}

/// Huge pages of one size.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HugePages {
    /// Page size in KiB.
    pub size_kib: u64,
    /// Number of pages.
    pub count: u64,
    /// How many of them are free now (libvirt's `virNodeGetFreePages`), as
    /// of the last report; a scheduler reads this, not `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<u64>,
}

/// One PCI device of the host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    /// Address `dddd:bb:ss.f`.
    pub address: String,
    /// Vendor id and name (`0x8086 Intel Corporation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Product id and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// PCI class code (`0x020000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Host driver bound to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// IOMMU group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
}

/// A condition, as in core Kubernetes types.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason for the last transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Last time nodeinfo confirmed this condition (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// Last time the status changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}
