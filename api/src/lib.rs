//! virtkube's Kubernetes API: the custom resources (group `virtkube.io`,
//! version `v1alpha1`), the label and annotation keys, the XML namespace of
//! virtkube's domain metadata, and the validation that turns a VirtTemplate
//! plus a pod's annotations into a fully resolved, defaulted [`ResolvedTemplate`].
//!
//! Everything here is pure: no I/O, no client. The shim and nodeinfo do the I/O.

pub mod civil;
pub mod crds;
pub mod domain;
pub mod image;
pub mod node;
pub mod overrides;
pub mod podnet;
pub mod quantity;
pub mod resolve;
pub mod template;

pub use domain::{VirtDomain, VirtDomainSpec, VirtDomainStatus};
pub use image::{
    ImageFile, ImageFileSpec, ImageFileStatus, ImageRepository, ImageRepositorySpec, ImageRepositoryStatus,
};
pub use node::{VirtNode, VirtNodeSpec, VirtNodeStatus};
pub use overrides::{OverrideError, Overrides};
pub use resolve::{ResolvedTemplate, TemplateError};
pub use template::{VirtTemplate, VirtTemplateSpec};

/// The API group of every virtkube resource.
pub const GROUP: &str = "virtkube.io";
/// The API version of every virtkube resource.
pub const VERSION: &str = "v1alpha1";

/// XML namespace of the `<metadata>` element virtkube writes into every domain
/// it creates. nodeinfo finds virtkube's domains (and their owner pods) by it.
pub const METADATA_XMLNS: &str = "https://virtkube.io/xmlns/domain/v1alpha1";
/// Escapes text for XML content and attribute values (either quote), for
/// the small documents virtkube writes by hand (libvirt pool and volume
/// XML, the gate's owner record).
pub fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Prefix used for [`METADATA_XMLNS`] in rendered XML.
pub const METADATA_PREFIX: &str = "virtkube";

/// Pod annotation keys understood by the shim.
pub mod annotations {
    /// Name of the VirtTemplate (in the pod's namespace) to run.
    pub const TEMPLATE: &str = "virtkube.io/template";
    /// Memory override, a Kubernetes quantity (`512Mi`, `2Gi`).
    pub const MEMORY: &str = "virtkube.io/memory";
    /// vCPU count override, a positive integer.
    pub const CPUS: &str = "virtkube.io/cpus";
    /// Kernel command line override (replaces the template's).
    pub const CMDLINE: &str = "virtkube.io/cmdline";
    /// MAC address of the first network interface.
    pub const MAC: &str = "virtkube.io/mac";
    /// Cloud-init user-data for this pod (replaces the template's; adds a
    /// `cidata` disk to a template without `cloudInit`).
    pub const USER_DATA: &str = "virtkube.io/user-data";
    /// What the VM needs of its node, for the scheduler extender
    /// (virtkube-sched); the shim ignores it.
    pub const REQUIRES: &str = "virtkube.io/requires";
}

/// Node label keys published by nodeinfo.
pub mod labels {
    /// `"true"` on every node with a virthost (the `virtkube` RuntimeClass
    /// schedules VM pods there).
    pub const VIRTHOST: &str = "virtkube.io/virthost";
    /// `"true"` when the node's QEMU can use KVM.
    pub const KVM: &str = "virtkube.io/kvm";
    /// The host architecture (`x86_64`, `aarch64`).
    pub const ARCH: &str = "virtkube.io/arch";
    /// Prefix (label domain) of one label per usable CPU model.
    pub const CPU_MODEL_DOMAIN: &str = "cpu-model.virtkube.io";
    /// Prefix (label domain) of one label per host CPU feature.
    pub const CPU_FEATURE_DOMAIN: &str = "cpu-feature.virtkube.io";
    /// Prefix (label domain) of one label per supported machine type.
    pub const MACHINE_TYPE_DOMAIN: &str = "machine-type.virtkube.io";
}
