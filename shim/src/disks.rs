//! Disks from the VM container (`containerFile`): the shim opens them in its
//! own mount namespace, where the image's files and the pod's volumes are,
//! and passes the descriptors to libvirtd. Each is opened without following
//! any symbolic link, and judged as the gate judges what it is passed (a
//! regular file or a block device, not empty, not a kernel file). How:
//!
//! - read-only: the file itself, read-only (an image's layer is shared);
//! - persistent: the file itself, read-write; it must be on a volume, not in
//!   the container's own file system, which disappears with the container;
//! - otherwise: a private copy in the scratch directory (the container's
//!   writable layer unless `VIRTKUBE_SCRATCH_DIR` says otherwise), unlinked
//!   at once, so the guest's writes vanish with the container.
//!
//! The cloud-init disk is built here too: a `cidata` volume in a sealed
//! memfd (see [`crate::cidata`]).

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;

use virtkube_api::resolve::{CloudInitSource, DiskSource, ResolvedTemplate};

/// How a container disk is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The file, read-only.
    ReadOnly,
    /// The file, read-write (on a volume).
    InPlace,
    /// A private, unlinked copy, read-write.
    Copy,
}

/// How to open a disk: read-only wins; then persistent or a copy.
pub fn mode(read_only: bool, persistent: bool) -> Mode {
    match (read_only, persistent) {
        (true, _) => Mode::ReadOnly,
        (false, true) => Mode::InPlace,
        (false, false) => Mode::Copy,
    }
}

/// One disk opened for passing: its descriptor group (the target name the
/// renderer gave it) and the descriptor.
#[derive(Debug)]
pub struct Opened {
    /// The descriptor group: the disk's target (`vda`, `sda`, …).
    pub group: String,
    /// The open file.
    pub fd: OwnedFd,
    /// Whether QEMU may write to it.
    pub writable: bool,
    /// What was opened, for messages.
    pub path: String,
}

/// Who the guest is to cloud-init: its `instance-id` and `local-hostname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The pod's UID (each pod is a new instance).
    pub instance_id: String,
    /// The pod's name.
    pub hostname: String,
}

impl Seed {
    /// The pod's UID and name; outside Kubernetes, the domain's UUID if it
    /// has one, and the container's hostname (the domain's name).
    pub fn of(instance: &crate::render::Instance) -> Seed {
        Seed {
            instance_id: instance
                .pod_uid
                .clone()
                .or_else(|| instance.uuid.clone())
                .unwrap_or_else(|| instance.domain_name.clone()),
            hostname: instance
                .pod_name
                .clone()
                .unwrap_or_else(|| instance.domain_name.clone()),
        }
    }
}

/// Opens every `containerFile` disk of `template` and builds its cloud-init
/// disk, in the order of the rendered domain's disks; `scratch` holds
/// private copies. The error names the disk's field and what to do.
pub fn open_all(template: &ResolvedTemplate, scratch: &Path, seed: &Seed) -> Result<Vec<Opened>, String> {
    let mut opened = Vec::new();
    let targets = crate::render::disk_targets(template);
    for (index, (disk, group)) in template.disks.iter().zip(targets).enumerate() {
        if let DiskSource::CloudInit(source) = &disk.source {
            let fd = cloud_init_disk(source, seed)?;
            opened.push(Opened {
                group,
                fd,
                writable: false,
                path: format!("(cloud-init {})", crate::cidata::LABEL),
            });
            continue;
        }
        let DiskSource::Container { path, persistent } = &disk.source else {
            continue;
        };
        let field = format!("disks[{index}].containerFile");
        let how = mode(disk.read_only, *persistent);
        let fd = open_one(path, how, scratch).map_err(|why| format!("{field} {path:?}: {why}"))?;
        opened.push(Opened {
            group,
            fd,
            writable: how != Mode::ReadOnly,
            path: path.clone(),
        });
    }
    Ok(opened)
}

fn open_one(path: &str, how: Mode, scratch: &Path) -> Result<OwnedFd, String> {
    // Read-only first, whatever the mode: opening a file of the image's
    // layer for writing would copy it up whole before any check.
    let fd = open_no_symlinks(path, libc::O_RDONLY)?;
    let judged = libvirt_wire::disk_fd::check(0, fd.as_fd()).map_err(|refused| {
        // The check speaks of "descriptor 0": here it is the named file.
        refused.to_string().replacen("descriptor 0", "it", 1)
    })?;
    if judged.block_device {
        // A block device is a volume (a PVC's volumeDevices): written in
        // place, never copied whole into the container.
        return match how {
            Mode::ReadOnly => Ok(fd),
            Mode::InPlace => reopen_writable(&fd),
            Mode::Copy => Err(
                "is a block device (a volume): the guest cannot get a private copy of it; set persistent: true to write to it, or readOnly: true".into(),
            ),
        };
    }
    match how {
        Mode::ReadOnly => Ok(fd),
        Mode::InPlace => {
            // A volume is a mount of its own; the container's file system is
            // the mount of /.
            let root = open_no_symlinks("/", libc::O_RDONLY | libc::O_DIRECTORY)?;
            match (mount_id(&fd), mount_id(&root)) {
                (Some(file), Some(root)) if file != root => {}
                (Some(_), Some(_)) => {
                    return Err(
                        "a persistent disk must be on a volume (a PersistentVolumeClaim), but this file is in the container's own file system, which disappears with the container; mount a volume there, or drop persistent"
                            .into(),
                    );
                }
                _ => return Err("cannot tell which mount it is on (/proc/self/fdinfo)".into()),
            }
            reopen_writable(&fd)
        }
        Mode::Copy => private_copy(File::from(fd), scratch),
    }
}

/// The same file, now for writing (through the descriptor, so no path is
/// resolved again).
fn reopen_writable(fd: &OwnedFd) -> Result<OwnedFd, String> {
    let reopened = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&reopened)
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open it for writing: {e}"))
}

/// The mount a descriptor's file is on, from `/proc/self/fdinfo`.
fn mount_id(fd: &OwnedFd) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(fd))).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
}

/// Opens `path` without following a symbolic link anywhere in it (openat2's
/// RESOLVE_NO_SYMLINKS), never blocking on a FIFO (O_NONBLOCK, cleared again).
fn open_no_symlinks(path: &str, flags: i32) -> Result<OwnedFd, String> {
    let c_path = std::ffi::CString::new(path).map_err(|_| "contains a NUL byte".to_owned())?;
    // SAFETY: an all-zero open_how is a valid value; the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the C string and the open_how of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) => {
                "is reached through a symbolic link; name the file itself (links are not followed)".into()
            }
            Some(libc::ENOENT) => "does not exist in the VM container".into(),
            Some(libc::EISDIR) => "is a directory; a disk must be a regular file or a block device".into(),
            Some(libc::ENOSYS) => "cannot be opened safely: the kernel lacks openat2 (Linux 5.6)".into(),
            _ => format!("cannot be opened: {e}"),
        });
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: fcntl on a descriptor we own; clears O_NONBLOCK for QEMU.
    unsafe {
        let flags = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_SETFL,
                flags & !libc::O_NONBLOCK,
            );
        }
    }
    Ok(fd)
}

/// The `cidata` volume for `source`, in a sealed memfd. Errors name
/// `spec.cloudInit` and the file.
fn cloud_init_disk(source: &CloudInitSource, seed: &Seed) -> Result<OwnedFd, String> {
    let field = "spec.cloudInit";
    let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
        let Some(directory) = &source.directory else {
            return Ok(None);
        };
        read_seed_file(&Path::new(directory).join(name))
            .map_err(|why| format!("{field}.directory {directory:?}: {name} {why}"))
    };
    let mut files = std::collections::BTreeMap::new();
    let user_data = match (&source.user_data, &source.directory) {
        (Some(inline), _) => inline.clone().into_bytes(),
        (None, Some(directory)) => read("user-data")?.ok_or_else(|| match std::fs::read_dir(directory) {
            Ok(entries) => {
                let present: Vec<String> = entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| !name.starts_with(".."))
                    .collect();
                format!(
                    "{field}.directory {directory:?} has no user-data file (it holds: {}); name the Secret's or ConfigMap's key user-data",
                    if present.is_empty() { "nothing".to_owned() } else { present.join(", ") }
                )
            }
            Err(e) => format!(
                "{field}.directory {directory:?} cannot be read ({e}); mount the Secret or ConfigMap with the user-data there"
            ),
        })?,
        (None, None) => return Err(format!("{field}: no user-data given")),
    };
    files.insert("user-data".to_owned(), user_data);
    let given_meta = read("meta-data")?;
    let given_meta = given_meta
        .as_deref()
        .map(|bytes| std::str::from_utf8(bytes).map_err(|_| format!("{field}: meta-data is not UTF-8 text")))
        .transpose()?;
    let meta = crate::cidata::meta_data(given_meta, &seed.instance_id, &seed.hostname)
        .map_err(|why| format!("{field}: meta-data {why}"))?;
    files.insert("meta-data".to_owned(), meta);
    for name in crate::cidata::OPTIONAL_FILES {
        if let Some(data) = read(name)? {
            files.insert(name.to_owned(), data);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let image = crate::cidata::iso9660(crate::cidata::LABEL, &files, now).map_err(|why| format!("{field}: {why}"))?;
    sealed_memfd("virtkube-cidata", &image)
        .map_err(|e| format!("{field}: cannot hold the cloud-init disk in memory: {e}"))
}

/// A seed file's bytes, `None` when it does not exist. Links are followed:
/// a Secret or ConfigMap volume is made of them, and the shim copies the
/// bytes rather than passing the file.
fn read_seed_file(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: a FIFO named user-data must not hang the start.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot be examined: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mut data = Vec::new();
    file.take(crate::cidata::MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if data.len() > crate::cidata::MAX_FILE_BYTES {
        return Err(format!(
            "is larger than {} MiB; cloud-init's seed files are small",
            crate::cidata::MAX_FILE_BYTES >> 20
        ));
    }
    Ok(Some(data))
}

/// `bytes` in an anonymous memory file, sealed against any change (what
/// the guest reads is what the shim wrote), opened read-only.
fn sealed_memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::Write;
    let c_name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create reads the C string and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and nothing else owns it.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // QEMU takes a read-only disk's descriptor only if it was opened
    // read-only: the same memory file, reopened so.
    let read_only = File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))?;
    Ok(read_only.into())
}

/// A read-write copy of `source` in `scratch`, unlinked at once: only the
/// descriptor holds it, and it is gone when QEMU and the shim close it.
fn private_copy(mut source: File, scratch: &Path) -> Result<OwnedFd, String> {
    let name = scratch.join(format!(".virtkube-disk-{}-{}", std::process::id(), unique()));
    let mut copy = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&name)
        .map_err(|e| {
            format!(
                "cannot make its private copy in {} ({e}); set VIRTKUBE_SCRATCH_DIR to a writable directory with room (an emptyDir), or make the disk readOnly or persistent",
                scratch.display()
            )
        })?;
    let _ = std::fs::remove_file(&name);
    std::io::copy(&mut source, &mut copy).map_err(|e| {
        format!(
            "copying it into {} failed ({e}); give VIRTKUBE_SCRATCH_DIR more room",
            scratch.display()
        )
    })?;
    std::io::Seek::rewind(&mut copy).map_err(|e| format!("cannot rewind its copy: {e}"))?;
    Ok(copy.into())
}

/// A number no other copy of this process has used.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shim-disks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn read_only_wins_then_persistent_else_a_copy() {
        assert_eq!(mode(true, true), Mode::ReadOnly);
        assert_eq!(mode(true, false), Mode::ReadOnly);
        assert_eq!(mode(false, true), Mode::InPlace);
        assert_eq!(mode(false, false), Mode::Copy);
    }

    #[test]
    fn a_private_copy_takes_the_writes_and_leaves_the_image_alone() {
        let dir = scratch("copy");
        let image = dir.join("root.raw");
        std::fs::write(&image, b"original").unwrap();
        let fd = open_one(image.to_str().unwrap(), Mode::Copy, &dir).unwrap();
        let mut copy = File::from(fd);
        copy.write_all(b"CHANGED!").unwrap();
        copy.rewind().unwrap();
        let mut seen = String::new();
        copy.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "CHANGED!");
        assert_eq!(std::fs::read_to_string(&image).unwrap(), "original");
        // Unlinked: only the image is left in the directory.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("root.raw")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_paths_are_refused_with_the_reason() {
        let dir = scratch("hostile");
        let image = dir.join("root.raw");
        std::fs::write(&image, b"disk").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
        std::os::unix::fs::symlink(&image, dir.join("inner-link")).unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let at = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        for (path, how, why) in [
            (at("link"), Mode::ReadOnly, "symbolic link"),
            (at("inner-link"), Mode::ReadOnly, "symbolic link"),
            (at("empty"), Mode::ReadOnly, "empty file"),
            (at("fifo"), Mode::ReadOnly, "is a FIFO"),
            (at("missing"), Mode::ReadOnly, "does not exist"),
            (dir.to_str().unwrap().to_owned(), Mode::ReadOnly, "is a directory"),
            (dir.to_str().unwrap().to_owned(), Mode::InPlace, "is a directory"),
            // /proc/self is a link; /proc/PID/mem is not, and is the kernel's.
            ("/proc/self/mem".to_owned(), Mode::ReadOnly, "symbolic link"),
            (format!("/proc/{}/mem", std::process::id()), Mode::ReadOnly, "procfs"),
            ("/dev/null".to_owned(), Mode::ReadOnly, "character device"),
        ] {
            let e = open_one(&path, how, &dir).unwrap_err();
            assert!(e.contains(why), "{path}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_block_device_is_written_in_place_or_read_never_copied() {
        // A node for the first loop device, as a PVC's volumeDevices puts
        // one in the container (mknod needs CAP_MKNOD: root, as the tests run).
        let dir = scratch("block");
        let node = dir.join("disk");
        let c_node = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; makedev(7, 0) is /dev/loop0's number.
        if unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) } != 0 {
            skip_unless_tools_optional(&format!(
                "cannot make a block device node here ({})",
                std::io::Error::last_os_error()
            ));
            return;
        }
        let path = node.to_str().unwrap();
        for how in [Mode::ReadOnly, Mode::InPlace] {
            let fd = open_one(path, how, &dir).unwrap_or_else(|e| panic!("{how:?}: {e}"));
            assert!(libvirt_wire::disk_fd::check(0, fd.as_fd()).unwrap().block_device);
        }
        let e = open_one(path, Mode::Copy, &dir).unwrap_err();
        assert!(
            e.contains("is a block device (a volume)") && e.contains("persistent: true"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory laid out as the kubelet lays out a Secret volume: each
    /// key a link into a timestamped directory through `..data`.
    fn secret_volume(tag: &str, keys: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = scratch(tag);
        let data = dir.join("..2026_11_23_20_00_00.000000001");
        std::fs::create_dir(&data).unwrap();
        for (key, value) in keys {
            std::fs::write(data.join(key), value).unwrap();
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).unwrap();
        }
        std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
        dir
    }

    /// A test that needs what this machine lacks is skipped, saying so,
    /// unless VIRTKUBE_REQUIRE_TOOLS is set (scripts/test.sh sets it, having
    /// installed everything): then it fails.
    fn skip_unless_tools_optional(why: &str) {
        assert!(
            std::env::var_os("VIRTKUBE_REQUIRE_TOOLS").is_none(),
            "{why}, and VIRTKUBE_REQUIRE_TOOLS is set"
        );
        eprintln!("{why}; skipped");
    }

    fn tool(program: &str, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new(program).args(args).output().ok()?;
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn the_cloud_init_disk_is_a_sealed_cidata_volume_that_blkid_and_isoinfo_read() {
        let dir = secret_volume(
            "cidata",
            &[
                ("user-data", "#cloud-config\nruncmd: [echo hi]\n"),
                ("meta-data", "public-keys: [ssh-ed25519 AAAA me]\n"),
                ("network-config", "version: 2\n"),
            ],
        );
        let source = CloudInitSource {
            directory: Some(dir.to_str().unwrap().to_owned()),
            user_data: None,
        };
        let seed = Seed {
            instance_id: "6f1c0b9e-1111-2222-3333-444455556666".into(),
            hostname: "web-0".into(),
        };
        let fd = cloud_init_disk(&source, &seed).unwrap();
        libvirt_wire::disk_fd::check(0, fd.as_fd()).unwrap();
        // SAFETY: F_GETFL/F_GET_SEALS only read the state of a descriptor we hold.
        let (flags, seals) = unsafe {
            (
                libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_GETFL),
                libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_GET_SEALS),
            )
        };
        assert_eq!(
            flags & libc::O_ACCMODE,
            libc::O_RDONLY,
            "QEMU takes a read-only disk read-only"
        );
        assert_eq!(seals & libc::F_SEAL_WRITE, libc::F_SEAL_WRITE, "sealed against writes");
        let mut file = File::from(fd);
        let mut image = Vec::new();
        file.read_to_end(&mut image).unwrap();
        let path = dir.join("seed.iso");
        std::fs::write(&path, &image).unwrap();
        let path = path.to_str().unwrap();
        // util-linux's blkid is everywhere; it is how cloud-init finds the disk.
        let probed = tool("blkid", &["-p", "-o", "export", path]).unwrap();
        assert!(
            probed.contains("TYPE=iso9660") && probed.contains("LABEL=cidata"),
            "{probed}"
        );
        // isoinfo (genisoimage) reads the Rock Ridge names and the files.
        let Some(listing) = tool("isoinfo", &["-R", "-f", "-i", path]) else {
            skip_unless_tools_optional("isoinfo is not installed (apt-get install genisoimage)");
            return;
        };
        let mut names: Vec<_> = listing.lines().collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/network-config", "/user-data"]);
        let user_data = tool("isoinfo", &["-R", "-i", path, "-x", "/user-data"]).unwrap();
        assert_eq!(user_data, "#cloud-config\nruncmd: [echo hi]\n");
        let meta: serde_json::Value =
            serde_json::from_str(&tool("isoinfo", &["-R", "-i", path, "-x", "/meta-data"]).unwrap()).unwrap();
        assert_eq!(meta["instance-id"], "6f1c0b9e-1111-2222-3333-444455556666");
        assert_eq!(meta["local-hostname"], "web-0");
        assert_eq!(meta["public-keys"][0], "ssh-ed25519 AAAA me");
        // Without Rock Ridge, the ISO 9660 names still read as the files'.
        let plain = tool("isoinfo", &["-f", "-i", path]).unwrap();
        assert!(plain.contains("/USER-DATA.;1"), "{plain}");
        // The annotation's user-data replaces the directory's, which keeps
        // giving the rest.
        let annotated = CloudInitSource {
            user_data: Some("#!/bin/sh\necho annotated\n".into()),
            ..source
        };
        let mut image = Vec::new();
        File::from(cloud_init_disk(&annotated, &seed).unwrap())
            .read_to_end(&mut image)
            .unwrap();
        std::fs::write(path, &image).unwrap();
        let user_data = tool("isoinfo", &["-R", "-i", path, "-x", "/user-data"]).unwrap();
        assert_eq!(user_data, "#!/bin/sh\necho annotated\n");
        let network = tool("isoinfo", &["-R", "-i", path, "-x", "/network-config"]).unwrap();
        assert_eq!(network, "version: 2\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cloud_init_errors_name_the_directory_and_the_file() {
        let seed = Seed {
            instance_id: "i".into(),
            hostname: "h".into(),
        };
        let dir = secret_volume("cidata-bad", &[("userdata", "x"), ("meta-data", "- not a mapping\n")]);
        let source = |user_data: Option<&str>| CloudInitSource {
            directory: Some(dir.to_str().unwrap().to_owned()),
            user_data: user_data.map(str::to_owned),
        };
        let e = cloud_init_disk(&source(None), &seed).unwrap_err();
        assert!(
            e.contains("has no user-data file (it holds: userdata, meta-data)")
                || e.contains("(it holds: meta-data, userdata)"),
            "{e}"
        );
        let e = cloud_init_disk(&source(Some("#!/bin/sh\n")), &seed).unwrap_err();
        assert!(e.starts_with("spec.cloudInit: meta-data is not a YAML mapping"), "{e}");
        std::fs::remove_file(dir.join("meta-data")).unwrap();
        // A FIFO (no writer: opening it would block) and an oversized file.
        let fifo = std::ffi::CString::new(dir.join("vendor-data").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = cloud_init_disk(&source(Some("#!/bin/sh\n")), &seed).unwrap_err();
        assert!(e.ends_with("vendor-data is not a regular file"), "{e}");
        std::fs::remove_file(dir.join("vendor-data")).unwrap();
        std::fs::write(dir.join("vendor-data"), vec![b'v'; crate::cidata::MAX_FILE_BYTES + 1]).unwrap();
        let e = cloud_init_disk(&source(Some("#!/bin/sh\n")), &seed).unwrap_err();
        assert!(e.contains("vendor-data is larger than 16 MiB"), "{e}");
        std::fs::remove_file(dir.join("vendor-data")).unwrap();
        std::fs::create_dir(dir.join("network-config")).unwrap();
        let e = cloud_init_disk(&source(Some("#!/bin/sh\n")), &seed).unwrap_err();
        assert!(e.ends_with("network-config is not a regular file"), "{e}");
        std::fs::remove_dir(dir.join("network-config")).unwrap();
        let missing = CloudInitSource {
            directory: Some(dir.join("absent").to_str().unwrap().to_owned()),
            user_data: None,
        };
        let e = cloud_init_disk(&missing, &seed).unwrap_err();
        assert!(e.contains("absent\" cannot be read (No such file or directory"), "{e}");
        std::fs::create_dir(dir.join("empty")).unwrap();
        let empty = CloudInitSource {
            directory: Some(dir.join("empty").to_str().unwrap().to_owned()),
            user_data: None,
        };
        let e = cloud_init_disk(&empty, &seed).unwrap_err();
        assert!(e.contains("has no user-data file (it holds: nothing)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_persistent_disk_must_be_on_another_file_system_than_the_root() {
        // /tmp here is on the root file system unless a tmpfs is mounted.
        let dir = scratch("persistent");
        let image = dir.join("root.raw");
        std::fs::write(&image, b"disk").unwrap();
        let on_root = mount_id(&open_no_symlinks(dir.to_str().unwrap(), libc::O_RDONLY).unwrap())
            == mount_id(&open_no_symlinks("/", libc::O_RDONLY).unwrap());
        let opened = open_one(image.to_str().unwrap(), Mode::InPlace, &dir);
        if on_root {
            assert!(opened.unwrap_err().contains("must be on a volume"));
        } else {
            opened.unwrap();
        }
        // /dev/shm is a tmpfs of its own: a "volume" as far as the check goes.
        let shm = Path::new("/dev/shm").join(format!("shim-disks-{}", std::process::id()));
        std::fs::write(&shm, b"disk").unwrap();
        let fd = open_one(shm.to_str().unwrap(), Mode::InPlace, &dir).unwrap();
        let mut file = File::from(fd);
        file.write_all(b"DISK").unwrap();
        assert_eq!(std::fs::read_to_string(&shm).unwrap(), "DISK", "written in place");
        std::fs::remove_file(&shm).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
