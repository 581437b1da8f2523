//! The shim's exit codes: a public interface (README, "Exit codes").

use std::fmt;

/// Why the shim exits, and with which code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// 0: the guest powered off, or a requested graceful stop completed.
    GuestStopped,
    /// 1: the VM could not start (bad template or annotation, libvirt refused
    /// the domain, libvirtd unreachable).
    StartFailed(String),
    /// 2: usage or configuration error (bad flag or environment variable).
    Usage(String),
    /// 3: the guest crashed or panicked, or its QEMU process failed.
    GuestCrashed(String),
    /// 4: the connection to libvirtd was lost and the VM did not survive it
    /// (or libvirtd did not come back within the reattach timeout).
    LostLibvirtd(String),
    /// 5: the domain was destroyed by someone other than the shim.
    DestroyedExternally,
    /// 6: a stop was requested and the guest did not shut down within the
    /// timeout (or a second signal came): the shim destroyed it.
    ForcedStop(String),
    /// 128+N: killed by signal N before the VM started.
    Signal(i32),
    /// 0: `--print-xml` printed the domain; no VM was run.
    PrintedXml,
}

impl Exit {
    /// The process exit code.
    pub fn code(&self) -> i32 {
        match self {
            Exit::GuestStopped | Exit::PrintedXml => 0,
            Exit::StartFailed(_) => 1,
            Exit::Usage(_) => 2,
            Exit::GuestCrashed(_) => 3,
            Exit::LostLibvirtd(_) => 4,
            Exit::DestroyedExternally => 5,
            Exit::ForcedStop(_) => 6,
            Exit::Signal(n) => 128 + n,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::GuestStopped => write!(f, "the guest stopped"),
            Exit::StartFailed(why) => write!(f, "could not start the VM: {why}"),
            Exit::Usage(why) => write!(f, "configuration error: {why}"),
            Exit::GuestCrashed(why) => write!(f, "the guest crashed: {why}"),
            Exit::LostLibvirtd(why) => write!(f, "lost libvirtd, and the VM with it: {why}"),
            Exit::DestroyedExternally => write!(f, "the domain was destroyed by someone else"),
            Exit::ForcedStop(why) => write!(f, "the VM was destroyed: {why}"),
            Exit::Signal(n) => write!(f, "stopped by signal {n} before the VM started"),
            Exit::PrintedXml => write!(f, "printed the domain XML (no VM was started)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_documented() {
        let all = [
            Exit::GuestStopped,
            Exit::StartFailed(String::new()),
            Exit::Usage(String::new()),
            Exit::GuestCrashed(String::new()),
            Exit::LostLibvirtd(String::new()),
            Exit::DestroyedExternally,
            Exit::ForcedStop(String::new()),
            Exit::Signal(15),
        ];
        let codes: Vec<i32> = all.iter().map(Exit::code).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6, 143]);
        let readme = include_str!("../../README.md");
        for code in &codes[..7] {
            assert!(
                readme.contains(&format!("| {code} |")),
                "README documents no exit code {code}"
            );
        }
        assert!(readme.contains("| 128+N |"));
    }
}
