//! The WebSocket protocol (RFC 6455), as much of it as RFB over WebSocket
//! needs (what noVNC speaks): the opening handshake and the framing. Pure:
//! bytes in, bytes out; the VNC server (`vnc.rs`) does the I/O.
//!
//! RFB is a byte stream, so message boundaries carry nothing: every data
//! frame's payload (binary, or a continuation) is simply the next bytes of
//! the stream.

use base64::Engine;

/// The largest request head the handshake reads (a browser's is ~1 KiB).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The largest frame payload accepted from a viewer (its RFB messages are
/// small; a frame claiming more is not a viewer's).
pub const MAX_FRAME: u64 = 1024 * 1024;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a viewer's handshake or frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// Not an HTTP GET asking to upgrade to WebSocket version 13.
    #[error("not a WebSocket upgrade request: {0}")]
    NotUpgrade(String),
    /// A page from elsewhere than this machine: browsers let any page open
    /// a WebSocket to localhost, where `kubectl port-forward` listens.
    #[error(
        "a page from {0} may not open this VM's screen: only pages served from localhost may (any web page open in the browser could otherwise watch and type)"
    )]
    ForeignOrigin(String),
    /// A frame the protocol forbids from a client.
    #[error("bad WebSocket frame: {0}")]
    BadFrame(String),
}

/// What the viewer asked for in its opening handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The request path (`/`, `/websockify`): any is served.
    pub path: String,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Whether it offered the `binary` subprotocol (older noVNC does), which
    /// the answer must then name.
    pub binary_protocol: bool,
}

/// Whether a browser page of `origin` may open the screen: one served from
/// this machine (`http(s)://localhost`, `127.0.0.1` or `[::1]`, any port).
/// `null` (a `file:` page, a sandboxed frame) is not.
pub fn is_local_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = match rest.strip_prefix("[::1]") {
        Some(after) => return after.is_empty() || is_port(after),
        None => rest.split_once(':').map_or(rest, |(host, _)| host),
    };
    let after = &rest[host.len()..];
    matches!(host, "localhost" | "127.0.0.1") && (after.is_empty() || is_port(after))
}

fn is_port(text: &str) -> bool {
    text.strip_prefix(':')
        .is_some_and(|port| !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()))
}

/// The length of the request head in `buf` (through its blank line), once
/// it has all arrived.
pub fn head_length(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
}

/// Parses a request head (through its blank line).
pub fn parse_upgrade(head: &[u8]) -> Result<Upgrade, WsError> {
    let text = std::str::from_utf8(head).map_err(|_| WsError::NotUpgrade("the request is not text".into()))?;
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    if method != Some("GET") || !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(WsError::NotUpgrade(format!(
            "request line {request:?}; connect a WebSocket (GET) here, or a VNC viewer to port 5900"
        )));
    }
    let (mut key, mut upgrade, mut version, mut binary_protocol) = (None, false, None, false);
    let mut origin = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(WsError::NotUpgrade(format!("header line {line:?} has no colon")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-key" => key = Some(value.to_owned()),
            "sec-websocket-version" => version = Some(value.to_owned()),
            "sec-websocket-protocol" => binary_protocol = value.split(',').any(|p| p.trim() == "binary"),
            "origin" => origin = Some(value.to_owned()),
            _ => {}
        }
    }
    if !upgrade {
        return Err(WsError::NotUpgrade(
            "no \"Upgrade: websocket\" header; this port speaks RFB over WebSocket only".into(),
        ));
    }
    if version.as_deref() != Some("13") {
        return Err(WsError::NotUpgrade(format!(
            "Sec-WebSocket-Version {version:?}; only 13 is spoken"
        )));
    }
    // A viewer that is not a browser sends no Origin.
    if let Some(origin) = origin
        && !is_local_origin(&origin)
    {
        return Err(WsError::ForeignOrigin(origin));
    }
    let key = key.ok_or_else(|| WsError::NotUpgrade("no Sec-WebSocket-Key header".into()))?;
    match base64::engine::general_purpose::STANDARD.decode(&key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(WsError::NotUpgrade(format!(
                "Sec-WebSocket-Key {key:?} is not 16 bytes in base64"
            )));
        }
    }
    Ok(Upgrade {
        path: path.unwrap_or("/").to_owned(),
        key,
        binary_protocol,
    })
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{key}{GUID}")).digest().bytes();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// The answer that completes the handshake.
pub fn accept_response(upgrade: &Upgrade) -> String {
    let protocol = if upgrade.binary_protocol {
        "Sec-WebSocket-Protocol: binary\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        accept_key(&upgrade.key)
    )
}

/// The answer to a request that is refused: says why.
pub fn refusal(why: &WsError) -> String {
    let status = match why {
        WsError::ForeignOrigin(_) => "403 Forbidden",
        _ => "400 Bad Request",
    };
    http_answer(status, &why.to_string())
}

/// A plain-text HTTP answer that closes the connection.
pub fn http_answer(status: &str, text: &str) -> String {
    let body = format!("{text}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        }
    }
}

/// One frame from a viewer, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: Opcode,
    pub payload: Vec<u8>,
}

/// Decodes the first frame in `buf`: `Ok(None)` until it has all arrived,
/// else the frame and how many bytes it took. A client's frames must be
/// masked (RFC 6455 §5.1) and no larger than [`MAX_FRAME`].
pub fn decode_client_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = Opcode::from_bits(buf[0] & 0x0f)
        .ok_or_else(|| WsError::BadFrame(format!("unknown opcode {:#x}", buf[0] & 0x0f)))?;
    if buf[0] & 0x70 != 0 {
        return Err(WsError::BadFrame("reserved bits set (no extension was agreed)".into()));
    }
    if buf[1] & 0x80 == 0 {
        return Err(WsError::BadFrame("a client's frame must be masked".into()));
    }
    let (length, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut word = [0u8; 8];
            word.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(word), 10)
        }
        126 | 127 => return Ok(None),
        small => (u64::from(small), 2),
    };
    if length > MAX_FRAME {
        return Err(WsError::BadFrame(format!(
            "a {length}-byte frame; a viewer's are at most {MAX_FRAME}"
        )));
    }
    let control = matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong);
    if control && (length > 125 || buf[0] & 0x80 == 0) {
        return Err(WsError::BadFrame(
            "a control frame must be whole and at most 125 bytes".into(),
        ));
    }
    let length = length as usize;
    if buf.len() < at + 4 + length {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let payload = buf[at..at + length]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some((Frame { opcode, payload }, at + length)))
}

/// Encodes a whole, unmasked frame (a server's).
pub fn encode_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode.bits());
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn the_rfc_example_key_is_accepted_as_the_rfc_says() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn a_browser_upgrade_is_understood_and_answered() {
        let head = b"GET /websockify HTTP/1.1\r\nHost: localhost:6080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary, base64\r\n\r\n";
        assert_eq!(head_length(head), Some(head.len()));
        assert_eq!(head_length(&head[..head.len() - 1]), None);
        let upgrade = parse_upgrade(head).unwrap();
        assert_eq!(upgrade.path, "/websockify");
        assert!(upgrade.binary_protocol);
        let answer = accept_response(&upgrade);
        assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(answer.contains("Sec-WebSocket-Protocol: binary\r\n"));
        assert!(answer.ends_with("\r\n\r\n"));
    }

    #[test]
    fn requests_that_are_not_upgrades_are_refused_with_the_reason() {
        for (head, expected) in [
            ("POST / HTTP/1.1\r\n\r\n", "request line"),
            ("RFB 003.008\n\r\n\r\n", "request line"),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "Upgrade: websocket"),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
                "only 13",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "no Sec-WebSocket-Key",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "not 16 bytes",
            ),
            ("GET / HTTP/1.1\r\nno colon here\r\n\r\n", "no colon"),
        ] {
            let why = parse_upgrade(head.as_bytes()).unwrap_err();
            assert!(why.to_string().contains(expected), "{head:?}: {why}");
            assert!(refusal(&why).starts_with("HTTP/1.1 400 "));
        }
        assert!(parse_upgrade(b"\xff\xfe\r\n\r\n").is_err());
    }

    #[test]
    fn only_pages_of_this_machine_may_open_the_screen() {
        for local in [
            "http://localhost",
            "http://localhost:8000",
            "https://127.0.0.1:443",
            "http://[::1]:8080",
            "http://[::1]",
        ] {
            assert!(is_local_origin(local), "{local}");
        }
        for foreign in [
            "null",
            "https://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:80",
            "http://localhost:80@evil.example",
            "http://localhost:",
            "http://localhost:8000/x",
            "file://",
            "ws://localhost",
            "",
        ] {
            assert!(!is_local_origin(foreign), "{foreign}");
        }
        let with_origin = |origin: &str| {
            format!(
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
            )
        };
        let why = parse_upgrade(with_origin("https://evil.example").as_bytes()).unwrap_err();
        assert_eq!(why, WsError::ForeignOrigin("https://evil.example".into()));
        assert!(refusal(&why).starts_with("HTTP/1.1 403 "));
        assert!(parse_upgrade(with_origin("http://localhost:8000").as_bytes()).is_ok());
    }

    #[test]
    fn client_frames_are_unmasked_and_waited_for_until_whole() {
        let frame = masked(0x82, b"RFB 003.008\n");
        for cut in 0..frame.len() {
            assert_eq!(decode_client_frame(&frame[..cut]), Ok(None), "cut at {cut}");
        }
        let mut two = frame.clone();
        two.extend(masked(0x89, b"hi"));
        let (first, used) = decode_client_frame(&two).unwrap().unwrap();
        assert_eq!(
            (first.opcode, first.payload.as_slice(), used),
            (Opcode::Binary, &b"RFB 003.008\n"[..], frame.len())
        );
        let (ping, _) = decode_client_frame(&two[used..]).unwrap().unwrap();
        assert_eq!((ping.opcode, ping.payload), (Opcode::Ping, b"hi".to_vec()));
        let long = vec![7u8; 300];
        let (frame, _) = decode_client_frame(&masked(0x02, &long)).unwrap().unwrap();
        assert_eq!((frame.opcode, frame.payload), (Opcode::Binary, long));
    }

    #[test]
    fn frames_a_client_may_not_send_are_refused() {
        let unmasked = [0x82, 0x02, b'h', b'i'];
        assert!(
            decode_client_frame(&unmasked)
                .unwrap_err()
                .to_string()
                .contains("masked")
        );
        assert!(
            decode_client_frame(&masked(0x83, b"x"))
                .unwrap_err()
                .to_string()
                .contains("opcode")
        );
        assert!(
            decode_client_frame(&masked(0xc2, b"x"))
                .unwrap_err()
                .to_string()
                .contains("reserved")
        );
        assert!(
            decode_client_frame(&masked(0x09, b"x"))
                .unwrap_err()
                .to_string()
                .contains("control")
        );
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        assert!(decode_client_frame(&huge).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn server_frames_use_the_shortest_length() {
        assert_eq!(encode_frame(Opcode::Binary, b"ab"), vec![0x82, 2, b'a', b'b']);
        let mid = encode_frame(Opcode::Binary, &[0; 300]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 44]);
        let big = encode_frame(Opcode::Binary, &[0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
        assert_eq!(encode_frame(Opcode::Close, &[]), vec![0x88, 0]);
    }
}
