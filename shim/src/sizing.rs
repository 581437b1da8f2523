//! Whether the VM fits in its container. The gate moves QEMU into the VM
//! container's cgroups, so the container's memory limit bounds the guest's
//! memory plus QEMU's own. Pure: the limit comes in as the text of the
//! container's cgroup files.

/// QEMU's memory beyond the guest's, measured with the tiny guest under TCG
/// (RSS 217 MiB for 128 MiB of guest memory: 89 MiB more), rounded up for
/// headroom. `VIRTKUBE_QEMU_OVERHEAD` overrides it.
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

/// How the VM's memory compares with its container's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// The limit holds the guest and QEMU.
    Fits,
    /// No limit: the VM starts, but the scheduler does not know its size.
    Unlimited {
        /// Guest memory plus QEMU's overhead, in bytes.
        needed: u64,
    },
    /// The limit is below guest memory plus QEMU's overhead.
    TooSmall {
        /// The container's limit, in bytes.
        limit: u64,
        /// Guest memory, in bytes.
        guest: u64,
        /// QEMU's overhead, in bytes.
        overhead: u64,
    },
}

/// Compares the container's `limit` with `guest` memory plus QEMU's `overhead`.
pub fn fit(limit: Option<u64>, guest: u64, overhead: u64) -> Fit {
    let needed = guest.saturating_add(overhead);
    match limit {
        None => Fit::Unlimited { needed },
        Some(limit) if limit < needed => Fit::TooSmall { limit, guest, overhead },
        Some(_) => Fit::Fits,
    }
}

/// Bytes as whole MiB, rounded up (how a `resources:` block is best written).
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// The `resources:` block that fits `needed` bytes.
pub fn resources_block(needed: u64) -> String {
    let m = mib(needed);
    format!("resources: {{requests: {{memory: {m}Mi}}, limits: {{memory: {m}Mi}}}}")
}

impl Fit {
    /// What to tell the user: `Err` refuses the start (exit 1), `Ok(Some)` is
    /// a warning, `Ok(None)` nothing.
    pub fn verdict(&self) -> Result<Option<String>, String> {
        match self {
            Fit::Fits => Ok(None),
            Fit::Unlimited { needed } => Ok(Some(format!(
                "the container has no memory limit, so the scheduler does not know this VM's size ({} MiB with QEMU); set {}",
                mib(*needed),
                resources_block(*needed)
            ))),
            Fit::TooSmall { limit, guest, overhead } => Err(format!(
                "the container's memory limit ({} MiB) cannot hold the VM: guest memory {} MiB + QEMU's overhead {} MiB = {} MiB (QEMU runs in this container's cgroup); set {} on the VM container, or give the guest less memory",
                mib(*limit),
                mib(*guest),
                mib(*overhead),
                mib(guest + overhead),
                resources_block(guest + overhead)
            )),
        }
    }
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
    fn a_limit_below_guest_plus_overhead_is_refused_with_the_numbers() {
        let verdict = fit(Some(200 * MIB), 128 * MIB, DEFAULT_QEMU_OVERHEAD).verdict();
        let message = verdict.unwrap_err();
        assert!(message.contains("memory limit (200 MiB)"), "{message}");
        assert!(
            message.contains("guest memory 128 MiB + QEMU's overhead 128 MiB = 256 MiB"),
            "{message}"
        );
        assert!(
            message.contains("resources: {requests: {memory: 256Mi}, limits: {memory: 256Mi}}"),
            "{message}"
        );
    }

    #[test]
    fn enough_or_no_limit_starts() {
        assert_eq!(fit(Some(256 * MIB), 128 * MIB, 128 * MIB).verdict(), Ok(None));
        let warning = fit(None, 2048 * MIB, 128 * MIB).verdict().unwrap().unwrap();
        assert!(warning.contains("no memory limit"), "{warning}");
        assert!(warning.contains("memory: 2176Mi"), "{warning}");
    }
}
