//! The guest's DHCP server for a pod interface (masquerade): one client,
//! one address. Pure: a request's bytes in, the reply's bytes out, so every
//! malformed packet is tested without a network. RFC 2131 and 2132; the
//! domain search list is RFC 3397's encoding.

use std::net::Ipv4Addr;

/// What the guest is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The guest NIC's MAC: the only client answered.
    pub mac: [u8; 6],
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The router and server: the pod side of the tap.
    pub server: Ipv4Addr,
    /// DNS servers (the pod's).
    pub dns: Vec<Ipv4Addr>,
    /// DNS search domains (the pod's).
    pub search: Vec<String>,
    /// The guest's host name (the pod's).
    pub hostname: Option<String>,
    /// The link MTU (the pod's).
    pub mtu: Option<u16>,
    /// Lease time in seconds.
    pub seconds: u32,
}

/// What a reply is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// DHCPOFFER, to a DISCOVER.
    Offer,
    /// DHCPACK: the guest has the address.
    Ack,
    /// DHCPNAK: it asked for another address.
    Nak,
}

/// A reply to send, and where: broadcast, or to the client's address when
/// it already has one (a renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// What it is.
    pub kind: ReplyKind,
    /// The packet.
    pub bytes: Vec<u8>,
    /// Unicast to this address (the client's `ciaddr`); `None`: broadcast.
    pub unicast: Option<Ipv4Addr>,
}

/// Why a packet gets no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Not a well-formed DHCP request.
    #[error("a malformed DHCP packet: {0}")]
    Malformed(&'static str),
    /// From a MAC other than the guest's.
    #[error("a DHCP request from {0}, not the guest's NIC")]
    OtherClient(String),
    /// A message type the server does not answer (DECLINE, RELEASE, INFORM…).
    #[error("DHCP message type {0} needs no answer")]
    NotAnswered(u8),
    /// A REQUEST for another server's offer.
    #[error("a DHCP request for another server's offer")]
    OtherServer,
}

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HEADER: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const REQUEST: u8 = 3;
const OFFER: u8 = 2;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// The options of a request that matter here.
#[derive(Debug, Default)]
struct Options {
    message_type: Option<u8>,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
}

fn parse_options(mut bytes: &[u8]) -> Result<Options, Ignored> {
    let mut options = Options::default();
    while let Some((&code, rest)) = bytes.split_first() {
        match code {
            0 => bytes = rest,
            255 => return Ok(options),
            _ => {
                let (&length, rest) = rest
                    .split_first()
                    .ok_or(Ignored::Malformed("an option without its length"))?;
                let value = rest
                    .get(..usize::from(length))
                    .ok_or(Ignored::Malformed("an option longer than the packet"))?;
                let address = || <[u8; 4]>::try_from(value).ok().map(Ipv4Addr::from);
                match code {
                    53 => options.message_type = value.first().copied(),
                    50 => options.requested = address(),
                    54 => options.server = address(),
                    _ => {}
                }
                bytes = &rest[usize::from(length)..];
            }
        }
    }
    Err(Ignored::Malformed("the options do not end"))
}

/// The answer to one packet from the guest's side of the tap.
pub fn answer(packet: &[u8], lease: &Lease) -> Result<Reply, Ignored> {
    if packet.len() < HEADER + COOKIE.len() {
        return Err(Ignored::Malformed("shorter than a BOOTP header"));
    }
    if packet[0] != BOOTREQUEST {
        return Err(Ignored::Malformed("not a BOOTREQUEST"));
    }
    if packet[1] != 1 || packet[2] != 6 {
        return Err(Ignored::Malformed("not an Ethernet client"));
    }
    if packet[HEADER..HEADER + 4] != COOKIE {
        return Err(Ignored::Malformed("no DHCP magic cookie"));
    }
    let mac = &packet[28..34];
    if mac != lease.mac {
        return Err(Ignored::OtherClient(
            mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        ));
    }
    let options = parse_options(&packet[HEADER + 4..])?;
    let ciaddr = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let kind = match options.message_type {
        Some(DISCOVER) => ReplyKind::Offer,
        Some(REQUEST) => {
            if options.server.is_some_and(|server| server != lease.server) {
                return Err(Ignored::OtherServer);
            }
            let wanted = options.requested.unwrap_or(ciaddr);
            if wanted == lease.address {
                ReplyKind::Ack
            } else {
                ReplyKind::Nak
            }
        }
        Some(other) => return Err(Ignored::NotAnswered(other)),
        None => return Err(Ignored::Malformed("no DHCP message type")),
    };
    let unicast = (!ciaddr.is_unspecified() && kind != ReplyKind::Nak).then_some(ciaddr);
    Ok(Reply {
        kind,
        bytes: reply(packet, lease, kind),
        unicast,
    })
}

fn reply(request: &[u8], lease: &Lease, kind: ReplyKind) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[0] = BOOTREPLY;
    out[1] = 1;
    out[2] = 6;
    out[4..8].copy_from_slice(&request[4..8]); // xid
    out[10..12].copy_from_slice(&request[10..12]); // flags
    if kind != ReplyKind::Nak {
        out[16..20].copy_from_slice(&lease.address.octets()); // yiaddr
    }
    out[24..28].copy_from_slice(&request[24..28]); // giaddr
    out[28..44].copy_from_slice(&request[28..44]); // chaddr
    out.extend_from_slice(&COOKIE);
    let mut option = |code: u8, value: &[u8]| {
        // Values longer than an option holds are split, as RFC 3396 allows.
        for chunk in value.chunks(255) {
            out.push(code);
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
    };
    option(
        53,
        &[match kind {
            ReplyKind::Offer => OFFER,
            ReplyKind::Ack => ACK,
            ReplyKind::Nak => NAK,
        }],
    );
    option(54, &lease.server.octets());
    if kind != ReplyKind::Nak {
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(lease.prefix)).unwrap_or(0));
        option(51, &lease.seconds.to_be_bytes());
        option(58, &(lease.seconds / 2).to_be_bytes());
        option(59, &(lease.seconds / 8 * 7).to_be_bytes());
        option(1, &mask.octets());
        option(3, &lease.server.octets());
        if !lease.dns.is_empty() {
            option(6, &lease.dns.iter().flat_map(|a| a.octets()).collect::<Vec<_>>());
        }
        if let Some(first) = lease.search.first() {
            option(15, first.as_bytes());
            option(119, &search_list(&lease.search));
        }
        if let Some(hostname) = &lease.hostname {
            option(12, hostname.as_bytes());
        }
        if let Some(mtu) = lease.mtu {
            option(26, &mtu.to_be_bytes());
        }
    }
    out.push(255);
    // Some clients drop replies shorter than a BOOTP packet (300 bytes).
    if out.len() < 300 {
        out.resize(300, 0);
    }
    out
}

/// RFC 3397: each domain as DNS labels, uncompressed.
fn search_list(domains: &[String]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for domain in domains {
        for label in domain.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            let label = &label.as_bytes()[..label.len().min(63)];
            bytes.push(label.len() as u8);
            bytes.extend_from_slice(label);
        }
        bytes.push(0);
    }
    bytes
}

/// The DNS servers and search domains of a resolv.conf (IPv4 servers only:
/// the guest's network is IPv4).
pub fn parse_resolv_conf(text: &str) -> (Vec<Ipv4Addr>, Vec<String>) {
    let (mut servers, mut search) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.next().and_then(|w| w.parse::<Ipv4Addr>().ok())),
            Some("search" | "domain") => {
                search = words.map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    servers.truncate(3);
    search.truncate(6);
    (servers, search)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            address: Ipv4Addr::new(10, 0, 2, 2),
            prefix: 24,
            server: Ipv4Addr::new(10, 0, 2, 1),
            dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
            search: vec!["ns.svc.cluster.local".into(), "cluster.local".into()],
            hostname: Some("vm-0".into()),
            mtu: Some(1450),
            seconds: 86400,
        }
    }

    fn request(kind: u8, mac: [u8; 6], extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0] = BOOTREQUEST;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        p[10] = 0x80; // broadcast flag
        p[28..34].copy_from_slice(&mac);
        p.extend_from_slice(&COOKIE);
        p.extend_from_slice(&[53, 1, kind]);
        p.extend_from_slice(extra);
        p.push(255);
        p
    }

    /// The options of a reply, by code (the first of each).
    fn options_of(reply: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut rest = &reply[HEADER + 4..];
        let mut found = Vec::new();
        while let Some((&code, tail)) = rest.split_first() {
            if code == 255 {
                break;
            }
            let len = usize::from(tail[0]);
            found.push((code, tail[1..1 + len].to_vec()));
            rest = &tail[1 + len..];
        }
        found
    }

    fn option(reply: &[u8], code: u8) -> Option<Vec<u8>> {
        options_of(reply).into_iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    #[test]
    fn a_discover_is_offered_the_lease_with_the_pods_settings() {
        let reply = answer(&request(DISCOVER, lease().mac, &[]), &lease()).unwrap();
        assert_eq!(reply.kind, ReplyKind::Offer);
        assert_eq!(reply.unicast, None);
        let b = &reply.bytes;
        assert_eq!(b[0], BOOTREPLY);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef], "the client's transaction");
        assert_eq!(b[10], 0x80, "the broadcast flag is echoed");
        assert_eq!(&b[16..20], &[10, 0, 2, 2]);
        assert_eq!(&b[28..34], &lease().mac);
        assert_eq!(option(b, 53), Some(vec![OFFER]));
        assert_eq!(option(b, 54), Some(vec![10, 0, 2, 1]));
        assert_eq!(option(b, 1), Some(vec![255, 255, 255, 0]));
        assert_eq!(option(b, 3), Some(vec![10, 0, 2, 1]));
        assert_eq!(option(b, 6), Some(vec![10, 96, 0, 10]));
        assert_eq!(option(b, 15), Some(b"ns.svc.cluster.local".to_vec()));
        let mut search = Vec::new();
        for label in ["ns", "svc", "cluster", "local", "", "cluster", "local", ""] {
            search.push(label.len() as u8);
            search.extend_from_slice(label.as_bytes());
        }
        assert_eq!(option(b, 119), Some(search));
        assert_eq!(option(b, 12), Some(b"vm-0".to_vec()));
        assert_eq!(option(b, 26), Some(1450u16.to_be_bytes().to_vec()));
        assert_eq!(option(b, 51), Some(86400u32.to_be_bytes().to_vec()));
        assert!(b.len() >= 300);
    }

    #[test]
    fn a_request_for_the_lease_is_acked_and_anything_else_refused() {
        let ours = [54, 4, 10, 0, 2, 1, 50, 4, 10, 0, 2, 2];
        let reply = answer(&request(REQUEST, lease().mac, &ours), &lease()).unwrap();
        assert_eq!(reply.kind, ReplyKind::Ack);
        assert_eq!(option(&reply.bytes, 53), Some(vec![ACK]));

        let other_address = [54, 4, 10, 0, 2, 1, 50, 4, 10, 0, 2, 9];
        let reply = answer(&request(REQUEST, lease().mac, &other_address), &lease()).unwrap();
        assert_eq!(reply.kind, ReplyKind::Nak);
        assert_eq!(&reply.bytes[16..20], &[0, 0, 0, 0], "a NAK offers nothing");
        assert_eq!(option(&reply.bytes, 3), None);

        let other_server = [54, 4, 192, 168, 1, 1, 50, 4, 10, 0, 2, 2];
        assert_eq!(
            answer(&request(REQUEST, lease().mac, &other_server), &lease()),
            Err(Ignored::OtherServer)
        );

        // A renewal: the client has the address and says so in ciaddr.
        let mut renewal = request(REQUEST, lease().mac, &[]);
        renewal[12..16].copy_from_slice(&[10, 0, 2, 2]);
        let reply = answer(&renewal, &lease()).unwrap();
        assert_eq!(reply.kind, ReplyKind::Ack);
        assert_eq!(reply.unicast, Some(Ipv4Addr::new(10, 0, 2, 2)));
    }

    #[test]
    fn malformed_and_foreign_packets_get_no_answer_and_no_panic() {
        let l = lease();
        let good = request(DISCOVER, l.mac, &[]);
        assert!(matches!(answer(&[], &l), Err(Ignored::Malformed(_))));
        assert!(matches!(answer(&good[..HEADER], &l), Err(Ignored::Malformed(_))));
        let mut reply_op = good.clone();
        reply_op[0] = BOOTREPLY;
        assert!(matches!(answer(&reply_op, &l), Err(Ignored::Malformed(_))));
        let mut no_cookie = good.clone();
        no_cookie[HEADER] = 0;
        assert!(matches!(answer(&no_cookie, &l), Err(Ignored::Malformed(_))));
        let mut unterminated = good.clone();
        unterminated.pop();
        assert!(matches!(answer(&unterminated, &l), Err(Ignored::Malformed(_))));
        let mut overlong = good[..HEADER + 4].to_vec();
        overlong.extend_from_slice(&[53, 200, 1]);
        assert!(matches!(answer(&overlong, &l), Err(Ignored::Malformed(_))));
        let no_type = {
            let mut p = good[..HEADER + 4].to_vec();
            p.push(255);
            p
        };
        assert!(matches!(answer(&no_type, &l), Err(Ignored::Malformed(_))));
        assert!(matches!(
            answer(&request(DISCOVER, [2, 0, 0, 0, 0, 1], &[]), &l),
            Err(Ignored::OtherClient(_))
        ));
        assert_eq!(answer(&request(7, l.mac, &[]), &l), Err(Ignored::NotAnswered(7)));
        // Every truncation of a good packet: an answer or a reason, never a panic.
        let full = request(REQUEST, l.mac, &[54, 4, 10, 0, 2, 1, 50, 4, 10, 0, 2, 2]);
        for end in 0..full.len() {
            let _ = answer(&full[..end], &l);
        }
    }

    #[test]
    fn resolv_conf_gives_ipv4_servers_and_the_search_list() {
        let (servers, search) = parse_resolv_conf(
            "# kubelet\nnameserver 10.96.0.10\nnameserver fd00::10\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        );
        assert_eq!(servers, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            search,
            vec!["ns.svc.cluster.local", "svc.cluster.local", "cluster.local"]
        );
        assert_eq!(parse_resolv_conf(""), (vec![], vec![]));
    }
}
