//! What a VM pod needs of its node. Pure: from the pod's annotations and,
//! when it names one, its VirtTemplate.
//!
//! The scheduler sees the pod, not the image: a template baked into a VM
//! image is invisible to it. So a VM pod says what it needs in one of two
//! ways (docs/scheduling.md):
//! - `virtkube.io/template: NAME` names a VirtTemplate in its namespace,
//!   whose machine (domain type, arch, CPU, machine type, memory) is read,
//!   with the pod's override annotations (`virtkube.io/memory`, …) applied,
//!   as the shim will;
//! - `virtkube.io/requires` lists needs directly, for an image's baked
//!   template: `kvm, arch=x86_64, cpu-model=Skylake-Client,
//!   cpu-feature=avx512f, machine=pc-q35-7.2, memory=4Gi,
//!   hugepages-2Mi=512, pci=8086:1572`.
//!
//! Both may be given; the needs add up. A pod with neither is not a VM pod
//! (or one that needs nothing): every node passes, at once.

use std::collections::BTreeMap;

use virtkube_api::VirtTemplateSpec;
use virtkube_api::template::{CpuFeaturePolicy, CpuMode, DomainType};

/// The annotation naming a VirtTemplate in the pod's namespace.
pub const TEMPLATE_ANNOTATION: &str = virtkube_api::annotations::TEMPLATE;
/// The annotation listing needs directly.
pub const REQUIRES_ANNOTATION: &str = virtkube_api::annotations::REQUIRES;

/// The most items `virtkube.io/requires` may list (each costs every call).
pub const MAX_REQUIRES_ITEMS: usize = 64;

/// What a VM needs of its node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// KVM (domain type `kvm`, or a host-passthrough CPU).
    pub kvm: bool,
    /// The host architecture.
    pub arch: Option<String>,
    /// A CPU model usable in `custom` mode.
    pub cpu_model: Option<String>,
    /// CPU features the host CPU must have.
    pub cpu_features: Vec<String>,
    /// CPU features the host CPU must not have (a template's `forbid`).
    pub forbidden_features: Vec<String>,
    /// A machine type the hypervisor offers.
    pub machine: Option<String>,
    /// Guest memory, in bytes: it must fit in the host's memory.
    pub memory_bytes: Option<u64>,
    /// Huge pages: (page size in KiB, count) on one NUMA cell.
    pub hugepages: Option<(u64, u64)>,
    /// PCI devices by `vendor:device` (hex, as `lspci -n` prints them).
    pub pci: Vec<String>,
}

impl Requirements {
    /// Whether it asks nothing of a node.
    pub fn is_empty(&self) -> bool {
        self == &Requirements::default()
    }

    fn add(&mut self, other: Requirements) {
        self.kvm |= other.kvm;
        self.arch = other.arch.or(self.arch.take());
        self.cpu_model = other.cpu_model.or(self.cpu_model.take());
        self.machine = other.machine.or(self.machine.take());
        self.memory_bytes = other.memory_bytes.or(self.memory_bytes);
        self.hugepages = other.hugepages.or(self.hugepages);
        for feature in other.cpu_features {
            if !self.cpu_features.contains(&feature) {
                self.cpu_features.push(feature);
            }
        }
        for feature in other.forbidden_features {
            if !self.forbidden_features.contains(&feature) {
                self.forbidden_features.push(feature);
            }
        }
        for device in other.pci {
            if !self.pci.contains(&device) {
                self.pci.push(device);
            }
        }
    }
}

/// Why a pod's needs cannot be known: said on every node's refusal, so the
/// pod's `FailedScheduling` event tells what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequirementsError {
    /// `virtkube.io/requires` does not parse.
    #[error("annotation virtkube.io/requires: {0}")]
    Requires(String),
    /// The named template does not exist (yet).
    #[error(
        "VirtTemplate {namespace}/{name} (annotation virtkube.io/template) does not exist; create it, or fix the annotation"
    )]
    NoTemplate { namespace: String, name: String },
    /// The template or the pod's overrides are invalid (the shim would fail too).
    #[error("VirtTemplate {namespace}/{name}: {why}")]
    BadTemplate {
        namespace: String,
        name: String,
        why: String,
    },
}

/// A VM pod's needs. `template` looks a VirtTemplate up by namespace and name.
pub fn of_pod(
    namespace: &str,
    annotations: &BTreeMap<String, String>,
    template: impl Fn(&str, &str) -> Option<VirtTemplateSpec>,
) -> Result<Requirements, RequirementsError> {
    let mut needs = Requirements::default();
    if let Some(name) = annotations.get(TEMPLATE_ANNOTATION) {
        let spec = template(namespace, name).ok_or_else(|| RequirementsError::NoTemplate {
            namespace: namespace.to_owned(),
            name: name.clone(),
        })?;
        needs.add(of_template(namespace, name, &spec, annotations)?);
    }
    if let Some(text) = annotations.get(REQUIRES_ANNOTATION) {
        needs.add(parse_requires(text).map_err(RequirementsError::Requires)?);
    }
    Ok(needs)
}

/// The needs of a template, with the pod's overrides applied.
fn of_template(
    namespace: &str,
    name: &str,
    spec: &VirtTemplateSpec,
    annotations: &BTreeMap<String, String>,
) -> Result<Requirements, RequirementsError> {
    let bad = |why: String| RequirementsError::BadTemplate {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        why,
    };
    let mut resolved = virtkube_api::resolve::resolve(Some(name.to_owned()), spec).map_err(|e| bad(e.to_string()))?;
    virtkube_api::overrides::Overrides::from_annotations(annotations)
        .and_then(|o| o.apply(&mut resolved))
        .map_err(|e| bad(e.to_string()))?;
    Ok(Requirements {
        kvm: resolved.domain_type == DomainType::Kvm || resolved.cpu_mode == Some(CpuMode::HostPassthrough),
        arch: Some(resolved.arch.as_str().to_owned()),
        cpu_model: resolved
            .cpu_model
            .clone()
            .filter(|_| resolved.cpu_mode == Some(CpuMode::Custom)),
        cpu_features: resolved
            .cpu_features
            .iter()
            // `force` gives the guest a feature the host may lack: no need.
            .filter(|(_, policy)| *policy == CpuFeaturePolicy::Require)
            .map(|(name, _)| name.clone())
            .collect(),
        forbidden_features: resolved
            .cpu_features
            .iter()
            .filter(|(_, policy)| *policy == CpuFeaturePolicy::Forbid)
            .map(|(name, _)| name.clone())
            .collect(),
        machine: resolved.machine.clone(),
        memory_bytes: Some(resolved.memory_bytes),
        hugepages: None,
        pci: Vec::new(),
    })
}

/// Parses `virtkube.io/requires`: comma-separated `kvm` and `key=value`.
pub fn parse_requires(text: &str) -> Result<Requirements, String> {
    let mut needs = Requirements::default();
    let items: Vec<&str> = text.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
    if items.len() > MAX_REQUIRES_ITEMS {
        return Err(format!("{} items; at most {MAX_REQUIRES_ITEMS}", items.len()));
    }
    for item in items {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim())),
            None => (item, None),
        };
        let value = |what: &str| {
            value
                .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic()))
                .map(str::to_owned)
                .ok_or_else(|| format!("{key:?} needs a value ({key}={what})"))
        };
        match key {
            "kvm" if item == "kvm" => needs.kvm = true,
            "kvm" => return Err(format!("{item:?}: kvm takes no value (write just kvm)")),
            "arch" => {
                let arch = value("x86_64")?;
                if !matches!(arch.as_str(), "x86_64" | "aarch64") {
                    return Err(format!("arch {arch:?} is not one virtkube runs (x86_64, aarch64)"));
                }
                needs.arch = Some(arch);
            }
            "cpu-model" => needs.cpu_model = Some(value("Skylake-Client")?),
            "cpu-feature" => needs.cpu_features.push(value("avx512f")?),
            "machine" => needs.machine = Some(value("pc-q35-7.2")?),
            "memory" => {
                let text = value("4Gi")?;
                let bytes = virtkube_api::quantity::parse_bytes(&text).map_err(|e| format!("memory={text:?} {e}"))?;
                needs.memory_bytes = Some(bytes);
            }
            huge if huge.starts_with("hugepages-") => {
                let size = &huge["hugepages-".len()..];
                let size_kib = match size {
                    "2Mi" => 2048,
                    "1Gi" => 1024 * 1024,
                    other => return Err(format!("huge page size {other:?} is not 2Mi or 1Gi")),
                };
                let count = value("512")?
                    .parse::<u64>()
                    .map_err(|_| format!("{huge} needs a whole number of pages"))?;
                needs.hugepages = Some((size_kib, count));
            }
            "pci" => {
                let id = value("8086:1572")?.to_ascii_lowercase();
                let hex4 = |s: &str| s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit());
                match id.split_once(':') {
                    Some((vendor, device)) if hex4(vendor) && hex4(device) => needs.pci.push(id),
                    _ => return Err(format!("pci={id:?} is not vendor:device in hex (8086:1572)")),
                }
            }
            _ => {
                return Err(format!(
                    "{item:?} is not a need virtkube knows; use kvm, arch=, cpu-model=, cpu-feature=, machine=, memory=, hugepages-2Mi=, hugepages-1Gi=, pci="
                ));
            }
        }
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn template(yaml: &str) -> VirtTemplateSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn the_requires_annotation_lists_every_kind_of_need() {
        let needs = parse_requires(
            "kvm, arch=x86_64, cpu-model=Skylake-Client, cpu-feature=avx512f, cpu-feature=vmx, machine=pc-q35-7.2, memory=4Gi, hugepages-2Mi=512, pci=8086:1572",
        )
        .unwrap();
        assert_eq!(
            needs,
            Requirements {
                kvm: true,
                arch: Some("x86_64".into()),
                cpu_model: Some("Skylake-Client".into()),
                cpu_features: vec!["avx512f".into(), "vmx".into()],
                machine: Some("pc-q35-7.2".into()),
                memory_bytes: Some(4 << 30),
                hugepages: Some((2048, 512)),
                pci: vec!["8086:1572".into()],
                forbidden_features: Vec::new(),
            }
        );
        assert!(parse_requires("").unwrap().is_empty());
    }

    #[test]
    fn a_bad_requires_annotation_says_what_is_wrong() {
        for (text, expected) in [
            ("gpu", "not a need virtkube knows"),
            ("kvm=yes", "kvm takes no value"),
            ("arch=riscv64", "not one virtkube runs"),
            ("memory=lots", "memory=\"lots\""),
            ("hugepages-4Ki=1", "not 2Mi or 1Gi"),
            ("hugepages-2Mi=many", "whole number"),
            ("pci=intel", "vendor:device"),
            ("machine=", "needs a value"),
            ("cpu-feature=a b", "needs a value"),
        ] {
            let why = parse_requires(text).unwrap_err();
            assert!(why.contains(expected), "{text}: {why}");
        }
    }

    #[test]
    fn a_named_template_gives_its_machine_with_the_pods_overrides() {
        let spec = template(
            "arch: x86_64\ndomainType: kvm\nmachine: pc-q35-7.2\nmemory: 1Gi\ncpu: {mode: custom, model: Skylake-Client, features: [{name: avx512f, policy: require}, {name: vmx, policy: disable}]}\n",
        );
        let pod = annotations(&[(TEMPLATE_ANNOTATION, "big"), ("virtkube.io/memory", "2Gi")]);
        let needs = of_pod("team", &pod, |ns, name| {
            (ns == "team" && name == "big").then(|| spec.clone())
        })
        .unwrap();
        assert!(needs.kvm);
        assert_eq!(needs.arch.as_deref(), Some("x86_64"));
        assert_eq!(needs.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(needs.cpu_model.as_deref(), Some("Skylake-Client"));
        assert_eq!(
            needs.cpu_features,
            vec!["avx512f".to_owned()],
            "a disabled feature is not needed"
        );
        assert!(needs.forbidden_features.is_empty());
        assert_eq!(needs.memory_bytes, Some(2 << 30), "the pod's override");
        // An auto domain type runs anywhere (as qemu where KVM is missing).
        let auto = template("memory: 128Mi\n");
        let needs = of_pod("team", &annotations(&[(TEMPLATE_ANNOTATION, "t")]), |_, _| {
            Some(auto.clone())
        })
        .unwrap();
        assert!(!needs.kvm);
    }

    #[test]
    fn a_template_and_the_requires_annotation_add_up() {
        let pod = annotations(&[(TEMPLATE_ANNOTATION, "t"), (REQUIRES_ANNOTATION, "kvm, pci=8086:1572")]);
        let needs = of_pod("team", &pod, |_, _| Some(template("memory: 128Mi\n"))).unwrap();
        assert!(
            needs.kvm && needs.pci == ["8086:1572"] && needs.memory_bytes == Some(128 << 20),
            "{needs:?}"
        );
    }

    #[test]
    fn a_missing_or_broken_template_is_the_pods_reason() {
        let pod = annotations(&[(TEMPLATE_ANNOTATION, "gone")]);
        let why = of_pod("team", &pod, |_, _| None).unwrap_err();
        assert!(why.to_string().contains("VirtTemplate team/gone"), "{why}");
        let pod = annotations(&[(TEMPLATE_ANNOTATION, "t"), ("virtkube.io/cpus", "lots")]);
        let why = of_pod("team", &pod, |_, _| Some(template("memory: 128Mi\n"))).unwrap_err();
        assert!(why.to_string().contains("virtkube.io/cpus"), "{why}");
        // Not a VM pod: no needs, no lookups.
        let needs = of_pod("team", &BTreeMap::new(), |_, _| panic!("looked up a template")).unwrap();
        assert!(needs.is_empty());
    }
}
