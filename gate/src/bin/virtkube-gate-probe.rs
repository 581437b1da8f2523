//! A hostile VM container, for testing the gate as an attacker would: it
//! tries everything a VM container should not be able to do through the
//! gate's socket, prints one line per attempt (`NAME<TAB>REFUSED<TAB>reason`
//! or `NAME<TAB>ALLOWED`), then does what a VM container may: creates its own
//! domain and watches it, and stays connected until its stdin closes (so a
//! test can SIGKILL it and watch the domain go).
//!
//! usage: virtkube-gate-probe SOCKET|URI OWNER OWN_XML_FILE
//!        virtkube-gate-probe --malformed SOCKET
//!        virtkube-gate-probe --find SOCKET UUID
//! VIRTKUBE_PROBE_VOLUMES (space-separated POOL/VOLUME/FORMAT) adds attempts
//! to create the domain with each ImageFile volume as a writable disk.
//! The second form sends broken frames instead (see `malformed`); the third
//! tries to take over a domain another process created (the first form
//! prints its UUID after `ready`).
//! OWNER is the pod's UID, or a Docker container's short ID (`@HOSTNAME@`:
//! the container's hostname, which Docker sets to it); `@OWNER@` in the XML
//! file is replaced by it (a pod's UID is known only once it runs). It
//! waits for a line on stdin (or its end) before connecting, so a test can
//! place it in a pod's cgroup first.

use std::io::BufRead;

use libvirt_wire::protocol::{DomainRef, procedure};
use libvirt_wire::xdr::Encoder;
use libvirt_wire::{Client, Error, Options, flags};

/// What the shim sends: AUTODESTROY (for a libvirtd without the gate), VALIDATE.
const CREATE_FLAGS: u32 = flags::START_AUTODESTROY | flags::START_VALIDATE;

fn outcome(name: &str, result: Result<(), Error>) {
    match result {
        Ok(()) => println!("{name}\tALLOWED"),
        Err(Error::Libvirt(e)) if e.code == 88 => println!("{name}\tREFUSED\t{}", e.message),
        Err(e) => println!("{name}\tERROR\t{e}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, socket] = args.as_slice()
        && mode == "--malformed"
    {
        let mut go = String::new();
        let _ = std::io::stdin().lock().read_line(&mut go);
        malformed::run(socket);
        return;
    }
    if let [mode, socket, uuid] = args.as_slice()
        && mode == "--find"
    {
        let uuid = libvirt_wire::protocol::parse_uuid(uuid).unwrap_or([0; 16]);
        let mut go = String::new();
        let _ = std::io::stdin().lock().read_line(&mut go);
        let uri = format!("qemu+unix:///system?socket={socket}");
        match Client::connect(&uri, Options::default()).await {
            Ok(client) => outcome(
                "take over another process's domain",
                client.lookup_by_uuid(&uuid).await.map(drop),
            ),
            Err(e) => println!("connect\tERROR\t{e}"),
        }
        return;
    }
    let [socket, uid, own_xml_file] = args.as_slice() else {
        eprintln!("usage: virtkube-gate-probe SOCKET OWNER OWN_XML_FILE");
        std::process::exit(2);
    };
    // A Docker container's ID is its default hostname.
    let hostname;
    let uid = if uid == "@HOSTNAME@" {
        hostname = std::fs::read_to_string("/etc/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned();
        &hostname
    } else {
        uid
    };
    let own_xml = std::fs::read_to_string(own_xml_file)
        .unwrap_or_else(|e| panic!("{own_xml_file}: {e}"))
        .replace("@OWNER@", uid);
    let mut go = String::new();
    let _ = std::io::stdin().lock().read_line(&mut go);

    // SOCKET is a path, or a whole URI (the gate's TCP listener).
    let (uri, other_uri) = if socket.contains("://") {
        (
            socket.clone(),
            socket.replacen("qemu+", "test+", 1).replace("/system", "/default"),
        )
    } else {
        (
            format!("qemu+unix:///system?socket={socket}"),
            format!("test+unix:///default?socket={socket}"),
        )
    };
    // A URI other than the allowed one.
    let other = Client::connect(&other_uri, Options::default()).await;
    outcome("open test:///default", other.map(drop));

    let client = match Client::connect(&uri, Options::default()).await {
        Ok(client) => client,
        Err(e) => {
            println!("connect\tERROR\t{e}");
            return;
        }
    };
    let other_uid = "11111111-2222-3333-4444-555555555555";
    let variants: Vec<(&str, String)> = vec![
        ("another pod's UUID", own_xml.replace(uid.as_str(), other_uid)),
        (
            "hostdev",
            own_xml.replace("<devices>", "<devices><hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='1' function='0'/></source></hostdev>"),
        ),
        (
            "qemu:commandline",
            own_xml.replace("</domain>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-monitor'/><qemu:arg value='unix:/tmp/m,server'/></qemu:commandline></domain>"),
        ),
        ("/etc/shadow as a kernel", replace_kernel(&own_xml, "/etc/shadow")),
        ("a block device as a kernel", replace_kernel(&own_xml, "/dev/sda")),
        (
            "the virthost's service account token as a kernel",
            replace_kernel(&own_xml, "/var/run/secrets/kubernetes.io/serviceaccount/token"),
        ),
        ("a ../ escape", replace_kernel(&own_xml, "/var/lib/virtkube/images/../../../../etc/shadow")),
        (
            "a symlink out of the images directory",
            replace_kernel(&own_xml, "/var/lib/virtkube/images/gate-probe-link"),
        ),
        (
            "/etc/shadow as a disk",
            own_xml.replace("<devices>", "<devices><disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdz' bus='virtio'/></disk>"),
        ),
        (
            "/dev/sda as a block disk",
            own_xml.replace("<devices>", "<devices><disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz' bus='virtio'/></disk>"),
        ),
    ];
    // ImageFile volumes to try to attach (VIRTKUBE_PROBE_VOLUMES: space-separated
    // POOL/VOLUME/FORMAT), writable: another namespace's, for instance.
    let mut variants = variants;
    for item in std::env::var("VIRTKUBE_PROBE_VOLUMES")
        .unwrap_or_default()
        .split_whitespace()
    {
        let mut parts = item.splitn(3, '/');
        let (Some(pool), Some(volume), Some(format)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let disk = format!(
            "<devices><disk type='volume' device='disk'><driver name='qemu' type='{format}'/><source pool='{pool}' volume='{volume}'/><target dev='vdz' bus='virtio'/></disk>"
        );
        let name: &'static str = Box::leak(format!("ImageFile volume {pool}/{volume} as {format}").into_boxed_str());
        variants.push((name, own_xml.replace("<devices>", &disk)));
    }
    for (name, xml) in &variants {
        outcome(
            &format!("create: {name}"),
            client.create_xml(xml, CREATE_FLAGS).await.map(drop),
        );
    }
    outcome(
        "create: without VALIDATE (XML libvirt has not checked)",
        client.create_xml(&own_xml, flags::START_AUTODESTROY).await.map(drop),
    );
    // Calls outside the allow-list, with plausible arguments.
    let raw: [(&str, i32, Vec<u8>); 7] = [
        ("define a domain", 11, {
            let mut e = Encoder::new();
            e.string(&own_xml);
            e.into_bytes()
        }),
        ("list all domains", 273, {
            let mut e = Encoder::new();
            e.i32(1).u32(0);
            e.into_bytes()
        }),
        ("look a domain up by name", procedure::DOMAIN_LOOKUP_BY_NAME, {
            let mut e = Encoder::new();
            e.string("victim");
            e.into_bytes()
        }),
        ("list node devices", 313, {
            let mut e = Encoder::new();
            e.i32(1).u32(0);
            e.into_bytes()
        }),
        ("list secrets", 287, {
            let mut e = Encoder::new();
            e.i32(1).u32(0);
            e.into_bytes()
        }),
        ("list storage pools", 281, {
            let mut e = Encoder::new();
            e.i32(1).u32(0);
            e.into_bytes()
        }),
        ("read the host's sysinfo", 203, {
            let mut e = Encoder::new();
            e.u32(0);
            e.into_bytes()
        }),
    ];
    for (name, proc_, args) in raw {
        outcome(name, client.connection().call(proc_, &args).await.map(drop));
    }
    let victim = DomainRef {
        name: "victim".into(),
        uuid: libvirt_wire::protocol::parse_uuid(other_uid).unwrap_or([1; 16]),
        id: 1,
    };
    outcome(
        "stop another domain before creating one",
        client.destroy(&victim, 0).await,
    );
    outcome(
        "find another domain by UUID",
        client.lookup_by_uuid(&victim.uuid).await.map(drop),
    );
    outcome("events of every domain", {
        let mut e = Encoder::new();
        e.i32(0).bool(false);
        client
            .connection()
            .call(procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY, &e.into_bytes())
            .await
            .map(drop)
    });

    // What a VM container may do.
    let own = match client.create_xml(&own_xml, CREATE_FLAGS).await {
        Ok(domain) => {
            println!("create own domain\tALLOWED");
            domain
        }
        Err(e) => {
            outcome("create own domain", Err(e));
            return;
        }
    };
    outcome(
        "a second domain",
        client.create_xml(&own_xml, CREATE_FLAGS).await.map(drop),
    );
    outcome(
        "another domain by name",
        client
            .get_state(&DomainRef {
                uuid: own.uuid,
                ..victim.clone()
            })
            .await
            .map(drop),
    );
    outcome(
        "another domain by UUID",
        client
            .get_state(&DomainRef {
                name: own.name.clone(),
                ..victim.clone()
            })
            .await
            .map(drop),
    );
    outcome(
        "find a second domain after creating one",
        client.lookup_by_uuid(&own.uuid).await.map(drop),
    );
    outcome("own domain's state", client.get_state(&own).await.map(drop));
    outcome("own domain's events", client.lifecycle_events(&own).await.map(drop));
    outcome(
        "own domain's console",
        client.open_console(&own, None, flags::CONSOLE_FORCE).await.map(drop),
    );
    println!("ready");
    println!("uuid {}", own.uuid_string());
    // Stay connected (the VM lives) until stdin closes or the process is
    // killed; "handover" passes the connection to another process and exits.
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.trim() == "handover" {
            hand_over_and_exit();
        }
        line.clear();
    }
    outcome("destroy own domain", client.destroy(&own, 0).await);
}

/// Lets a child (`sleep 60`) inherit every socket this process holds, its
/// connection to the gate included, and exits: the VM must not live on in
/// the child's copy of the connection.
fn hand_over_and_exit() -> ! {
    use std::os::unix::fs::FileTypeExt;
    for entry in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if fd > 2 && std::fs::metadata(entry.path()).is_ok_and(|m| m.file_type().is_socket()) {
            // SAFETY: clearing FD_CLOEXEC on a descriptor this process holds.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
    }
    let child = std::process::Command::new("sleep")
        .arg("60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(child) => println!("handed over {}", child.id()),
        Err(e) => println!("handover failed\t{e}"),
    }
    std::process::exit(0)
}

fn replace_kernel(xml: &str, path: &str) -> String {
    match (xml.find("<kernel>"), xml.find("</kernel>")) {
        (Some(a), Some(b)) => format!("{}<kernel>{path}{}", &xml[..a], &xml[b..]),
        _ => xml.to_owned(),
    }
}

/// Broken frames, each on a connection of its own: what the gate does with
/// each is printed as `ATTACK<TAB>closed`, `ATTACK<TAB>denied<TAB>reason`
/// or `ATTACK<TAB>answered`/`silent`.
mod malformed {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use libvirt_wire::protocol::{self, Header, MessageType, Status, procedure};

    fn call(procedure: i32, serial: u32, payload: &[u8]) -> Vec<u8> {
        protocol::encode_packet(
            &Header::remote(procedure, MessageType::Call, serial, Status::Ok),
            payload,
        )
    }

    /// What came back: the gate's answer to the first call, or its hanging up.
    fn outcome(stream: &mut UnixStream) -> String {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return "closed".into(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "closed".into(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return "silent".into();
            }
            Err(e) => return format!("error\t{e}"),
            Ok(()) => {}
        }
        let len = u32::from_be_bytes(len) as usize;
        let mut body = vec![0u8; len.saturating_sub(4).min(1 << 20)];
        if stream.read_exact(&mut body).is_err() {
            return "closed".into();
        }
        match protocol::decode_packet(&body) {
            Ok((header, payload)) if header.status == Status::Error => match protocol::decode_error(payload) {
                Ok(e) => format!("denied\t{}", e.message),
                Err(_) => "answered".into(),
            },
            _ => "answered".into(),
        }
    }

    fn attempt(socket: &str, name: &str, bytes: &[u8], close_write: bool) {
        let mut stream = match UnixStream::connect(socket) {
            Ok(s) => s,
            Err(e) => {
                println!("{name}\tconnect failed\t{e}");
                return;
            }
        };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(bytes);
        if close_write {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        println!("{name}\t{}", outcome(&mut stream));
    }

    pub fn run(socket: &str) {
        attempt(socket, "length 0xffffffff", &[0xff; 8], false);
        let over = (4 * 1024 * 1024 + 2048u32).to_be_bytes();
        attempt(socket, "a 4 MiB + 2 KiB frame", &over, false);
        let mut truncated = call(procedure::CONNECT_OPEN, 1, &[0; 64]);
        truncated.truncate(40);
        attempt(socket, "a truncated frame", &truncated, true);
        attempt(socket, "a length below the header", &[0, 0, 0, 8, 0, 0, 0, 0], false);
        attempt(
            socket,
            "garbage XDR in CONNECT_OPEN",
            &call(procedure::CONNECT_OPEN, 1, &[0xff; 3]),
            false,
        );
        // A string whose length says 3 GiB.
        let mut huge = Vec::new();
        huge.extend_from_slice(&0xC000_0000u32.to_be_bytes());
        huge.extend_from_slice(&[b'a'; 16]);
        attempt(
            socket,
            "a 3 GiB string in CREATE_XML",
            &call(procedure::DOMAIN_CREATE_XML, 1, &huge),
            false,
        );
        let unknown = protocol::encode_packet(
            &Header {
                program: 0x1234_5678,
                ..Header::remote(1, MessageType::Call, 1, Status::Ok)
            },
            &[],
        );
        attempt(socket, "an unknown program", &unknown, false);
        let reply = protocol::encode_packet(&Header::remote(1, MessageType::Reply, 1, Status::Ok), &[]);
        attempt(socket, "a reply from the client", &reply, false);

        // A flood of refused calls whose answers are never read: the gate
        // must stop reading (its writes block) rather than buffer answers.
        match UnixStream::connect(socket) {
            Ok(mut stream) => {
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let one = call(273, 0, &[0, 0, 0, 1, 0, 0, 0, 0]);
                let mut sent = 0usize;
                for serial in 0..200_000u32 {
                    let mut frame = one.clone();
                    frame[20..24].copy_from_slice(&serial.to_be_bytes());
                    if stream.write_all(&frame).is_err() {
                        break;
                    }
                    sent += 1;
                }
                println!("a flood of 200000 refused calls, answers unread\tsent {sent}");
            }
            Err(e) => println!("a flood of 200000 refused calls, answers unread\tconnect failed\t{e}"),
        }

        // More connections than one caller may hold. Each of the four has
        // had a call answered (refused for its URI, the connection kept), so
        // the gate holds all four before the fifth comes, however busy it is.
        let open = call(procedure::CONNECT_OPEN, 1, &[0, 0, 0, 0, 0, 0, 0, 0]);
        let held: Vec<UnixStream> = (0..4)
            .filter_map(|_| UnixStream::connect(socket).ok())
            .map(|mut stream| {
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                let _ = stream.write_all(&open);
                let _ = outcome(&mut stream);
                stream
            })
            .collect();
        attempt(
            socket,
            "a fifth connection",
            &call(procedure::CONNECT_OPEN, 1, &[0, 0, 0, 0, 0, 0, 0, 0]),
            false,
        );
        drop(held);
    }
}
