//! Whether a VM fits where its QEMU will run. The gate moves QEMU into the
//! VM's pod cgroup (Kubernetes) or its container's (Docker), so that
//! cgroup's memory limit must hold the guest's memory and QEMU's own. The
//! gate checks before it lets the domain be created, and refuses with the
//! numbers and what to write. Pure but for [`memory_limit_of`].

use std::path::Path;

const MIB: u64 = 1024 * 1024;

/// QEMU's memory beyond the guest's, measured with the tiny guest under TCG
/// (RSS 217 MiB for 128 MiB of guest memory: 89 MiB more), rounded up for
/// headroom. The same figure is the `virtkube` RuntimeClass's
/// `overhead.podFixed`; `--qemu-overhead-mib` overrides it.
pub const DEFAULT_QEMU_OVERHEAD: u64 = 128 * MIB;

/// cgroup v1 reports "no limit" as a huge number (the largest page multiple
/// below 2⁶³); anything from 2⁶² up is unlimited in practice.
const V1_UNLIMITED: u64 = 1 << 62;

/// What bounds QEMU's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// A Kubernetes pod's cgroup: its containers' limits plus the
    /// RuntimeClass's overhead.
    Pod,
    /// A Docker container's cgroup: its `--memory`.
    Container,
}

/// The limit in one cgroup file's text: v2 `memory.max` (`max` = none) or
/// v1 `memory.limit_in_bytes` (a huge number = none). `None`: no limit.
pub fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|bytes| *bytes < V1_UNLIMITED)
}

/// The memory limit of the cgroup at `dir` (either version), `None` if it
/// has none or cannot be read.
pub fn memory_limit_of(dir: &Path) -> Option<u64> {
    ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .as_deref()
        .and_then(parse_limit)
}

/// Bytes as whole MiB, rounded up (how a `resources:` block is best written).
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// Refuses a VM whose `guest` memory plus QEMU's `overhead` exceeds the
/// `limit` of the cgroup `cgroup` that will hold QEMU; the message gives the
/// numbers and what to write. No limit: admitted (the shim warns).
pub fn check(limit: Option<u64>, guest: u64, overhead: u64, bound: Bound, cgroup: &str) -> Result<(), String> {
    let needed = guest.saturating_add(overhead);
    let Some(limit) = limit.filter(|limit| *limit < needed) else {
        return Ok(());
    };
    let (g, o, n, l) = (mib(guest), mib(overhead), mib(needed), mib(limit));
    let sum = format!("guest memory {g} MiB + QEMU's overhead {o} MiB = {n} MiB");
    Err(match bound {
        Bound::Pod => format!(
            "the pod's memory limit ({l} MiB) cannot hold the VM: {sum} (QEMU runs in the pod's cgroup {cgroup}). \
             Give the pod runtimeClassName: virtkube (its overhead adds QEMU's {o} MiB) and the VM container \
             resources: {{requests: {{memory: {g}Mi}}, limits: {{memory: {g}Mi}}}}, or without that RuntimeClass \
             resources: {{requests: {{memory: {n}Mi}}, limits: {{memory: {n}Mi}}}}; or give the guest less memory"
        ),
        Bound::Container => format!(
            "the container's memory limit ({l} MiB) cannot hold the VM: {sum} (QEMU runs in the container's cgroup {cgroup}). \
             Run it with --memory {n}m, or give the guest less memory"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_from_either_cgroup_version() {
        assert_eq!(parse_limit("268435456\n"), Some(256 * MIB));
        assert_eq!(parse_limit("max\n"), None);
        // v1's "unlimited".
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("garbage"), None);
        let dir = std::env::temp_dir().join(format!("virtkube-sizing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(memory_limit_of(&dir), None);
        std::fs::write(dir.join("memory.limit_in_bytes"), "536870912\n").unwrap();
        assert_eq!(memory_limit_of(&dir), Some(512 * MIB));
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(memory_limit_of(&dir), None, "v2's file wins where both exist");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pod_below_guest_plus_overhead_is_refused_with_the_numbers_and_both_remedies() {
        let message = check(
            Some(200 * MIB),
            160 * MIB,
            DEFAULT_QEMU_OVERHEAD,
            Bound::Pod,
            "/kubepods/pod1",
        )
        .unwrap_err();
        for part in [
            "pod's memory limit (200 MiB)",
            "guest memory 160 MiB + QEMU's overhead 128 MiB = 288 MiB",
            "cgroup /kubepods/pod1",
            "runtimeClassName: virtkube",
            "limits: {memory: 160Mi}",
            "limits: {memory: 288Mi}",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    #[test]
    fn a_docker_container_gets_the_flag_to_use() {
        let message = check(Some(100 * MIB), 128 * MIB, 128 * MIB, Bound::Container, "/docker/ab").unwrap_err();
        assert!(message.contains("container's memory limit (100 MiB)"), "{message}");
        assert!(message.contains("--memory 256m"), "{message}");
    }

    #[test]
    fn enough_or_no_limit_is_admitted() {
        assert_eq!(check(Some(256 * MIB), 128 * MIB, 128 * MIB, Bound::Pod, "/p"), Ok(()));
        assert_eq!(check(None, 2048 * MIB, 128 * MIB, Bound::Container, "/c"), Ok(()));
        assert!(check(Some(256 * MIB - 1), 128 * MIB, 128 * MIB, Bound::Pod, "/p").is_err());
    }
}
