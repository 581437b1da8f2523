//! Where the shim finds libvirtd when `VIRTKUBE_LIBVIRT_URI` is not set.
//!
//! 1. libvirtd's socket mounted at the default path (Docker, and pods that
//!    mount the virthost's socket directory): `qemu:///system`.
//! 2. Otherwise, in a pod (bare `kubectl run IMAGE`, no volumes): the node's
//!    virthost over TCP, at the pod's `status.hostIP`, where its gate
//!    listens and knows the pod by its pod IP.
//! 3. Otherwise `qemu:///system`, whose connection error then says what to do.

use std::fmt;
use std::net::IpAddr;

/// libvirtd's socket behind the default `qemu:///system` URI.
pub const DEFAULT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";
/// The port of the virthost gate's TCP listener (libvirt's default).
pub const VIRTHOST_TCP_PORT: u16 = 16509;

/// How the URI was chosen; it decides the advice given when connecting fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `VIRTKUBE_LIBVIRT_URI`.
    Explicit,
    /// The socket at [`DEFAULT_SOCKET`] exists.
    MountedSocket,
    /// The node's virthost over TCP, found through the pod's `status.hostIP`.
    NodeTcp {
        /// The node's IP.
        host_ip: IpAddr,
    },
    /// Nothing found: the default URI, which will fail to connect.
    NothingFound,
}

/// The chosen libvirt URI and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// What to connect to.
    pub uri: String,
    /// Why this one.
    pub source: Source,
}

/// What the shim knows when it chooses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clues<'a> {
    /// `VIRTKUBE_LIBVIRT_URI`, when set.
    pub explicit_uri: Option<&'a str>,
    /// Whether [`DEFAULT_SOCKET`] exists.
    pub socket_mounted: bool,
    /// The pod's `status.hostIP` (or `HOST_IP` from the downward API), in a cluster.
    pub host_ip: Option<&'a str>,
}

/// A `status.hostIP` that is not an IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pod's host IP {0:?} is not an IP address; set VIRTKUBE_LIBVIRT_URI to reach libvirtd")]
pub struct BadHostIp(pub String);

/// Chooses the URI (see the module's documentation for the order).
pub fn choose(clues: &Clues<'_>) -> Result<Endpoint, BadHostIp> {
    let default = |source| Endpoint {
        uri: crate::config::DEFAULT_URI.to_owned(),
        source,
    };
    if let Some(uri) = clues.explicit_uri {
        return Ok(Endpoint {
            uri: uri.to_owned(),
            source: Source::Explicit,
        });
    }
    if clues.socket_mounted {
        return Ok(default(Source::MountedSocket));
    }
    let Some(host_ip) = clues.host_ip else {
        return Ok(default(Source::NothingFound));
    };
    let host_ip: IpAddr = host_ip.trim().parse().map_err(|_| BadHostIp(host_ip.to_owned()))?;
    let host = match host_ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    Ok(Endpoint {
        uri: format!("qemu+tcp://{host}:{VIRTHOST_TCP_PORT}/system"),
        source: Source::NodeTcp { host_ip },
    })
}

impl Endpoint {
    /// The URI to try now. A socket that has appeared since the choice (the
    /// virthost was starting, or recreating its socket) wins over a fallback.
    pub fn uri_now(&self, socket_mounted: bool) -> &str {
        match self.source {
            Source::NodeTcp { .. } | Source::NothingFound if socket_mounted => crate::config::DEFAULT_URI,
            _ => &self.uri,
        }
    }

    /// What to tell the user when connecting to this endpoint failed.
    pub fn advice(&self) -> Option<Advice<'_>> {
        match self.source {
            Source::Explicit | Source::MountedSocket => None,
            Source::NodeTcp { .. } | Source::NothingFound => Some(Advice(self)),
        }
    }
}

/// Advice after a failed connection, shown after the connection error.
#[derive(Debug)]
pub struct Advice<'a>(&'a Endpoint);

const MOUNT_HINT: &str = "mount the virthost's socket directory (/var/run/virtkube on the node) at /var/run/libvirt (see deploy/examples/tiny-deployment.yaml)";
const TCP_HINT: &str = "or check that the virthost runs on this node with its TCP listener on (VIRTKUBE_GATE_TCP, port 16509) and that this pod may reach its node's port 16509";

impl fmt::Display for Advice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.source {
            Source::NodeTcp { host_ip } => write!(
                f,
                "there is no libvirt socket at {DEFAULT_SOCKET}, so the shim tried the virthost of its node ({host_ip}) over TCP; {MOUNT_HINT}, {TCP_HINT}"
            ),
            Source::NothingFound => write!(
                f,
                "there is no libvirt socket at {DEFAULT_SOCKET}; {MOUNT_HINT}, set VIRTKUBE_LIBVIRT_URI, or run in a pod that may read itself from the Kubernetes API so the shim can find its node's virthost over TCP"
            ),
            Source::Explicit | Source::MountedSocket => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_uri_wins_over_everything() {
        let e = choose(&Clues {
            explicit_uri: Some("test+unix:///default"),
            socket_mounted: true,
            host_ip: Some("10.0.0.7"),
        })
        .unwrap();
        assert_eq!(e.uri, "test+unix:///default");
        assert_eq!(e.source, Source::Explicit);
        assert!(e.advice().is_none());
    }

    #[test]
    fn a_mounted_socket_comes_before_tcp() {
        let e = choose(&Clues {
            socket_mounted: true,
            host_ip: Some("10.0.0.7"),
            ..Clues::default()
        })
        .unwrap();
        assert_eq!((e.uri.as_str(), e.source), ("qemu:///system", Source::MountedSocket));
    }

    #[test]
    fn without_a_socket_the_node_is_reached_over_tcp() {
        let e = choose(&Clues {
            host_ip: Some("192.0.2.2"),
            ..Clues::default()
        })
        .unwrap();
        assert_eq!(e.uri, "qemu+tcp://192.0.2.2:16509/system");
        let advice = e.advice().unwrap().to_string();
        assert!(advice.contains("virthost of its node (192.0.2.2) over TCP"), "{advice}");
        assert!(
            advice.contains("VIRTKUBE_GATE_TCP") && advice.contains("port 16509"),
            "{advice}"
        );
        // The wire client reads it as TCP to the node's port 16509.
        let parsed = libvirt_wire::uri::parse(&e.uri).unwrap();
        assert_eq!(
            parsed.transport,
            libvirt_wire::uri::Transport::Tcp {
                host: "192.0.2.2".into(),
                port: 16509
            }
        );
    }

    #[test]
    fn a_socket_that_appears_later_wins_over_a_fallback() {
        let tcp = choose(&Clues {
            host_ip: Some("192.0.2.2"),
            ..Clues::default()
        })
        .unwrap();
        assert_eq!(tcp.uri_now(false), "qemu+tcp://192.0.2.2:16509/system");
        assert_eq!(tcp.uri_now(true), "qemu:///system");
        let nothing = choose(&Clues::default()).unwrap();
        assert_eq!(nothing.uri_now(true), "qemu:///system");
        let explicit = choose(&Clues {
            explicit_uri: Some("qemu+tcp://10.0.0.1/system"),
            ..Clues::default()
        })
        .unwrap();
        assert_eq!(explicit.uri_now(true), "qemu+tcp://10.0.0.1/system");
    }

    #[test]
    fn ipv6_node_addresses_are_bracketed() {
        let e = choose(&Clues {
            host_ip: Some("fd00::2"),
            ..Clues::default()
        })
        .unwrap();
        assert_eq!(e.uri, "qemu+tcp://[fd00::2]:16509/system");
        assert!(libvirt_wire::uri::parse(&e.uri).is_ok());
    }

    #[test]
    fn a_bad_host_ip_is_an_error_naming_it() {
        let e = choose(&Clues {
            host_ip: Some("node-1"),
            ..Clues::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("\"node-1\" is not an IP address"), "{e}");
    }

    #[test]
    fn nothing_found_falls_back_to_the_default_with_advice() {
        let e = choose(&Clues::default()).unwrap();
        assert_eq!(
            (e.uri.as_str(), e.source.clone()),
            ("qemu:///system", Source::NothingFound)
        );
        let advice = e.advice().unwrap().to_string();
        assert!(
            advice.contains("no libvirt socket at /var/run/libvirt/libvirt-sock"),
            "{advice}"
        );
    }
}
