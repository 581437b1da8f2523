//! Who is calling: the peer of a unix socket connection, known from the
//! kernel (SO_PEERCRED gives the PID at connect time; with the virthost in the
//! host's PID namespace it is the host's PID), and its cgroup, which names the
//! pod (`…/pod<UID>/…`) or the Docker container (`/docker/<ID>`).
//!
//! PID reuse: the credentials are the connecting process's, but that process
//! may exit and its PID be reused before the gate reads `/proc/<pid>`. So the
//! gate reads the process's start time with its cgroup and refuses a process
//! that started after the connection was accepted: that is not the caller.

use std::fmt;
use std::path::Path;

/// A caller the gate can tell apart from every other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A Kubernetes pod, by UID (canonical lowercase, dashed).
    Pod {
        /// metadata.uid.
        uid: String,
    },
    /// A plain Docker container, by its 64-hex-digit ID.
    Container {
        /// The container ID.
        id: String,
    },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Pod { uid } => write!(f, "pod {uid}"),
            Identity::Container { id } => write!(f, "container {}", id.get(..12).unwrap_or(id)),
        }
    }
}

/// Why a caller could not be identified (told to the caller and logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unidentified {
    /// The cgroup names no pod and no container: a host process, or a runtime
    /// the gate does not know.
    #[error(
        "the calling process (pid {pid}) is not in a Kubernetes pod or Docker container cgroup ({cgroup}); only VM containers may use this socket"
    )]
    NotAContainer {
        /// The caller's PID.
        pid: i32,
        /// The cgroup paths seen.
        cgroup: String,
    },
    /// The cgroup file names more than one pod or container.
    #[error("the calling process (pid {pid}) is in cgroups of different containers ({cgroup}); refusing to guess")]
    Ambiguous {
        /// The caller's PID.
        pid: i32,
        /// The cgroup paths seen.
        cgroup: String,
    },
    /// The process could not be read (gone, or not visible: the gate needs
    /// the host's PID namespace).
    #[error("the calling process (pid {pid}) cannot be read: {why} (the gate needs the host's PID namespace: hostPID)")]
    Unreadable {
        /// The caller's PID.
        pid: i32,
        /// Why.
        why: String,
    },
    /// The PID now belongs to a process that started after the connection.
    #[error("pid {pid} was reused by another process after it connected; refusing to take that process's identity")]
    PidReused {
        /// The caller's PID.
        pid: i32,
    },
}

/// The identity named by the text of `/proc/<pid>/cgroup` (v1 or v2), if any.
///
/// Recognised: the kubelet's cgroupfs driver (`/kubepods/<qos>/pod<UID>/<ctr>`,
/// `/kubepods/pod<UID>/<ctr>`), its systemd driver
/// (`kubepods-<qos>-pod<UID_with_underscores>.slice`), and Docker
/// (`/docker/<64 hex>` and systemd's `docker-<64 hex>.scope`). A Kubernetes pod
/// wins over the container ID of its runtime (dockershim's containers are in
/// both, under the pod).
/// Pod cgroups count only directly below the kubelet's own `kubepods` cgroup,
/// which is `kubepods_parent`/kubepods (`/` unless the kubelet runs with
/// `--cgroup-root`); Docker containers only at Docker's own places. A
/// `pod<UID>` or `docker/<ID>` anywhere else may have been made by anyone
/// with a delegated cgroup subtree, and names no one.
pub fn from_cgroup(pid: i32, text: &str) -> Result<Identity, Unidentified> {
    from_cgroup_under(pid, text, "/")
}

/// As [`from_cgroup`], with the kubelet's cgroup root.
pub fn from_cgroup_under(pid: i32, text: &str, kubepods_parent: &str) -> Result<Identity, Unidentified> {
    let mut found: Option<Identity> = None;
    let paths: Vec<&str> = text.lines().filter_map(|line| line.splitn(3, ':').nth(2)).collect();
    for path in &paths {
        let identity = pod_of(path, kubepods_parent).or_else(|| container_of(path));
        match (&found, identity) {
            (_, None) => {}
            (None, Some(id)) => found = Some(id),
            (Some(a), Some(b)) if *a == b => {}
            (Some(Identity::Container { .. }), Some(pod @ Identity::Pod { .. })) => found = Some(pod),
            (Some(Identity::Pod { .. }), Some(Identity::Container { .. })) => {}
            (Some(_), Some(_)) => {
                return Err(Unidentified::Ambiguous {
                    pid,
                    cgroup: paths.join(" "),
                });
            }
        }
    }
    found.ok_or_else(|| Unidentified::NotAContainer {
        pid,
        cgroup: if paths.is_empty() {
            "none".into()
        } else {
            paths.join(" ")
        },
    })
}

fn pod_of(path: &str, kubepods_parent: &str) -> Option<Identity> {
    pod_cgroup_of(path, kubepods_parent).map(|(uid, _)| Identity::Pod { uid })
}

/// The pod UID in a cgroup `path` and the pod's own cgroup (the prefix of
/// `path` that ends with the pod's component).
pub fn pod_cgroup_of<'a>(path: &'a str, kubepods_parent: &str) -> Option<(String, &'a str)> {
    let parent = kubepods_parent.trim_end_matches('/');
    let rest = path.strip_prefix(parent)?;
    let mut components = rest.trim_start_matches('/').split('/');
    // cgroupfs driver: kubepods/[<qos>/]pod<uid>/<ctr>
    // systemd driver: kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid_>.slice/<ctr>.scope
    let (uid, pod) = match components.next()? {
        "kubepods" => {
            let pod = match components.next()? {
                "burstable" | "besteffort" => components.next()?,
                other => other,
            };
            (canonical_uuid(pod.strip_prefix("pod")?)?, pod)
        }
        "kubepods.slice" => {
            let pod = match components.next()? {
                "kubepods-burstable.slice" | "kubepods-besteffort.slice" => components.next()?,
                other => other,
            };
            let uid = pod.strip_suffix(".slice")?.rsplit_once("-pod")?.1.replace('_', "-");
            (canonical_uuid(&uid)?, pod)
        }
        _ => return None,
    };
    // `pod` is a slice of `path`: the pod's cgroup ends where it ends.
    let end = pod.as_ptr() as usize - path.as_ptr() as usize + pod.len();
    Some((uid, &path[..end]))
}

fn container_of(path: &str) -> Option<Identity> {
    let id = path.strip_prefix("/docker/").or_else(|| {
        path.strip_prefix("/system.slice/docker-")
            .and_then(|p| p.strip_suffix(".scope"))
    })?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Identity::Container {
        id: id.to_ascii_lowercase(),
    })
}

pub use libvirt_wire::protocol::canonical_uuid;

/// The identity of process `pid`, read under `proc_root` (`/proc`), provided
/// the process started no later than `accepted_ticks` (clock ticks since boot,
/// as in `/proc/<pid>/stat`).
pub fn of_process(
    proc_root: &Path,
    pid: i32,
    accepted_ticks: u64,
    kubepods_parent: &str,
) -> Result<Identity, Unidentified> {
    let unreadable = |e: std::io::Error| Unidentified::Unreadable {
        pid,
        why: e.to_string(),
    };
    let dir = proc_root.join(pid.to_string());
    let started = start_ticks(&std::fs::read_to_string(dir.join("stat")).map_err(unreadable)?).ok_or(
        Unidentified::Unreadable {
            pid,
            why: "its stat file does not parse".into(),
        },
    )?;
    let cgroup = std::fs::read_to_string(dir.join("cgroup")).map_err(unreadable)?;
    // Read again: the cgroup belongs to the process whose start time was read.
    let again = start_ticks(&std::fs::read_to_string(dir.join("stat")).map_err(unreadable)?);
    if again != Some(started) || started > accepted_ticks {
        return Err(Unidentified::PidReused { pid });
    }
    from_cgroup_under(pid, &cgroup, kubepods_parent)
}

/// A pidfd for the peer of a unix socket (`SO_PEERPIDFD`, Linux ≥ 6.5): it
/// names the very process that called `connect()`, whatever later happens to
/// its PID. `None` on older kernels (then the start-time check stands alone).
pub fn peer_pidfd(socket: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the valid, writable
    // `pidfd`, and `len` is its size; the socket fd is borrowed and open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel gave us a new descriptor that we now own.
    (rc == 0 && pidfd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) })
}

/// Whether the process a pidfd names is alive and still has PID `pid` (as
/// `/proc/self/fdinfo` reports it: -1 once it has exited).
pub fn pidfd_is(pidfd: &std::os::fd::OwnedFd, pid: i32) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Pid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        })
        == Some(pid)
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
/// The command name (field 2) may hold spaces and parentheses: fields are
/// counted after its last `)`.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Now, in clock ticks since boot (the unit of `/proc/<pid>/stat`'s start time).
pub fn now_ticks() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, writable `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if rc != 0 || hz <= 0 {
        return u64::MAX; // Unknown: the reuse check then only compares the two reads.
    }
    let hz = hz as u64;
    (ts.tv_sec as u64).saturating_mul(hz) + (ts.tv_nsec as u64).saturating_mul(hz) / 1_000_000_000 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b";
    const CTR: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn kubelet_cgroupfs_driver_v1() {
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{CTR}\n11:memory:/kubepods/burstable/pod{UID}/{CTR}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CTR}\n0::/\n"
        );
        assert_eq!(from_cgroup(1, &text), Ok(Identity::Pod { uid: UID.into() }));
        let guaranteed = format!("0::/kubepods/pod{UID}/{CTR}\n");
        assert_eq!(from_cgroup(1, &guaranteed), Ok(Identity::Pod { uid: UID.into() }));
    }

    #[test]
    fn kubelet_systemd_driver_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CTR}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(from_cgroup(1, &text), Ok(Identity::Pod { uid: UID.into() }));
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(
            from_cgroup(1, &format!("4:memory:/docker/{CTR}\n0::/docker/{CTR}\n")),
            Ok(Identity::Container { id: CTR.into() })
        );
        assert_eq!(
            from_cgroup(1, &format!("0::/system.slice/docker-{CTR}.scope\n")),
            Ok(Identity::Container { id: CTR.into() })
        );
    }

    #[test]
    fn host_processes_and_lookalikes_are_not_identified() {
        for text in [
            "0::/\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/docker/not-hex\n",
            "0::/docker\n",
            "0::/kubepods/burstable/podnotauuid/x\n",
            "0::/podcast/4b7d3e62\n",
            "0::/user.slice/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/x\n",
            "0::/user.slice/user-1000.slice/kubepods/pod4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b/x\n",
            "0::/system.slice/mine/docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
            "",
            "garbage without colons\n",
        ] {
            assert!(
                matches!(from_cgroup(7, text), Err(Unidentified::NotAContainer { pid: 7, .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_kubelet_cgroup_root_is_honoured_and_nothing_else_is_a_pod() {
        let text = format!("0::/k8s-root/kubepods/besteffort/pod{UID}/{CTR}\n");
        assert_eq!(
            from_cgroup_under(1, &text, "/k8s-root"),
            Ok(Identity::Pod { uid: UID.into() })
        );
        assert!(from_cgroup(1, &text).is_err(), "not below the configured root");
        assert!(from_cgroup_under(1, &format!("0::/kubepods/pod{UID}/x\n"), "/k8s-root").is_err());
    }

    #[test]
    fn two_pods_or_two_containers_are_ambiguous() {
        let other = "9b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b";
        let text = format!("1:pids:/kubepods/pod{UID}/x\n2:memory:/kubepods/pod{other}/x\n");
        assert!(matches!(from_cgroup(1, &text), Err(Unidentified::Ambiguous { .. })));
        let text = format!("1:pids:/docker/{CTR}\n2:memory:/docker/{}\n", "f".repeat(64));
        assert!(matches!(from_cgroup(1, &text), Err(Unidentified::Ambiguous { .. })));
    }

    #[test]
    fn the_pod_wins_over_its_runtime_container() {
        let text = format!("1:pids:/docker/{CTR}\n2:memory:/kubepods/pod{UID}/{CTR}\n");
        assert_eq!(from_cgroup(1, &text), Ok(Identity::Pod { uid: UID.into() }));
    }

    #[test]
    fn the_start_time_is_read_after_the_command_name() {
        let stat =
            "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 2000000 300 18446744073709551615";
        assert_eq!(start_ticks(stat), Some(123_456));
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_read_and_a_later_start_is_refused() {
        let me = std::process::id() as i32;
        // The test runner is a host process (or the CI's container): either way it
        // must not be refused as reused when asked with the current time.
        let result = of_process(Path::new("/proc"), me, now_ticks(), "/");
        assert!(!matches!(result, Err(Unidentified::PidReused { .. })), "{result:?}");
        assert_eq!(
            of_process(Path::new("/proc"), me, 0, "/"),
            Err(Unidentified::PidReused { pid: me }),
            "a process that started after the accept is not the caller"
        );
        assert!(matches!(
            of_process(Path::new("/proc"), i32::MAX, now_ticks(), "/"),
            Err(Unidentified::Unreadable { .. })
        ));
    }

    #[test]
    fn a_pidfd_names_the_connecting_process_until_it_exits() {
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let Some(pidfd) = peer_pidfd(a.as_fd()) else {
            eprintln!("SO_PEERPIDFD unsupported by this kernel: nothing to test");
            return;
        };
        assert!(pidfd_is(&pidfd, std::process::id() as i32));
        assert!(!pidfd_is(&pidfd, 1));
        drop(b);
    }
}
