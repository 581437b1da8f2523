//! The repository manager's pure part: the libvirt XML of a repository's
//! pool and an ImageFile's volume, which volumes running domains use, the
//! import's HTTP reply head, and what to do next for an ImageFile
//! ([`next_step`]). The I/O is in [`crate::images`].

use virtkube_api::image::{ImageFile, ImageFormat, Preallocation};
use virtkube_api::quantity::parse_bytes;
use virtkube_api::xml_escape as escape;

/// A `dir` storage pool on the repository's mount.
pub fn pool_xml(name: &str, path: &str) -> String {
    format!(
        "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
        escape(name),
        escape(path)
    )
}

/// A new volume: blank, or copy-on-write over `backing` (path, format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    /// The volume's (and file's) name.
    pub name: String,
    /// Size the guest sees, in bytes.
    pub capacity: u64,
    /// Its format.
    pub format: ImageFormat,
    /// Space to take at once.
    pub preallocation: Preallocation,
    /// The volume it is a copy-on-write clone of: (path, format).
    pub backing: Option<(String, ImageFormat)>,
    /// The user and group QEMU runs as, who must own it (libvirt's
    /// `dynamic_ownership` is off in the virthost); None: root's.
    pub owner: Option<(u32, u32)>,
}

/// The uid and gid of `user` in an `/etc/passwd` text.
pub fn user_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [name, _, uid, gid, ..] if *name == user => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    })
}

/// libvirt's flag to preallocate qcow2's metadata (VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA).
pub const PREALLOC_METADATA: u32 = 1;

impl VolumePlan {
    /// The volume XML and the create flags.
    pub fn xml(&self) -> (String, u32) {
        let allocation = match self.preallocation {
            Preallocation::Full if self.backing.is_none() => self.capacity,
            _ => 0,
        };
        let backing = self.backing.as_ref().map_or_else(String::new, |(path, format)| {
            format!(
                "<backingStore><path>{}</path><format type='{}'/></backingStore>",
                escape(path),
                format.as_str()
            )
        });
        let owner = self.owner.map_or_else(String::new, |(uid, gid)| {
            format!("<owner>{uid}</owner><group>{gid}</group>")
        });
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><allocation unit='bytes'>{allocation}</allocation><target><format type='{}'/><permissions><mode>0640</mode>{owner}</permissions></target>{backing}</volume>",
            escape(&self.name),
            self.capacity,
            self.format.as_str(),
        );
        let flags = if self.preallocation == Preallocation::Metadata && self.format == ImageFormat::Qcow2 {
            PREALLOC_METADATA
        } else {
            0
        };
        (xml, flags)
    }
}

/// What one running domain's disks reach: pool volumes and files, its
/// backing chains included (a clone in use holds its golden image too).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiskUse {
    /// `(pool, volume)` of `<source pool volume>`.
    pub volumes: Vec<(String, String)>,
    /// `<source file>` anywhere in a disk or its `<backingStore>`.
    pub files: Vec<String>,
    /// The volumes of disks that are not read-only (their own source, not
    /// their backing chain, which QEMU only reads).
    pub written_volumes: Vec<(String, String)>,
    /// The files of disks that are not read-only.
    pub written_files: Vec<String>,
}

/// The volumes and files a domain's (live) XML says its disks use.
pub fn disk_use(domain_xml: &str) -> Result<DiskUse, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut uses = DiskUse::default();
    let disks = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk") && n.tag_name().namespace().is_none());
    for disk in disks {
        let read_only = disk.children().any(|c| c.has_tag_name("readonly"));
        if let Some(source) = disk.children().find(|c| c.has_tag_name("source"))
            && !read_only
        {
            if let (Some(pool), Some(volume)) = (source.attribute("pool"), source.attribute("volume")) {
                uses.written_volumes.push((pool.to_owned(), volume.to_owned()));
            }
            if let Some(file) = source.attribute("file") {
                uses.written_files.push(file.to_owned());
            }
        }
        for source in disk.descendants().filter(|n| n.has_tag_name("source")) {
            if let (Some(pool), Some(volume)) = (source.attribute("pool"), source.attribute("volume")) {
                uses.volumes.push((pool.to_owned(), volume.to_owned()));
            }
            if let Some(file) = source.attribute("file") {
                uses.files.push(file.to_owned());
            }
        }
    }
    Ok(uses)
}

/// Whether `path` is a mount point in `mountinfo` (`/proc/self/mountinfo`).
pub fn is_mount_point(mountinfo: &str, path: &str) -> bool {
    let escaped = path.replace(' ', "\\040");
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(escaped.as_str()))
}

/// How long a node's VirtNode heartbeat may be old before the node no
/// longer counts as mounting a repository (nodeinfo beats every 30 s).
pub const HEARTBEAT_LIMIT_SECS: i64 = 90;

/// How old a heartbeat may be when nodeinfo beats every `resync`: three
/// beats, and never less than [`HEARTBEAT_LIMIT_SECS`].
pub fn heartbeat_limit(resync: std::time::Duration) -> i64 {
    i64::try_from(resync.as_secs().saturating_mul(3))
        .unwrap_or(i64::MAX)
        .max(HEARTBEAT_LIMIT_SECS)
}

/// Whether VirtNode `node` is Ready with a heartbeat at most `limit`
/// seconds old at `now`: a node whose virthost is gone for good must not
/// stay the manager of a repository's volumes.
pub fn node_alive(node: &virtkube_api::VirtNode, now: k8s_openapi::jiff::Timestamp, limit: i64) -> bool {
    let Some(ready) = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == "Ready"))
    else {
        return false;
    };
    let beat = ready
        .last_heartbeat_time
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    ready.status == "True" && beat.is_some_and(|b| (now.as_second() - b.as_second()).abs() <= limit)
}

/// The pod a virtkube domain (`<namespace>_<pod>`) belongs to, as `namespace/pod`.
pub fn pod_of_domain(domain: &str) -> String {
    match domain.split_once('_') {
        Some((namespace, pod)) => format!("{namespace}/{pod}"),
        None => domain.to_owned(),
    }
}

/// The length an import serves, from its HTTP reply head: a `200` with a
/// `Content-Length`.
pub fn import_length(head: &str) -> Result<u64, String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/1.") || code != "200" {
        return Err(format!("the import pod answered {status:?}, not 200"));
    }
    lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .ok_or("the import pod's reply has no Content-Length".to_owned())?
        .1
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("the import pod's Content-Length is not a number: {e}"))
}

/// What the volume looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeNow {
    /// Size the guest sees.
    pub capacity: u64,
    /// Space on disk.
    pub allocation: u64,
    /// Its path in the pool.
    pub path: String,
}

/// A backing ImageFile as the clone sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Not named.
    None,
    /// Named, but missing or not ready: why.
    NotReady(String),
    /// Ready: its volume's path, format and capacity.
    Ready(String, ImageFormat, u64),
}

/// Everything [`next_step`] decides on.
#[derive(Debug, Clone)]
pub struct Situation {
    /// The ImageFile's volume name.
    pub volume_name: String,
    /// Who must own new volumes (QEMU's user and group).
    pub owner: Option<(u32, u32)>,
    /// The repository's pool when it runs here: (pool, repository format, preallocation).
    pub pool: Result<(String, ImageFormat, Preallocation), String>,
    /// The volume, when it exists.
    pub volume: Option<VolumeNow>,
    /// The backing ImageFile.
    pub backing: Backing,
    /// Running VMs using the volume (`namespace/pod`).
    pub users: Vec<String>,
    /// ImageFiles cloned from this one.
    pub clones: Vec<String>,
    /// Whether a volume was ever begun for it (its pool is recorded in the
    /// status before the volume is made): without one, deletion has nothing
    /// to wait for.
    pub begun: bool,
}

/// What the manager does next for an ImageFile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Put the finalizer on first, so no volume is ever left behind.
    AddFinalizer,
    /// Not yet: a phase, a reason and a message for the status.
    Wait {
        /// The phase to show.
        phase: &'static str,
        /// Machine-readable reason.
        reason: &'static str,
        /// What is missing, for a person.
        message: String,
    },
    /// Cannot be done as asked: the status says why; nothing is changed.
    Fail {
        /// Machine-readable reason.
        reason: &'static str,
        /// What to fix.
        message: String,
    },
    /// Make the volume.
    Create(VolumePlan),
    /// Make the volume from the container image's file.
    Import,
    /// Delete a volume an earlier import left half-written, then import again.
    DiscardPartialImport,
    /// Grow the volume to this many bytes.
    Resize(u64),
    /// Delete the volume (the ImageFile is being deleted and nothing uses it).
    DeleteVolume,
    /// The volume is gone: let the ImageFile go.
    RemoveFinalizer,
    /// All is as asked.
    Ready,
}

/// Decides the next step for `file` in `now`.
pub fn next_step(file: &ImageFile, now: &Situation, has_finalizer: bool) -> Step {
    let name = file.metadata.name.clone().unwrap_or_default();
    let deleting = file.metadata.deletion_timestamp.is_some();
    if deleting {
        if !has_finalizer {
            return Step::Ready;
        }
        if !now.begun {
            return Step::RemoveFinalizer;
        }
        // Without its pool the volume cannot be seen: letting the ImageFile
        // go would leave the file behind, for a later one of the same name.
        if let Err(why) = &now.pool {
            return Step::Wait {
                phase: "Deleting",
                reason: "RepositoryNotReady",
                message: format!("deletion waits for the repository: {why}"),
            };
        }
        if !now.users.is_empty() {
            return Step::Wait {
                phase: "Deleting",
                reason: "InUse",
                message: format!(
                    "deletion waits: running VMs use it ({}); delete them first",
                    now.users.join(", ")
                ),
            };
        }
        if !now.clones.is_empty() {
            return Step::Wait {
                phase: "Deleting",
                reason: "HasClones",
                message: format!(
                    "deletion waits: ImageFiles are cloned from it ({}); delete them first",
                    now.clones.join(", ")
                ),
            };
        }
        return if now.volume.is_some() {
            Step::DeleteVolume
        } else {
            Step::RemoveFinalizer
        };
    }
    if !has_finalizer {
        return Step::AddFinalizer;
    }
    let (_, repo_format, preallocation) = match &now.pool {
        Ok(p) => p.clone(),
        Err(why) => {
            return Step::Wait {
                phase: "Pending",
                reason: "RepositoryNotReady",
                message: why.clone(),
            };
        }
    };
    let spec = &file.spec;
    let wanted = match spec.capacity.as_deref().map(parse_bytes) {
        None => None,
        Some(Ok(0)) => {
            return Step::Fail {
                reason: "InvalidCapacity",
                message: "spec.capacity is 0; give a size such as 10Gi".into(),
            };
        }
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(e)) => {
            return Step::Fail {
                reason: "InvalidCapacity",
                message: format!("spec.capacity: {e}"),
            };
        }
    };
    let import = spec.source.as_ref().and_then(|s| s.container_image.as_ref());
    if import.is_some() && spec.backing_file.is_some() {
        return Step::Fail {
            reason: "InvalidSource",
            message: "set at most one of spec.source and spec.backingFile".into(),
        };
    }
    if let Some(backing) = &spec.backing_file
        && backing == &name
    {
        return Step::Fail {
            reason: "InvalidSource",
            message: "spec.backingFile names the ImageFile itself".into(),
        };
    }
    let Some(volume) = &now.volume else {
        if import.is_some() {
            return Step::Import;
        }
        return match &now.backing {
            Backing::NotReady(why) => Step::Wait {
                phase: "Pending",
                reason: "BackingNotReady",
                message: why.clone(),
            },
            Backing::Ready(_, _, capacity) if wanted.is_some_and(|w| w < *capacity) => Step::Fail {
                reason: "InvalidCapacity",
                message: format!(
                    "spec.capacity {} is below the backing ImageFile's {}: a clone is at least as large as its golden image",
                    virtkube_api::quantity::format_bytes(wanted.unwrap_or_default()),
                    virtkube_api::quantity::format_bytes(*capacity)
                ),
            },
            Backing::Ready(path, format, capacity) => Step::Create(VolumePlan {
                name: now.volume_name.clone(),
                capacity: wanted.unwrap_or(*capacity).max(*capacity),
                format: ImageFormat::Qcow2,
                preallocation: Preallocation::Off,
                backing: Some((path.clone(), *format)),
                owner: now.owner,
            }),
            Backing::None => match wanted {
                Some(capacity) => Step::Create(VolumePlan {
                    name: now.volume_name.clone(),
                    capacity,
                    format: spec.format.unwrap_or(repo_format),
                    preallocation,
                    backing: None,
                    owner: now.owner,
                }),
                None => Step::Fail {
                    reason: "InvalidCapacity",
                    message:
                        "a blank ImageFile needs spec.capacity (e.g. 10Gi), or a backingFile or source to take it from"
                            .into(),
                },
            },
        };
    };
    let imported = file.status.as_ref().is_some_and(|s| s.sha256.is_some());
    if import.is_some() && !imported {
        // The import's checksum is written only after the whole upload (and
        // cleared before one begins): a volume without it is what an
        // interrupted import left. Never ready, and never deleted under a VM.
        if now.users.is_empty() {
            return Step::DiscardPartialImport;
        }
        return Step::Wait {
            phase: "Creating",
            reason: "ImportInterrupted",
            message: format!(
                "an import was cut short, and running VMs use the half-written volume ({}); it is imported again once they stop",
                now.users.join(", ")
            ),
        };
    }
    match wanted {
        Some(bytes) if bytes > volume.capacity => {
            if now.users.is_empty() {
                Step::Resize(bytes)
            } else {
                Step::Wait {
                    phase: "Ready",
                    reason: "ResizeWaits",
                    message: format!(
                        "growing to {} waits until no VM uses it ({})",
                        virtkube_api::quantity::format_bytes(bytes),
                        now.users.join(", ")
                    ),
                }
            }
        }
        Some(bytes) if bytes < volume.capacity => Step::Fail {
            reason: "ShrinkRefused",
            message: format!(
                "spec.capacity {} is below the volume's {}: an image never shrinks (the guest's data would be cut)",
                virtkube_api::quantity::format_bytes(bytes),
                virtkube_api::quantity::format_bytes(volume.capacity)
            ),
        },
        _ => Step::Ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkube_api::image::{ContainerImageSource, ImageFileSpec, ImageFileStatus, ImageSource};

    fn file(spec: ImageFileSpec) -> ImageFile {
        ImageFile::new("disk", spec)
    }

    fn spec(capacity: Option<&str>) -> ImageFileSpec {
        ImageFileSpec {
            repository: "main".into(),
            capacity: capacity.map(Into::into),
            ..Default::default()
        }
    }

    fn situation() -> Situation {
        Situation {
            volume_name: "ns_disk".into(),
            owner: None,
            pool: Ok(("virtkube-main".into(), ImageFormat::Qcow2, Preallocation::Off)),
            volume: None,
            backing: Backing::None,
            users: vec![],
            clones: vec![],
            begun: true,
        }
    }

    fn volume(capacity: u64) -> Option<VolumeNow> {
        Some(VolumeNow {
            capacity,
            allocation: 4096,
            path: "/r/ns_disk".into(),
        })
    }

    #[test]
    fn a_blank_image_is_made_in_the_repositorys_format_once_the_finalizer_is_on() {
        let f = file(spec(Some("1Gi")));
        assert_eq!(next_step(&f, &situation(), false), Step::AddFinalizer);
        let Step::Create(plan) = next_step(&f, &situation(), true) else {
            panic!("no create")
        };
        assert_eq!(
            (plan.capacity, plan.format, plan.backing),
            (1 << 30, ImageFormat::Qcow2, None)
        );
        let mut now = situation();
        now.pool = Err("ImageRepository main has no node mounting it".into());
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Wait {
                reason: "RepositoryNotReady",
                ..
            }
        ));
        let Step::Fail { message, .. } = next_step(&file(spec(None)), &situation(), true) else {
            panic!("no failure")
        };
        assert!(message.contains("needs spec.capacity"), "{message}");
        for bad in ["0", "ten", "-1Gi"] {
            assert!(
                matches!(
                    next_step(&file(spec(Some(bad))), &situation(), true),
                    Step::Fail {
                        reason: "InvalidCapacity",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_clone_waits_for_its_backing_and_is_qcow2_over_it() {
        let mut s = spec(None);
        s.backing_file = Some("golden".into());
        let f = file(s);
        let mut now = situation();
        now.backing = Backing::NotReady("ImageFile golden is Creating".into());
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Wait {
                reason: "BackingNotReady",
                ..
            }
        ));
        now.backing = Backing::Ready("/r/ns_golden".into(), ImageFormat::Raw, 32 << 20);
        let Step::Create(plan) = next_step(&f, &now, true) else {
            panic!("no create")
        };
        let mut small = f.spec.clone();
        small.capacity = Some("1Mi".into());
        let Step::Fail { message, .. } = next_step(&file(small), &now, true) else {
            panic!("a clone smaller than its golden image was made")
        };
        assert!(message.contains("below the backing ImageFile's 32Mi"), "{message}");
        assert_eq!(plan.format, ImageFormat::Qcow2);
        assert_eq!(plan.capacity, 32 << 20);
        assert_eq!(plan.backing, Some(("/r/ns_golden".into(), ImageFormat::Raw)));
        let mut own = spec(None);
        own.backing_file = Some("disk".into());
        assert!(matches!(
            next_step(&file(own), &now, true),
            Step::Fail {
                reason: "InvalidSource",
                ..
            }
        ));
    }

    #[test]
    fn deletion_waits_for_users_and_clones_then_deletes_the_volume() {
        let mut f = file(spec(Some("1Gi")));
        f.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        let mut now = situation();
        now.volume = volume(1 << 30);
        now.users = vec!["ns/vm-1".into()];
        now.clones = vec!["clone-1".into()];
        let Step::Wait { reason, message, .. } = next_step(&f, &now, true) else {
            panic!("not deferred")
        };
        assert_eq!(reason, "InUse");
        assert!(message.contains("ns/vm-1"), "{message}");
        now.users.clear();
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Wait {
                reason: "HasClones",
                ..
            }
        ));
        now.clones.clear();
        assert_eq!(next_step(&f, &now, true), Step::DeleteVolume);
        let mut away = now.clone();
        away.pool = Err("no virthost mounts it".into());
        assert!(matches!(
            next_step(&f, &away, true),
            Step::Wait {
                reason: "RepositoryNotReady",
                ..
            }
        ));
        now.volume = None;
        assert_eq!(next_step(&f, &now, true), Step::RemoveFinalizer);
        assert_eq!(next_step(&f, &now, false), Step::Ready);
        // Never begun (its repository never existed): nothing to wait for.
        let mut never = situation();
        never.pool = Err("ImageRepository \"mian\" does not exist".into());
        never.begun = false;
        assert_eq!(next_step(&f, &never, true), Step::RemoveFinalizer);
    }

    #[test]
    fn growing_waits_for_the_vms_and_shrinking_is_refused() {
        let f = file(spec(Some("2Gi")));
        let mut now = situation();
        now.volume = volume(1 << 30);
        assert_eq!(next_step(&f, &now, true), Step::Resize(2 << 30));
        now.users = vec!["ns/vm-1".into()];
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Wait {
                reason: "ResizeWaits",
                ..
            }
        ));
        now.volume = volume(4 << 30);
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Fail {
                reason: "ShrinkRefused",
                ..
            }
        ));
        now.volume = volume(2 << 30);
        assert_eq!(next_step(&f, &now, true), Step::Ready);
        // A clone given a size below its volume's is refused as well.
        let mut clone = spec(Some("1Gi"));
        clone.backing_file = Some("golden".into());
        assert!(matches!(
            next_step(&file(clone), &now, true),
            Step::Fail {
                reason: "ShrinkRefused",
                ..
            }
        ));
    }

    #[test]
    fn an_import_is_redone_unless_it_finished() {
        let mut s = spec(None);
        s.source = Some(ImageSource {
            container_image: Some(ContainerImageSource {
                image: "virtkube/disk".into(),
                path: "/disk/root.raw".into(),
            }),
        });
        let mut f = file(s);
        let mut now = situation();
        assert_eq!(next_step(&f, &now, true), Step::Import);
        now.volume = volume(32 << 20);
        f.status = Some(ImageFileStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        assert_eq!(next_step(&f, &now, true), Step::DiscardPartialImport);
        // Never a volume in use, whatever the status lost; and never Ready.
        now.users = vec!["ns/vm".into()];
        assert!(matches!(
            next_step(&f, &now, true),
            Step::Wait {
                reason: "ImportInterrupted",
                ..
            }
        ));
        now.users.clear();
        // Declared clones do not keep a half-written golden image.
        now.clones = vec!["clone-1".into()];
        assert_eq!(next_step(&f, &now, true), Step::DiscardPartialImport);
        now.clones.clear();
        // Finished: the checksum says so, whatever the phase.
        f.status = Some(ImageFileStatus {
            phase: Some("Pending".into()),
            sha256: Some("ab".repeat(32)),
            ..Default::default()
        });
        assert_eq!(next_step(&f, &now, true), Step::Ready);
    }

    #[test]
    fn xml_in_and_out() {
        let plan = VolumePlan {
            name: "ns_a'b".into(),
            capacity: 1024,
            format: ImageFormat::Qcow2,
            preallocation: Preallocation::Metadata,
            backing: Some(("/r/ns_golden".into(), ImageFormat::Raw)),
            owner: Some((64055, 994)),
        };
        let (xml, flags) = plan.xml();
        assert!(
            xml.contains("<mode>0640</mode><owner>64055</owner><group>994</group>"),
            "{xml}"
        );
        assert_eq!(
            user_ids(
                "root:x:0:0:root:/root:/bin/bash\nlibvirt-qemu:x:64055:994:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n",
                "libvirt-qemu"
            ),
            Some((64055, 994))
        );
        assert_eq!(user_ids("root:x:0:0::/:/bin/sh\n", "libvirt-qemu"), None);
        assert_eq!(flags, PREALLOC_METADATA);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(
            doc.descendants().find(|n| n.has_tag_name("name")).unwrap().text(),
            Some("ns_a'b")
        );
        assert!(
            xml.contains("<backingStore><path>/r/ns_golden</path><format type='raw'/>"),
            "{xml}"
        );
        let domain = "<domain><devices><disk type='volume'><source pool='virtkube-main' volume='ns_c1'/><backingStore type='file'><source file='/r/ns_golden'/></backingStore></disk><disk type='file'><source file='/x'/></disk></devices><metadata><disk xmlns='urn:x'><source pool='p' volume='v'/></disk></metadata></domain>";
        let uses = disk_use(domain).unwrap();
        assert_eq!(uses.volumes, vec![("virtkube-main".to_owned(), "ns_c1".to_owned())]);
        assert_eq!(uses.files, vec!["/r/ns_golden".to_owned(), "/x".to_owned()]);
        assert_eq!(
            uses.written_volumes,
            vec![("virtkube-main".to_owned(), "ns_c1".to_owned())]
        );
        assert_eq!(uses.written_files, vec!["/x".to_owned()]);
        let read_only = disk_use(
            "<domain><devices><disk type='volume'><source pool='p' volume='v'/><readonly/></disk></devices></domain>",
        )
        .unwrap();
        assert!(read_only.written_volumes.is_empty() && read_only.volumes.len() == 1);
        assert!(disk_use("<domain").is_err());
        assert_eq!(pod_of_domain("ns_vm-1"), "ns/vm-1");
        let mountinfo = "36 35 98:0 /mnt1 /var/lib/virtkube/repositories/main rw,noatime master:1 - ext3 /dev/root rw\n37 35 98:0 / /var/lib/virtkube/repositories/main2 rw - ext4 /dev/x rw\n";
        assert!(is_mount_point(mountinfo, "/var/lib/virtkube/repositories/main"));
        assert!(!is_mount_point(mountinfo, "/var/lib/virtkube/repositories/other"));
        assert!(!is_mount_point(mountinfo, "/var/lib/virtkube/repositories"));
    }

    #[test]
    fn a_node_counts_while_its_virtnode_beats() {
        let node = |status: &str, beat: &str| {
            let mut n = virtkube_api::VirtNode::new("n1", virtkube_api::VirtNodeSpec::default());
            n.status = Some(virtkube_api::VirtNodeStatus {
                conditions: vec![virtkube_api::node::Condition {
                    kind: "Ready".into(),
                    status: status.into(),
                    last_heartbeat_time: Some(beat.into()),
                    ..Default::default()
                }],
                ..Default::default()
            });
            n
        };
        let now: k8s_openapi::jiff::Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
        let limit = heartbeat_limit(std::time::Duration::from_secs(30));
        assert_eq!(limit, 90);
        assert!(node_alive(&node("True", "2026-12-06T09:59:00Z"), now, limit));
        assert!(!node_alive(&node("True", "2026-12-06T09:58:00Z"), now, limit));
        // A slower beat is allowed three of its own periods.
        let slow = heartbeat_limit(std::time::Duration::from_secs(60));
        assert!(node_alive(&node("True", "2026-12-06T09:58:00Z"), now, slow));
        assert!(!node_alive(&node("False", "2026-12-06T09:59:50Z"), now, limit));
        assert!(!node_alive(&node("True", "yesterday"), now, limit));
        assert!(!node_alive(
            &virtkube_api::VirtNode::new("n2", Default::default()),
            now,
            limit
        ));
    }

    #[test]
    fn the_import_reply_head_must_be_a_200_with_a_length() {
        assert_eq!(
            import_length("HTTP/1.1 200 OK\r\ncontent-length: 33554432\r\n"),
            Ok(33554432)
        );
        assert!(
            import_length("HTTP/1.1 404 Not Found\r\n")
                .unwrap_err()
                .contains("not 200")
        );
        assert!(
            import_length("HTTP/1.1 200 OK\r\n")
                .unwrap_err()
                .contains("no Content-Length")
        );
        assert!(
            import_length("HTTP/1.1 200 OK\r\nContent-Length: x\r\n")
                .unwrap_err()
                .contains("not a number")
        );
    }
}
