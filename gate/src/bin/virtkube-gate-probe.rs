//! A hostile VM container, for testing the gate as an attacker would: it
//! tries everything a VM container should not be able to do through the
//! gate's socket, prints one line per attempt (`NAME<TAB>REFUSED<TAB>reason`
//! or `NAME<TAB>ALLOWED`), then does what a VM container may: creates its own
//! domain and watches it, and stays connected until its stdin closes (so a
//! test can SIGKILL it and watch the domain go).
//!
//! usage: virtkube-gate-probe SOCKET|URI OWNER OWN_XML_FILE
//! OWNER is the pod's UID, or a Docker container's short ID (`@HOSTNAME@`:
//! the container's hostname, which Docker sets to it); `@OWNER@` in the XML
//! file is replaced by it (a pod's UID is known only once it runs). It
//! waits for a line on stdin (or its end) before connecting, so a test can
//! place it in a pod's cgroup first.

use std::io::BufRead;

use libvirt_wire::protocol::{DomainRef, procedure};
use libvirt_wire::xdr::Encoder;
use libvirt_wire::{Client, Error, Options, flags};

/// What the shim sends: the VM dies with the connection, libvirt validates the XML.
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
    for (name, xml) in &variants {
        outcome(
            &format!("create: {name}"),
            client.create_xml(xml, CREATE_FLAGS).await.map(drop),
        );
    }
    outcome(
        "create: without AUTODESTROY (a VM that outlives its container)",
        client.create_xml(&own_xml, flags::START_VALIDATE).await.map(drop),
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
    outcome("own domain's state", client.get_state(&own).await.map(drop));
    outcome("own domain's events", client.lifecycle_events(&own).await.map(drop));
    outcome(
        "own domain's console",
        client.open_console(&own, None, flags::CONSOLE_FORCE).await.map(drop),
    );
    println!("ready");
    // Stay connected (the VM lives) until stdin closes or the process is killed.
    let mut rest = String::new();
    while std::io::stdin().lock().read_line(&mut rest).is_ok_and(|n| n > 0) {}
    outcome("destroy own domain", client.destroy(&own, 0).await);
}

fn replace_kernel(xml: &str, path: &str) -> String {
    match (xml.find("<kernel>"), xml.find("</kernel>")) {
        (Some(a), Some(b)) => format!("{}<kernel>{path}{}", &xml[..a], &xml[b..]),
        _ => xml.to_owned(),
    }
}
