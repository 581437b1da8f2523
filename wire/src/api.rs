//! The typed procedures virtkube uses, over a [`Connection`].

use std::os::fd::OwnedFd;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::client::{Connection, LARGE_REPLY, Options, RawLifecycle, StreamEvent};
use crate::error::{Error, Result};
use crate::protocol::{DomainRef, STREAM_CHUNK, Status, procedure};
use crate::queue::{self, Popped};
use crate::uri::{self, Target, Transport};
use crate::xdr::{Decoder, Encoder, XdrError};

/// `virDomainCreateFlags` and friends.
pub mod flags {
    /// `VIR_DOMAIN_START_AUTODESTROY`: the domain dies with this connection.
    pub const START_AUTODESTROY: u32 = 1 << 1;
    /// `VIR_DOMAIN_START_PAUSED`: create the domain with its CPUs stopped.
    pub const START_PAUSED: u32 = 1 << 0;
    /// `VIR_DOMAIN_START_VALIDATE`: validate the XML against the schema.
    pub const START_VALIDATE: u32 = 1 << 4;
    /// `VIR_DOMAIN_AFFECT_LIVE`: change the running domain, not its config.
    pub const AFFECT_LIVE: u32 = 1 << 0;
    /// `VIR_CONNECT_LIST_DOMAINS_ACTIVE`.
    pub const LIST_DOMAINS_ACTIVE: u32 = 1 << 0;
    /// `VIR_CONNECT_LIST_DOMAINS_INACTIVE`: defined domains that do not run.
    pub const LIST_DOMAINS_INACTIVE: u32 = 1 << 1;
    /// `VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN`.
    pub const SHUTDOWN_ACPI_POWER_BTN: u32 = 1 << 0;
    /// `VIR_DOMAIN_DESTROY_GRACEFUL`: SIGTERM only, no SIGKILL.
    pub const DESTROY_GRACEFUL: u32 = 1 << 0;
    /// `VIR_DOMAIN_CONSOLE_FORCE`: take the console from another client.
    pub const CONSOLE_FORCE: u32 = 1 << 0;
    /// `VIR_DOMAIN_CONSOLE_SAFE`: refuse if the driver cannot guard it.
    pub const CONSOLE_SAFE: u32 = 1 << 1;
    /// `VIR_DOMAIN_DEFINE_VALIDATE`: validate the XML against the schema.
    pub const DEFINE_VALIDATE: u32 = 1 << 0;
    /// `VIR_DOMAIN_FD_ASSOCIATE_SECLABEL_WRITABLE`: label the files for writing.
    pub const FD_ASSOCIATE_SECLABEL_WRITABLE: u32 = 1 << 1;
    /// `VIR_DOMAIN_REBOOT_ACPI_POWER_BTN`.
    pub const REBOOT_ACPI_POWER_BTN: u32 = 1 << 0;
    /// `VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH`: the client skips the display's
    /// own authentication (the descriptor is the authorisation).
    pub const OPEN_GRAPHICS_SKIPAUTH: u32 = 1 << 0;
}

/// `VIR_DRV_FEATURE_PROGRAM_KEEPALIVE`.
const FEATURE_PROGRAM_KEEPALIVE: i32 = 10;
/// `VIR_DRV_FEATURE_REMOTE_EVENT_CALLBACK`.
const FEATURE_REMOTE_EVENT_CALLBACK: i32 = 14;
/// `VIR_DOMAIN_METADATA_ELEMENT`.
const METADATA_ELEMENT: i32 = 2;
/// `VIR_ERR_NO_DOMAIN_METADATA`.
const ERR_NO_DOMAIN_METADATA: i32 = 80;
/// `REMOTE_DOMAIN_LIST_MAX`.
const DOMAIN_LIST_MAX: usize = 16384;
/// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
const EVENT_ID_LIFECYCLE: i32 = 0;
const AUTH_NONE: i32 = 0;

/// `virDomainState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// No state.
    NoState,
    /// Running.
    Running,
    /// Blocked on a resource.
    Blocked,
    /// Paused.
    Paused,
    /// Being shut down.
    ShuttingDown,
    /// Shut off.
    Shutoff,
    /// Crashed.
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// A value newer than this library.
    Unknown(i32),
}

impl DomainState {
    /// From libvirt's number.
    pub fn from_raw(v: i32) -> DomainState {
        match v {
            0 => DomainState::NoState,
            1 => DomainState::Running,
            2 => DomainState::Blocked,
            3 => DomainState::Paused,
            4 => DomainState::ShuttingDown,
            5 => DomainState::Shutoff,
            6 => DomainState::Crashed,
            7 => DomainState::PmSuspended,
            other => DomainState::Unknown(other),
        }
    }
}

/// `virDomainEventType` with its detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// Defined (detail: added, updated…).
    Defined(i32),
    /// Undefined.
    Undefined(i32),
    /// Started (detail 0 booted).
    Started(i32),
    /// Paused.
    Suspended(i32),
    /// Resumed.
    Resumed(i32),
    /// Stopped, with why.
    Stopped(StoppedReason),
    /// Guest shutdown in progress or finished (detail).
    Shutdown(i32),
    /// Power-management suspend.
    PmSuspended(i32),
    /// Guest crashed (detail 0 panicked).
    Crashed(i32),
    /// A newer event type: (event, detail).
    Unknown(i32, i32),
    /// This many events were dropped because the listener fell behind (the
    /// connection never waits for a listener): re-read the domain's state.
    Missed(u64),
}

/// `virDomainEventStoppedDetailType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedReason {
    /// The guest shut down (powered off).
    Shutdown,
    /// Destroyed (by someone calling destroy).
    Destroyed,
    /// The guest crashed.
    Crashed,
    /// Migrated away.
    Migrated,
    /// Saved to a file.
    Saved,
    /// The hypervisor failed (e.g. QEMU died).
    Failed,
    /// Restored from a snapshot.
    FromSnapshot,
    /// Newer detail.
    Other(i32),
}

impl LifecycleEvent {
    /// From libvirt's event and detail numbers.
    pub fn from_raw(event: i32, detail: i32) -> LifecycleEvent {
        match event {
            0 => LifecycleEvent::Defined(detail),
            1 => LifecycleEvent::Undefined(detail),
            2 => LifecycleEvent::Started(detail),
            3 => LifecycleEvent::Suspended(detail),
            4 => LifecycleEvent::Resumed(detail),
            5 => LifecycleEvent::Stopped(match detail {
                0 => StoppedReason::Shutdown,
                1 => StoppedReason::Destroyed,
                2 => StoppedReason::Crashed,
                3 => StoppedReason::Migrated,
                4 => StoppedReason::Saved,
                5 => StoppedReason::Failed,
                6 => StoppedReason::FromSnapshot,
                other => StoppedReason::Other(other),
            }),
            6 => LifecycleEvent::Shutdown(detail),
            7 => LifecycleEvent::PmSuspended(detail),
            8 => LifecycleEvent::Crashed(detail),
            other => LifecycleEvent::Unknown(other, detail),
        }
    }
}

/// libvirt's limit on one string argument (`VIR_NET_MESSAGE_STRING_MAX`).
pub const STRING_MAX: usize = 4 * 1024 * 1024;

/// Refuses, before anything is sent, a string libvirtd would refuse anyway.
fn check_string(what: &str, s: &str) -> Result<()> {
    if s.len() > STRING_MAX {
        return Err(Error::InvalidRequest(format!(
            "{what} is {} bytes; libvirt accepts at most {STRING_MAX} bytes in one string",
            s.len()
        )));
    }
    Ok(())
}

/// A client of libvirtd: the handshake and the typed procedures.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Connection,
}

fn decode<T>(procedure: i32, payload: &[u8], f: impl FnOnce(&mut Decoder<'_>) -> Result<T, XdrError>) -> Result<T> {
    let mut d = Decoder::new(payload);
    let value = f(&mut d).map_err(|source| Error::BadReply { procedure, source })?;
    d.finish().map_err(|source| Error::BadReply { procedure, source })?;
    Ok(value)
}

impl Client {
    /// Connects to the daemon a URI names and opens the connection.
    pub async fn connect(uri: &str, options: Options) -> Result<Client> {
        let target = uri::parse(uri)?;
        match &target.transport {
            Transport::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(|source| Error::Connect {
                    target: target.describe(),
                    source,
                })?;
                Client::open_unix(stream, &target, options).await
            }
            Transport::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|source| Error::Connect {
                        target: target.describe(),
                        source,
                    })?;
                stream.set_nodelay(true).map_err(|source| Error::Connect {
                    target: target.describe(),
                    source,
                })?;
                Client::open(stream, &target, options).await
            }
        }
    }

    /// The handshake over an established stream: AUTH_LIST (only `none` is
    /// accepted), CONNECT_OPEN with the URI's name, then feature probing:
    /// keepalive is started when the daemon supports it.
    pub async fn open<S>(stream: S, target: &Target, options: Options) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Client::handshake(Connection::start(stream, options), target).await
    }

    /// [`Client::open`] over a unix socket, which can also pass file
    /// descriptors ([`Client::fd_associate`]).
    pub async fn open_unix(stream: UnixStream, target: &Target, options: Options) -> Result<Client> {
        Client::handshake(Connection::start_unix(stream, options), target).await
    }

    async fn handshake(conn: Connection, target: &Target) -> Result<Client> {
        let client = Client { conn };
        let auth = client.conn.call(procedure::AUTH_LIST, &[]).await?;
        let types = decode(procedure::AUTH_LIST, &auth, |d| {
            let n = d.array_len("auth types", 20, 4)?;
            (0..n).map(|_| d.i32("auth type")).collect::<Result<Vec<i32>, _>>()
        })?;
        if !types.is_empty() && !types.contains(&AUTH_NONE) {
            let names: Vec<&str> = types
                .iter()
                .map(|t| match t {
                    1 => "sasl",
                    2 => "polkit",
                    _ => "unknown",
                })
                .collect();
            return Err(Error::AuthUnsupported(names.join(", ")));
        }
        let mut args = Encoder::new();
        args.opt_string(Some(&target.name)).u32(0);
        client.conn.call(procedure::CONNECT_OPEN, &args.into_bytes()).await?;
        if client.supports_feature(FEATURE_PROGRAM_KEEPALIVE).await? {
            client.conn.start_keepalive();
        }
        Ok(client)
    }

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Waits until the connection ends and says why.
    pub async fn closed(&self) -> Error {
        self.conn.closed().await
    }

    /// CONNECT_CLOSE, then the connection ends.
    pub async fn close(self) -> Result<()> {
        let result = self.conn.call(procedure::CONNECT_CLOSE, &[]).await;
        result.map(|_| ())
    }

    /// CONNECT_SUPPORTS_FEATURE.
    pub async fn supports_feature(&self, feature: i32) -> Result<bool> {
        let mut args = Encoder::new();
        args.i32(feature);
        let reply = self
            .conn
            .call(procedure::CONNECT_SUPPORTS_FEATURE, &args.into_bytes())
            .await?;
        decode(procedure::CONNECT_SUPPORTS_FEATURE, &reply, |d| d.i32("supported")).map(|v| v != 0)
    }

    /// CONNECT_GET_LIB_VERSION: libvirt's version as major × 1 000 000 + minor × 1000 + micro.
    pub async fn lib_version(&self) -> Result<u64> {
        let reply = self.conn.call(procedure::CONNECT_GET_LIB_VERSION, &[]).await?;
        decode(procedure::CONNECT_GET_LIB_VERSION, &reply, |d| d.u64("lib_ver"))
    }

    /// CONNECT_GET_CAPABILITIES: the host capabilities XML.
    pub async fn capabilities(&self) -> Result<String> {
        let reply = self
            .conn
            .call_large(procedure::CONNECT_GET_CAPABILITIES, &[], LARGE_REPLY)
            .await?;
        decode(procedure::CONNECT_GET_CAPABILITIES, &reply, |d| {
            d.string("capabilities")
        })
    }

    /// CONNECT_GET_DOMAIN_CAPABILITIES for an emulator/arch/machine/virt type
    /// (each optional: libvirt picks defaults).
    pub async fn domain_capabilities(
        &self,
        emulator: Option<&str>,
        arch: Option<&str>,
        machine: Option<&str>,
        virt_type: Option<&str>,
    ) -> Result<String> {
        let mut args = Encoder::new();
        args.opt_string(emulator)
            .opt_string(arch)
            .opt_string(machine)
            .opt_string(virt_type)
            .u32(0);
        let reply = self
            .conn
            .call_large(
                procedure::CONNECT_GET_DOMAIN_CAPABILITIES,
                &args.into_bytes(),
                LARGE_REPLY,
            )
            .await?;
        decode(procedure::CONNECT_GET_DOMAIN_CAPABILITIES, &reply, |d| {
            d.string("capabilities")
        })
    }

    /// DOMAIN_CREATE_XML: creates and starts a transient domain.
    pub async fn create_xml(&self, xml: &str, flags: u32) -> Result<DomainRef> {
        check_string("the domain XML", xml)?;
        let mut args = Encoder::new();
        args.string(xml).u32(flags);
        let reply = self.conn.call(procedure::DOMAIN_CREATE_XML, &args.into_bytes()).await?;
        decode(procedure::DOMAIN_CREATE_XML, &reply, DomainRef::decode)
    }

    /// DOMAIN_DEFINE_XML_FLAGS: defines a persistent (inactive) domain.
    pub async fn define_xml(&self, xml: &str, flags: u32) -> Result<DomainRef> {
        check_string("the domain XML", xml)?;
        let mut args = Encoder::new();
        args.string(xml).u32(flags);
        let reply = self
            .conn
            .call(procedure::DOMAIN_DEFINE_XML_FLAGS, &args.into_bytes())
            .await?;
        decode(procedure::DOMAIN_DEFINE_XML_FLAGS, &reply, DomainRef::decode)
    }

    /// DOMAIN_FD_ASSOCIATE: hands libvirtd `fds` (duplicates; the caller's
    /// stay open) as the descriptor group `name` of a defined domain, for
    /// its disks whose `<source fdgroup=…>` names it. Needs a unix socket.
    pub async fn fd_associate(
        &self,
        domain: &DomainRef,
        name: &str,
        fds: &[std::os::fd::BorrowedFd<'_>],
        flags: u32,
    ) -> Result<()> {
        check_string("the descriptor group name", name)?;
        if fds.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "descriptor group {name:?} has no file descriptors"
            )));
        }
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.string(name).u32(flags);
        self.conn
            .call_with_fds(procedure::DOMAIN_FD_ASSOCIATE, &args.into_bytes(), fds)
            .await
            .map(drop)
    }

    /// DOMAIN_CREATE_WITH_FLAGS: starts a defined domain.
    pub async fn create_defined(&self, domain: &DomainRef, flags: u32) -> Result<DomainRef> {
        let reply = self
            .domain_call(procedure::DOMAIN_CREATE_WITH_FLAGS, domain, flags)
            .await?;
        decode(procedure::DOMAIN_CREATE_WITH_FLAGS, &reply, DomainRef::decode)
    }

    /// DOMAIN_UNDEFINE_FLAGS: forgets a domain's persistent definition (a
    /// running domain goes on as a transient one).
    pub async fn undefine(&self, domain: &DomainRef, flags: u32) -> Result<()> {
        self.domain_call(procedure::DOMAIN_UNDEFINE_FLAGS, domain, flags)
            .await
            .map(drop)
    }

    /// DOMAIN_LOOKUP_BY_UUID.
    pub async fn lookup_by_uuid(&self, uuid: &[u8; 16]) -> Result<DomainRef> {
        let mut args = Encoder::new();
        args.fixed_opaque(uuid);
        let reply = self
            .conn
            .call(procedure::DOMAIN_LOOKUP_BY_UUID, &args.into_bytes())
            .await?;
        decode(procedure::DOMAIN_LOOKUP_BY_UUID, &reply, DomainRef::decode)
    }

    /// DOMAIN_LOOKUP_BY_NAME.
    pub async fn lookup_by_name(&self, name: &str) -> Result<DomainRef> {
        check_string("the domain name", name)?;
        let mut args = Encoder::new();
        args.string(name);
        let reply = self
            .conn
            .call(procedure::DOMAIN_LOOKUP_BY_NAME, &args.into_bytes())
            .await?;
        decode(procedure::DOMAIN_LOOKUP_BY_NAME, &reply, DomainRef::decode)
    }

    /// DOMAIN_GET_STATE: state and reason.
    pub async fn get_state(&self, domain: &DomainRef) -> Result<(DomainState, i32)> {
        let reply = self.domain_call(procedure::DOMAIN_GET_STATE, domain, 0).await?;
        decode(procedure::DOMAIN_GET_STATE, &reply, |d| {
            Ok((DomainState::from_raw(d.i32("state")?), d.i32("reason")?))
        })
    }

    /// DOMAIN_GET_XML_DESC.
    pub async fn xml_desc(&self, domain: &DomainRef, flags: u32) -> Result<String> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.u32(flags);
        let reply = self
            .conn
            .call_large(procedure::DOMAIN_GET_XML_DESC, &args.into_bytes(), LARGE_REPLY)
            .await?;
        decode(procedure::DOMAIN_GET_XML_DESC, &reply, |d| d.string("xml"))
    }

    /// DOMAIN_SHUTDOWN_FLAGS: asks the guest to shut down.
    pub async fn shutdown(&self, domain: &DomainRef, flags: u32) -> Result<()> {
        self.domain_call(procedure::DOMAIN_SHUTDOWN_FLAGS, domain, flags)
            .await
            .map(drop)
    }

    /// DOMAIN_DESTROY_FLAGS: stops the domain at once.
    pub async fn destroy(&self, domain: &DomainRef, flags: u32) -> Result<()> {
        self.domain_call(procedure::DOMAIN_DESTROY_FLAGS, domain, flags)
            .await
            .map(drop)
    }

    /// DOMAIN_RESUME: lets a paused domain's CPUs run.
    pub async fn resume(&self, domain: &DomainRef) -> Result<()> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        self.conn
            .call(procedure::DOMAIN_RESUME, &args.into_bytes())
            .await
            .map(drop)
    }

    /// DOMAIN_SUSPEND: stops the domain's CPUs (it stays in memory).
    pub async fn suspend(&self, domain: &DomainRef) -> Result<()> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        self.conn
            .call(procedure::DOMAIN_SUSPEND, &args.into_bytes())
            .await
            .map(drop)
    }

    /// DOMAIN_REBOOT: asks the guest to reboot (e.g. [`flags::REBOOT_ACPI_POWER_BTN`]).
    pub async fn reboot(&self, domain: &DomainRef, flags: u32) -> Result<()> {
        self.domain_call(procedure::DOMAIN_REBOOT, domain, flags)
            .await
            .map(drop)
    }

    /// DOMAIN_RESET: resets the machine at once, as its reset button would.
    pub async fn reset(&self, domain: &DomainRef, flags: u32) -> Result<()> {
        self.domain_call(procedure::DOMAIN_RESET, domain, flags).await.map(drop)
    }

    /// DOMAIN_SCREENSHOT: the display `screen` as an image (its MIME type
    /// and bytes: PNG from QEMU 7, PPM before). The download ends with an
    /// empty data packet; the client then finishes the stream and the
    /// daemon confirms. An image larger than `limit` bytes
    /// fails with [`Error::ReplyTooLarge`]; none of it is kept.
    pub async fn screenshot(&self, domain: &DomainRef, screen: u32, limit: usize) -> Result<Screenshot> {
        let proc_ = procedure::DOMAIN_SCREENSHOT;
        let serial = self.conn.next_serial();
        // Every byte counts: the budget holds the whole image, so a reader
        // that is slow for a moment loses nothing.
        let mut rx = self
            .conn
            .register_stream_with_budget(serial, limit.saturating_add(64 * 1024))?;
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.u32(screen).u32(0);
        let reply = match self
            .conn
            .call_with_serial(proc_, serial, &args.into_bytes(), self.conn.max_reply())
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                self.conn.unregister_stream(serial);
                return Err(e);
            }
        };
        let mime = decode(proc_, &reply, |d| d.opt_string("mime"))?.unwrap_or_default();
        let mut data = Vec::new();
        loop {
            match rx.pop().await {
                // The end of the data (an empty CONTINUE): the client
                // finishes its side and the daemon confirms with an OK.
                Popped::Item(StreamEvent::Data(chunk)) if chunk.is_empty() => {
                    self.conn.send_stream(proc_, serial, Status::Ok, &[]).await?;
                }
                Popped::Item(StreamEvent::Data(chunk)) => {
                    if data.len() + chunk.len() > limit {
                        let _ = self.conn.send_stream(proc_, serial, Status::Error, &[]).await;
                        self.conn.unregister_stream(serial);
                        return Err(Error::ReplyTooLarge {
                            procedure: proc_,
                            size: data.len() + chunk.len(),
                            limit,
                        });
                    }
                    data.extend_from_slice(&chunk);
                }
                Popped::Item(StreamEvent::Finished) => break,
                Popped::Item(StreamEvent::Failed(e)) => return Err(e),
                Popped::Lost(n) => {
                    let _ = self.conn.send_stream(proc_, serial, Status::Error, &[]).await;
                    self.conn.unregister_stream(serial);
                    return Err(Error::InvalidRequest(format!(
                        "{n} bytes of the screenshot were lost on the way; take it again"
                    )));
                }
                Popped::Closed => return Err(Error::ConnectionLost("screenshot stream dropped".into())),
            }
        }
        Ok(Screenshot { mime, data })
    }

    /// DOMAIN_OPEN_GRAPHICS_FD: a socket connected to the domain's display
    /// `index` (its VNC server), opened by libvirtd and passed back, so that
    /// nothing needs to listen on the node. Only over a unix socket.
    pub async fn open_graphics_fd(&self, domain: &DomainRef, index: u32, flags: u32) -> Result<OwnedFd> {
        let proc_ = procedure::DOMAIN_OPEN_GRAPHICS_FD;
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.u32(index).u32(flags);
        let (reply, fds) = self.conn.call_receiving_fds(proc_, &args.into_bytes()).await?;
        decode(proc_, &reply, |_| Ok(()))?;
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(fd), None) => Ok(fd),
            (None, _) => Err(Error::InvalidRequest(
                "libvirtd opened the display but passed no descriptor back".into(),
            )),
            (Some(_), Some(_)) => Err(Error::InvalidRequest(
                "libvirtd passed more than one descriptor for one display".into(),
            )),
        }
    }

    /// CONNECT_LIST_ALL_DOMAINS with `flags` (e.g. [`flags::LIST_DOMAINS_ACTIVE`]).
    pub async fn list_all_domains(&self, flags: u32) -> Result<Vec<DomainRef>> {
        let mut args = Encoder::new();
        args.i32(1).u32(flags);
        let proc_ = procedure::CONNECT_LIST_ALL_DOMAINS;
        let reply = self.conn.call_large(proc_, &args.into_bytes(), LARGE_REPLY).await?;
        decode(proc_, &reply, |d| {
            // A domain is at least a name length, a UUID and an ID.
            let count = d.array_len("domains", DOMAIN_LIST_MAX, 4 + 16 + 4)?;
            let domains = (0..count)
                .map(|_| DomainRef::decode(d))
                .collect::<Result<Vec<_>, _>>()?;
            d.u32("ret")?;
            Ok(domains)
        })
    }

    /// DOMAIN_SET_METADATA of the running domain: the element `xml` under
    /// namespace `uri` with prefix `key`; `None` removes it.
    pub async fn set_metadata(&self, domain: &DomainRef, xml: Option<&str>, key: &str, uri: &str) -> Result<()> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.i32(METADATA_ELEMENT)
            .opt_string(xml)
            .opt_string(Some(key))
            .opt_string(Some(uri))
            .u32(flags::AFFECT_LIVE);
        self.conn
            .call(procedure::DOMAIN_SET_METADATA, &args.into_bytes())
            .await
            .map(drop)
    }

    /// DOMAIN_GET_METADATA of the running domain: the element under
    /// namespace `uri`, or `None` when it has none.
    pub async fn metadata(&self, domain: &DomainRef, uri: &str) -> Result<Option<String>> {
        self.metadata_of(domain, uri, flags::AFFECT_LIVE).await
    }

    /// As [`Client::metadata`], of the running domain (`AFFECT_LIVE`) or of
    /// whatever it is now (0: the definition of an inactive domain).
    pub async fn metadata_of(&self, domain: &DomainRef, uri: &str, affect: u32) -> Result<Option<String>> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.i32(METADATA_ELEMENT).opt_string(Some(uri)).u32(affect);
        match self.conn.call(procedure::DOMAIN_GET_METADATA, &args.into_bytes()).await {
            Ok(reply) => decode(procedure::DOMAIN_GET_METADATA, &reply, |d| d.string("metadata")).map(Some),
            Err(Error::Libvirt(e)) if e.code == ERR_NO_DOMAIN_METADATA => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn domain_call(&self, proc_: i32, domain: &DomainRef, flags: u32) -> Result<Vec<u8>> {
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.u32(flags);
        self.conn.call(proc_, &args.into_bytes()).await
    }

    /// Subscribes to lifecycle events of one domain
    /// (CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY). Events of other domains
    /// never reach this listener.
    pub async fn lifecycle_events(&self, domain: &DomainRef) -> Result<LifecycleEvents> {
        if !self.supports_feature(FEATURE_REMOTE_EVENT_CALLBACK).await? {
            return Err(Error::InvalidRequest(
                "this libvirtd does not support per-callback events (libvirt ≥ 1.3.3 needed)".into(),
            ));
        }
        let mut args = Encoder::new();
        args.i32(EVENT_ID_LIFECYCLE).bool(true);
        domain.encode(&mut args);
        let proc_ = procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY;
        let serial = self.conn.next_serial();
        let rx = self.conn.register_lifecycle_for_call(serial, Some(domain.uuid))?;
        let reply = self
            .conn
            .call_with_serial(proc_, serial, &args.into_bytes(), self.conn.max_reply())
            .await?;
        let callback_id = decode(proc_, &reply, |d| d.i32("callbackID"))?;
        Ok(LifecycleEvents {
            client: self.clone(),
            callback_id,
            rx,
        })
    }

    /// Opens a domain's console as a stream (DOMAIN_OPEN_CONSOLE). `device`
    /// names a console alias; `None` is the first console.
    pub async fn open_console(&self, domain: &DomainRef, device: Option<&str>, flags: u32) -> Result<Console> {
        let serial = self.conn.next_serial();
        let rx = self.conn.register_stream(serial)?;
        let mut args = Encoder::new();
        domain.encode(&mut args);
        args.opt_string(device).u32(flags);
        if let Err(e) = self
            .conn
            .call_with_serial(
                procedure::DOMAIN_OPEN_CONSOLE,
                serial,
                &args.into_bytes(),
                self.conn.max_reply(),
            )
            .await
        {
            self.conn.unregister_stream(serial);
            return Err(e);
        }
        Ok(Console {
            reader: ConsoleReader { rx, done: false },
            writer: ConsoleWriter {
                conn: self.conn.clone(),
                serial,
            },
        })
    }
}

/// Lifecycle events of one domain.
#[derive(Debug)]
pub struct LifecycleEvents {
    client: Client,
    callback_id: i32,
    rx: queue::Receiver<RawLifecycle>,
}

impl LifecycleEvents {
    /// The next event; `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<LifecycleEvent> {
        match self.rx.pop().await {
            Popped::Item(raw) => Some(LifecycleEvent::from_raw(raw.event, raw.detail)),
            Popped::Lost(n) => Some(LifecycleEvent::Missed(n)),
            Popped::Closed => None,
        }
    }

    /// The callback id libvirtd assigned.
    pub fn callback_id(&self) -> i32 {
        self.callback_id
    }

    /// Unsubscribes (CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY).
    pub async fn deregister(self) -> Result<()> {
        self.client.conn.unregister_lifecycle(self.callback_id);
        let mut args = Encoder::new();
        args.i32(self.callback_id);
        self.client
            .conn
            .call(
                procedure::CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY,
                &args.into_bytes(),
            )
            .await
            .map(drop)
    }
}

/// An image of a domain's display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screenshot {
    /// Its MIME type, as libvirtd says (`image/png` from QEMU 7).
    pub mime: String,
    /// The image file's bytes.
    pub data: Vec<u8>,
}

/// A domain console stream.
#[derive(Debug)]
pub struct Console {
    reader: ConsoleReader,
    writer: ConsoleWriter,
}

impl Console {
    /// Separates reading and writing, for two tasks.
    pub fn split(self) -> (ConsoleReader, ConsoleWriter) {
        (self.reader, self.writer)
    }

    /// Next output from the guest; `Ok(None)` at the end of the stream.
    pub async fn read(&mut self) -> Result<Option<ConsoleOutput>> {
        self.reader.read().await
    }

    /// Sends bytes to the guest.
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        self.writer.write(data).await
    }
}

/// What a console read yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// Bytes from the guest.
    Data(Vec<u8>),
    /// This many bytes of guest output were dropped here because the reader
    /// fell behind by more than [`Options::stream_budget`] (the connection
    /// never waits for a console reader).
    Lost(u64),
}

/// The reading half of a console.
#[derive(Debug)]
pub struct ConsoleReader {
    rx: queue::Receiver<StreamEvent>,
    done: bool,
}

impl ConsoleReader {
    /// Next output from the guest; `Ok(None)` once the stream has finished.
    pub async fn read(&mut self) -> Result<Option<ConsoleOutput>> {
        if self.done {
            return Ok(None);
        }
        match self.rx.pop().await {
            Popped::Item(StreamEvent::Data(data)) => Ok(Some(ConsoleOutput::Data(data))),
            Popped::Lost(n) => Ok(Some(ConsoleOutput::Lost(n))),
            Popped::Item(StreamEvent::Finished) => {
                self.done = true;
                Ok(None)
            }
            Popped::Item(StreamEvent::Failed(e)) => {
                self.done = true;
                Err(e)
            }
            Popped::Closed => {
                self.done = true;
                Err(Error::ConnectionLost("console stream dropped".into()))
            }
        }
    }
}

/// The writing half of a console.
#[derive(Debug, Clone)]
pub struct ConsoleWriter {
    conn: Connection,
    serial: u32,
}

impl ConsoleWriter {
    /// Sends bytes to the guest, in chunks libvirt accepts.
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(STREAM_CHUNK) {
            self.conn
                .send_stream(procedure::DOMAIN_OPEN_CONSOLE, self.serial, Status::Continue, chunk)
                .await?;
        }
        Ok(())
    }

    /// Ends the stream normally (the daemon confirms on the reading half).
    pub async fn finish(&self) -> Result<()> {
        self.conn
            .send_stream(procedure::DOMAIN_OPEN_CONSOLE, self.serial, Status::Ok, &[])
            .await
    }

    /// Aborts the stream.
    pub async fn abort(&self) -> Result<()> {
        let result = self
            .conn
            .send_stream(procedure::DOMAIN_OPEN_CONSOLE, self.serial, Status::Error, &[])
            .await;
        self.conn.unregister_stream(self.serial);
        result
    }
}
