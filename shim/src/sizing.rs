//! The VM's size as its container sees it. The gate moves QEMU into the
//! VM's pod cgroup (or, on Docker, its container's) and refuses a VM that
//! cannot fit there; the shim warns about a container without a memory
//! limit and tells a kill for memory apart from a crash. Pure: the cgroup
//! files come in as text.

/// QEMU's memory beyond the guest's, as the gate assumes it by default
/// (measured with the tiny guest under TCG: RSS 217 MiB for 128 MiB of guest
/// memory, 89 MiB more, rounded up). `VIRTKUBE_QEMU_OVERHEAD` changes the
/// figure the shim's messages use.
pub const DEFAULT_QEMU_OVERHEAD: u64 = 128 * MIB;

const MIB: u64 = 1024 * 1024;

/// cgroup v1 reports "no limit" as a huge number (the largest page multiple
/// below 2⁶³); anything from 2⁶² up is unlimited in practice.
const V1_UNLIMITED: u64 = 1 << 62;

/// The container's memory limit in bytes from its cgroup v2 `memory.max` or
/// v1 `memory.limit_in_bytes` (whichever was readable), `None` if unlimited
/// or unknown.
pub fn memory_limit(v2_max: Option<&str>, v1_limit: Option<&str>) -> Option<u64> {
    if let Some(max) = v2_max.map(str::trim) {
        return max.parse().ok();
    }
    v1_limit
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|limit| *limit < V1_UNLIMITED)
}

/// Bytes as whole MiB, rounded up (how a `resources:` block is best written).
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// The warning for a VM container without a memory limit (`limit` `None`),
/// which leaves the VM's size unknown to the scheduler and its QEMU
/// unbounded. A limit that is too small is the gate's to refuse: it knows
/// which cgroup QEMU joins (the pod's, or a Docker container's) and its limit.
pub fn unlimited_warning(limit: Option<u64>, guest: u64, overhead: u64) -> Option<String> {
    if limit.is_some() {
        return None;
    }
    let (g, n) = (mib(guest), mib(guest.saturating_add(overhead)));
    Some(format!(
        "the container has no memory limit, so the scheduler does not know this VM's size ({n} MiB with QEMU) and nothing bounds it; \
         give the pod runtimeClassName: virtkube and this container resources: {{requests: {{memory: {g}Mi}}, limits: {{memory: {g}Mi}}}}, \
         or without that RuntimeClass resources: {{requests: {{memory: {n}Mi}}, limits: {{memory: {n}Mi}}}}"
    ))
}

/// How many processes the kernel has killed for memory in the container's
/// cgroup: `oom_kill` of cgroup v2 `memory.events` or v1 `memory.oom_control`.
pub fn oom_kills(v2_events: Option<&str>, v1_oom_control: Option<&str>) -> Option<u64> {
    v2_events
        .or(v1_oom_control)?
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_counted_in_either_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(oom_kills(Some(v2), None), Some(2));
        assert_eq!(oom_kills(None, Some(v1)), Some(5));
        assert_eq!(oom_kills(None, Some("oom_kill_disable 0\nunder_oom 0\n")), None);
        assert_eq!(oom_kills(None, None), None);
    }

    #[test]
    fn limits_read_from_either_cgroup_version() {
        assert_eq!(memory_limit(Some("268435456\n"), None), Some(256 * MIB));
        assert_eq!(memory_limit(Some("max\n"), None), None);
        assert_eq!(memory_limit(None, Some("536870912\n")), Some(512 * MIB));
        // v1's "unlimited".
        assert_eq!(memory_limit(None, Some("9223372036854771712\n")), None);
        assert_eq!(memory_limit(None, None), None);
        assert_eq!(memory_limit(None, Some("garbage")), None);
    }

    #[test]
    fn only_a_missing_limit_is_warned_about() {
        assert_eq!(unlimited_warning(Some(64 * MIB), 128 * MIB, 128 * MIB), None);
        let warning = unlimited_warning(None, 2048 * MIB, 128 * MIB).unwrap();
        assert!(warning.contains("no memory limit"), "{warning}");
        assert!(warning.contains("limits: {memory: 2048Mi}"), "{warning}");
        assert!(warning.contains("limits: {memory: 2176Mi}"), "{warning}");
        assert!(warning.contains("runtimeClassName: virtkube"), "{warning}");
    }
}
