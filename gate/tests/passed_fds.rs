//! Disks passed as file descriptors through the gate, against the real
//! libvirtd: this test process moves itself into a pod's cgroup (so it is a
//! separate test binary) and is the hostile client. It defines its domain
//! with a disk whose source is a descriptor group, then tries to pass what a
//! disk must not be — a directory, `/proc/self/mem`, an `O_PATH` descriptor,
//! a FIFO, a socket, an empty file — each refused with the reason while the
//! connection stays usable; then a real file, which QEMU ends up holding
//! though its path exists nowhere in QEMU's view. Another connection's
//! definition of the running domain is refused and undone; a definition
//! abandoned before its start is forgotten. A qcow2 disk is refused.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use libvirt_wire::{Client, Options, flags};

fn open(path: &str, flags: i32) -> OwnedFd {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a valid C string; the descriptor returned is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(fd >= 0, "{path}: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
#[ignore = "needs root, libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
fn only_open_files_pass_as_disks_and_qemu_gets_them() {
    let (dir, uid, cgroup) = support::this_process_in_a_pod("virtkube-gate-fds", "7a8b9c0d-1e2f-4a3b-8c4d");
    let (mut gate, socket, log) = support::start_gate(env!("CARGO_BIN_EXE_virtkube-gate"), &dir, "/virtkube-test");
    // Whatever happens below: the gate stops, and this process leaves the
    // pod's cgroup so that the directories can go.
    let mut cleanup = support::Cleanup(Vec::new());
    let (cg, scratch) = (cgroup.clone(), dir.clone());
    cleanup.0.push(Box::new(move || {
        let _ = gate.kill();
        let _ = gate.wait();
        if let Some(root) = cg.ancestors().nth(5) {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        support::remove_pod_cgroup(&cg);
        let _ = std::fs::remove_dir_all(&scratch);
    }));
    let name = format!("gate-fds-{}", std::process::id());
    let golden = support::tiny_golden_without_network();
    let xml = golden
        .replace("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", &uid)
        .replace("virtkube-golden_tiny-0", &name)
        .replace(
            "<devices>",
            r#"<devices><disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/virtkube-fd/root" fdgroup="root"/><target dev="vda" bus="virtio"/></disk>"#,
        );
    let disk = dir.join("root.raw");
    std::fs::write(&disk, vec![0u8; 1024 * 1024]).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::write(dir.join("empty"), b"").unwrap();
    let uri = format!("qemu+unix:///system?socket={}", socket.display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = || std::fs::read_to_string(&log).unwrap_or_default();

    runtime.block_on(async {
        let client = Client::connect(&uri, Options::default()).await.unwrap();
        // A qcow2 header could name a file of the node, and the caller could
        // rewrite it after any check: only raw comes as descriptors.
        let qcow2 = xml.replacen(r#"type="raw""#, r#"type="qcow2""#, 1);
        let refused = client.define_xml(&qcow2, flags::DEFINE_VALIDATE).await.unwrap_err();
        assert!(
            refused.to_string().contains("must be raw, not qcow2"),
            "{refused}\n{}",
            report()
        );
        let defined = client.define_xml(&xml, flags::DEFINE_VALIDATE).await.unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let hostile: Vec<(&str, OwnedFd, &str)> = vec![
            (
                "a directory",
                open(dir.to_str().unwrap(), libc::O_RDONLY),
                "is a directory",
            ),
            (
                "/proc/self/mem",
                open("/proc/self/mem", libc::O_RDONLY),
                "is a file of procfs",
            ),
            (
                "an O_PATH descriptor",
                open(disk.to_str().unwrap(), libc::O_PATH),
                "O_PATH",
            ),
            (
                "a FIFO",
                open(fifo.to_str().unwrap(), libc::O_RDONLY | libc::O_NONBLOCK),
                "is a FIFO",
            ),
            ("a socket", OwnedFd::from(a), "is a socket"),
            (
                "an empty file",
                open(dir.join("empty").to_str().unwrap(), libc::O_RDONLY),
                "empty file",
            ),
        ];
        for (what, fd, why) in &hostile {
            let refused = client
                .fd_associate(&defined, "root", &[fd.as_fd()], 0)
                .await
                .expect_err(what);
            assert!(refused.to_string().contains(why), "{what}: {refused}\n{}", report());
        }
        // A good descriptor for a group no disk names, and one too many: refused.
        let file = open(disk.to_str().unwrap(), libc::O_RDWR);
        let refused = client
            .fd_associate(&defined, "data", &[file.as_fd()], 0)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("named by none"), "{refused}");
        // Still in step: the real disk passes, and the domain starts.
        client
            .fd_associate(&defined, "root", &[file.as_fd()], flags::FD_ASSOCIATE_SECLABEL_WRITABLE)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", report()));
        let running = client
            .create_defined(&defined, 0)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", report()));
        let qemu = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
        let held = std::fs::read_dir(format!("/proc/{}/fd", qemu.trim()))
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .any(|target| target == disk);
        assert!(held, "QEMU does not hold {}\n{}", disk.display(), report());
        // Another connection of the pod defining it again, to make it
        // persistent and pass descriptors to it: refused and undone.
        let intruder = Client::connect(&uri, Options::default()).await.unwrap();
        let refused = intruder.define_xml(&xml, flags::DEFINE_VALIDATE).await.unwrap_err();
        assert!(refused.to_string().contains("runs already"), "{refused}\n{}", report());
        let direct = Client::connect("qemu:///system", Options::default()).await.unwrap();
        let transient = direct.undefine(&running, 0).await.unwrap_err();
        assert!(
            transient.libvirt().is_some_and(|e| e.code == 55),
            "the running domain stayed defined: {transient}"
        );
        drop(intruder);
        // The gate made it transient: destroyed, nothing stays defined.
        client.destroy(&running, 0).await.unwrap();
        let gone = direct.lookup_by_name(&name).await.unwrap_err();
        assert!(gone.libvirt().is_some_and(|e| e.is_no_domain()), "{gone}");

        // A definition whose connection ends before it starts is forgotten.
        let abandoning = Client::connect(&uri, Options::default()).await.unwrap();
        abandoning.define_xml(&xml, flags::DEFINE_VALIDATE).await.unwrap();
        drop(abandoning);
        let deadline = Instant::now() + Duration::from_secs(10);
        while direct.lookup_by_name(&name).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the abandoned definition stayed\n{}",
                report()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(cleanup);
}
