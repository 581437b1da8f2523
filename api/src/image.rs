//! `ImageRepository` and `ImageFile`: VM disk images kept on shared storage
//! that only the virthost pods mount, managed through libvirt's storage API
//! by virtkube-nodeinfo's repository manager. A template's disk names an
//! ImageFile (`imageFile: NAME`); the VM pod never mounts the storage.
//!
//! An ImageRepository is cluster-scoped: its claim lives in the virthost's
//! namespace (only pods of that namespace can mount it, and the virthost
//! pods must), and it is node infrastructure a cluster operator provides,
//! like a StorageClass. ImageFiles are namespaced: they are the users' data,
//! and the gate lets a VM pod use only the ImageFiles of its own namespace.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::node::Condition;

/// Where the virthost mounts repository `name`'s claim.
pub fn mount_path(repository: &str) -> String {
    format!("{REPOSITORIES_DIR}/{repository}")
}

/// The directory under which the virthost mounts every repository.
pub const REPOSITORIES_DIR: &str = "/var/lib/virtkube/repositories";

/// Why `name` cannot name an ImageRepository, if it cannot: the virthost
/// mounts it as a pod volume `repo-NAME`, a DNS label (no dots, at most 63).
pub fn check_repository_name(name: &str) -> Result<(), String> {
    if is_dns_subdomain(name) && !name.contains('.') && name.len() <= 63 - "repo-".len() {
        Ok(())
    } else {
        Err(format!(
            "ImageRepository name {name:?} must be a DNS label of at most 58 characters (lowercase letters, digits, '-'; no '.'): the virthost mounts it as volume repo-NAME"
        ))
    }
}

/// The libvirt storage pool of repository `name`.
pub fn pool_name(repository: &str) -> String {
    format!("virtkube-{repository}")
}

/// The libvirt volume (and file) of ImageFile `namespace/name`: namespaces
/// and names are DNS labels, so the `_` cannot be part of either.
pub fn volume_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

/// The namespace and name of the ImageFile whose volume is `volume`.
pub fn image_file_of_volume(volume: &str) -> Option<(&str, &str)> {
    let (namespace, name) = volume.split_once('_')?;
    (is_dns_subdomain(namespace) && is_dns_subdomain(name)).then_some((namespace, name))
}

/// Whether `s` is a Kubernetes object name (a DNS subdomain): 1–253 of
/// lowercase letters, digits, `-` and `.`, starting and ending alphanumeric.
pub fn is_dns_subdomain(s: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    s.len() <= 253
        && edge(s.as_bytes().first())
        && edge(s.as_bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The finalizer with which the repository manager deletes a volume before
/// its ImageFile goes, and a pool before its ImageRepository goes.
pub const FINALIZER: &str = "virtkube.io/storage";

/// Shared storage for VM disk images: a PersistentVolumeClaim that the
/// virthost pods mount and libvirt manages as a storage pool.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    doc = "Shared storage for VM disk images: a claim the virthost pods mount, managed as a libvirt storage pool.",
    version = "v1alpha1",
    kind = "ImageRepository",
    plural = "imagerepositories",
    shortname = "irepo",
    status = "ImageRepositoryStatus",
    printcolumn = r#"{"name":"Claim","type":"string","jsonPath":".spec.claimName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".status.pool"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageRepositorySpec {
    /// The PersistentVolumeClaim holding the images, in the virthost's
    /// namespace (`virtkube-system`). ReadWriteMany when VMs on several
    /// nodes use it; a local or hostPath volume serves one node.
    pub claim_name: String,
    /// Format of new blank ImageFiles: `qcow2` (default) or `raw`. Clones
    /// are always qcow2; imports are raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// Space given to a new blank ImageFile when it is made: `off`
    /// (default: on first write), `metadata` (qcow2's tables) or `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<Preallocation>,
}

/// What a repository looks like from the nodes that mount it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageRepositoryStatus {
    /// `Pending` (the claim is missing or not mounted yet), `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The libvirt storage pool on each node that mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Where the virthost mounts the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size of the file system (a quantity, e.g. `50Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Space in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// Space left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<String>,
    /// Nodes whose virthost mounts the claim and runs the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// `Ready`: the pool runs on at least one node; its reason says what is
    /// missing when not (`ClaimMissing`, `ClaimNotBound`, `NotMounted`,
    /// `PoolFailed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A VM disk image in a repository: a libvirt storage volume.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    doc = "A VM disk image in an ImageRepository: a libvirt storage volume, blank, cloned or imported.",
    version = "v1alpha1",
    kind = "ImageFile",
    plural = "imagefiles",
    shortname = "ifile",
    namespaced,
    status = "ImageFileStatus",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".status.format"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"OnDisk","type":"string","jsonPath":".status.allocation"}"#,
    printcolumn = r#"{"name":"Backing","type":"string","jsonPath":".spec.backingFile"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageFileSpec {
    /// The ImageRepository holding the volume.
    pub repository: String,
    /// Size the guest sees (a quantity, e.g. `10Gi`). Needed for a blank
    /// image; a clone or an import defaults to its source's size. Raising it
    /// grows the volume while no VM uses it; it never shrinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Format of a blank image: `qcow2` or `raw` (default: the repository's).
    /// A clone is always qcow2, an import always raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// Another ImageFile of this namespace and repository to clone,
    /// copy-on-write: the new image starts as that one and keeps only its
    /// own writes. Many VMs can share one golden image this way; the golden
    /// image is then read-only to VMs and cannot be deleted before its clones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Where the first contents come from (at most one of `source` and `backingFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageSource>,
    /// VMs may attach it read-only only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Several running VMs may write it at once (a cluster file system
    /// inside; QEMU's own locking still applies). Default false: the gate
    /// refuses a second VM writing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shareable: Option<bool>,
}

/// Where an ImageFile's first contents come from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSource {
    /// A file inside a container image (a raw disk image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<ContainerImageSource>,
}

/// A file baked into a container image built `FROM` the virtkube shim base
/// (which serves it to the repository manager while the import runs).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerImageSource {
    /// The container image, e.g. `registry.example/vm/debian:12`.
    pub image: String,
    /// The raw disk image's path inside it, e.g. `/disk/root.raw`.
    pub path: String,
}

/// What an ImageFile is now.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageFileStatus {
    /// `Pending` (waiting for its repository or backing file), `Creating`,
    /// `Ready`, `Failed` or `Deleting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The libvirt storage pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The libvirt volume in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The volume's format (`raw` or `qcow2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Size the guest sees (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Space the volume takes on disk (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// The backing ImageFile the volume was cloned from (kept as made: a
    /// clone's chain does not change with its spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// SHA-256 of an import's bytes, as they were read from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Running VMs using it (`namespace/pod`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// `Ready`, with a reason when not (`RepositoryNotReady`,
    /// `BackingNotReady`, `Importing`, `CreateFailed`, `InUse`,
    /// `HasClones`, `ShrinkRefused`...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A disk image format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Raw image: fastest, no copy-on-write.
    Raw,
    /// QEMU copy-on-write image: sparse, can have a backing file.
    Qcow2,
}

impl ImageFormat {
    /// libvirt's and QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format named `name` by libvirt.
    pub fn parse(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

/// How much space a new blank image takes at once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// None: space is taken on first write.
    Off,
    /// qcow2's tables only.
    Metadata,
    /// All of it.
    Full,
}

/// The volume a VM disk uses for ImageFile `image`, as the shim renders it:
/// (pool, volume, format). Refused, saying what to do, while the ImageFile
/// is not ready or when the disk would write a read-only one.
pub fn volume_for_disk(image: &ImageFile, disk_read_only: bool) -> Result<(String, String, ImageFormat), String> {
    let name = image.metadata.name.as_deref().unwrap_or_default();
    let status = image.status.clone().unwrap_or_default();
    if image.metadata.deletion_timestamp.is_some() {
        return Err(format!("ImageFile {name:?} is being deleted"));
    }
    if status.phase.as_deref() != Some("Ready") {
        let why = status
            .conditions
            .iter()
            .find(|c| c.kind == "Ready")
            .and_then(|c| c.message.clone())
            .unwrap_or_else(|| "the repository manager has not made its volume yet".into());
        return Err(format!(
            "ImageFile {name:?} is not ready (phase {}): {why}",
            status.phase.as_deref().unwrap_or("unset")
        ));
    }
    if image.spec.read_only == Some(true) && !disk_read_only {
        return Err(format!(
            "ImageFile {name:?} is readOnly: set readOnly: true on the disk, or clone it (an ImageFile with backingFile: {name})"
        ));
    }
    match (
        status.pool,
        status.volume,
        status.format.as_deref().and_then(ImageFormat::parse),
    ) {
        (Some(pool), Some(volume), Some(format)) => Ok((pool, volume, format)),
        _ => Err(format!(
            "ImageFile {name:?} is Ready but its status does not name its pool, volume and format; the repository manager wrote an incomplete status"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(read_only: bool) -> ImageFile {
        let mut image = ImageFile::new(
            "golden",
            ImageFileSpec {
                repository: "main".into(),
                read_only: Some(read_only),
                ..Default::default()
            },
        );
        image.status = Some(ImageFileStatus {
            phase: Some("Ready".into()),
            pool: Some("virtkube-main".into()),
            volume: Some("team_golden".into()),
            format: Some("qcow2".into()),
            ..Default::default()
        });
        image
    }

    #[test]
    fn a_disk_gets_the_volume_of_a_ready_image_file_only() {
        assert_eq!(
            volume_for_disk(&ready(false), false),
            Ok(("virtkube-main".into(), "team_golden".into(), ImageFormat::Qcow2))
        );
        let error = volume_for_disk(&ready(true), false).unwrap_err();
        assert!(error.contains("readOnly: set readOnly: true on the disk"), "{error}");
        assert!(volume_for_disk(&ready(true), true).is_ok());
        let mut creating = ready(false);
        if let Some(status) = creating.status.as_mut() {
            status.phase = Some("Creating".into());
            status.conditions = vec![Condition {
                kind: "Ready".into(),
                status: "False".into(),
                reason: Some("Importing".into()),
                message: Some("importing from pod team/golden-import".into()),
                ..Default::default()
            }];
        }
        let error = volume_for_disk(&creating, false).unwrap_err();
        assert!(
            error.contains("not ready (phase Creating): importing from pod"),
            "{error}"
        );
        let mut incomplete = ready(false);
        if let Some(status) = incomplete.status.as_mut() {
            status.format = Some("vmdk".into());
        }
        assert!(
            volume_for_disk(&incomplete, false)
                .unwrap_err()
                .contains("incomplete status")
        );
        let mut unset = ready(false);
        unset.status = None;
        assert!(volume_for_disk(&unset, false).unwrap_err().contains("phase unset"));
    }

    #[test]
    fn a_volume_names_exactly_one_image_file() {
        assert_eq!(volume_name("team-a", "golden"), "team-a_golden");
        assert_eq!(image_file_of_volume("team-a_golden"), Some(("team-a", "golden")));
        for bad in [
            "golden",
            "_golden",
            "team-a_",
            "team_a_golden",
            "Team_x",
            "a_b/../c",
            "a_b c",
            "a_-b",
            "a_..",
        ] {
            assert_eq!(image_file_of_volume(bad), None, "{bad:?}");
        }
        assert_eq!(pool_name("main"), "virtkube-main");
        assert!(check_repository_name("main").is_ok());
        assert!(check_repository_name(&"a".repeat(58)).is_ok());
        for bad in ["images.example", "", "-x", &"a".repeat(59)] {
            assert!(check_repository_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(mount_path("main"), "/var/lib/virtkube/repositories/main");
    }
}
