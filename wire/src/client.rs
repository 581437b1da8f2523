//! The connection: one reader task routes every incoming packet — replies to
//! their callers by serial, lifecycle events to their listener by callback id,
//! stream packets to their stream by serial, keepalive PINGs to a PONG — and a
//! keepalive task declares the daemon dead after a configurable silence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::protocol::{
    self, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, LEN_SIZE, LifecycleMessage, MessageType,
    REMOTE_PROGRAM, Status, procedure,
};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Send a PING after this much silence from the daemon.
    pub keepalive_interval: Duration,
    /// Declare the daemon dead after `keepalive_interval × keepalive_count`
    /// of silence (libvirt's own client: 5 s × 5).
    pub keepalive_count: u32,
    /// Longest a call may wait for its reply.
    pub call_timeout: Duration,
    /// Packets buffered per stream or event listener before the reader waits
    /// for the consumer (back-pressure instead of unbounded memory).
    pub channel_capacity: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 5,
            call_timeout: Duration::from_secs(120),
            channel_capacity: 64,
        }
    }
}

/// What happens on a stream.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    Data(Vec<u8>),
    Finished,
    Failed(Error),
}

/// A lifecycle event as delivered to a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawLifecycle {
    pub domain: protocol::DomainRef,
    pub event: i32,
    pub detail: i32,
}

type Reply = std::result::Result<Vec<u8>, Error>;

#[derive(Default)]
struct Routes {
    pending: HashMap<u32, oneshot::Sender<Reply>>,
    streams: HashMap<u32, mpsc::Sender<StreamEvent>>,
    lifecycle: HashMap<i32, (Option<[u8; 16]>, mpsc::Sender<RawLifecycle>)>,
    /// Listeners waiting for their REGISTER_ANY reply (by call serial): the
    /// reader installs them under the callback id before routing any later
    /// packet, so no event between the reply and the caller waking is lost.
    lifecycle_pending: HashMap<u32, (Option<[u8; 16]>, mpsc::Sender<RawLifecycle>)>,
    /// Why the connection ended, once it has.
    closed: Option<ClosedReason>,
}

#[derive(Debug, Clone)]
enum ClosedReason {
    Lost(String),
    Keepalive(Duration),
}

impl ClosedReason {
    fn to_error(&self) -> Error {
        match self {
            ClosedReason::Lost(why) => Error::ConnectionLost(why.clone()),
            ClosedReason::Keepalive(d) => Error::KeepaliveTimeout(*d),
        }
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

pub(crate) struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    serial: AtomicU32,
    routes: Mutex<Routes>,
    last_heard: Mutex<Instant>,
    closed_tx: watch::Sender<bool>,
    options: Options,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        // A panic while holding this lock cannot leave the maps inconsistent
        // (each operation is a single insert/remove), so poisoning is ignored.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn heard(&self) {
        *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn silence(&self) -> Duration {
        self.last_heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// Ends the connection: every waiter gets the reason.
    fn close(&self, reason: ClosedReason) {
        let mut routes = self.routes();
        if routes.closed.is_some() {
            return;
        }
        log::debug!("libvirt connection closed: {reason:?}");
        for (_, waiter) in routes.pending.drain() {
            let _ = waiter.send(Err(reason.to_error()));
        }
        for (_, stream) in routes.streams.drain() {
            let _ = stream.try_send(StreamEvent::Failed(reason.to_error()));
        }
        routes.lifecycle.clear();
        routes.lifecycle_pending.clear();
        routes.closed = Some(reason);
        drop(routes);
        let _ = self.closed_tx.send(true);
    }

    async fn send(&self, header: &Header, payload: &[u8]) -> Result<()> {
        if let Some(reason) = &self.routes().closed {
            return Err(reason.to_error());
        }
        let packet = protocol::encode_packet(header, payload);
        if packet.len() > protocol::MAX_PACKET {
            return Err(Error::InvalidRequest(format!(
                "a {}-byte message exceeds the {}-byte limit",
                packet.len(),
                protocol::MAX_PACKET
            )));
        }
        let mut writer = self.writer.lock().await;
        let result = async {
            writer.write_all(&packet).await?;
            writer.flush().await
        }
        .await;
        if let Err(e) = result {
            self.close(ClosedReason::Lost(format!("write failed: {e}")));
            return Err(Error::ConnectionLost(format!("write failed: {e}")));
        }
        Ok(())
    }
}

/// A connection to libvirtd. Cheap to clone; the connection closes (with
/// CONNECT_CLOSE, best effort) when the last clone is dropped.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("closed", &self.is_closed()).finish()
    }
}

struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let inner = self.0.clone();
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        if inner.routes().closed.is_some() {
            tasks.iter().for_each(JoinHandle::abort);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let serial = inner.serial.fetch_add(1, Ordering::Relaxed);
                    let header = Header::remote(procedure::CONNECT_CLOSE, MessageType::Call, serial, Status::Ok);
                    let _ = tokio::time::timeout(Duration::from_secs(1), inner.send(&header, &[])).await;
                    inner.close(ClosedReason::Lost("connection dropped".into()));
                    tasks.iter().for_each(JoinHandle::abort);
                });
            }
            Err(_) => tasks.iter().for_each(JoinHandle::abort),
        }
    }
}

impl Connection {
    /// Starts the reader and keepalive tasks over an established byte stream.
    /// No libvirt call is made; see [`crate::Client::open`] for the handshake.
    pub fn start<S>(stream: S, options: Options) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer): (ReadHalf<S>, WriteHalf<S>) = tokio::io::split(stream);
        let (closed_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(Box::new(writer)),
            serial: AtomicU32::new(1),
            routes: Mutex::new(Routes::default()),
            last_heard: Mutex::new(Instant::now()),
            closed_tx,
            options,
            tasks: Mutex::new(Vec::new()),
        });
        let reader_task = tokio::spawn(read_loop(inner.clone(), Box::new(reader)));
        inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(reader_task);
        Connection {
            _guard: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        }
    }

    /// Starts sending PINGs after silence and declaring the daemon dead after
    /// `interval × count` of it. Call once the daemon has said it supports
    /// keepalive.
    pub fn start_keepalive(&self) {
        let inner = Arc::downgrade(&self.inner);
        let interval = self.inner.options.keepalive_interval;
        let limit = interval * self.inner.options.keepalive_count;
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                if inner.routes().closed.is_some() {
                    return;
                }
                let silence = inner.silence();
                if silence >= limit {
                    log::warn!("libvirtd silent for {silence:?}: connection considered dead");
                    inner.close(ClosedReason::Keepalive(silence));
                    return;
                }
                if silence >= interval {
                    let _ = inner.send(&Header::keepalive(KEEPALIVE_PING), &[]).await;
                }
            }
        });
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.routes().closed.is_some()
    }

    /// Waits until the connection ends, and says why.
    pub async fn closed(&self) -> Error {
        let mut rx = self.inner.closed_tx.subscribe();
        loop {
            if let Some(reason) = &self.inner.routes().closed {
                return reason.to_error();
            }
            if rx.changed().await.is_err() {
                return Error::ConnectionLost("connection dropped".into());
            }
        }
    }

    pub(crate) fn next_serial(&self) -> u32 {
        self.inner.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls a remote procedure and returns the reply payload.
    pub async fn call(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>> {
        let serial = self.next_serial();
        self.call_with_serial(proc_, serial, args).await
    }

    pub(crate) async fn call_with_serial(&self, proc_: i32, serial: u32, args: &[u8]) -> Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = self.inner.routes();
            if let Some(reason) = &routes.closed {
                return Err(reason.to_error());
            }
            routes.pending.insert(serial, tx);
        }
        let header = Header::remote(proc_, MessageType::Call, serial, Status::Ok);
        if let Err(e) = self.inner.send(&header, args).await {
            self.inner.routes().pending.remove(&serial);
            return Err(e);
        }
        let timeout = self.inner.options.call_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                self.inner.routes().pending.remove(&serial);
                Err(Error::Timeout {
                    procedure: proc_,
                    timeout,
                })
            }
        }
    }

    fn closed_error(&self) -> Error {
        match &self.inner.routes().closed {
            Some(reason) => reason.to_error(),
            None => Error::ConnectionLost("reply channel dropped".into()),
        }
    }

    /// Registers a stream for `serial` before the call that opens it, so no
    /// early packet is lost.
    pub(crate) fn register_stream(&self, serial: u32) -> Result<mpsc::Receiver<StreamEvent>> {
        let (tx, rx) = mpsc::channel(self.inner.options.channel_capacity);
        let mut routes = self.inner.routes();
        if let Some(reason) = &routes.closed {
            return Err(reason.to_error());
        }
        routes.streams.insert(serial, tx);
        Ok(rx)
    }

    pub(crate) fn unregister_stream(&self, serial: u32) {
        self.inner.routes().streams.remove(&serial);
    }

    /// Sends a stream packet (data, finish or abort).
    pub(crate) async fn send_stream(&self, proc_: i32, serial: u32, status: Status, data: &[u8]) -> Result<()> {
        let header = Header::remote(proc_, MessageType::Stream, serial, status);
        self.inner.send(&header, data).await
    }

    /// Prepares a lifecycle listener for the REGISTER_ANY call with `serial`.
    pub(crate) fn register_lifecycle_for_call(
        &self,
        serial: u32,
        uuid: Option<[u8; 16]>,
    ) -> Result<mpsc::Receiver<RawLifecycle>> {
        let (tx, rx) = mpsc::channel(self.inner.options.channel_capacity);
        let mut routes = self.inner.routes();
        if let Some(reason) = &routes.closed {
            return Err(reason.to_error());
        }
        routes.lifecycle_pending.insert(serial, (uuid, tx));
        Ok(rx)
    }

    pub(crate) fn unregister_lifecycle(&self, callback_id: i32) {
        self.inner.routes().lifecycle.remove(&callback_id);
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

async fn read_loop(inner: Arc<Inner>, mut reader: Reader) {
    let reason = loop {
        match read_packet(&mut reader).await {
            Ok(body) => {
                inner.heard();
                if let Err(reason) = dispatch(&inner, &body).await {
                    break reason;
                }
            }
            Err(reason) => break reason,
        }
    };
    log::debug!("libvirt reader stopping: {reason}");
    inner.close(ClosedReason::Lost(reason));
}

/// Reads one packet body (header + payload). The length is checked before
/// anything is allocated.
async fn read_packet(reader: &mut Reader) -> std::result::Result<Vec<u8>, String> {
    let mut len_word = [0u8; LEN_SIZE];
    match reader.read_exact(&mut len_word).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err("libvirtd closed the connection".into());
        }
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let len = protocol::check_length(u32::from_be_bytes(len_word)).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len - LEN_SIZE];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("connection ended inside a {len}-byte packet: {e}"))?;
    Ok(body)
}

/// Routes one packet. An error ends the connection (the framing can no longer
/// be trusted); anything merely unexpected is logged and ignored.
async fn dispatch(inner: &Arc<Inner>, body: &[u8]) -> std::result::Result<(), String> {
    let (header, payload) = protocol::decode_packet(body).map_err(|e| e.to_string())?;
    match header.program {
        KEEPALIVE_PROGRAM => {
            if header.procedure == KEEPALIVE_PING {
                let _ = inner.send(&Header::keepalive(KEEPALIVE_PONG), &[]).await;
            }
            Ok(())
        }
        REMOTE_PROGRAM => {
            match header.kind {
                MessageType::Reply | MessageType::ReplyWithFds => route_reply(inner, &header, payload).await,
                MessageType::Message => route_event(inner, &header, payload).await,
                MessageType::Stream => route_stream(inner, &header, payload).await,
                other => log::warn!(
                    "ignoring unexpected {other:?} packet from libvirtd (procedure {})",
                    header.procedure
                ),
            }
            Ok(())
        }
        other => {
            log::warn!("ignoring a packet of unknown program {other:#x}");
            Ok(())
        }
    }
}

fn decode_failure(procedure: i32, payload: &[u8]) -> Error {
    match protocol::decode_error(payload) {
        Ok(e) => Error::Libvirt(e),
        Err(source) => Error::BadReply { procedure, source },
    }
}

async fn route_reply(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    let waiter = {
        let mut routes = inner.routes();
        if let Some(listener) = routes.lifecycle_pending.remove(&header.serial)
            && header.status == Status::Ok
            && let Ok(id) = crate::xdr::Decoder::new(payload).i32("callbackID")
        {
            routes.lifecycle.insert(id, listener);
        }
        routes.pending.remove(&header.serial)
    };
    if let Some(waiter) = waiter {
        let reply = match header.status {
            Status::Ok => Ok(payload.to_vec()),
            _ => Err(decode_failure(header.procedure, payload)),
        };
        let _ = waiter.send(reply);
        return;
    }
    // A stream's finish/abort may be refused with an error reply on its serial.
    let stream = inner.routes().streams.remove(&header.serial);
    match stream {
        Some(stream) => {
            let _ = stream
                .send(StreamEvent::Failed(decode_failure(header.procedure, payload)))
                .await;
        }
        None => log::warn!(
            "ignoring a reply to serial {} (procedure {}) that nobody is waiting for",
            header.serial,
            header.procedure
        ),
    }
}

async fn route_event(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    if header.procedure != procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE {
        log::debug!("ignoring event procedure {}", header.procedure);
        return;
    }
    let message = match LifecycleMessage::decode(payload) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("ignoring a malformed lifecycle event: {e}");
            return;
        }
    };
    let listener = inner.routes().lifecycle.get(&message.callback_id).cloned();
    match listener {
        Some((filter, tx)) => {
            if filter.is_some_and(|uuid| uuid != message.domain.uuid) {
                log::warn!(
                    "ignoring a lifecycle event for {:?} on callback {} registered for another domain",
                    message.domain,
                    message.callback_id
                );
                return;
            }
            let event = RawLifecycle {
                domain: message.domain,
                event: message.event,
                detail: message.detail,
            };
            if tx.send(event).await.is_err() {
                inner.routes().lifecycle.remove(&message.callback_id);
            }
        }
        None => log::debug!(
            "ignoring a lifecycle event for unknown callback {}",
            message.callback_id
        ),
    }
}

async fn route_stream(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    let stream = {
        let mut routes = inner.routes();
        if header.status == Status::Continue {
            routes.streams.get(&header.serial).cloned()
        } else {
            routes.streams.remove(&header.serial)
        }
    };
    let Some(stream) = stream else {
        log::warn!("ignoring a stream packet for unknown serial {}", header.serial);
        return;
    };
    let event = match header.status {
        Status::Continue => StreamEvent::Data(payload.to_vec()),
        Status::Ok => StreamEvent::Finished,
        Status::Error => StreamEvent::Failed(decode_failure(header.procedure, payload)),
    };
    if stream.send(event).await.is_err() {
        inner.routes().streams.remove(&header.serial);
    }
}
