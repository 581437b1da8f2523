//! Errors of libvirt-wire.

use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::protocol::FrameError;
use crate::uri::UriError;
use crate::xdr::XdrError;

/// An error reported by libvirt (`virNetMessageError`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("libvirt error {code} (domain {domain}): {message}")]
pub struct LibvirtError {
    /// `virErrorNumber`, e.g. 42 = no such domain.
    pub code: i32,
    /// `virErrorDomain`: the part of libvirt that raised it.
    pub domain: i32,
    /// 1 warning, 2 error.
    pub level: i32,
    /// libvirt's message.
    pub message: String,
}

impl LibvirtError {
    /// `VIR_ERR_NO_DOMAIN`.
    pub const NO_DOMAIN: i32 = 42;
    /// `VIR_ERR_OPERATION_INVALID` (e.g. domain is not running).
    pub const OPERATION_INVALID: i32 = 55;
    /// `VIR_ERR_NO_SUPPORT`.
    pub const NO_SUPPORT: i32 = 3;
    /// `VIR_ERR_INVALID_ARG` (e.g. an unsupported flag).
    pub const INVALID_ARG: i32 = 8;

    /// The domain does not exist (any more).
    pub fn is_no_domain(&self) -> bool {
        self.code == Self::NO_DOMAIN
    }
}

/// Any failure of a libvirt-wire operation.
#[derive(Debug, Error)]
pub enum Error {
    /// The URI is not one libvirt-wire can use.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Could not reach the daemon.
    #[error(
        "cannot connect to libvirtd at {target}: {source} (is libvirtd running, and its socket mounted or its TCP port reachable?)"
    )]
    Connect {
        /// Socket path or host:port.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// The daemon wants an authentication method libvirt-wire lacks.
    #[error(
        "libvirtd requires authentication ({0}); virtkube supports only auth none: set auth_unix_rw/auth_tcp = \"none\" in libvirtd.conf for virtkube's socket"
    )]
    AuthUnsupported(String),
    /// libvirt refused the call.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The connection failed or was closed; pending calls fail with this.
    #[error("connection to libvirtd lost: {0}")]
    ConnectionLost(String),
    /// The daemon stopped answering keepalive pings.
    #[error("libvirtd did not answer for {0:?} (keepalive): considered dead")]
    KeepaliveTimeout(Duration),
    /// A reply or event whose payload does not decode.
    #[error("malformed reply to procedure {procedure}: {source}")]
    BadReply {
        /// The procedure.
        procedure: i32,
        /// The decoding problem.
        source: XdrError,
    },
    /// A packet that breaks the framing rules.
    #[error("malformed packet from libvirtd: {0}")]
    Frame(#[from] FrameError),
    /// A call took longer than allowed.
    #[error("libvirtd did not reply to procedure {procedure} within {timeout:?}")]
    Timeout {
        /// The procedure.
        procedure: i32,
        /// The limit.
        timeout: Duration,
    },
    /// A reply larger than the call accepts (it was read past, not kept).
    #[error(
        "libvirtd's reply to procedure {procedure} is {size} bytes, more than the {limit} bytes this call accepts: refused without reading it into memory"
    )]
    ReplyTooLarge {
        /// The procedure.
        procedure: i32,
        /// The payload's size.
        size: usize,
        /// The call's limit.
        limit: usize,
    },
    /// A stream packet larger than libvirt ever sends; the stream is ended.
    #[error("libvirtd sent a {size}-byte stream packet; libvirt's streams carry at most {limit} bytes per packet")]
    ChunkTooLarge {
        /// The packet's payload size.
        size: usize,
        /// libvirt's stream chunk size.
        limit: usize,
    },
    /// A request libvirt-wire refuses to send.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl Error {
    /// The libvirt error, if libvirt refused the call.
    pub fn libvirt(&self) -> Option<&LibvirtError> {
        match self {
            Error::Libvirt(e) => Some(e),
            _ => None,
        }
    }

    /// The connection is gone (lost, keepalive timeout, I/O).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost(_) | Error::KeepaliveTimeout(_))
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
