//! The ImageFiles VM pods may use as disks, from the Kubernetes API: a
//! reflector over ImageFiles and the gate's reflector over this node's pods
//! (a pod's namespace, from its UID). A pod may use only the ImageFiles of
//! its own namespace, ready, by the volume the repository manager made, in
//! the format the volume has, and read-only where the ImageFile says so or
//! clones are made from it. The decision is pure over the two stores.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use virtkube_api::image::{self, ImageFile};

use crate::identity::Identity;
use crate::policy::{Denied, VolumeGrant, Volumes};

/// The ImageFiles and this node's pods, as the gate last heard of them.
pub struct Catalog {
    /// This node's pods.
    pub pods: Store<Pod>,
    /// Every ImageFile.
    pub files: Store<ImageFile>,
    /// Set once both have been listed: before that, an ImageFile missing
    /// from the store may only not be read yet.
    pub listed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Volumes for Catalog {
    fn grant(&self, who: &Identity, pool: &str, volume: &str) -> Result<VolumeGrant, Denied> {
        if !self.listed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Denied(format!(
                "volume {pool}/{volume}: the gate has not read the ImageFiles and this node's pods from the Kubernetes API yet (it just started); start the VM again"
            )));
        }
        grant(&self.pods.state(), &self.files.state(), who, pool, volume)
    }
}

/// How `who` may use `pool`/`volume`, given the pods and ImageFiles known.
pub fn grant(
    pods: &[Arc<Pod>],
    files: &[Arc<ImageFile>],
    who: &Identity,
    pool: &str,
    volume: &str,
) -> Result<VolumeGrant, Denied> {
    let refuse = |why: String| Err(Denied(format!("volume {pool}/{volume}: {why}")));
    let Identity::Pod { uid } = who else {
        return refuse("ImageFile disks are for pods (a Docker container has no namespace)".into());
    };
    let Some(pod) = pods.iter().find(|p| p.metadata.uid.as_deref() == Some(uid.as_str())) else {
        return refuse(format!(
            "the gate does not know pod {uid} among this node's pods yet; try again"
        ));
    };
    let namespace = pod.namespace().unwrap_or_default();
    let Some((owner_namespace, name)) = image::image_file_of_volume(volume) else {
        return refuse("it is not an ImageFile's volume".into());
    };
    if owner_namespace != namespace {
        return refuse(format!(
            "it belongs to ImageFile {owner_namespace}/{name}; a VM may use the ImageFiles of its own namespace {namespace} only"
        ));
    }
    let Some(file) = files
        .iter()
        .find(|f| f.namespace().as_deref() == Some(owner_namespace) && f.name_any() == name)
    else {
        return refuse(format!("there is no ImageFile {owner_namespace}/{name}"));
    };
    let status = file.status.clone().unwrap_or_default();
    if file.metadata.deletion_timestamp.is_some() {
        return refuse(format!("ImageFile {owner_namespace}/{name} is being deleted"));
    }
    if status.phase.as_deref() != Some("Ready")
        || status.pool.as_deref() != Some(pool)
        || status.volume.as_deref() != Some(volume)
    {
        return refuse(format!(
            "ImageFile {owner_namespace}/{name} is not ready as this volume (phase {}, pool {:?}, volume {:?})",
            status.phase.as_deref().unwrap_or("unset"),
            status.pool.as_deref().unwrap_or(""),
            status.volume.as_deref().unwrap_or("")
        ));
    }
    let Some(format) = status.format.as_deref().and_then(image::ImageFormat::parse) else {
        return refuse(format!("ImageFile {owner_namespace}/{name} has no known format"));
    };
    // A clone's chain is the one its volume was made with, whatever its
    // spec says now.
    let has_clones = files.iter().any(|f| {
        let made_from = f.status.as_ref().and_then(|s| s.backing_file.as_deref());
        f.namespace().as_deref() == Some(owner_namespace)
            && (f.spec.backing_file.as_deref() == Some(name) || made_from == Some(name))
    });
    Ok(VolumeGrant {
        format: format.as_str().to_owned(),
        read_only: file.spec.read_only == Some(true) || has_clones,
        shareable: file.spec.shareable == Some(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkube_api::image::{ImageFileSpec, ImageFileStatus};

    fn pod(namespace: &str, uid: &str) -> Arc<Pod> {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(namespace.into());
        pod.metadata.name = Some("vm".into());
        pod.metadata.uid = Some(uid.into());
        Arc::new(pod)
    }

    fn file(namespace: &str, name: &str, spec: ImageFileSpec, phase: &str) -> Arc<ImageFile> {
        let mut f = ImageFile::new(name, spec);
        f.metadata.namespace = Some(namespace.into());
        f.status = Some(ImageFileStatus {
            phase: Some(phase.into()),
            pool: Some("virtkube-main".into()),
            volume: Some(format!("{namespace}_{name}")),
            format: Some("qcow2".into()),
            ..Default::default()
        });
        Arc::new(f)
    }

    fn spec(backing: Option<&str>) -> ImageFileSpec {
        ImageFileSpec {
            repository: "main".into(),
            backing_file: backing.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_gets_its_own_namespaces_ready_image_files_only() {
        let pods = [pod("team-a", "uid-a"), pod("team-b", "uid-b")];
        let files = [
            file("team-a", "golden", spec(None), "Ready"),
            file("team-a", "clone-1", spec(Some("golden")), "Ready"),
            file("team-a", "new", spec(None), "Creating"),
        ];
        let a = Identity::Pod { uid: "uid-a".into() };
        let b = Identity::Pod { uid: "uid-b".into() };
        let clone = grant(&pods, &files, &a, "virtkube-main", "team-a_clone-1").unwrap();
        assert_eq!(
            clone,
            VolumeGrant {
                format: "qcow2".into(),
                read_only: false,
                shareable: false
            }
        );
        // The golden image has a clone: read-only to every VM.
        assert!(
            grant(&pods, &files, &a, "virtkube-main", "team-a_golden")
                .unwrap()
                .read_only
        );
        // Also when the clone's spec no longer names it: its volume still does.
        let mut unnamed = ImageFile::new("clone-2", spec(None));
        unnamed.metadata.namespace = Some("team-a".into());
        unnamed.status = Some(ImageFileStatus {
            backing_file: Some("new".into()),
            ..Default::default()
        });
        let with_unnamed = [file("team-a", "new", spec(None), "Ready"), Arc::new(unnamed)];
        assert!(
            grant(&pods, &with_unnamed, &a, "virtkube-main", "team-a_new")
                .unwrap()
                .read_only
        );
        let refused = |who: &Identity, pool: &str, volume: &str, expected: &str| {
            let Denied(why) = grant(&pods, &files, who, pool, volume).unwrap_err();
            assert!(why.contains(expected), "{volume}: {why}");
        };
        refused(
            &b,
            "virtkube-main",
            "team-a_clone-1",
            "a VM may use the ImageFiles of its own namespace team-b only",
        );
        refused(
            &a,
            "virtkube-main",
            "team-a_new",
            "is not ready as this volume (phase Creating",
        );
        refused(&a, "virtkube-other", "team-a_clone-1", "is not ready as this volume");
        refused(
            &a,
            "virtkube-main",
            "team-a_missing",
            "there is no ImageFile team-a/missing",
        );
        refused(&a, "virtkube-main", "../../etc/shadow", "not an ImageFile's volume");
        refused(&a, "virtkube-main", "team-a_clone-1/../x", "not an ImageFile's volume");
        refused(
            &Identity::Pod { uid: "uid-z".into() },
            "virtkube-main",
            "team-a_clone-1",
            "does not know pod uid-z",
        );
        refused(
            &Identity::Container { id: "abc".into() },
            "virtkube-main",
            "team-a_clone-1",
            "are for pods",
        );
    }
}
