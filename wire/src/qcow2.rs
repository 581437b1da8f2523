//! What a qcow2 image's header says about files outside the image. QEMU
//! opens a backing file or an external data file by the name the header
//! gives, in its own mount namespace: the node's. So an image passed as a
//! descriptor may be qcow2 only if its header names no such file. The shim
//! checks before passing (to say which disk and what to do); the gate checks
//! every descriptor of a qcow2 disk as it arrives.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The first bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// How much of the image is read: the header, and the backing file's name
/// where it usually sits (right after the header and its extensions).
const READ_BYTES: usize = 64 * 1024;

/// Why a qcow2 image may not be passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The data does not start as a qcow2 image does.
    #[error(
        "is not a qcow2 image (it does not start with qcow2's magic); give its format as raw, or convert it: qemu-img convert -O qcow2 IMAGE image.qcow2"
    )]
    NotQcow2,
    /// Shorter than a qcow2 header.
    #[error("is too short to be a qcow2 image ({0} bytes)")]
    Truncated(usize),
    /// A version this check does not know.
    #[error("is a qcow2 image of version {0}; only versions 2 and 3 are understood")]
    Version(u32),
    /// The header names a backing file.
    #[error(
        "names a backing file ({0}) in its header, which QEMU would open on the node; flatten it first: qemu-img convert -O qcow2 IMAGE flat.qcow2"
    )]
    BackingFile(String),
    /// The image keeps its data in another file.
    #[error(
        "keeps its data in an external data file, which QEMU would open on the node; convert it into one file first: qemu-img convert -O qcow2 IMAGE whole.qcow2"
    )]
    ExternalDataFile,
    /// Encrypted: QEMU would need a key virtkube cannot give it.
    #[error(
        "is encrypted (qcow2 encryption method {0}), and virtkube cannot give QEMU its key; decrypt it first: qemu-img convert -O qcow2 …"
    )]
    Encrypted(u32),
    /// The descriptor could not be read.
    #[error("cannot be read: {0}")]
    Unreadable(String),
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be32(bytes, at)) << 32) | u64::from(be32(bytes, at + 4))
}

/// Judges the start of an image (at least its header; the backing file's
/// name is quoted when it lies within `start`).
pub fn check_header(start: &[u8]) -> Result<(), Refused> {
    if start.len() < 4 || start[..4] != MAGIC {
        return Err(Refused::NotQcow2);
    }
    // Version 2's header is 72 bytes; version 3 adds the feature bits.
    if start.len() < 72 {
        return Err(Refused::Truncated(start.len()));
    }
    let version = be32(start, 4);
    if !(2..=3).contains(&version) {
        return Err(Refused::Version(version));
    }
    let backing_offset = be64(start, 8);
    if backing_offset != 0 {
        let size = be32(start, 16) as usize;
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|at| start.get(at..at.checked_add(size)?))
            .map(|name| format!("{:?}", String::from_utf8_lossy(name)))
            .unwrap_or_else(|| format!("at byte {backing_offset}"));
        return Err(Refused::BackingFile(name));
    }
    let encryption = be32(start, 32);
    if encryption != 0 {
        return Err(Refused::Encrypted(encryption));
    }
    if version >= 3 {
        if start.len() < 80 {
            return Err(Refused::Truncated(start.len()));
        }
        const EXTERNAL_DATA_FILE: u64 = 1 << 2;
        if be64(start, 72) & EXTERNAL_DATA_FILE != 0 {
            return Err(Refused::ExternalDataFile);
        }
    }
    Ok(())
}

/// Reads the start of the image behind `fd` (at offset 0, without moving
/// the descriptor's position) and judges it.
pub fn check_fd(fd: BorrowedFd<'_>) -> Result<(), Refused> {
    let mut start = vec![0u8; READ_BYTES];
    let mut filled = 0;
    while filled < start.len() {
        // SAFETY: pread writes at most the given length into the buffer's
        // unfilled tail, which is valid and writable.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                start[filled..].as_mut_ptr().cast(),
                start.len() - filled,
                filled as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => filled += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Refused::Unreadable(e.to_string()));
            }
        }
    }
    start.truncate(filled);
    check_header(&start)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h
    }

    #[test]
    fn a_self_contained_image_passes_and_every_way_out_is_named() {
        check_header(&header(2)).unwrap();
        check_header(&header(3)).unwrap();
        let mut backed = header(3);
        backed[8..16].copy_from_slice(&200u64.to_be_bytes());
        backed[16..20].copy_from_slice(&11u32.to_be_bytes());
        backed[200..211].copy_from_slice(b"/etc/shadow");
        assert_eq!(
            check_header(&backed),
            Err(Refused::BackingFile("\"/etc/shadow\"".into()))
        );
        backed[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            check_header(&backed),
            Err(Refused::BackingFile(format!("at byte {}", 1u64 << 40)))
        );
        let mut external = header(3);
        external[79] = 1 << 2;
        assert_eq!(check_header(&external), Err(Refused::ExternalDataFile));
        let mut encrypted = header(2);
        encrypted[35] = 2;
        assert_eq!(check_header(&encrypted), Err(Refused::Encrypted(2)));
        assert_eq!(check_header(&header(4)), Err(Refused::Version(4)));
        assert_eq!(check_header(b"raw disk"), Err(Refused::NotQcow2));
        assert_eq!(check_header(&header(3)[..40]), Err(Refused::Truncated(40)));
        assert_eq!(check_header(&header(3)[..75]), Err(Refused::Truncated(75)));
        let message = Refused::BackingFile("\"base.qcow2\"".into()).to_string();
        assert!(message.contains("qemu-img convert -O qcow2"), "{message}");
    }

    /// Images made by qemu-img itself, if it is installed.
    #[test]
    fn qemu_img_s_own_images_are_judged_as_expected() {
        let dir = std::env::temp_dir().join(format!("wire-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let qemu_img = |args: &[&str]| std::process::Command::new("qemu-img").args(args).output();
        let Ok(made) = qemu_img(&["create", "-q", "-f", "qcow2", &at("base.qcow2"), "1M"]) else {
            eprintln!("qemu-img is not installed (apt-get install qemu-utils); skipped");
            return;
        };
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let made = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &at("base.qcow2"),
            &at("overlay.qcow2"),
        ])
        .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let made = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", at("data.raw")),
            &at("split.qcow2"),
            "1M",
        ])
        .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let judge = |name: &str| {
            let file = std::fs::File::open(at(name)).unwrap();
            check_fd(std::os::fd::AsFd::as_fd(&file))
        };
        judge("base.qcow2").unwrap();
        assert_eq!(
            judge("overlay.qcow2"),
            Err(Refused::BackingFile(format!("{:?}", at("base.qcow2"))))
        );
        assert_eq!(judge("split.qcow2"), Err(Refused::ExternalDataFile));
        assert_eq!(judge("data.raw"), Err(Refused::NotQcow2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
