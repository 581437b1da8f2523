//! The pod network's fixed facts, shared by the shim (which renders the
//! interface and answers the guest's DHCP) and the gate (which admits the
//! interface and plumbs it into the pod).
//!
//! A `pod` interface with the masquerade binding is a tap in the VM pod's
//! network namespace. The pod side of the tap is the guest's router,
//! [`GATEWAY`]; the guest gets [`GUEST`] by DHCP. Both are private and the
//! same in every pod: each pod has its own namespace, so they never meet.

use std::net::Ipv4Addr;

/// The pod side of the tap: the guest's router and DHCP server.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The address the guest is leased.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The prefix length of the guest's subnet.
pub const PREFIX: u8 = 24;

/// Where the shim serves the VM's display inside the pod, on 127.0.0.1
/// only (reached with `kubectl port-forward`): RFB (any VNC viewer).
pub const VNC_PORT: u16 = 5900;
/// RFB over WebSocket (noVNC, a browser), on 127.0.0.1 like [`VNC_PORT`].
pub const VNC_WEBSOCKET_PORT: u16 = 6080;
/// The port on which an ImageFile's import pod (`virtkube-shim serve-file`)
/// serves its file to the repository manager.
pub const IMPORT_PORT: u16 = 8090;
/// The pod's loopback ports that stay the shim's: every other port of
/// 127.0.0.1 (where `kubectl port-forward` connects) reaches the guest.
pub const SHIM_PORTS: [u16; 2] = [VNC_PORT, VNC_WEBSOCKET_PORT];

/// The name of a domain's pod tap. libvirt creates it under this name in the
/// virthost's network namespace, where names of all the node's VMs meet, so
/// it is derived from the domain's name (unique on the node, and the gate
/// only lets a caller create its own). 14 characters: under the kernel's 15.
pub fn tap_name(domain_name: &str) -> String {
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = domain_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("vk{:012x}", hash >> 16)
}

/// Whether `name` has the shape of a pod tap name (any domain's).
pub fn is_tap_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("vk")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_distinct_and_fit_the_kernel() {
        let a = tap_name("ns_vm-a");
        assert_eq!(a, tap_name("ns_vm-a"));
        assert_ne!(a, tap_name("ns_vm-b"));
        assert!(a.len() < 16, "{a} is too long for an interface name");
        assert!(is_tap_name(&a), "{a}");
        assert!(!is_tap_name("eth0"));
        assert!(!is_tap_name("vk0123456789aZ"));
        // Pinned: the gate and the shim of different builds must agree.
        assert_eq!(tap_name(""), "vkcbf29ce48422");
    }
}
