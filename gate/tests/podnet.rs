//! The gate's pod network plumbing against the real kernel: a "pod" is a
//! process in a network namespace of its own with a veth uplink; a tap made
//! in this (the "virthost's") namespace is moved into it and put behind the
//! pod's address. What the plumbing left is read back with `ip`, `nft` and
//! /proc from inside the pod's namespace. Refusals: a caller in the node's
//! namespace, a caller that has exited, a tap that does not exist, a pod
//! with no network, a pod whose interface name would break into the rules.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use virtkube_gate::podnet::{self, PlumbError};
use virtkube_gate::relay::CallerProcess;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process in a network namespace of its own; killed on drop.
struct Pod(Child);

impl Pod {
    /// With a veth uplink `uplink` (address 192.0.2.2/24, MTU 1400) when `networked`.
    fn start(uplink: &str, networked: bool) -> Pod {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pod = Pod(child);
        // unshare has to have made the namespace before the veth goes in.
        for _ in 0..100 {
            let own = std::fs::read_link("/proc/self/ns/net").unwrap();
            if std::fs::read_link(format!("/proc/{}/ns/net", pod.pid())).is_ok_and(|ns| ns != own) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if networked {
            let pid = pod.pid().to_string();
            let host_end = format!("{uplink}h");
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &pid,
            ]);
            run(&["ip", "link", "set", &host_end, "up"]);
            pod.inside(&["ip", "link", "set", "eth0", "mtu", "1400", "up"]);
            pod.inside(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        }
        pod
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn caller(&self) -> CallerProcess {
        CallerProcess::read(std::path::Path::new("/proc"), self.pid()).unwrap()
    }

    fn inside(&self, args: &[&str]) -> String {
        let pid = self.pid().to_string();
        let mut all = vec!["nsenter", "-t", pid.as_str(), "-n", "--"];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tap(name: &str) {
    let _ = Command::new("ip").args(["link", "del", name]).output();
    run(&["ip", "tuntap", "add", "dev", name, "mode", "tap"]);
}

fn in_this_namespace(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
#[ignore = "needs root (network namespaces, nft): scripts/test.sh runs it"]
fn the_tap_moves_into_the_pod_and_sits_behind_its_address() {
    let pod = Pod::start("vkt1", true);
    let name = virtkube_api::podnet::tap_name(&format!("test_{}", std::process::id()));
    tap(&name);
    let plumbed = podnet::plumb(std::path::Path::new("/proc"), pod.caller(), &name).unwrap();
    assert_eq!(plumbed.uplink, "eth0");
    assert_eq!(plumbed.pod_address.to_string(), "192.0.2.2");
    assert_eq!(plumbed.mtu, 1400, "the tap takes the pod's MTU");
    assert!(!in_this_namespace(&name), "the tap left the virthost's namespace");

    let link = pod.inside(&["ip", "-o", "-4", "addr", "show", "dev", &name]);
    assert!(link.contains("10.0.2.1/24"), "the tap is the guest's router: {link}");
    let detail = pod.inside(&["ip", "-o", "link", "show", "dev", &name]);
    assert!(detail.contains("mtu 1400") && detail.contains(",UP"), "{detail}");
    for (device, key) in [
        (name.as_str(), "forwarding"),
        (name.as_str(), "route_localnet"),
        ("eth0", "forwarding"),
    ] {
        let value = pod.inside(&["cat", &format!("/proc/sys/net/ipv4/conf/{device}/{key}")]);
        assert_eq!(value.trim(), "1", "{device} {key}");
    }
    let rules = pod.inside(&["nft", "list", "table", "ip", "virtkube"]);
    for expected in [
        "iifname \"eth0\" ip daddr 192.0.2.2 dnat to 10.0.2.2",
        "ip saddr 10.0.2.0/24 masquerade",
        "ip daddr 127.0.0.1 dnat to 10.0.2.2",
        "snat to 10.0.2.1",
    ] {
        assert!(rules.contains(expected), "missing {expected:?} in\n{rules}");
    }
    // The node's own rules are untouched.
    let host = Command::new("nft")
        .args(["list", "table", "ip", "virtkube"])
        .output()
        .unwrap();
    assert!(!host.status.success(), "the node's namespace has no virtkube table");

    // A restarted VM container: its new tap (same domain, same name)
    // replaces the old, and the rules are replaced, not doubled.
    pod.inside(&["ip", "link", "del", &name]);
    tap(&name);
    podnet::plumb(std::path::Path::new("/proc"), pod.caller(), &name).unwrap();
    let again = pod.inside(&["nft", "list", "table", "ip", "virtkube"]);
    assert_eq!(again.matches("masquerade").count(), 1, "{again}");
}

#[test]
#[ignore = "needs root (network namespaces, nft): scripts/test.sh runs it"]
fn callers_without_a_network_of_their_own_are_refused() {
    let name = virtkube_api::podnet::tap_name(&format!("refuse_{}", std::process::id()));
    tap(&name);
    let proc_root = std::path::Path::new("/proc");

    // In the node's namespace (a hostNetwork pod): its rules are the node's.
    let me = CallerProcess::read(proc_root, std::process::id() as i32).unwrap();
    let why = podnet::plumb(proc_root, me, &name).unwrap_err();
    assert!(matches!(why, PlumbError::SharedNamespace(_)), "{why}");
    assert!(why.to_string().contains("hostNetwork"), "{why}");
    assert!(in_this_namespace(&name), "nothing moved");

    // Exited (its PID may be someone else's by now).
    let gone = {
        let pod = Pod::start("vkt2", true);
        let caller = pod.caller();
        drop(pod);
        caller
    };
    let why = podnet::plumb(proc_root, gone, &name).unwrap_err();
    assert!(
        matches!(why, PlumbError::CallerGone(_) | PlumbError::Namespace { .. }),
        "{why}"
    );
    assert!(in_this_namespace(&name), "nothing moved");

    // A tap libvirt never made.
    let pod = Pod::start("vkt3", true);
    let why = podnet::plumb(proc_root, pod.caller(), "vk000000000000").unwrap_err();
    assert!(matches!(why, PlumbError::NoTap(_)), "{why}");

    // A pod with no network (docker run --network none): nothing to hide behind.
    let lonely = Pod::start("vkt4", false);
    let why = podnet::plumb(proc_root, lonely.caller(), &name).unwrap_err();
    assert!(matches!(why, PlumbError::NoUplink(_)), "{why}");
    assert!(
        why.to_string().contains("lo 127.0.0.1") || why.to_string().contains("nothing"),
        "{why}"
    );
    // A pod that named its interface to break out of the NAT script (one
    // with NET_ADMIN in its own namespace can): nft never sees the name.
    let crafty = Pod::start("vkt5", true);
    crafty.inside(&["ip", "link", "set", "eth0", "down"]);
    crafty.inside(&["ip", "link", "set", "eth0", "name", "e\";inc"]);
    crafty.inside(&["ip", "link", "set", "e\";inc", "up"]);
    let other = virtkube_api::podnet::tap_name(&format!("crafty_{}", std::process::id()));
    tap(&other);
    let why = podnet::plumb(proc_root, crafty.caller(), &other).unwrap_err();
    assert!(matches!(why, PlumbError::NoUplink(_)), "{why}");
    assert!(why.to_string().contains("does not put into its rules"), "{why}");
    let tables = crafty.inside(&["nft", "list", "tables"]);
    assert!(!tables.contains("virtkube"), "{tables}");
    let _ = Command::new("ip").args(["link", "del", &name]).output();
}

/// The guest's side of a tap: frames written here arrive as the guest's.
struct GuestSide(std::fs::File);

impl GuestSide {
    /// Attaches to `tap` in `pod`'s namespace (where it now is).
    fn attach(pod: &Pod, tap: &str) -> GuestSide {
        use std::os::fd::FromRawFd;
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", pod.pid())).unwrap();
        let tap = tap.to_owned();
        let file = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a valid namespace descriptor.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            // SAFETY: a plain open of the tun device.
            let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
            assert!(fd >= 0, "open /dev/net/tun: {}", std::io::Error::last_os_error());
            // SAFETY: an all-zero ifreq is valid; the name fits (14 bytes).
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (slot, byte) in ifr.ifr_name.iter_mut().zip(tap.bytes()) {
                *slot = byte as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            // SAFETY: TUNSETIFF takes a pointer to an ifreq, which lives through the call.
            let rc = unsafe { libc::ioctl(fd, TUNSETIFF, &mut ifr) };
            assert_eq!(rc, 0, "TUNSETIFF {tap}: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is open and owned by nothing else.
            unsafe { std::fs::File::from_raw_fd(fd) }
        })
        .join()
        .unwrap();
        GuestSide(file)
    }

    fn send(&mut self, frame: &[u8]) {
        use std::io::Write;
        self.0.write_all(frame).unwrap();
    }

    /// Whether a TCP SYN-ACK from `from:port` comes out of the tap within 2 s.
    fn syn_ack_from(&mut self, from: [u8; 4], port: u16) -> bool {
        use std::io::Read;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut frame = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            match self.0.read(&mut frame) {
                Ok(n) if n >= 14 + 20 + 20 && frame[12..14] == [8, 0] && frame[14 + 9] == 6 => {
                    let tcp = 14 + usize::from(frame[14] & 0x0f) * 4;
                    let (source, sport, flags) = (
                        &frame[26..30],
                        u16::from_be_bytes([frame[tcp], frame[tcp + 1]]),
                        frame[tcp + 13],
                    );
                    if source == from && sport == port && flags & 0x12 == 0x12 {
                        return true;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("reading the tap: {e}"),
            }
        }
        false
    }
}

fn checksum(words: &[u8]) -> u16 {
    let mut sum: u32 = words
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame holding a TCP SYN from the guest (10.0.2.2) to `to:port`.
fn syn(to_mac: [u8; 6], to: [u8; 4], port: u16) -> Vec<u8> {
    let from = [10, 0, 2, 2];
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&from);
    pseudo.extend_from_slice(&to);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    guest_frame(to_mac, to, 6, &tcp)
}

/// An Ethernet frame from the guest (10.0.2.2, MAC 02:00:00:00:00:02)
/// holding an IPv4 packet of `protocol` to `to`.
fn guest_frame(to_mac: [u8; 6], to: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0, 10, 0, 2, 2]);
    ip.extend_from_slice(&to);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = to_mac.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    frame.extend(ip);
    frame.extend_from_slice(payload);
    frame
}

/// An Ethernet frame holding a UDP datagram from the guest (10.0.2.2) to `to:port`.
fn datagram(to_mac: [u8; 6], to: [u8; 4], port: u16, data: &[u8]) -> Vec<u8> {
    let length = 8 + data.len() as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40001u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&length.to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    udp.extend_from_slice(data);
    guest_frame(to_mac, to, 17, &udp)
}

/// A hostile guest sends packets out of its NIC to the pod's loopback,
/// where the shim serves the VM's screen and sidecars listen (the tap has
/// route_localnet, which port-forward's NAT needs): a TCP SYN is not
/// answered and a UDP datagram is not delivered. The same SYN to the
/// guest's router is answered, so the frames do reach the pod; and without
/// the gate's drop rule the datagram is delivered, so the rule is what
/// refuses it.
#[test]
#[ignore = "needs root (network namespaces, nft, /dev/net/tun) and socat: scripts/test.sh runs it"]
fn a_guest_cannot_reach_the_pods_loopback() {
    let pod = Pod::start("vkt4", true);
    let name = virtkube_api::podnet::tap_name(&format!("loopback_{}", std::process::id()));
    tap(&name);
    podnet::plumb(std::path::Path::new("/proc"), pod.caller(), &name).unwrap();
    let mut guest = GuestSide::attach(&pod, &name);
    // A pod's loopback is up (a new namespace's is not).
    pod.inside(&["ip", "link", "set", "lo", "up"]);
    pod.inside(&[
        "ip",
        "neigh",
        "replace",
        "10.0.2.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        &name,
        "nud",
        "permanent",
    ]);
    // (sysfs shows the mount's namespace, not the pod's: ask ip.)
    let link = pod.inside(&["ip", "-o", "link", "show", "dev", &name]);
    let mac: Vec<u8> = link
        .split_once("link/ether ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {link}"))
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mac: [u8; 6] = mac.try_into().unwrap();
    let pid = pod.pid().to_string();
    let received = std::env::temp_dir().join(format!("virtkube-loopback-{}", std::process::id()));
    let _ = std::fs::remove_file(&received);
    let mut listeners = [
        Command::new("nsenter")
            .args([
                "-t",
                &pid,
                "-n",
                "--",
                "socat",
                "TCP-LISTEN:5999,reuseaddr,fork",
                "SYSTEM:true",
            ])
            .spawn()
            .unwrap(),
        Command::new("nsenter")
            .args(["-t", &pid, "-n", "--", "socat", "-u", "UDP4-RECV:5998,bind=127.0.0.1"])
            .arg(format!("OPEN:{},creat,append", received.display()))
            .spawn()
            .unwrap(),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let delivered = |what: &str| {
        std::thread::sleep(Duration::from_millis(500));
        std::fs::read_to_string(&received).unwrap_or_default().contains(what)
    };

    guest.send(&syn(mac, [10, 0, 2, 1], 5999));
    let router = guest.syn_ack_from([10, 0, 2, 1], 5999);
    guest.send(&syn(mac, [127, 0, 0, 1], 5999));
    let loopback_tcp = guest.syn_ack_from([127, 0, 0, 1], 5999);
    guest.send(&datagram(mac, [127, 0, 0, 1], 5998, b"first"));
    let loopback_udp = delivered("first");
    pod.inside(&["nft", "delete", "chain", "ip", "virtkube", "input"]);
    guest.send(&datagram(mac, [127, 0, 0, 1], 5998, b"second"));
    let loopback_udp_without_the_rule = delivered("second");
    for listener in &mut listeners {
        let _ = listener.kill();
        let _ = listener.wait();
    }
    let _ = std::fs::remove_file(&received);

    assert!(
        router,
        "the guest's SYN to its router was not answered: the test reaches nothing"
    );
    assert!(!loopback_tcp, "the guest connected to the pod's 127.0.0.1");
    assert!(
        !loopback_udp,
        "the guest's datagram reached a socket on the pod's 127.0.0.1"
    );
    assert!(
        loopback_udp_without_the_rule,
        "without the drop rule the datagram was not delivered either: the test proves nothing about the rule"
    );
}
