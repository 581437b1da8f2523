//! The pod network's unprivileged part: once the gate has moved the guest's
//! tap into this container's network namespace (before the guest runs), the
//! shim answers the guest's DHCP there, handing out the pod's DNS, search
//! domains, host name and MTU ([`crate::dhcp`]).
//!
//! Needs only what every container has: binding UDP port 67 uses
//! CAP_NET_BIND_SERVICE (a default capability), and the socket is bound to
//! the tap (SO_BINDTODEVICE, unprivileged since Linux 5.7).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use virtkube_api::podnet;
use virtkube_api::resolve::{MacAddr, ResolvedTemplate};
use virtkube_api::template::InterfaceType;

use crate::dhcp::{self, Lease, ReplyKind};
use crate::render::{Instance, derived_mac};
use crate::runtime::log;

/// How long the shim looks for the tap the gate moved in (it is there when
/// the create returns; the wait covers nothing but a slow kernel).
const TAP_PATIENCE: Duration = Duration::from_secs(2);
/// How long a lease lasts; renewals come at half of it.
const LEASE_SECONDS: u32 = 86_400;

/// The guest's pod NIC, if the template has one: its tap and MAC.
pub fn pod_nic(template: &ResolvedTemplate, instance: &Instance) -> Option<(String, MacAddr)> {
    let (index, nic) = template
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, nic)| nic.kind == InterfaceType::Pod)?;
    Some((
        podnet::tap_name(&instance.domain_name),
        nic.mac.unwrap_or_else(|| derived_mac(instance, index)),
    ))
}

/// Checks that the tap is here with the router address and starts the DHCP
/// server on it, on a thread of its own for the shim's life.
pub fn serve(tap: &str, mac: MacAddr) -> Result<(), String> {
    let deadline = Instant::now() + TAP_PATIENCE;
    let mtu = loop {
        match tap_state(tap) {
            Ok((address, mtu)) if address == podnet::GATEWAY => break mtu,
            state if Instant::now() >= deadline => {
                let found = match state {
                    Ok((address, _)) => format!("it has address {address}, not {}", podnet::GATEWAY),
                    Err(e) => format!("it is not in this container's network namespace ({e})"),
                };
                return Err(format!(
                    "the guest's pod interface was not set up: {found}. The shim must reach libvirt through virtkube-gate, which moves the tap into the pod; a template for a plain libvirtd needs another interface type, or interfaces: []"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let (dns, search) = std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| dhcp::parse_resolv_conf(&text))
        .unwrap_or_default();
    let lease = Lease {
        mac: mac.0,
        address: podnet::GUEST,
        prefix: podnet::PREFIX,
        server: podnet::GATEWAY,
        dns,
        search,
        hostname: hostname(),
        mtu: u16::try_from(mtu).ok(),
        seconds: LEASE_SECONDS,
    };
    let socket = bind_dhcp(tap)?;
    std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || answer_forever(&socket, &lease))
        .map_err(|e| format!("cannot start the guest's DHCP server: {e}"))?;
    Ok(())
}

fn answer_forever(socket: &UdpSocket, lease: &Lease) {
    let mut packet = [0u8; 1500];
    let mut leased = false;
    loop {
        let length = match socket.recv_from(&mut packet) {
            Ok((length, _)) => length,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(format!("the guest's DHCP server stopped: {e}"));
                return;
            }
        };
        let reply = match dhcp::answer(&packet[..length], lease) {
            Ok(reply) => reply,
            Err(why) => {
                log::debug!("DHCP: {why}");
                continue;
            }
        };
        let to = SocketAddrV4::new(reply.unicast.unwrap_or(Ipv4Addr::BROADCAST), 68);
        if let Err(e) = socket.send_to(&reply.bytes, to) {
            log(format!("the guest's DHCP reply could not be sent: {e}"));
            continue;
        }
        match reply.kind {
            ReplyKind::Ack if !leased => {
                leased = true;
                log(format!(
                    "the guest took {}/{} by DHCP (router {}); it answers at this pod's address",
                    lease.address, lease.prefix, lease.server
                ));
            }
            ReplyKind::Nak => log("the guest asked for an address it cannot have: told so (DHCPNAK)"),
            _ => {}
        }
    }
}

/// UDP port 67 on the tap only, able to broadcast.
fn bind_dhcp(tap: &str) -> Result<UdpSocket, String> {
    let failed = |what: &str| format!("the guest's DHCP server: {what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(failed("socket"));
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for (option, what) in [
        (libc::SO_REUSEADDR, "SO_REUSEADDR"),
        (libc::SO_BROADCAST, "SO_BROADCAST"),
    ] {
        // SAFETY: an int option on our socket.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(failed(what));
        }
    }
    // SAFETY: the device name's bytes, with their length.
    let bound = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            tap.as_ptr().cast(),
            tap.len() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(failed(&format!("binding to {tap}")));
    }
    // SAFETY: sockaddr_in is plain data.
    let mut address: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    address.sin_family = libc::AF_INET as libc::sa_family_t;
    address.sin_port = 67u16.to_be();
    // SAFETY: binding our socket to a sockaddr_in of the right size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        let error = std::io::Error::last_os_error();
        return Err(if error.raw_os_error() == Some(libc::EACCES) {
            "the guest's DHCP server cannot bind UDP port 67: the VM container needs CAP_NET_BIND_SERVICE (a default capability; do not drop it)".to_owned()
        } else {
            format!("the guest's DHCP server cannot bind UDP port 67: {error}")
        });
    }
    Ok(UdpSocket::from(fd))
}

/// The tap's IPv4 address and MTU, as this namespace sees it.
fn tap_state(tap: &str) -> std::io::Result<(Ipv4Addr, u32)> {
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = || {
        // SAFETY: ifreq is plain data; zeroes are a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(tap.bytes().take(libc::IFNAMSIZ - 1)) {
            *slot = byte as libc::c_char;
        }
        request
    };
    let mut address = request();
    // SAFETY: an interface ioctl with a valid ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFADDR, &raw mut address) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFADDR filled an AF_INET address.
    let sin = unsafe { &*(&raw const address.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>() };
    let mut mtu = request();
    // SAFETY: an interface ioctl with a valid ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU, &raw mut mtu) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU filled the MTU.
    let mtu = unsafe { mtu.ifr_ifru.ifru_mtu } as u32;
    Ok((Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), mtu))
}

/// This container's host name (the pod's name in Kubernetes).
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name.len() <= 63).then(|| name.to_owned())
}
