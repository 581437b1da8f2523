//! What may be passed to libvirtd as a disk: an open descriptor of a
//! regular file or a block device, on an ordinary file system. Never a path
//! (an `O_PATH` descriptor), a directory, a FIFO, a socket, a device other
//! than a disk, an empty file, or a file of the kernel's own file systems
//! (`/proc/self/mem`, sysfs, cgroupfs…), whose "contents" are the kernel's
//! state rather than a disk's. The shim checks what it opens; the gate
//! checks what a VM container passes.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Why a passed descriptor is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Opened with `O_PATH`: a name, not an open file.
    #[error("descriptor {index} was opened with O_PATH: pass an open file, not a path")]
    PathOnly {
        /// Its position in the call.
        index: usize,
    },
    /// Not a regular file or a block device.
    #[error("descriptor {index} is a {kind}; a disk must be a regular file or a block device")]
    Kind {
        /// Its position in the call.
        index: usize,
        /// What it is.
        kind: &'static str,
    },
    /// A file of a kernel file system.
    #[error("descriptor {index} is a file of {fs}, not a disk image")]
    KernelFs {
        /// Its position in the call.
        index: usize,
        /// Which file system.
        fs: &'static str,
    },
    /// A regular file of no bytes: no disk at all.
    #[error("descriptor {index} is an empty file; a disk image has a size")]
    Empty {
        /// Its position in the call.
        index: usize,
    },
    /// fstat/fstatfs/fcntl failed.
    #[error("descriptor {index} cannot be examined: {error}")]
    Unreadable {
        /// Its position in the call.
        index: usize,
        /// The error.
        error: String,
    },
}

/// File type names for `st_mode & S_IFMT`.
pub fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFBLK => "block device",
        libc::S_IFDIR => "directory",
        libc::S_IFCHR => "character device",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symbolic link",
        _ => "file of an unknown type",
    }
}

/// The kernel's pseudo file systems, by `statfs` magic number.
pub fn kernel_fs(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x0027_e0eb => "cgroupfs",
        0x6367_7270 => "cgroup2fs",
        0x6462_6720 => "debugfs",
        0x7374_6174 => "securityfs",
        0x7472_6163 => "tracefs",
        0xcafe_4a11 => "bpffs",
        0x6e73_6673 => "nsfs",
        0x0000_1cd1 => "devpts",
        0x6265_6570 => "configfs",
        0xde5e_81e4 => "efivarfs",
        0x6165_676c => "pstore",
        0xf97c_ff8c => "selinuxfs",
        0x4249_4e4d => "binfmt_misc",
        0x6573_5543 => "fusectl",
        0x7375_7245 => "autofs",
        0x0000_9fa2 => "usbdevfs",
        _ => return None,
    })
}

/// What a descriptor that may be passed as a disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    /// A block device (else a regular file).
    pub block_device: bool,
    /// Its file's device and inode: what identifies it whatever its name.
    pub file: (u64, u64),
}

/// Judges the `index`th descriptor of a call.
pub fn check(index: usize, fd: BorrowedFd<'_>) -> Result<Disk, Refused> {
    let raw = fd.as_raw_fd();
    let failed = |what: &str| Refused::Unreadable {
        index,
        error: format!("{what}: {}", std::io::Error::last_os_error()),
    };
    // SAFETY: fcntl(F_GETFL) only reads the flags of a descriptor we hold.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(failed("fcntl"));
    }
    if flags & libc::O_PATH != 0 {
        return Err(Refused::PathOnly { index });
    }
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into the writable `st`.
    if unsafe { libc::fstat(raw, &mut st) } < 0 {
        return Err(failed("fstat"));
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFBLK {
        return Err(Refused::Kind {
            index,
            kind: kind_name(st.st_mode),
        });
    }
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into the writable `fs`.
    if unsafe { libc::fstatfs(raw, &mut fs) } < 0 {
        return Err(failed("fstatfs"));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    if let Some(name) = kernel_fs(fs.f_type as i64) {
        return Err(Refused::KernelFs { index, fs: name });
    }
    if kind == libc::S_IFREG && st.st_size == 0 {
        return Err(Refused::Empty { index });
    }
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)] // widths differ between libcs
    Ok(Disk {
        block_device: kind == libc::S_IFBLK,
        file: (st.st_dev as u64, u64::from(st.st_ino)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn open(path: &str, flags: i32) -> OwnedFd {
        let c = std::ffi::CString::new(path).unwrap();
        // SAFETY: a valid C string; the returned descriptor is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        assert!(fd >= 0, "{path}: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just opened and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_regular_file_passes_and_everything_else_is_named() {
        let dir = std::env::temp_dir().join(format!("gate-passed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, b"disk").unwrap();
        let disk = disk.to_str().unwrap();
        let judged = check(0, open(disk, libc::O_RDWR).as_fd()).unwrap();
        let meta = std::fs::metadata(disk).unwrap();
        assert_eq!(
            judged,
            Disk {
                block_device: false,
                file: (
                    std::os::unix::fs::MetadataExt::dev(&meta),
                    std::os::unix::fs::MetadataExt::ino(&meta)
                ),
            }
        );
        assert_eq!(
            check(1, open(disk, libc::O_PATH).as_fd()),
            Err(Refused::PathOnly { index: 1 })
        );
        let e = check(2, open(dir.to_str().unwrap(), libc::O_RDONLY).as_fd()).unwrap_err();
        assert_eq!(
            e,
            Refused::Kind {
                index: 2,
                kind: "directory"
            }
        );
        assert!(e.to_string().contains("regular file or a block device"), "{e}");
        let e = check(3, open("/proc/self/mem", libc::O_RDONLY).as_fd()).unwrap_err();
        assert_eq!(e, Refused::KernelFs { index: 3, fs: "procfs" });
        let e = check(
            4,
            open("/sys/kernel/mm/transparent_hugepage/enabled", libc::O_RDONLY).as_fd(),
        );
        assert!(matches!(e, Err(Refused::KernelFs { fs: "sysfs", .. })), "{e:?}");
        let e = check(5, open("/dev/null", libc::O_RDONLY).as_fd());
        assert_eq!(
            e,
            Err(Refused::Kind {
                index: 5,
                kind: "character device"
            })
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            check(6, a.as_fd()),
            Err(Refused::Kind {
                index: 6,
                kind: "socket"
            })
        );
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = check(
            7,
            open(fifo.to_str().unwrap(), libc::O_RDONLY | libc::O_NONBLOCK).as_fd(),
        );
        assert_eq!(e, Err(Refused::Kind { index: 7, kind: "FIFO" }));
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            check(8, open(empty.to_str().unwrap(), libc::O_RDONLY).as_fd()),
            Err(Refused::Empty { index: 8 })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
