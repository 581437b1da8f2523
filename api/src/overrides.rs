//! Per-pod overrides from annotations (`virtkube.io/memory`, `virtkube.io/cpus`,
//! `virtkube.io/cmdline`, `virtkube.io/mac`, `virtkube.io/user-data`).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::annotations;
use crate::resolve::{self, MacAddr, ResolvedTemplate};

/// A bad override annotation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("annotation {key}: {message}")]
pub struct OverrideError {
    /// The annotation key.
    pub key: String,
    /// What is wrong with its value and what is accepted.
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> OverrideError {
    OverrideError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Overrides parsed from a pod's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Kernel command line (replaces the template's).
    pub cmdline: Option<String>,
    /// MAC of the first interface.
    pub mac: Option<MacAddr>,
    /// Cloud-init user-data.
    pub user_data: Option<String>,
}

const KNOWN: [&str; 7] = [
    annotations::TEMPLATE,
    annotations::REQUIRES,
    annotations::MEMORY,
    annotations::CPUS,
    annotations::CMDLINE,
    annotations::MAC,
    annotations::USER_DATA,
];

impl Overrides {
    /// Reads the override annotations. An unknown `virtkube.io/` key is an
    /// error (a typo must not be silently ignored); other keys are not ours.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Overrides, OverrideError> {
        let mut overrides = Overrides::default();
        for (key, value) in annotations {
            match key.as_str() {
                annotations::MEMORY => {
                    overrides.memory_bytes = Some(resolve::parse_memory(value.trim()).map_err(|m| err(key, m))?);
                }
                annotations::CPUS => {
                    let vcpus: u32 = value
                        .trim()
                        .parse()
                        .map_err(|_| err(key, format!("{value:?} is not a whole number of vCPUs (e.g. 2)")))?;
                    resolve::check_vcpus(vcpus).map_err(|m| err(key, m))?;
                    overrides.vcpus = Some(vcpus);
                }
                annotations::CMDLINE => {
                    resolve::check_cmdline(value).map_err(|m| err(key, m))?;
                    overrides.cmdline = Some(value.clone());
                }
                annotations::MAC => {
                    overrides.mac = Some(MacAddr::parse(value.trim()).map_err(|m| err(key, m))?);
                }
                annotations::USER_DATA => {
                    if value.trim().is_empty() {
                        return Err(err(
                            key,
                            "is empty; give the user-data (a #cloud-config document or a script), or remove the annotation",
                        ));
                    }
                    overrides.user_data = Some(value.clone());
                }
                // The scheduler's business (virtkube-sched), not the VM's.
                annotations::TEMPLATE | annotations::REQUIRES => {}
                other if other.starts_with("virtkube.io/") => {
                    return Err(err(
                        key,
                        format!("is not a virtkube annotation; known: {}", KNOWN.join(", ")),
                    ));
                }
                _ => {}
            }
        }
        Ok(overrides)
    }

    /// Applies the overrides to a resolved template.
    pub fn apply(&self, template: &mut ResolvedTemplate) -> Result<(), OverrideError> {
        if let Some(bytes) = self.memory_bytes {
            template.memory_bytes = bytes;
        }
        if let Some(vcpus) = self.vcpus {
            if let Some(t) = &template.topology {
                let product = u64::from(t.sockets) * u64::from(t.cores) * u64::from(t.threads);
                if product != u64::from(vcpus) {
                    return Err(err(
                        annotations::CPUS,
                        format!(
                            "\"{vcpus}\" does not match the template's topology ({} sockets × {} cores × {} threads = {product}); use a template without topology or {product}",
                            t.sockets, t.cores, t.threads
                        ),
                    ));
                }
            }
            template.vcpus = vcpus;
        }
        if let Some(cmdline) = &self.cmdline {
            if template.kernel.is_none() {
                return Err(err(
                    annotations::CMDLINE,
                    "is set but the template has no boot.kernel; a command line needs direct kernel boot",
                ));
            }
            template.cmdline = Some(cmdline.clone());
        }
        if let Some(mac) = self.mac {
            let Some(first) = template.interfaces.first_mut() else {
                return Err(err(
                    annotations::MAC,
                    format!("\"{mac}\" is set but the template has no interfaces"),
                ));
            };
            first.mac = Some(mac);
            if let Some(index) = template.interfaces.iter().skip(1).position(|nic| nic.mac == Some(mac)) {
                return Err(err(
                    annotations::MAC,
                    format!(
                        "\"{mac}\" is already the MAC of spec.interfaces[{}]; each NIC needs its own",
                        index + 1
                    ),
                ));
            }
        }
        if let Some(user_data) = &self.user_data {
            let existing = template.disks.iter_mut().find_map(|disk| match &mut disk.source {
                resolve::DiskSource::CloudInit(source) => Some(source),
                _ => None,
            });
            match existing {
                Some(source) => source.user_data = Some(user_data.clone()),
                None => template.disks.push(resolve::cloud_init_disk(resolve::CloudInitSource {
                    directory: None,
                    user_data: Some(user_data.clone()),
                })),
            }
        }
        Ok(())
    }
}
