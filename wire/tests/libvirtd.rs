//! libvirt-wire against the real libvirtd that scripts/libvirtd-up.sh starts:
//! the test driver for fast lifecycle checks, the qemu driver (TCG) for a
//! real guest's console and AUTODESTROY.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use libvirt_wire::{Client, ConsoleOutput, DomainState, LifecycleEvent, Options, StoppedReason, flags};

fn test_domain_xml(name: &str) -> String {
    format!("<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>")
}

async fn connect(uri: &str) -> Client {
    Client::connect(uri, Options::default())
        .await
        .unwrap_or_else(|e| panic!("{e} (start libvirtd with scripts/libvirtd-up.sh)"))
}

async fn next_event(events: &mut libvirt_wire::LifecycleEvents) -> Option<LifecycleEvent> {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn handshake_and_host_facts() {
    let client = connect("test+unix:///default").await;
    assert!(client.lib_version().await.unwrap() >= 1_000_000);
    let caps = client.capabilities().await.unwrap();
    assert!(
        caps.contains("<capabilities>") && caps.contains("<domain type='test'"),
        "{caps}"
    );
    client.close().await.unwrap();

    let qemu = connect("qemu:///system").await;
    let domcaps = qemu
        .domain_capabilities(None, Some("x86_64"), None, Some("qemu"))
        .await
        .unwrap();
    assert!(domcaps.contains("<domainCapabilities>"), "{domcaps}");
    assert!(domcaps.contains("<domain>qemu</domain>"), "{domcaps}");
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn test_driver_create_state_events_destroy() {
    let client = connect("test+unix:///default").await;
    let a = client.create_xml(&test_domain_xml("wire-a"), 0).await.unwrap();
    let b = client
        .create_xml(&test_domain_xml("wire-b"), flags::START_VALIDATE)
        .await
        .unwrap();
    assert_eq!(a.name, "wire-a");
    assert_eq!(client.get_state(&a).await.unwrap().0, DomainState::Running);
    assert_eq!(client.lookup_by_uuid(&a.uuid).await.unwrap().name, "wire-a");

    let mut events_a = client.lifecycle_events(&a).await.unwrap();
    let mut events_b = client.lifecycle_events(&b).await.unwrap();
    assert_ne!(events_a.callback_id(), events_b.callback_id());

    client.destroy(&a, 0).await.unwrap();
    assert_eq!(
        next_event(&mut events_a).await,
        Some(LifecycleEvent::Stopped(StoppedReason::Destroyed))
    );
    // b's listener must not have seen a's event.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events_b.next())
            .await
            .is_err()
    );

    let gone = client.get_state(&a).await.unwrap_err();
    assert!(gone.libvirt().is_some_and(|e| e.is_no_domain()), "{gone}");

    client.shutdown(&b, 0).await.unwrap();
    assert!(matches!(
        next_event(&mut events_b).await,
        Some(LifecycleEvent::Stopped(_) | LifecycleEvent::Shutdown(_))
    ));
    events_a.deregister().await.unwrap();
    let _ = client.destroy(&b, 0).await;
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn libvirt_errors_are_typed_and_the_connection_survives_them() {
    let client = connect("test+unix:///default").await;
    // The test driver refuses AUTODESTROY (DESIGN.md); the error carries libvirt's code and message.
    let err = client
        .create_xml(&test_domain_xml("wire-autodestroy"), flags::START_AUTODESTROY)
        .await
        .unwrap_err();
    let lv = err.libvirt().unwrap_or_else(|| panic!("not a libvirt error: {err}"));
    assert!(lv.message.contains("unsupported flags"), "{lv:?}");
    let err = client
        .create_xml("<domain type='test'><name>broken", 0)
        .await
        .unwrap_err();
    assert!(err.libvirt().is_some(), "{err}");
    let err = client.lookup_by_uuid(&[7u8; 16]).await.unwrap_err();
    assert!(err.libvirt().is_some_and(|e| e.is_no_domain()), "{err}");
    // Still usable.
    assert!(client.capabilities().await.is_ok());
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn many_calls_in_flight_on_one_connection() {
    let client = connect("test+unix:///default").await;
    let calls = (0..50).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.lib_version().await.unwrap() })
    });
    let versions: Vec<u64> = futures_join(calls).await;
    assert_eq!(versions.len(), 50);
    assert!(versions.windows(2).all(|w| w[0] == w[1]));
}

async fn futures_join<T: Send + 'static>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn unreachable_daemon_is_a_clear_error() {
    let err = Client::connect(
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        Options::default(),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("cannot connect to libvirtd at unix socket /nonexistent/libvirt-sock"),
        "{message}"
    );
    let err = Client::connect("qemu:///session", Options::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("session"), "{err}");
}

const TINY: &str = "/var/lib/virtkube/images/tiny";

fn tiny_xml(name: &str, cmdline: &str) -> String {
    assert!(
        std::path::Path::new(TINY).join("vmlinuz").exists(),
        "the tiny guest is missing: run scripts/build-tiny-guest.sh"
    );
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{TINY}/vmlinuz</kernel><initrd>{TINY}/initrd.gz</initrd>\
         <cmdline>console=ttyS0 panic=-1 {cmdline}</cmdline></os><features><acpi/><apic/></features>\
         <devices><serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>\
         <memballoon model='none'/></devices></domain>"
    )
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn qemu_guest_console_is_read_through_a_stream() {
    let client = connect("qemu:///system").await;
    let name = format!("wire-console-{}", std::process::id());
    let domain = client
        .create_xml(&tiny_xml(&name, ""), flags::START_AUTODESTROY)
        .await
        .unwrap();
    let mut console = client.open_console(&domain, None, flags::CONSOLE_FORCE).await.unwrap();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(output) = console.read().await.unwrap() {
            let ConsoleOutput::Data(bytes) = output else {
                panic!("{output:?}: the test reads as fast as it can")
            };
            seen.extend_from_slice(&bytes);
            if String::from_utf8_lossy(&seen).contains("virtkube-tiny: ready") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(
        found,
        "guest console never said ready; got:\n{}",
        String::from_utf8_lossy(&seen)
    );

    // Type into the guest shell and read the answer.
    console.write(b"echo sum=$((40+2))\n").await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        let mut out = Vec::new();
        while let Some(output) = console.read().await.unwrap() {
            let ConsoleOutput::Data(bytes) = output else {
                panic!("{output:?}: the test reads as fast as it can")
            };
            out.extend_from_slice(&bytes);
            if String::from_utf8_lossy(&out).contains("sum=42") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(answered, "the guest shell did not answer");
    client.destroy(&domain, 0).await.unwrap();
}

#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn autodestroy_domain_dies_with_the_connection() {
    let client = connect("qemu:///system").await;
    let name = format!("wire-autodestroy-{}", std::process::id());
    let domain = client
        .create_xml(&tiny_xml(&name, ""), flags::START_AUTODESTROY)
        .await
        .unwrap();
    let observer = connect("qemu:///system").await;
    assert_eq!(observer.get_state(&domain).await.unwrap().0, DomainState::Running);
    drop(client);
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if observer
            .lookup_by_uuid(&domain.uuid)
            .await
            .is_err_and(|e| e.libvirt().is_some_and(|l| l.is_no_domain()))
        {
            gone = true;
            break;
        }
    }
    assert!(gone, "the AUTODESTROY domain outlived its connection by 5 s");
}

/// The tiny guest with a raw disk that libvirtd never opens by path: its
/// source names a descriptor group, and the file comes as a descriptor.
#[tokio::test]
#[ignore = "needs libvirtd with QEMU and the tiny guest: scripts/test.sh runs it"]
async fn a_disk_passed_as_a_descriptor_is_what_qemu_opens() {
    use std::os::fd::AsFd;
    let client = connect("qemu:///system").await;
    let name = format!("wire-fd-{}", std::process::id());
    let path = std::env::temp_dir().join(format!("{name}.raw"));
    std::fs::write(&path, vec![0u8; 1024 * 1024]).unwrap();
    let disk = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // A path QEMU cannot open: only the descriptor can reach the file.
    let xml = tiny_xml(&name, "").replace(
        "<memballoon",
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='/nonexistent/virtkube/root.raw' fdgroup='root'/><target dev='vda' bus='virtio'/></disk><memballoon",
    );
    let defined = client.define_xml(&xml, flags::DEFINE_VALIDATE).await.unwrap();
    client
        .fd_associate(&defined, "root", &[disk.as_fd()], flags::FD_ASSOCIATE_SECLABEL_WRITABLE)
        .await
        .unwrap();
    let running = client.create_defined(&defined, flags::START_PAUSED).await.unwrap();
    // Transient from here on: destroying it leaves nothing defined.
    client.undefine(&running, 0).await.unwrap();
    let qemu = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
    let held = std::fs::read_dir(format!("/proc/{}/fd", qemu.trim()))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| target == path);
    let live = client.xml_desc(&running, 0).await.unwrap();
    client.destroy(&running, 0).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(held, "QEMU (PID {}) does not hold {}", qemu.trim(), path.display());
    assert!(live.contains("fdgroup='root'"), "{live}");
    let gone = client.lookup_by_name(&name).await.unwrap_err();
    assert!(gone.libvirt().is_some_and(|e| e.is_no_domain()), "{gone}");
}
