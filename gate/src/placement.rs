//! Where a VM's QEMU belongs: in its VM container's cgroup, in every
//! hierarchy, so that the pod's limits apply to it and the kubelet accounts
//! it to the pod. Pure: from the caller's `/proc/<pid>/cgroup` and the gate's
//! own `/proc/self/mountinfo`, the `cgroup.procs` files to write QEMU's PID
//! to. cgroup v1 (one hierarchy per controller set), v2 (the unified
//! hierarchy) and both at once; the kubelet's cgroupfs and systemd drivers
//! and Docker name their cgroups differently, but placement only follows
//! paths, so all of them work alike.
//!
//! Where exactly: in a Kubernetes pod, the **pod's** cgroup, so that the
//! pod's limit — its containers' limits plus the RuntimeClass's
//! `overhead.podFixed` — bounds QEMU, and the VM container's own limit can
//! be the guest's memory. cgroup v1 lets a process live in the pod cgroup
//! itself; cgroup v2 with its controllers allows processes only in leaves,
//! so there QEMU gets a leaf of its own, `virtkube-qemu`, under the pod (the
//! kubelet removes it with the pod). Outside Kubernetes (Docker) there is no pod: QEMU joins
//! the VM container's cgroup, a leaf already.

use std::path::PathBuf;

/// A mounted cgroup hierarchy, as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The path within the hierarchy that the mount shows as its root (not
    /// `/` inside a cgroup namespace or for a bind mount of a subtree).
    pub root: String,
    /// Which hierarchy.
    pub hierarchy: Hierarchy,
}

/// A v1 hierarchy by its controllers (or `name=…`), or the v2 one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1, e.g. `["cpu", "cpuacct"]` or `["name=systemd"]`, sorted.
    V1(Vec<String>),
    /// cgroup v2, the unified hierarchy.
    V2,
}

/// Why a process's cgroups could not be turned into places.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// A line of `/proc/<pid>/cgroup` that is not `ID:CONTROLLERS:PATH`.
    #[error("line {0:?} of the caller's cgroup file is not ID:CONTROLLERS:PATH")]
    BadLine(String),
    /// The caller's cgroup lies outside what the gate's mount shows.
    #[error(
        "the caller's {hierarchy} cgroup {path} is outside the gate's view of that hierarchy (mounted from {root}); the gate needs the host's cgroup namespace"
    )]
    OutsideMount {
        /// The hierarchy, as named in the cgroup file.
        hierarchy: String,
        /// The caller's path in it.
        path: String,
        /// The root the gate's mount shows.
        root: String,
    },
    /// Nothing to place into: no hierarchy of the caller is mounted here.
    #[error("none of the caller's cgroup hierarchies is mounted where the gate can see it")]
    NothingMounted,
}

/// The places one process should join, and the hierarchies skipped because
/// the gate has no mount of them (named v1 hierarchies are often unmounted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// `cgroup.procs` files, one per mounted hierarchy.
    pub procs_files: Vec<PathBuf>,
    /// Cgroups to make before joining them (cgroup v2 leaves under a pod).
    pub make_dirs: Vec<PathBuf>,
    /// The cgroup whose memory limit bounds QEMU: the one in the v1 memory
    /// hierarchy, else the v2 one (its parent, for a leaf of our own, which
    /// has no limit of its own).
    pub memory_cgroup: Option<PathBuf>,
    /// Hierarchies of the caller that no mount shows (as the cgroup file names them).
    pub unmounted: Vec<String>,
}

/// Whose cgroup QEMU joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The caller's own (a Docker container).
    Container,
    /// The pod the caller is in, its pods' cgroups under
    /// `kubepods_parent`/kubepods (see [`crate::identity`]).
    Pod {
        /// The kubelet's cgroup root.
        kubepods_parent: &'a str,
    },
}

/// QEMU's own leaf under a pod's cgroup in cgroup v2.
pub const V2_POD_LEAF: &str = "virtkube-qemu";

/// The cgroup mounts in a `/proc/self/mountinfo` text.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, mount_point) = (unescape(fields.get(3)?), unescape(fields.get(4)?));
            let mut after = after.split(' ');
            let (fstype, _source, options) = (after.next()?, after.next()?, after.next().unwrap_or(""));
            let hierarchy = match fstype {
                "cgroup2" => Hierarchy::V2,
                "cgroup" => {
                    let mut controllers: Vec<String> = options
                        .split(',')
                        .filter(|o| is_controller_option(o))
                        .map(str::to_owned)
                        .collect();
                    controllers.sort();
                    Hierarchy::V1(controllers)
                }
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(mount_point),
                root,
                hierarchy,
            })
        })
        .collect()
}

/// v1 super options that are not controllers.
fn is_controller_option(option: &str) -> bool {
    !matches!(
        option,
        "rw" | "ro" | "noprefix" | "clone_children" | "xattr" | "cpuset_v2_mode" | ""
    ) && !option.starts_with("release_agent=")
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where QEMU goes for a caller whose `/proc/<pid>/cgroup` reads
/// `proc_cgroup`, in every hierarchy the gate has mounted: the caller's
/// cgroup, or for [`Scope::Pod`] its pod's (a hierarchy where the caller is
/// in no pod keeps the caller's cgroup).
pub fn placement(proc_cgroup: &str, mounts: &[CgroupMount], scope: Scope<'_>) -> Result<Placement, PlacementError> {
    let mut result = Placement::default();
    // The rule that only leaves hold processes binds where the v2 hierarchy
    // has the controllers. On a hybrid host (controllers on v1, a bare
    // unified hierarchy beside them) it does not, and the kubelet there never
    // removes pod cgroups from the unified hierarchy: no leaf of our own.
    let controllers_in_v2 = !mounts.iter().any(|m| match &m.hierarchy {
        Hierarchy::V1(controllers) => controllers.iter().any(|c| !c.starts_with("name=")),
        Hierarchy::V2 => false,
    });
    for line in proc_cgroup.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(PlacementError::BadLine(line.to_owned()));
        };
        if !path.starts_with('/') {
            return Err(PlacementError::BadLine(line.to_owned()));
        }
        let hierarchy = if controllers.is_empty() {
            Hierarchy::V2
        } else {
            let mut names: Vec<String> = controllers.split(',').map(str::to_owned).collect();
            names.sort();
            Hierarchy::V1(names)
        };
        let Some(mount) = mounts.iter().find(|m| m.hierarchy == hierarchy) else {
            result.unmounted.push(if controllers.is_empty() {
                "unified".into()
            } else {
                controllers.to_owned()
            });
            continue;
        };
        let relative = within(&mount.root, path).ok_or_else(|| PlacementError::OutsideMount {
            hierarchy: if controllers.is_empty() {
                "unified".into()
            } else {
                controllers.to_owned()
            },
            path: path.to_owned(),
            root: mount.root.clone(),
        })?;
        // The pod's own path, within the mount (a mount rooted below the
        // pod shows no pod: the caller's cgroup is used, as for Docker).
        let pod = match scope {
            Scope::Pod { kubepods_parent } => {
                crate::identity::pod_cgroup_of(path, kubepods_parent).and_then(|(_, pod)| within(&mount.root, pod))
            }
            Scope::Container => None,
        };
        let mut dir = mount.mount_point.clone();
        dir.extend(pod.unwrap_or(relative).split('/').filter(|c| !c.is_empty()));
        let is_memory = match &mount.hierarchy {
            Hierarchy::V1(controllers) => controllers.iter().any(|c| c == "memory"),
            Hierarchy::V2 => result.memory_cgroup.is_none(),
        };
        if is_memory {
            result.memory_cgroup = Some(dir.clone());
        }
        if pod.is_some() && mount.hierarchy == Hierarchy::V2 && controllers_in_v2 {
            dir.push(V2_POD_LEAF);
            result.make_dirs.push(dir.clone());
        }
        result.procs_files.push(dir.join("cgroup.procs"));
    }
    if result.procs_files.is_empty() {
        return Err(PlacementError::NothingMounted);
    }
    Ok(result)
}

/// `path` relative to `root`, if it lies within it (whole components only;
/// `..` never climbs out).
fn within<'a>(root: &str, path: &'a str) -> Option<&'a str> {
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    if root == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(root.trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kind: cgroup v1 controllers plus a cgroup2 mount.
    const MOUNTINFO_V1: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
28 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
30 25 0:28 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
31 25 0:29 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset,clone_children
40 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
";

    /// A kubelet with the cgroupfs driver on that machine.
    const POD_V1: &str = "\
12:pids:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
11:cpuset:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
5:cpu,cpuacct:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
4:memory:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
3:blkio:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
1:name=systemd:/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
0::/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1
";

    #[test]
    fn mounts_are_read_with_their_controllers() {
        let mounts = cgroup_mounts(MOUNTINFO_V1);
        assert_eq!(mounts.len(), 6, "{mounts:#?}");
        assert_eq!(mounts[0].hierarchy, Hierarchy::V2);
        assert!(mounts.contains(&CgroupMount {
            mount_point: "/sys/fs/cgroup/cpu,cpuacct".into(),
            root: "/".into(),
            hierarchy: Hierarchy::V1(vec!["cpu".into(), "cpuacct".into()]),
        }));
        assert!(
            mounts
                .iter()
                .any(|m| m.hierarchy == Hierarchy::V1(vec!["name=systemd".into()]))
        );
        assert!(
            mounts
                .iter()
                .any(|m| m.hierarchy == Hierarchy::V1(vec!["cpuset".into()]))
        );
    }

    #[test]
    fn a_v1_pod_container_is_joined_in_every_mounted_hierarchy() {
        let placed = placement(POD_V1, &cgroup_mounts(MOUNTINFO_V1), Scope::Container).unwrap();
        let files: Vec<String> = placed.procs_files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/pids/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
                "/sys/fs/cgroup/cpuset/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
                "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
                "/sys/fs/cgroup/memory/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
                "/sys/fs/cgroup/systemd/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
                "/sys/fs/cgroup/unified/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs",
            ]
        );
        assert_eq!(placed.unmounted, ["blkio"]);
    }

    const POD: Scope<'static> = Scope::Pod { kubepods_parent: "/" };

    #[test]
    fn in_a_pod_qemu_joins_the_pod_cgroup_itself_under_v1() {
        let placed = placement(POD_V1, &cgroup_mounts(MOUNTINFO_V1), POD).unwrap();
        let files: Vec<String> = placed.procs_files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/pids/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
                "/sys/fs/cgroup/cpuset/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
                "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
                "/sys/fs/cgroup/memory/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
                "/sys/fs/cgroup/systemd/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
                // The unified hierarchy of a hybrid host holds no controllers,
                // so the pod cgroup may hold QEMU itself there too.
                "/sys/fs/cgroup/unified/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/cgroup.procs",
            ]
        );
        assert!(placed.make_dirs.is_empty(), "{placed:?}");
        assert_eq!(
            placed.memory_cgroup,
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b"
            ))
        );
    }

    #[test]
    fn in_a_v2_pod_qemu_gets_a_leaf_and_the_pod_limit_bounds_it() {
        let mountinfo = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let pod = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4b7d3e62_5b2f_4c3a_9a8e_0c1d2e3f4a5b.slice/cri-containerd-abc.scope\n";
        let slice = "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4b7d3e62_5b2f_4c3a_9a8e_0c1d2e3f4a5b.slice";
        let placed = placement(pod, &cgroup_mounts(mountinfo), POD).unwrap();
        assert_eq!(
            placed.procs_files,
            [PathBuf::from(format!("{slice}/virtkube-qemu/cgroup.procs"))]
        );
        assert_eq!(placed.make_dirs, [PathBuf::from(format!("{slice}/virtkube-qemu"))]);
        assert_eq!(placed.memory_cgroup, Some(PathBuf::from(slice)));
        // A guaranteed pod under cgroupfs, seen through a subtree mount.
        let subtree = "35 24 0:30 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let placed = placement(
            "0::/kubepods/pod1b2c3d4e-0000-4000-8000-000000000001/ctr\n",
            &cgroup_mounts(subtree),
            POD,
        )
        .unwrap();
        assert_eq!(
            placed.procs_files,
            [PathBuf::from(
                "/sys/fs/cgroup/pod1b2c3d4e-0000-4000-8000-000000000001/virtkube-qemu/cgroup.procs"
            )]
        );
    }

    #[test]
    fn a_mount_rooted_inside_the_pod_shows_no_pod() {
        let pod = "/kubepods/burstable/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b";
        let mountinfo = format!("35 24 0:30 {pod}/ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let placed = placement(&format!("0::{pod}/ctr\n"), &cgroup_mounts(&mountinfo), POD).unwrap();
        assert_eq!(placed.procs_files, [PathBuf::from("/sys/fs/cgroup/cgroup.procs")]);
    }

    #[test]
    fn a_docker_container_or_a_path_outside_the_kubelets_root_keeps_its_cgroup() {
        let docker = "4:memory:/docker/0123\n0::/docker/0123\n";
        let placed = placement(docker, &cgroup_mounts(MOUNTINFO_V1), POD).unwrap();
        assert_eq!(
            placed.procs_files,
            [
                PathBuf::from("/sys/fs/cgroup/memory/docker/0123/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/unified/docker/0123/cgroup.procs"),
            ]
        );
        assert!(placed.make_dirs.is_empty());
        assert_eq!(
            placed.memory_cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/memory/docker/0123"))
        );
        // A pod-looking path that is not under the kubelet's root is no pod.
        let elsewhere = Scope::Pod {
            kubepods_parent: "/virtkube-test",
        };
        let placed = placement(POD_V1, &cgroup_mounts(MOUNTINFO_V1), elsewhere).unwrap();
        assert!(
            placed.procs_files[0].ends_with("pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/ctr1/cgroup.procs"),
            "{placed:?}"
        );
    }

    #[test]
    fn a_v2_systemd_driver_pod_and_a_docker_container() {
        let mountinfo = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let pod = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4b7d3e62_5b2f_4c3a_9a8e_0c1d2e3f4a5b.slice/cri-containerd-abc.scope\n";
        let placed = placement(pod, &cgroup_mounts(mountinfo), Scope::Container).unwrap();
        assert_eq!(
            placed.procs_files,
            [PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4b7d3e62_5b2f_4c3a_9a8e_0c1d2e3f4a5b.slice/cri-containerd-abc.scope/cgroup.procs"
            )]
        );
        let docker = "0::/system.slice/docker-0123abcd.scope\n";
        assert_eq!(
            placement(docker, &cgroup_mounts(mountinfo), Scope::Container)
                .unwrap()
                .procs_files,
            [PathBuf::from(
                "/sys/fs/cgroup/system.slice/docker-0123abcd.scope/cgroup.procs"
            )]
        );
    }

    #[test]
    fn a_subtree_mount_and_a_path_outside_it() {
        // A cgroup namespace (or a bind mount) showing /kubepods as its root.
        let mountinfo = "35 24 0:30 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let mounts = cgroup_mounts(mountinfo);
        assert_eq!(
            placement("0::/kubepods/besteffort/pod9/c\n", &mounts, Scope::Container)
                .unwrap()
                .procs_files,
            [PathBuf::from("/sys/fs/cgroup/besteffort/pod9/c/cgroup.procs")]
        );
        for outside in ["0::/system.slice/x\n", "0::/kubepodsX/y\n", "0::/kubepods/../etc\n"] {
            let e = placement(outside, &mounts, Scope::Container).unwrap_err();
            assert!(matches!(e, PlacementError::OutsideMount { .. }), "{outside:?}: {e}");
            assert!(e.to_string().contains("host's cgroup namespace"), "{e}");
        }
    }

    #[test]
    fn bad_input_is_named() {
        let mounts = cgroup_mounts(MOUNTINFO_V1);
        for bad in ["garbage\n", "1:memory\n", "4:memory:relative/path\n"] {
            assert!(
                matches!(
                    placement(bad, &mounts, Scope::Container),
                    Err(PlacementError::BadLine(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            placement("7:hugetlb:/a\n", &mounts, Scope::Container),
            Err(PlacementError::NothingMounted)
        );
        assert_eq!(
            placement("", &mounts, Scope::Container),
            Err(PlacementError::NothingMounted)
        );
        // Escaped mount points.
        let spaced = cgroup_mounts("1 1 0:1 / /mnt/cg\\040v2 rw - cgroup2 none rw\n");
        assert_eq!(spaced[0].mount_point, PathBuf::from("/mnt/cg v2"));
    }
}
