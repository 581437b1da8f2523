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
