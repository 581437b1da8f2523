//! libvirt URIs and where they lead.
//!
//! Accepted forms:
//! `qemu:///system`, `qemu+unix:///system[?socket=PATH]`,
//! `qemu+tcp://HOST[:PORT]/system`, `test+unix:///default`,
//! `test+unix:///ABSOLUTE/PATH.xml`, `test+tcp://HOST[:PORT]/default`.

use thiserror::Error;

/// libvirtd's default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";
/// libvirtd's default TCP port.
pub const DEFAULT_TCP_PORT: u16 = 16509;

const ACCEPTED: &str =
    "qemu:///system, qemu+unix:///system?socket=PATH, qemu+tcp://HOST[:PORT]/system, test+unix:///default";

/// A URI libvirt-wire cannot use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("libvirt URI {uri:?} {problem}; accepted forms: {ACCEPTED}")]
pub struct UriError {
    /// The URI.
    pub uri: String,
    /// What is wrong.
    pub problem: String,
}

/// How to reach the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket path.
    Unix(String),
    /// TCP to host and port (unauthenticated, unencrypted).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A parsed URI: where to connect and what to ask the daemon to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where.
    pub transport: Transport,
    /// The name sent in CONNECT_OPEN: the URI without transport, host and
    /// client-side parameters (`qemu:///system`).
    pub name: String,
}

impl Target {
    /// A human-readable form of the transport, for messages.
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Unix(path) => format!("unix socket {path}"),
            Transport::Tcp { host, port } => format!("tcp {host}:{port}"),
        }
    }
}

/// Parses a libvirt URI.
pub fn parse(uri: &str) -> Result<Target, UriError> {
    let fail = |problem: &str| UriError {
        uri: uri.to_owned(),
        problem: problem.to_owned(),
    };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| fail("has no scheme (driver://)"))?;
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if driver != "qemu" && driver != "test" {
        return Err(fail(&format!(
            "has driver {driver:?}; virtkube speaks to the qemu and test drivers"
        )));
    }
    let (authority, path_query) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => return Err(fail("has no path (/system)")),
    };
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    let mut socket = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("socket", value)) if !value.is_empty() => socket = Some(value.to_owned()),
            _ => return Err(fail(&format!("has unsupported parameter {pair:?} (only socket=PATH)"))),
        }
    }
    match (driver, path) {
        ("qemu", "/system") => {}
        ("qemu", "/session") => {
            return Err(fail(
                "names the per-user session daemon; virtkube's VMs run on the node's system daemon: use qemu:///system",
            ));
        }
        ("qemu", _) => return Err(fail("has a path other than /system")),
        ("test", "/default") => {}
        ("test", p) if p.len() > 1 && p.ends_with(".xml") => {}
        ("test", _) => return Err(fail("has a path other than /default or /ABSOLUTE/PATH.xml")),
        _ => return Err(fail("has an unknown driver")),
    }
    let name = format!("{driver}://{path}");
    let transport = match transport {
        None | Some("unix") => {
            if !authority.is_empty() {
                return Err(fail(
                    "names a host but uses a unix socket; use qemu+tcp://HOST/system for a remote daemon",
                ));
            }
            if driver == "test" && transport.is_none() {
                return Err(fail(
                    "is libvirt's in-process test driver; virtkube talks to a daemon: use test+unix:///default",
                ));
            }
            Transport::Unix(socket.unwrap_or_else(|| DEFAULT_SOCKET.to_owned()))
        }
        Some("tcp") => {
            if socket.is_some() {
                return Err(fail("sets socket= on a tcp URI"));
            }
            let (host, port) = parse_authority(authority).ok_or_else(|| fail("needs HOST or HOST:PORT for tcp"))?;
            Transport::Tcp { host, port }
        }
        Some(other) => {
            return Err(fail(&format!(
                "uses transport {other:?}; virtkube supports unix and tcp"
            )));
        }
    };
    Ok(Target { transport, name })
}

fn parse_authority(authority: &str) -> Option<(String, u16)> {
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    // [v6]:port, [v6], host:port, host
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => DEFAULT_TCP_PORT,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.split_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_owned(), DEFAULT_TCP_PORT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, name: &str) -> Target {
        Target {
            transport: Transport::Unix(path.into()),
            name: name.into(),
        }
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(parse("qemu:///system").unwrap(), unix(DEFAULT_SOCKET, "qemu:///system"));
        assert_eq!(
            parse("qemu+unix:///system").unwrap(),
            unix(DEFAULT_SOCKET, "qemu:///system")
        );
        assert_eq!(
            parse("qemu+unix:///system?socket=/var/run/virtkube/libvirt-sock").unwrap(),
            unix("/var/run/virtkube/libvirt-sock", "qemu:///system")
        );
        assert_eq!(
            parse("test+unix:///default").unwrap(),
            unix(DEFAULT_SOCKET, "test:///default")
        );
        assert_eq!(
            parse("test+unix:///tmp/node.xml").unwrap(),
            unix(DEFAULT_SOCKET, "test:///tmp/node.xml")
        );
        let tcp = |host: &str, port| Target {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            name: "qemu:///system".into(),
        };
        assert_eq!(parse("qemu+tcp://10.0.0.5/system").unwrap(), tcp("10.0.0.5", 16509));
        assert_eq!(parse("qemu+tcp://node-1:16600/system").unwrap(), tcp("node-1", 16600));
        assert_eq!(
            parse("qemu+tcp://[fd00::1]:16509/system").unwrap(),
            tcp("fd00::1", 16509)
        );
    }

    #[test]
    fn rejected_forms_say_why_and_list_the_accepted_ones() {
        let cases = [
            ("qemu:///session", "per-user session daemon"),
            ("xen:///system", "driver \"xen\""),
            ("qemu+ssh://host/system", "transport \"ssh\""),
            ("qemu+tls://host/system", "transport \"tls\""),
            ("qemu://host/system", "names a host but uses a unix socket"),
            ("qemu+tcp:///system", "needs HOST or HOST:PORT"),
            ("qemu+tcp://host:notaport/system", "needs HOST or HOST:PORT"),
            (
                "qemu+unix:///system?no_verify=1",
                "unsupported parameter \"no_verify=1\"",
            ),
            ("qemu:///other", "path other than /system"),
            ("test:///default", "in-process test driver"),
            ("qemu", "has no scheme"),
            ("qemu://", "has no path"),
            ("", "has no scheme"),
        ];
        for (uri, expected) in cases {
            let message = parse(uri).unwrap_err().to_string();
            assert!(message.contains(expected), "{uri}: {message}");
            assert!(message.contains("accepted forms: qemu:///system"), "{uri}: {message}");
        }
    }
}
