//! The pod network's privileged part: the gate moves the tap libvirt made
//! for a domain's `pod` interface into its caller's network namespace and
//! puts it behind the pod's address (masquerade), before the guest runs.
//!
//! In the pod's namespace the tap gets the guest's router address
//! ([`podnet::GATEWAY`]), forwarding is turned on for it and the pod's
//! uplink, and one nftables table, `ip virtkube`, NATs both ways: the guest's
//! traffic leaves with the pod IP, and new connections to the pod IP (and to
//! 127.0.0.1 inside the pod, which is where `kubectl port-forward` connects)
//! go to the guest. Everything lives in the pod's namespace and ends with
//! it; the tap ends with QEMU. The guest's DHCP is the shim's, unprivileged.
//!
//! Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (setns) over the pod's namespace,
//! and the `nft` command; the VM pod needs nothing.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use virtkube_api::podnet;

use crate::relay::CallerProcess;

/// Why the pod network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PlumbError {
    /// The caller's namespace could not be opened, or the caller is gone.
    #[error("the caller's network namespace ({path}) cannot be opened: {source}")]
    Namespace {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The caller exited (its PID may be another process's now).
    #[error("the calling process {0} has exited; its network namespace is not its pod's any more")]
    CallerGone(i32),
    /// The caller shares the node's or the virthost's network.
    #[error(
        "the caller shares the {0} network namespace (a hostNetwork pod, or docker run --network host): a pod interface needs the pod's own network; declare another interface type, or interfaces: []"
    )]
    SharedNamespace(&'static str),
    /// libvirt made no tap under the expected name.
    #[error("libvirt created no tap {0:?} for the domain's pod interface")]
    NoTap(String),
    /// The pod has no interface with an IPv4 address besides the tap.
    #[error(
        "the pod's network namespace has no interface with an IPv4 address to put the guest behind (found: {0}); a pod interface needs the pod on a network"
    )]
    NoUplink(String),
    /// A netlink or ioctl call failed.
    #[error("{what} failed: {source}")]
    Kernel {
        /// What was being done.
        what: String,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// nft failed or is missing.
    #[error("nft {0}")]
    Nft(String),
}

fn kernel(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PlumbError {
    let what = what.into();
    move |source| PlumbError::Kernel { what, source }
}

/// What the plumbing set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plumbed {
    /// The tap, now in the pod's namespace.
    pub tap: String,
    /// The pod's interface the guest is behind, and its address.
    pub uplink: String,
    /// The pod's IPv4 address.
    pub pod_address: Ipv4Addr,
    /// The MTU the tap was given (the uplink's).
    pub mtu: u32,
}

/// The nftables script that puts the guest behind the pod's address. Run in
/// the pod's namespace; replaces an earlier one (a restarted VM container's)
/// in one transaction.
pub fn ruleset(tap: &str, uplink: &str, pod_address: Ipv4Addr) -> String {
    let guest = podnet::GUEST;
    let gateway = podnet::GATEWAY;
    // The shim's own (its VNC server): kept from the guest.
    let shim_ports = podnet::SHIM_PORTS.map(|p| p.to_string()).join(", ");
    let subnet = format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(guest) & (u32::MAX << (32 - podnet::PREFIX))),
        podnet::PREFIX
    );
    format!(
        "table ip virtkube
delete table ip virtkube
table ip virtkube {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"{uplink}\" ip daddr {pod_address} dnat to {guest}
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\toifname \"lo\" ip daddr 127.0.0.1 tcp dport {{ {shim_ports} }} accept
\t\toifname \"lo\" ip daddr 127.0.0.1 dnat to {guest}
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"{tap}\" ip daddr 127.0.0.0/8 ct direction original drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"{uplink}\" ip saddr {subnet} masquerade
\t\toifname \"{tap}\" ip saddr 127.0.0.1 snat to {gateway}
\t}}
}}
"
    )
}

/// Moves `tap` (in the gate's namespace) into `caller`'s network namespace
/// and puts it behind the pod's address. Blocking.
pub fn plumb(proc_root: &Path, caller: CallerProcess, tap: &str) -> Result<Plumbed, PlumbError> {
    let path = proc_root.join(caller.pid.to_string()).join("ns/net");
    let namespace = File::open(&path).map_err(|source| PlumbError::Namespace {
        path: path.display().to_string(),
        source,
    })?;
    // Opened, then checked: the namespace is the caller's, not a process's
    // that took its PID.
    if CallerProcess::read(proc_root, caller.pid) != Some(caller) {
        return Err(PlumbError::CallerGone(caller.pid));
    }
    let theirs = namespace.metadata().map_err(kernel("reading the caller's namespace"))?;
    for (whose, own) in [
        ("node's", proc_root.join("1/ns/net")),
        ("virthost's", Path::new("/proc/self/ns/net").to_path_buf()),
    ] {
        if let Ok(own) = std::fs::metadata(&own)
            && (own.dev(), own.ino()) == (theirs.dev(), theirs.ino())
        {
            return Err(PlumbError::SharedNamespace(whose));
        }
    }
    let index = if_index(tap).ok_or_else(|| PlumbError::NoTap(tap.to_owned()))?;
    let route = Netlink::open()?;
    route.move_link(index, namespace.as_raw_fd())?;
    drop(route);
    // A thread of its own enters the pod's namespace: the gate's other
    // threads stay in the virthost's.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only, with a valid namespace descriptor.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(PlumbError::Kernel {
                        what: "entering the caller's network namespace".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                configure_inside(tap)
            })
            .join()
            .unwrap_or_else(|_| Err(PlumbError::Nft("plumbing thread panicked".into())))
    })
}

/// In the pod's namespace: address, MTU and forwarding for the tap; the NAT.
fn configure_inside(tap: &str) -> Result<Plumbed, PlumbError> {
    let (uplink, pod_address) = uplink(tap)?;
    // The pod named its interface (one with NET_ADMIN in its namespace may
    // rename it), and the name goes into nft's script, which runs in the
    // virthost's mount namespace: a quote could add an `include` of a
    // virthost file. Plain names only.
    if !is_plain_name(&uplink) {
        return Err(PlumbError::NoUplink(format!(
            "an interface named {uplink:?}, which the gate does not put into its rules (letters, digits, '.', '-', '_' and '@' only)"
        )));
    }
    let control = Control::open()?;
    let mtu = control.mtu(&uplink)?;
    control.set_mtu(tap, mtu)?;
    control.set_address(tap, podnet::GATEWAY, podnet::PREFIX)?;
    control.set_up(tap)?;
    let route = Netlink::open()?;
    let tap_index = if_index(tap).ok_or_else(|| PlumbError::NoTap(tap.to_owned()))?;
    let uplink_index = if_index(&uplink).ok_or_else(|| PlumbError::NoUplink(uplink.clone()))?;
    // The guest's packets in through the tap, and replies and inbound
    // connections in through the uplink, are forwarded; 127.0.0.1 may leave
    // through the tap (port-forward's connections, source-NATed there).
    route.set_ipv4_conf(
        tap_index,
        &[(IPV4_DEVCONF_FORWARDING, 1), (IPV4_DEVCONF_ROUTE_LOCALNET, 1)],
    )?;
    route.set_ipv4_conf(uplink_index, &[(IPV4_DEVCONF_FORWARDING, 1)])?;
    run_nft(&ruleset(tap, &uplink, pod_address))?;
    Ok(Plumbed {
        tap: tap.to_owned(),
        uplink,
        pod_address,
        mtu,
    })
}

/// The pod's interface with an IPv4 address (other than loopback and the
/// tap): the one the guest hides behind.
fn uplink(tap: &str) -> Result<(String, Ipv4Addr), PlumbError> {
    let mut found = Vec::new();
    let mut first: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `first` with a list freed below.
    if unsafe { libc::getifaddrs(&mut first) } != 0 {
        return Err(kernel("listing the pod's addresses")(std::io::Error::last_os_error()));
    }
    let mut chosen = None;
    let mut entry = first;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string in the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr, when set, points at a sockaddr of its family.
        if ifa.ifa_addr.is_null() || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let address = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let address = Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
        found.push(format!("{name} {address}"));
        if chosen.is_none() && name != tap && !address.is_loopback() && ifa.ifa_flags & libc::IFF_LOOPBACK as u32 == 0 {
            chosen = Some((name, address));
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(first) };
    chosen.ok_or_else(|| {
        PlumbError::NoUplink(if found.is_empty() {
            "nothing".into()
        } else {
            found.join(", ")
        })
    })
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_@".contains(&b))
}

fn run_nft(script: &str) -> Result<(), PlumbError> {
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| PlumbError::Nft("is not installed in the virthost (Debian's nftables package)".into()))?;
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| PlumbError::Nft(format!("cannot be started: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| PlumbError::Nft(format!("did not take its rules: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| PlumbError::Nft(format!("did not finish: {e}")))?;
    if !output.status.success() {
        return Err(PlumbError::Nft(format!(
            "refused the NAT rules ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

fn if_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

const IPV4_DEVCONF_FORWARDING: u16 = 1;
const IPV4_DEVCONF_ROUTE_LOCALNET: u16 = 26;
const IFLA_INET_CONF: u16 = 1;

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> Result<Netlink, PlumbError> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(kernel("opening a netlink socket")(std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(Netlink(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// RTM_NEWLINK on an existing link, with `attributes` after its ifinfomsg.
    fn set_link(&self, index: u32, attributes: &[u8], what: &str) -> Result<(), PlumbError> {
        let mut message = Vec::with_capacity(32 + attributes.len());
        let length = 16 + 16 + attributes.len();
        message.extend_from_slice(&(length as u32).to_ne_bytes());
        message.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        message.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        // ifinfomsg: family, pad, type, index, flags, change.
        message.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        message.extend_from_slice(&(index as i32).to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(attributes);
        // SAFETY: sending a buffer we own to our socket.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(kernel(what)(std::io::Error::last_os_error()));
        }
        let mut reply = [0u8; 1024];
        // SAFETY: receiving into a buffer we own.
        let got = unsafe { libc::recv(self.0.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if got < 0 {
            return Err(kernel(what)(std::io::Error::last_os_error()));
        }
        ack_of(&reply[..got as usize]).map_err(kernel(what))
    }

    fn move_link(&self, index: u32, namespace: i32) -> Result<(), PlumbError> {
        self.set_link(
            index,
            &attribute(libc::IFLA_NET_NS_FD, &(namespace as u32).to_ne_bytes()),
            "moving the tap into the caller's network namespace",
        )
    }

    fn set_ipv4_conf(&self, index: u32, values: &[(u16, u32)]) -> Result<(), PlumbError> {
        let conf: Vec<u8> = values
            .iter()
            .flat_map(|(key, value)| attribute(*key, &value.to_ne_bytes()))
            .collect();
        let inet = attribute(libc::AF_INET as u16, &attribute(IFLA_INET_CONF, &conf));
        self.set_link(
            index,
            &attribute(libc::IFLA_AF_SPEC, &inet),
            "turning on forwarding in the pod's namespace",
        )
    }
}

/// One netlink attribute, padded to 4 bytes.
fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
    let length = 4 + payload.len();
    let mut bytes = Vec::with_capacity(length.next_multiple_of(4));
    bytes.extend_from_slice(&(length as u16).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(payload);
    bytes.resize(length.next_multiple_of(4), 0);
    bytes
}

/// The kernel's answer to a request with NLM_F_ACK: an NLMSG_ERROR whose
/// code is 0 on success.
fn ack_of(reply: &[u8]) -> std::io::Result<()> {
    let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed netlink reply");
    let kind = u16::from_ne_bytes(
        reply
            .get(4..6)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    if i32::from(kind) != libc::NLMSG_ERROR {
        return Err(malformed());
    }
    let code = i32::from_ne_bytes(
        reply
            .get(16..20)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    if code == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(-code))
    }
}

/// An AF_INET datagram socket for interface ioctls, in the calling thread's namespace.
struct Control(OwnedFd);

impl Control {
    fn open() -> Result<Control, PlumbError> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(kernel("opening a control socket")(std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(Control(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn request(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *slot = byte as libc::c_char;
        }
        request
    }

    fn ioctl(&self, op: libc::Ioctl, request: &mut libc::ifreq, what: String) -> Result<(), PlumbError> {
        // SAFETY: an interface ioctl on our socket with a valid ifreq.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), op, request as *mut libc::ifreq) } != 0 {
            return Err(kernel(what)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn mtu(&self, name: &str) -> Result<u32, PlumbError> {
        let mut request = Control::request(name);
        self.ioctl(libc::SIOCGIFMTU, &mut request, format!("reading the MTU of {name}"))?;
        // SAFETY: SIOCGIFMTU filled the mtu member.
        Ok(unsafe { request.ifr_ifru.ifru_mtu } as u32)
    }

    fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), PlumbError> {
        let mut request = Control::request(name);
        request.ifr_ifru.ifru_mtu = mtu as i32;
        self.ioctl(
            libc::SIOCSIFMTU,
            &mut request,
            format!("setting the MTU of {name} to {mtu}"),
        )
    }

    fn set_address(&self, name: &str, address: Ipv4Addr, prefix: u8) -> Result<(), PlumbError> {
        let netmask = Ipv4Addr::from(u32::MAX << (32 - prefix));
        for (op, value, what) in [
            (libc::SIOCSIFADDR, address, "address"),
            (libc::SIOCSIFNETMASK, netmask, "netmask"),
        ] {
            let mut request = Control::request(name);
            // SAFETY: sockaddr_in fits in the ifreq's sockaddr member.
            let sin =
                unsafe { &mut *(&mut request.ifr_ifru.ifru_addr as *mut libc::sockaddr).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(value).to_be();
            self.ioctl(op, &mut request, format!("setting the {what} of {name} to {value}"))?;
        }
        Ok(())
    }

    fn set_up(&self, name: &str) -> Result<(), PlumbError> {
        let mut request = Control::request(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut request, format!("reading the flags of {name}"))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut request, format!("bringing {name} up"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_put_the_guest_behind_the_pod_address_only() {
        let rules = ruleset("vk0123456789ab", "eth0", Ipv4Addr::new(10, 244, 0, 7));
        // Replaces an earlier table in the same transaction.
        assert!(
            rules.starts_with("table ip virtkube\ndelete table ip virtkube\n"),
            "{rules}"
        );
        assert!(
            rules.contains("iifname \"eth0\" ip daddr 10.244.0.7 dnat to 10.0.2.2"),
            "{rules}"
        );
        assert!(
            rules.contains("oifname \"eth0\" ip saddr 10.0.2.0/24 masquerade"),
            "{rules}"
        );
        assert!(
            rules.contains("oifname \"lo\" ip daddr 127.0.0.1 dnat to 10.0.2.2"),
            "{rules}"
        );
        // The guest may not reach the pod's loopback (route_localnet lets
        // its packets in): only replies to what port-forward sent it.
        assert!(
            rules.contains("iifname \"vk0123456789ab\" ip daddr 127.0.0.0/8 ct direction original drop"),
            "{rules}"
        );
        // The shim's display ports stay the pod's, before that rule.
        let kept = rules
            .find("oifname \"lo\" ip daddr 127.0.0.1 tcp dport { 5900, 6080 } accept")
            .expect(&rules);
        assert!(
            kept < rules.find("oifname \"lo\" ip daddr 127.0.0.1 dnat").unwrap(),
            "{rules}"
        );
        assert!(
            rules.contains("oifname \"vk0123456789ab\" ip saddr 127.0.0.1 snat to 10.0.2.1"),
            "{rules}"
        );
    }

    #[test]
    fn only_plain_interface_names_go_into_the_rules() {
        for plain in ["eth0", "net1", "veth-a.1", "eth0@if12", "a_b"] {
            assert!(is_plain_name(plain), "{plain}");
        }
        for hostile in [
            "",
            "e\"; include \"/etc/shadow",
            "a b",
            "a\nb",
            "a{",
            "0123456789abcdefg",
            "é",
        ] {
            assert!(!is_plain_name(hostile), "{hostile:?}");
        }
    }

    #[test]
    fn netlink_attributes_are_padded_and_acks_read() {
        assert_eq!(attribute(28, &7u32.to_ne_bytes()).len(), 8);
        assert_eq!(attribute(1, &[1, 2, 3, 4, 5]).len(), 12);
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(ack_of(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_of(&ack).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(ack_of(&ack[..10]).is_err(), "a short reply is an error, not a panic");
    }
}
