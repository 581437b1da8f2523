//! libvirt's RPC framing and the handful of messages virtkube uses, written
//! by hand from `src/rpc/virnetprotocol.x` and `src/remote/remote_protocol.x`
//! (read, not copied: those files are LGPL).
//!
//! A packet on the wire is a 4-byte big-endian length (counting itself), a
//! 24-byte header, and a payload that is XDR for calls, replies and events,
//! and raw bytes for stream data.

use std::fmt;

use crate::error::LibvirtError;
use crate::xdr::{Decoder, Encoder, UUID_LEN, XdrError};

/// Size of the length word.
pub const LEN_SIZE: usize = 4;
/// Size of the header.
pub const HEADER_SIZE: usize = 24;
/// Largest packet accepted in either direction. libvirt allows 32 MiB; none
/// of virtkube's calls needs more than 16 MiB, and the cap bounds what a
/// hostile peer can make us allocate.
pub const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Largest stream data payload libvirt sends in one packet.
pub const STREAM_CHUNK: usize = 262_120;

/// The remote program (`REMOTE_PROGRAM`).
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
/// Its version.
pub const REMOTE_VERSION: u32 = 1;
/// The keepalive program (`KEEPALIVE_PROGRAM`, "keep").
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
/// Its version.
pub const KEEPALIVE_VERSION: u32 = 1;
/// Keepalive PING.
pub const KEEPALIVE_PING: i32 = 1;
/// Keepalive PONG.
pub const KEEPALIVE_PONG: i32 = 2;

/// Remote procedure numbers used here.
pub mod procedure {
    /// CONNECT_OPEN.
    pub const CONNECT_OPEN: i32 = 1;
    /// CONNECT_CLOSE.
    pub const CONNECT_CLOSE: i32 = 2;
    /// CONNECT_GET_VERSION.
    pub const CONNECT_GET_VERSION: i32 = 4;
    /// CONNECT_GET_CAPABILITIES.
    pub const CONNECT_GET_CAPABILITIES: i32 = 7;
    /// DOMAIN_CREATE_XML.
    pub const DOMAIN_CREATE_XML: i32 = 10;
    /// DOMAIN_GET_XML_DESC.
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    /// DOMAIN_LOOKUP_BY_NAME.
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    /// DOMAIN_RESUME.
    pub const DOMAIN_RESUME: i32 = 28;
    /// `REMOTE_PROC_DOMAIN_REBOOT`.
    pub const DOMAIN_REBOOT: i32 = 27;
    /// `REMOTE_PROC_DOMAIN_SUSPEND`.
    pub const DOMAIN_SUSPEND: i32 = 34;
    /// `REMOTE_PROC_DOMAIN_SCREENSHOT`.
    pub const DOMAIN_SCREENSHOT: i32 = 211;
    /// `REMOTE_PROC_DOMAIN_RESET`.
    pub const DOMAIN_RESET: i32 = 245;
    /// `REMOTE_PROC_DOMAIN_OPEN_GRAPHICS_FD`.
    pub const DOMAIN_OPEN_GRAPHICS_FD: i32 = 343;
    /// DOMAIN_LOOKUP_BY_UUID.
    pub const DOMAIN_LOOKUP_BY_UUID: i32 = 24;
    /// CONNECT_SUPPORTS_FEATURE.
    pub const CONNECT_SUPPORTS_FEATURE: i32 = 60;
    /// AUTH_LIST.
    pub const AUTH_LIST: i32 = 66;
    /// CONNECT_GET_LIB_VERSION.
    pub const CONNECT_GET_LIB_VERSION: i32 = 157;
    /// DOMAIN_OPEN_CONSOLE.
    pub const DOMAIN_OPEN_CONSOLE: i32 = 201;
    /// DOMAIN_GET_STATE.
    pub const DOMAIN_GET_STATE: i32 = 212;
    /// DOMAIN_CREATE_WITH_FLAGS.
    pub const DOMAIN_CREATE_WITH_FLAGS: i32 = 196;
    /// DOMAIN_UNDEFINE_FLAGS.
    pub const DOMAIN_UNDEFINE_FLAGS: i32 = 231;
    /// DOMAIN_DESTROY_FLAGS.
    pub const DOMAIN_DESTROY_FLAGS: i32 = 234;
    /// DOMAIN_SHUTDOWN_FLAGS.
    pub const DOMAIN_SHUTDOWN_FLAGS: i32 = 258;
    /// DOMAIN_SET_METADATA.
    pub const DOMAIN_SET_METADATA: i32 = 264;
    /// DOMAIN_GET_METADATA.
    pub const DOMAIN_GET_METADATA: i32 = 265;
    /// CONNECT_LIST_ALL_DOMAINS.
    pub const CONNECT_LIST_ALL_DOMAINS: i32 = 273;
    /// DOMAIN_DEFINE_XML_FLAGS.
    pub const DOMAIN_DEFINE_XML_FLAGS: i32 = 350;
    /// DOMAIN_FD_ASSOCIATE (libvirt ≥ 9.0).
    pub const DOMAIN_FD_ASSOCIATE: i32 = 443;
    /// CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY.
    pub const CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: i32 = 316;
    /// CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY.
    pub const CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY: i32 = 317;
    /// DOMAIN_EVENT_CALLBACK_LIFECYCLE (server → client message).
    pub const DOMAIN_EVENT_CALLBACK_LIFECYCLE: i32 = 318;
    /// CONNECT_GET_DOMAIN_CAPABILITIES.
    pub const CONNECT_GET_DOMAIN_CAPABILITIES: i32 = 342;
}

/// `virNetMessageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Client → server call.
    Call,
    /// Server → client reply.
    Reply,
    /// Asynchronous message (events, keepalive).
    Message,
    /// Stream data.
    Stream,
    /// Call with passed file descriptors.
    CallWithFds,
    /// Reply with passed file descriptors.
    ReplyWithFds,
    /// Stream hole.
    StreamHole,
}

impl MessageType {
    fn from_u32(v: u32) -> Option<MessageType> {
        Some(match v {
            0 => MessageType::Call,
            1 => MessageType::Reply,
            2 => MessageType::Message,
            3 => MessageType::Stream,
            4 => MessageType::CallWithFds,
            5 => MessageType::ReplyWithFds,
            6 => MessageType::StreamHole,
            _ => return None,
        })
    }

    fn to_u32(self) -> u32 {
        match self {
            MessageType::Call => 0,
            MessageType::Reply => 1,
            MessageType::Message => 2,
            MessageType::Stream => 3,
            MessageType::CallWithFds => 4,
            MessageType::ReplyWithFds => 5,
            MessageType::StreamHole => 6,
        }
    }
}

/// `virNetMessageStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success / end of stream.
    Ok,
    /// An error; a `virNetMessageError` follows (except for client stream aborts).
    Error,
    /// More stream data follows.
    Continue,
}

impl Status {
    fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Error,
            2 => Status::Continue,
            _ => return None,
        })
    }

    fn to_u32(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::Error => 1,
            Status::Continue => 2,
        }
    }
}

/// `virNetMessageHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Program.
    pub program: u32,
    /// Program version.
    pub version: u32,
    /// Procedure.
    pub procedure: i32,
    /// Message type.
    pub kind: MessageType,
    /// Serial number tying replies and stream packets to their call.
    pub serial: u32,
    /// Status.
    pub status: Status,
}

impl Header {
    /// A keepalive message (PING or PONG).
    pub fn keepalive(procedure: i32) -> Header {
        Header {
            program: KEEPALIVE_PROGRAM,
            version: KEEPALIVE_VERSION,
            procedure,
            kind: MessageType::Message,
            serial: 0,
            status: Status::Ok,
        }
    }

    /// A header of the remote program.
    pub fn remote(procedure: i32, kind: MessageType, serial: u32, status: Status) -> Header {
        Header {
            program: REMOTE_PROGRAM,
            version: REMOTE_VERSION,
            procedure,
            kind,
            serial,
            status,
        }
    }
}

/// Why bytes are not a libvirt packet.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length word is smaller than a header.
    #[error("packet length {0} is shorter than the {min}-byte header", min = LEN_SIZE + HEADER_SIZE)]
    TooShort(usize),
    /// The length word exceeds [`MAX_PACKET`].
    #[error("packet length {0} exceeds the {MAX_PACKET}-byte limit")]
    TooLong(usize),
    /// A header field out of range.
    #[error("packet header has invalid {field} {value}")]
    BadHeader {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u32,
    },
    /// The header itself is truncated.
    #[error("packet header: {0}")]
    Xdr(#[from] XdrError),
}

/// Checks a length word read from the wire, before anything is allocated.
pub fn check_length(len: u32) -> Result<usize, FrameError> {
    let len = len as usize;
    if len < LEN_SIZE + HEADER_SIZE {
        Err(FrameError::TooShort(len))
    } else if len > MAX_PACKET {
        Err(FrameError::TooLong(len))
    } else {
        Ok(len)
    }
}

/// Encodes a whole packet, length word included.
pub fn encode_packet(header: &Header, payload: &[u8]) -> Vec<u8> {
    let total = LEN_SIZE + HEADER_SIZE + payload.len();
    let mut e = Encoder::new();
    e.u32(u32::try_from(total).unwrap_or(u32::MAX))
        .u32(header.program)
        .u32(header.version)
        .i32(header.procedure)
        .u32(header.kind.to_u32())
        .u32(header.serial)
        .u32(header.status.to_u32());
    let mut bytes = e.into_bytes();
    bytes.extend_from_slice(payload);
    bytes
}

/// Decodes the header at the start of a packet body (the bytes after the
/// length word) and returns it with the payload.
pub fn decode_packet(body: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    let mut d = Decoder::new(body);
    let program = d.u32("header.prog")?;
    let version = d.u32("header.vers")?;
    let procedure = d.i32("header.proc")?;
    let kind_raw = d.u32("header.type")?;
    let serial = d.u32("header.serial")?;
    let status_raw = d.u32("header.status")?;
    let kind = MessageType::from_u32(kind_raw).ok_or(FrameError::BadHeader {
        field: "type",
        value: kind_raw,
    })?;
    let status = Status::from_u32(status_raw).ok_or(FrameError::BadHeader {
        field: "status",
        value: status_raw,
    })?;
    let header = Header {
        program,
        version,
        procedure,
        kind,
        serial,
        status,
    };
    Ok((header, &body[HEADER_SIZE..]))
}

/// A domain as the protocol names it (`remote_nonnull_domain`).
#[derive(Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// Name.
    pub name: String,
    /// UUID bytes.
    pub uuid: [u8; UUID_LEN],
    /// Hypervisor id (-1 when not running).
    pub id: i32,
}

impl DomainRef {
    /// Encodes it.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed_opaque(&self.uuid).i32(self.id);
    }

    /// Decodes it.
    pub fn decode(d: &mut Decoder<'_>) -> Result<DomainRef, XdrError> {
        Ok(DomainRef {
            name: d.string("domain.name")?,
            uuid: d.fixed_opaque::<UUID_LEN>("domain.uuid")?,
            id: d.i32("domain.id")?,
        })
    }

    /// The UUID in its usual text form.
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }
}

impl fmt::Debug for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Domain({:?}, {}, id {})", self.name, self.uuid_string(), self.id)
    }
}

/// `8-4-4-4-12` hex form of a UUID.
pub fn format_uuid(uuid: &[u8; UUID_LEN]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A UUID in its canonical form (lowercase, dashed), from dashed or bare
/// 32-digit text; `None` when it is not a UUID.
pub fn canonical_uuid(text: &str) -> Option<String> {
    parse_uuid(text).map(|bytes| format_uuid(&bytes))
}

/// Parses a UUID in `8-4-4-4-12` hex form (or 32 hex digits).
pub fn parse_uuid(text: &str) -> Option<[u8; UUID_LEN]> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || text.len() != 32 && text.len() != 36 {
        return None;
    }
    let mut out = [0u8; UUID_LEN];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Decodes a `virNetMessageError` payload.
pub fn decode_error(payload: &[u8]) -> Result<LibvirtError, XdrError> {
    let mut d = Decoder::new(payload);
    let code = d.i32("error.code")?;
    let domain = d.i32("error.domain")?;
    let message = d.opt_string("error.message")?;
    let level = d.i32("error.level")?;
    if d.bool("error.dom")? {
        DomainRef::decode(&mut d)?;
    }
    for what in ["error.str1", "error.str2", "error.str3"] {
        d.opt_string(what)?;
    }
    d.i32("error.int1")?;
    d.i32("error.int2")?;
    if d.bool("error.net")? {
        d.string("error.net.name")?;
        d.fixed_opaque::<UUID_LEN>("error.net.uuid")?;
    }
    d.finish()?;
    Ok(LibvirtError {
        code,
        domain,
        level,
        message: message.unwrap_or_else(|| format!("libvirt error code {code} without a message")),
    })
}

/// Encodes a `virNetMessageError` (used by tests' fake daemons).
pub fn encode_error(err: &LibvirtError) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(err.code)
        .i32(err.domain)
        .opt_string(Some(&err.message))
        .i32(err.level)
        .bool(false)
        .opt_string(None)
        .opt_string(None)
        .opt_string(None)
        .i32(0)
        .i32(0)
        .bool(false);
    e.into_bytes()
}

/// A lifecycle event (`remote_domain_event_callback_lifecycle_msg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleMessage {
    /// The callback registration it belongs to.
    pub callback_id: i32,
    /// The domain.
    pub domain: DomainRef,
    /// `virDomainEventType`.
    pub event: i32,
    /// Event-specific detail.
    pub detail: i32,
}

impl LifecycleMessage {
    /// Decodes one.
    pub fn decode(payload: &[u8]) -> Result<LifecycleMessage, XdrError> {
        let mut d = Decoder::new(payload);
        let callback_id = d.i32("lifecycle.callbackID")?;
        let domain = DomainRef::decode(&mut d)?;
        let event = d.i32("lifecycle.event")?;
        let detail = d.i32("lifecycle.detail")?;
        d.finish()?;
        Ok(LifecycleMessage {
            callback_id,
            domain,
            event,
            detail,
        })
    }

    /// Encodes one (used by tests' fake daemons).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.i32(self.callback_id);
        self.domain.encode(&mut e);
        e.i32(self.event).i32(self.detail);
        e.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_round_trip() {
        let header = Header::remote(procedure::DOMAIN_GET_STATE, MessageType::Call, 7, Status::Ok);
        let bytes = encode_packet(&header, &[1, 2, 3, 4]);
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            check_length(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
            Ok(32)
        );
        let (back, payload) = decode_packet(&bytes[4..]).unwrap();
        assert_eq!(back, header);
        assert_eq!(payload, [1, 2, 3, 4]);
    }

    #[test]
    fn bad_lengths_and_headers() {
        assert_eq!(check_length(27), Err(FrameError::TooShort(27)));
        assert_eq!(check_length(u32::MAX), Err(FrameError::TooLong(u32::MAX as usize)));
        let mut body = encode_packet(&Header::remote(1, MessageType::Call, 1, Status::Ok), &[])[4..].to_vec();
        body[15] = 9; // type
        assert_eq!(
            decode_packet(&body),
            Err(FrameError::BadHeader {
                field: "type",
                value: 9
            })
        );
        assert!(matches!(decode_packet(&body[..10]), Err(FrameError::Xdr(_))));
    }

    #[test]
    fn error_round_trip() {
        let err = LibvirtError {
            code: 42,
            domain: 10,
            level: 2,
            message: "Domain not found".into(),
        };
        assert_eq!(decode_error(&encode_error(&err)).unwrap(), err);
        assert!(decode_error(&[0, 0, 0, 1]).is_err());
    }

    #[test]
    fn uuid_text() {
        let text = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b";
        let uuid = parse_uuid(text).unwrap();
        assert_eq!(format_uuid(&uuid), text);
        assert_eq!(parse_uuid("6f1c2b3a4d5e4f608a7b9c0d1e2f3a4b"), Some(uuid));
        assert_eq!(parse_uuid("nope"), None);
        assert_eq!(parse_uuid("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4g"), None);
    }
}
