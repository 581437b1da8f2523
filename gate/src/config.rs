//! The gate's policy file: what the node's operator allows VM containers,
//! kept in a ConfigMap (`deploy/03-virthost.yaml` mounts it at
//! `/etc/virtkube/gate.yaml`). Every field is optional; a field left out keeps
//! the built-in default, and a command-line flag overrides the file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::relay::Gate;

/// The largest policy file the gate reads.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// The policy file as written (YAML; camelCase keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GateConfig {
    /// Directories VM files (kernels, initrds, disks) may come from.
    pub images_roots: Option<Vec<PathBuf>>,
    /// Most memory one VM may have, in KiB.
    pub max_memory_kib: Option<u64>,
    /// Most vCPUs one VM may have.
    pub max_vcpus: Option<u32>,
    /// Interface types VMs may use.
    pub interface_types: Option<Vec<String>>,
    /// Connection URIs VMs may open.
    pub uris: Option<Vec<String>>,
    /// `allow` or `deny`: network disks (nbd, rbd, iscsi) with the node's credentials.
    pub network_disks: Option<String>,
    /// The cgroup the kubelet's kubepods cgroup is under (its `--cgroup-root`).
    pub kubepods_parent: Option<String>,
    /// Most connections one pod or container may hold at once.
    pub max_connections_per_caller: Option<usize>,
    /// QEMU's memory beyond the guest's, in MiB (the RuntimeClass's overhead).
    pub qemu_overhead_mib: Option<u64>,
}

/// A policy file the gate will not run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Larger than [`MAX_CONFIG_BYTES`].
    #[error("the gate's policy file is larger than {MAX_CONFIG_BYTES} bytes, the most it reads")]
    TooLarge(usize),
    /// Not YAML, or a key or value of the wrong kind.
    #[error(
        "the gate's policy file is not valid: {0} (keys: imagesRoots, maxMemoryKib, maxVcpus, interfaceTypes, uris, networkDisks, kubepodsParent, maxConnectionsPerCaller, qemuOverheadMib)"
    )]
    Syntax(String),
    /// A value that parses but cannot be a policy.
    #[error("the gate's policy file: {0}")]
    Value(String),
}

impl GateConfig {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<GateConfig, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(text.len()));
        }
        if text.trim().is_empty() {
            return Ok(GateConfig::default());
        }
        let mut budget = serde_saphyr::Budget::default();
        budget.max_depth = 8;
        budget.max_nodes = 10_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        options.with_snippet = false;
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Applies the file onto the gate's settings.
    pub fn apply(self, gate: &mut Gate) -> Result<(), ConfigError> {
        let policy = &mut gate.policy;
        if let Some(roots) = self.images_roots {
            policy.roots = checked_roots(roots).map_err(ConfigError::Value)?;
        }
        if let Some(kib) = self.max_memory_kib {
            policy.max_memory_kib = kib;
        }
        if let Some(vcpus) = self.max_vcpus {
            policy.max_vcpus = vcpus;
        }
        if let Some(types) = self.interface_types {
            policy.interface_types = types;
        }
        if let Some(uris) = self.uris {
            if uris.is_empty() {
                return Err(ConfigError::Value(
                    "uris is empty: no VM could connect; leave it out for the default".into(),
                ));
            }
            policy.uris = uris;
        }
        if let Some(choice) = self.network_disks {
            policy.network_disks = network_disks(&choice).map_err(ConfigError::Value)?;
        }
        if let Some(parent) = self.kubepods_parent {
            if !parent.starts_with('/') {
                return Err(ConfigError::Value(format!(
                    "kubepodsParent {parent:?} is not an absolute cgroup path (the kubelet's --cgroup-root, e.g. /)"
                )));
            }
            gate.kubepods_parent = parent;
        }
        if let Some(mib) = self.qemu_overhead_mib {
            gate.qemu_overhead = mib
                .checked_mul(1024 * 1024)
                .ok_or_else(|| ConfigError::Value(format!("qemuOverheadMib {mib} is too large")))?;
        }
        match self.max_connections_per_caller {
            Some(0) => {
                return Err(ConfigError::Value(
                    "maxConnectionsPerCaller 0 would refuse every VM container".into(),
                ));
            }
            Some(max) => gate.max_connections_per_caller = max,
            None => {}
        }
        Ok(())
    }
}

/// Roots must be absolute: a relative one would depend on the gate's working directory.
pub fn checked_roots(roots: Vec<PathBuf>) -> Result<Vec<PathBuf>, String> {
    if roots.is_empty() {
        return Err("no images root: every VM file would be refused; leave it out for the default".into());
    }
    match roots.iter().find(|r| !r.is_absolute()) {
        Some(relative) => Err(format!("images root {} is not an absolute path", relative.display())),
        None => Ok(roots),
    }
}

/// `allow` or `deny`.
pub fn network_disks(choice: &str) -> Result<bool, String> {
    match choice {
        "allow" => Ok(true),
        "deny" => Ok(false),
        other => Err(format!("networkDisks {other:?}: use allow or deny")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::Policy;

    fn applied(text: &str) -> Result<(Policy, String), ConfigError> {
        let mut gate = Gate::default();
        GateConfig::parse(text)?.apply(&mut gate)?;
        Ok((gate.policy, gate.kubepods_parent))
    }

    #[test]
    fn an_empty_file_keeps_the_defaults() {
        let (policy, parent) = applied("").unwrap();
        assert_eq!(policy.max_vcpus, Policy::default().max_vcpus);
        assert_eq!(parent, "/");
    }

    #[test]
    fn every_field_applies() {
        let (policy, parent) = applied(
            "imagesRoots: [/srv/vm]\nmaxMemoryKib: 1048576\nmaxVcpus: 2\ninterfaceTypes: [user]\n\
             uris: ['qemu:///system']\nnetworkDisks: allow\nkubepodsParent: /k8s\n",
        )
        .unwrap();
        assert_eq!(policy.roots, vec![PathBuf::from("/srv/vm")]);
        assert_eq!((policy.max_memory_kib, policy.max_vcpus), (1_048_576, 2));
        assert_eq!(policy.interface_types, vec!["user".to_owned()]);
        assert!(policy.network_disks);
        assert_eq!(parent, "/k8s");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, needle) in [
            ("maxVCPUs: 2\n", "unknown field"),
            ("maxVcpus: lots\n", "maxVcpus"),
            ("networkDisks: maybe\n", "use allow or deny"),
            ("imagesRoots: [images]\n", "not an absolute path"),
            ("imagesRoots: []\n", "no images root"),
            ("uris: []\n", "uris is empty"),
            ("maxConnectionsPerCaller: 0\n", "would refuse every VM container"),
            ("kubepodsParent: kubepods\n", "not an absolute cgroup path"),
            ("[1, 2]\n", "not valid"),
        ] {
            let e = applied(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let huge = "#".repeat(MAX_CONFIG_BYTES + 1);
        assert!(matches!(applied(&huge), Err(ConfigError::TooLarge(_))));
    }
}
