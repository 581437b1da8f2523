//! Who is calling over TCP: a VM pod that cannot mount the gate's socket (a
//! bare `kubectl run`) reaches it at its node's address, and the gate knows
//! it by its source address, the pod IP. The gate watches the pods of its
//! own node (a kube-runtime reflector) and maps the address to exactly one
//! running, non-hostNetwork pod; anything else is refused with the reason.
//!
//! The lookup and the liveness check are pure, over the reflector's pods.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// Why a TCP caller is not a pod the gate will serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownAddress {
    /// No pod on this node has the address.
    #[error(
        "no pod on node {node} has address {ip} (the gate serves pods of its own node over TCP; other callers are refused)"
    )]
    NoPod { ip: IpAddr, node: String },
    /// A hostNetwork pod (or the node itself) shares the node's addresses:
    /// the address says nothing about which one is calling.
    #[error(
        "address {ip} is the node's own (hostNetwork pod {pod}): it does not tell the gate which pod is calling; mount the gate's socket instead (/var/run/virtkube on the node at /var/run/libvirt)"
    )]
    HostNetwork { ip: IpAddr, pod: String },
    /// The only pod with the address is being deleted or has ended.
    #[error("pod {pod} (address {ip}) is {why}: it may not start a VM")]
    Ending { ip: IpAddr, pod: String, why: &'static str },
    /// More than one live pod claims the address (an address being reused
    /// while the gate's view catches up).
    #[error("{count} pods on node {node} claim address {ip}; refusing rather than guessing")]
    Ambiguous { ip: IpAddr, node: String, count: usize },
    /// The gate has not read its node's pods yet, or cannot reach the API.
    #[error("the gate has not yet read the pods of node {node} from the Kubernetes API ({why})")]
    NotSynced { node: String, why: String },
}

impl UnknownAddress {
    /// Whether waiting could change the answer: the pod's address may not
    /// have reached the API yet when its container starts, and an ended
    /// pod keeps in its status the address a new pod has just been given.
    pub fn may_resolve(&self) -> bool {
        !matches!(self, UnknownAddress::HostNetwork { .. })
    }
}

fn addresses(pod: &Pod) -> impl Iterator<Item = IpAddr> + '_ {
    let status = pod.status.as_ref();
    let single = status.and_then(|s| s.pod_ip.as_deref());
    let many = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str());
    single.into_iter().chain(many).filter_map(|text| text.parse().ok())
}

fn name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("?"),
        pod.metadata.name.as_deref().unwrap_or("?")
    )
}

fn ended(pod: &Pod) -> Option<&'static str> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("being deleted");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => Some("Succeeded"),
        Some("Failed") => Some("Failed"),
        _ => None,
    }
}

/// The UID of the pod that owns `ip` among `pods` (this node's).
pub fn identify(pods: &[Arc<Pod>], ip: IpAddr, node: &str) -> Result<String, UnknownAddress> {
    let holders: Vec<&Pod> = pods
        .iter()
        .map(Arc::as_ref)
        .filter(|p| addresses(p).any(|a| a == ip))
        .collect();
    if let Some(host) = holders
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
    {
        return Err(UnknownAddress::HostNetwork { ip, pod: name(host) });
    }
    let live: Vec<&&Pod> = holders.iter().filter(|p| ended(p).is_none()).collect();
    match live.as_slice() {
        [pod] => match pod.metadata.uid.as_deref() {
            Some(uid) if !uid.is_empty() => Ok(uid.to_owned()),
            _ => Err(UnknownAddress::NoPod {
                ip,
                node: node.to_owned(),
            }),
        },
        [] => match holders.first() {
            Some(pod) => Err(UnknownAddress::Ending {
                ip,
                pod: name(pod),
                why: ended(pod).unwrap_or("ended"),
            }),
            None => Err(UnknownAddress::NoPod {
                ip,
                node: node.to_owned(),
            }),
        },
        many => Err(UnknownAddress::Ambiguous {
            ip,
            node: node.to_owned(),
            count: many.len(),
        }),
    }
}

/// How long past its deletion deadline (deletionTimestamp, which already
/// includes the grace period) a pod's connection may last.
pub const DELETION_MARGIN_SECONDS: i64 = 30;

/// Whether the pod `uid` still holds `ip` and has not ended, at `now`. A TCP
/// caller's connection is closed when this turns false: the container may be
/// gone without its connection having closed (its network namespace torn
/// down first), and the VM must not outlive it. A pod being deleted keeps its
/// connection while its shim stops the VM, until its grace period and
/// [`DELETION_MARGIN_SECONDS`] are over.
pub fn still_holds(pods: &[Arc<Pod>], uid: &str, ip: IpAddr, now: k8s_openapi::jiff::Timestamp) -> bool {
    pods.iter().any(|p| {
        p.metadata.uid.as_deref() == Some(uid)
            && addresses(p).any(|a| a == ip)
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
            && p.metadata
                .deletion_timestamp
                .as_ref()
                .is_none_or(|deadline| now.as_second() <= deadline.0.as_second() + DELETION_MARGIN_SECONDS)
    })
}

/// The socket inode of the established connection from `local` to
/// `remote` in a `/proc/<pid>/net/tcp` or `tcp6` table (a network
/// namespace's TCP sockets), if it holds one. The gate asks it of a process
/// of the pod its source address names: the connection must really come
/// from that pod's network namespace, not from someone sending with its
/// address; the inode then names the process that holds it.
pub fn netns_connection_inode(table: &str, local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, state, inode) = (fields.get(1)?, fields.get(2)?, fields.get(3)?, fields.get(9)?);
        // 01 is TCP_ESTABLISHED.
        (*state == "01" && proc_net_addr(l) == Some(local) && proc_net_addr(r) == Some(remote))
            .then(|| inode.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel
/// prints them: each 32-bit word of the address in the machine's byte order,
/// the port in hex. An IPv4-mapped IPv6 address reads as IPv4.
fn proc_net_addr(text: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(|w| w.to_ne_bytes());
    let ip = match addr.len() {
        8 => IpAddr::from(word(addr)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::from(bytes).to_canonical()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, uid: &str, ip: &str, extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "vms", "uid": uid},
            "spec": {"containers": [], "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        });
        merge(&mut value, extra);
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_pod_with_the_address_is_the_caller() {
        let pods = vec![
            pod("a", "uid-a", "10.1.0.5", json!({})),
            pod("b", "uid-b", "10.1.0.6", json!({})),
        ];
        assert_eq!(identify(&pods, ip("10.1.0.6"), "node-a"), Ok("uid-b".to_owned()));
        // IPv6 from podIPs.
        let dual = vec![pod(
            "c",
            "uid-c",
            "10.1.0.7",
            json!({"status": {"podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]}}),
        )];
        assert_eq!(identify(&dual, ip("fd00::7"), "node-a"), Ok("uid-c".to_owned()));
    }

    #[test]
    fn unknown_host_network_ending_and_shared_addresses_are_refused() {
        let pods = vec![
            pod("a", "uid-a", "10.1.0.5", json!({})),
            pod(
                "virthost",
                "uid-h",
                "192.0.2.10",
                json!({"spec": {"hostNetwork": true}}),
            ),
            pod("other-host", "uid-o", "192.0.2.10", json!({})),
            pod(
                "gone",
                "uid-g",
                "10.1.0.8",
                json!({"metadata": {"deletionTimestamp": "2026-11-23T10:00:00Z"}}),
            ),
            pod("done", "uid-d", "10.1.0.9", json!({"status": {"phase": "Succeeded"}})),
            pod("x", "uid-x", "10.1.0.10", json!({})),
            pod("y", "uid-y", "10.1.0.10", json!({})),
        ];
        let refused = |addr: &str| identify(&pods, ip(addr), "node-a").unwrap_err();
        let no_pod = refused("10.9.9.9");
        assert!(
            no_pod
                .to_string()
                .contains("no pod on node node-a has address 10.9.9.9")
        );
        assert!(no_pod.may_resolve());
        let host = refused("192.0.2.10");
        assert!(host.to_string().contains("hostNetwork pod vms/virthost"), "{host}");
        assert!(!host.may_resolve());
        let gone = refused("10.1.0.8");
        assert!(gone.to_string().contains("being deleted"), "{gone}");
        // Its address may be a new pod's, not yet seen: worth waiting for.
        assert!(gone.may_resolve());
        assert!(refused("10.1.0.9").to_string().contains("Succeeded"));
        let shared = refused("10.1.0.10");
        assert!(shared.to_string().contains("2 pods"), "{shared}");
        assert!(shared.may_resolve());
        // An ended pod and a new one with its address: the new one is the caller.
        let reused = vec![
            pod("old", "uid-old", "10.1.0.11", json!({"status": {"phase": "Failed"}})),
            pod("new", "uid-new", "10.1.0.11", json!({})),
        ];
        assert_eq!(identify(&reused, ip("10.1.0.11"), "node-a"), Ok("uid-new".to_owned()));
    }

    #[test]
    fn the_connection_must_be_in_the_pods_network_namespace() {
        // As the kernel prints them on x86-64 (little-endian words).
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  0: 030011AC:D431 020200C0:407D 01 00000000:00000000 00:00000000 00000000     0        0 81234 1\n\
                  1: 030011AC:D432 020200C0:407D 06 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        let pod = "172.17.0.3:54321".parse().unwrap();
        let gate = "192.0.2.2:16509".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(netns_connection_inode(v4, pod, gate), Some(81234));
            // The TIME_WAIT one (06) is not a connection.
            assert_eq!(
                netns_connection_inode(v4, "172.17.0.3:54322".parse().unwrap(), gate),
                None
            );
            assert_eq!(
                netns_connection_inode(v4, "172.17.0.4:54321".parse().unwrap(), gate),
                None
            );
            assert_eq!(
                netns_connection_inode(v4, pod, "192.0.2.2:16510".parse().unwrap()),
                None
            );
            // IPv4-mapped IPv6 from a dual-stack socket, and plain IPv6.
            let v6 = "  sl  local_address                         remote_address                        st\n\
                      0: 0000000000000000FFFF0000030011AC:D431 0000000000000000FFFF0000020200C0:407D 01 00000000:00000000 00:00000000 00000000 0 0 777 1\n\
                      1: 000080FD000000000000000007000000:0050 000080FD000000000000000001000000:407D 01 00000000:00000000 00:00000000 00000000 0 0 778 1\n";
            assert_eq!(netns_connection_inode(v6, pod, gate), Some(777));
            assert_eq!(
                netns_connection_inode(v6, "[fd80::7]:80".parse().unwrap(), "[fd80::1]:16509".parse().unwrap()),
                Some(778)
            );
        }
        assert_eq!(netns_connection_inode("header only\n", pod, gate), None);
        assert_eq!(
            netns_connection_inode("h\n 0: garbage\n 1: 1:2 3:4 01\n", pod, gate),
            None
        );
    }

    #[test]
    fn a_connection_lasts_while_its_pod_holds_the_address() {
        let at = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        let now = at("2026-11-23T10:00:00Z");
        let pods = vec![pod("a", "uid-a", "10.1.0.5", json!({}))];
        assert!(still_holds(&pods, "uid-a", ip("10.1.0.5"), now));
        assert!(!still_holds(&pods, "uid-a", ip("10.1.0.6"), now));
        assert!(!still_holds(&[], "uid-a", ip("10.1.0.5"), now));
        let deleting = vec![pod(
            "a",
            "uid-a",
            "10.1.0.5",
            json!({"metadata": {"deletionTimestamp": "2026-11-23T10:00:20Z"}}),
        )];
        // During the grace period and the margin after it, not beyond.
        assert!(still_holds(&deleting, "uid-a", ip("10.1.0.5"), now));
        assert!(still_holds(
            &deleting,
            "uid-a",
            ip("10.1.0.5"),
            at("2026-11-23T10:00:50Z")
        ));
        assert!(!still_holds(
            &deleting,
            "uid-a",
            ip("10.1.0.5"),
            at("2026-11-23T10:00:51Z")
        ));
        let failed = vec![pod("a", "uid-a", "10.1.0.5", json!({"status": {"phase": "Failed"}}))];
        assert!(!still_holds(&failed, "uid-a", ip("10.1.0.5"), now));
    }
}
