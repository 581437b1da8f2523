//! The connection: one reader task routes every incoming packet — replies to
//! their callers by serial, lifecycle events to their listener by callback id,
//! stream packets to their stream by serial, keepalive PINGs to a PONG — and a
//! keepalive task declares the daemon dead after a configurable silence.
//!
//! The reader never waits for anyone: consumers get byte-budgeted queues that
//! drop (and count) what a slow consumer cannot take, PONGs are written by a
//! task of their own, and a packet is only buffered whole when its receiver
//! accepts that size; anything larger is read past in small pieces. So a
//! console whose stdout nobody reads cannot silence the connection, and a
//! peer's 16 MiB frame costs the client no more than its limits allow.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::protocol::{
    self, HEADER_SIZE, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, LEN_SIZE, LifecycleMessage,
    MessageType, REMOTE_PROGRAM, STREAM_CHUNK, Status, procedure,
};
use crate::queue::{self, Pushed};

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
    /// Bytes of data buffered per stream (a console) for a consumer that
    /// falls behind; past it, incoming data is dropped and the consumer is
    /// told how much ([`crate::ConsoleOutput::Lost`]). The connection itself
    /// never waits for a consumer.
    pub stream_budget: usize,
    /// Events buffered per event listener; past it, events are dropped and
    /// the listener is told how many ([`crate::LifecycleEvent::Missed`]).
    pub event_budget: usize,
    /// The largest reply payload an ordinary call accepts. Calls that return
    /// XML documents (capabilities, domain XML) accept up to libvirt's own
    /// packet limit. A larger reply fails its call with
    /// [`Error::ReplyTooLarge`] without being buffered; the connection goes on.
    pub max_reply: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 5,
            call_timeout: Duration::from_secs(120),
            stream_budget: 1024 * 1024,
            event_budget: 1024,
            max_reply: 64 * 1024,
        }
    }
}

/// Reply limit for calls that return whole XML documents.
pub(crate) const LARGE_REPLY: usize = protocol::MAX_PACKET;

/// What one queued stream item costs beyond its bytes.
const ITEM_OVERHEAD: usize = 64;

/// What a lifecycle event costs of an event budget: one unit each.
const EVENT_COST: usize = 1;

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

/// A call waiting for its reply.
struct Pending {
    reply: oneshot::Sender<Reply>,
    /// The largest reply payload it accepts.
    limit: usize,
}

type Listener = (Option<[u8; 16]>, queue::Sender<RawLifecycle>);

#[derive(Default)]
struct Routes {
    pending: HashMap<u32, Pending>,
    streams: HashMap<u32, queue::Sender<StreamEvent>>,
    lifecycle: HashMap<i32, Listener>,
    /// Listeners waiting for their REGISTER_ANY reply (by call serial): the
    /// reader installs them under the callback id before routing any later
    /// packet, so no event between the reply and the caller waking is lost.
    lifecycle_pending: HashMap<u32, Listener>,
    /// Descriptors that came with a reply (REPLY_WITH_FDS), by call serial,
    /// until the caller takes them.
    received_fds: HashMap<u32, Vec<OwnedFd>>,
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

/// The sending half: any byte stream, or a unix socket, which can also
/// carry file descriptors.
struct Writer {
    bytes: Box<dyn AsyncWrite + Send + Unpin>,
    unix: Option<Arc<tokio::net::unix::OwnedWriteHalf>>,
}

pub(crate) struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    /// The unix socket (shared with the writer), from which the reader takes
    /// the descriptors that follow a REPLY_WITH_FDS.
    fd_source: Option<Arc<tokio::net::unix::OwnedWriteHalf>>,
    serial: AtomicU32,
    /// A PONG is queued or being written: the reader never queues a second.
    pong_owed: AtomicBool,
    /// A PING is being written: the keepalive task never waits for it.
    ping_in_flight: AtomicBool,
    routes: Mutex<Routes>,
    last_heard: Mutex<Instant>,
    closed_tx: watch::Sender<bool>,
    options: Options,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn closed_error(&self) -> Error {
        match &self.routes().closed {
            Some(reason) => reason.to_error(),
            None => Error::ConnectionLost("connection closed".into()),
        }
    }

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
        routes.received_fds.clear();
        for (_, waiter) in routes.pending.drain() {
            let _ = waiter.reply.send(Err(reason.to_error()));
        }
        for (_, stream) in routes.streams.drain() {
            stream.push_final(StreamEvent::Failed(reason.to_error()));
        }
        let maps = &mut *routes;
        let listeners = maps.lifecycle.drain().map(|(_, l)| l);
        for (_, listener) in listeners.chain(maps.lifecycle_pending.drain().map(|(_, l)| l)) {
            listener.close();
        }
        routes.closed = Some(reason);
        drop(routes);
        let _ = self.closed_tx.send(true);
    }

    async fn send(&self, header: &Header, payload: &[u8]) -> Result<()> {
        self.send_then(header, payload, &[], || {}).await
    }

    /// Sends a packet; `locked` runs once this sender holds the writer. A
    /// write that is still blocked when the connection closes (a keepalive
    /// timeout, the reader's end) gives up at once.
    async fn send_then(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        locked: impl FnOnce(),
    ) -> Result<()> {
        if let Some(reason) = &self.routes().closed {
            return Err(reason.to_error());
        }
        if fds.len() > crate::fdpass::MAX_FDS {
            return Err(Error::InvalidRequest(format!(
                "{} file descriptors in one call; libvirt takes at most {}",
                fds.len(),
                crate::fdpass::MAX_FDS
            )));
        }
        let packet = protocol::encode_packet(header, payload);
        if packet.len() > protocol::MAX_PACKET {
            return Err(Error::InvalidRequest(format!(
                "a {}-byte message exceeds the {}-byte limit",
                packet.len(),
                protocol::MAX_PACKET
            )));
        }
        let mut closed = self.closed_tx.subscribe();
        let mut writer = tokio::select! {
            writer = self.writer.lock() => writer,
            _ = closed.wait_for(|closed| *closed) => return Err(self.closed_error()),
        };
        if !fds.is_empty() && writer.unix.is_none() {
            return Err(Error::InvalidRequest(
                "file descriptors can only be passed over a unix socket, and this connection is not one".into(),
            ));
        }
        locked();
        // From here the stream is mid-message: a caller that gives up (a
        // timeout drops this future) must not leave half a packet, or a
        // packet without its descriptors, for the next writer to continue.
        let mut unfinished = CloseIfUnfinished(Some(self));
        let write = async {
            writer.bytes.write_all(&packet).await?;
            writer.bytes.flush().await?;
            // Each descriptor right after its message, as libvirtd reads them.
            if let Some(unix) = &writer.unix {
                let stream: &tokio::net::UnixStream = (**unix).as_ref();
                for fd in fds {
                    crate::fdpass::send_fd(stream, *fd).await?;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let result = tokio::select! {
            result = write => result,
            _ = closed.wait_for(|closed| *closed) => return Err(self.closed_error()),
        };
        unfinished.0 = None;
        if let Err(e) = result {
            self.close(ClosedReason::Lost(format!("write failed: {e}")));
            return Err(Error::ConnectionLost(format!("write failed: {e}")));
        }
        Ok(())
    }
}

/// Ends the connection when dropped still armed: a write abandoned midway.
struct CloseIfUnfinished<'a>(Option<&'a Inner>);

impl Drop for CloseIfUnfinished<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.0 {
            inner.close(ClosedReason::Lost(
                "a write was abandoned midway (its caller gave up); the stream cannot be trusted".into(),
            ));
        }
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
        Connection::start_halves(
            Box::new(reader),
            Writer {
                bytes: Box::new(writer),
                unix: None,
            },
            None,
            options,
        )
    }

    /// [`Connection::start`] over a unix socket, which can also pass file
    /// descriptors ([`Connection::call_with_fds`]).
    pub fn start_unix(stream: tokio::net::UnixStream, options: Options) -> Connection {
        let (reader, writer) = stream.into_split();
        let writer = Arc::new(writer);
        let fd_source = Some(writer.clone());
        Connection::start_halves(
            Box::new(reader),
            Writer {
                bytes: Box::new(SharedWriteHalf(writer.clone())),
                unix: Some(writer),
            },
            fd_source,
            options,
        )
    }

    fn start_halves(
        reader: Reader,
        writer: Writer,
        fd_source: Option<Arc<tokio::net::unix::OwnedWriteHalf>>,
        options: Options,
    ) -> Connection {
        let (closed_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            fd_source,
            serial: AtomicU32::new(1),
            pong_owed: AtomicBool::new(false),
            ping_in_flight: AtomicBool::new(false),
            routes: Mutex::new(Routes::default()),
            last_heard: Mutex::new(Instant::now()),
            closed_tx,
            options,
            tasks: Mutex::new(Vec::new()),
        });
        let reader_task = tokio::spawn(read_loop(inner.clone(), reader));
        inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(reader_task);
        Connection {
            _guard: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        }
    }

    /// Starts sending PINGs after silence and declaring the daemon dead after
    /// `interval × count` of it. Call once the daemon has said it supports
    /// keepalive. Any byte from the daemon counts as hearing it, and the
    /// check never waits behind a write; once it declares the daemon dead,
    /// blocked writes give up too.
    pub fn start_keepalive(&self) {
        let inner = Arc::downgrade(&self.inner);
        let interval = self.inner.options.keepalive_interval.max(Duration::from_millis(1));
        let limit = interval
            .checked_mul(self.inner.options.keepalive_count)
            .unwrap_or(Duration::MAX);
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
                if silence >= interval && !inner.ping_in_flight.swap(true, Ordering::AcqRel) {
                    let pinger = inner.clone();
                    tokio::spawn(async move {
                        let _ = pinger.send(&Header::keepalive(KEEPALIVE_PING), &[]).await;
                        pinger.ping_in_flight.store(false, Ordering::Release);
                    });
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

    pub(crate) fn max_reply(&self) -> usize {
        self.inner.options.max_reply
    }

    pub(crate) fn next_serial(&self) -> u32 {
        self.inner.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls a remote procedure and returns the reply payload, which may be
    /// at most [`Options::max_reply`] bytes.
    pub async fn call(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>> {
        let serial = self.next_serial();
        self.call_with_serial(proc_, serial, args, self.inner.options.max_reply)
            .await
    }

    /// Calls a remote procedure whose reply may be up to `limit` bytes.
    pub(crate) async fn call_large(&self, proc_: i32, args: &[u8], limit: usize) -> Result<Vec<u8>> {
        let serial = self.next_serial();
        self.call_with_serial(proc_, serial, args, limit).await
    }

    /// Calls a remote procedure passing file descriptors (CALL_WITH_FDS):
    /// libvirtd gets its own duplicates; the caller's stay open. Only over a
    /// unix socket ([`Connection::start_unix`]).
    pub async fn call_with_fds(&self, proc_: i32, args: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Vec<u8>> {
        let serial = self.next_serial();
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        let mut payload = Vec::with_capacity(4 + args.len());
        payload.extend_from_slice(&count.to_be_bytes());
        payload.extend_from_slice(args);
        self.call_full(proc_, serial, &payload, fds, self.inner.options.max_reply)
            .await
    }

    /// Calls a remote procedure whose reply carries file descriptors
    /// (REPLY_WITH_FDS), and returns the reply payload and the descriptors.
    /// Only over a unix socket.
    pub async fn call_receiving_fds(&self, proc_: i32, args: &[u8]) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        if self.inner.fd_source.is_none() {
            return Err(Error::InvalidRequest(
                "file descriptors can only be received over a unix socket, and this connection is not one".into(),
            ));
        }
        let serial = self.next_serial();
        // Taken whatever the outcome, also by a caller that gives up
        // (dropped): none stays open behind in the routes.
        let _forget = ForgetFdsOnDrop {
            inner: &self.inner,
            serial,
        };
        let result = self
            .call_with_serial(proc_, serial, args, self.inner.options.max_reply)
            .await;
        let fds = self.inner.routes().received_fds.remove(&serial).unwrap_or_default();
        Ok((result?, fds))
    }

    pub(crate) async fn call_with_serial(&self, proc_: i32, serial: u32, args: &[u8], limit: usize) -> Result<Vec<u8>> {
        self.call_full(proc_, serial, args, &[], limit).await
    }

    async fn call_full(
        &self,
        proc_: i32,
        serial: u32,
        args: &[u8],
        fds: &[BorrowedFd<'_>],
        limit: usize,
    ) -> Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = self.inner.routes();
            if let Some(reason) = &routes.closed {
                return Err(reason.to_error());
            }
            routes.pending.insert(serial, Pending { reply: tx, limit });
        }
        // A caller that gives up (its own timeout, a dropped future) leaves no
        // route behind; the late reply is then recognised and ignored.
        let _forget = ForgetOnDrop {
            inner: &self.inner,
            serial,
        };
        let kind = if fds.is_empty() {
            MessageType::Call
        } else {
            MessageType::CallWithFds
        };
        let header = Header::remote(proc_, kind, serial, Status::Ok);
        let timeout = self.inner.options.call_timeout;
        let call = async {
            self.inner.send_then(&header, args, fds, || {}).await?;
            rx.await.map_err(|_| self.closed_error())?
        };
        tokio::time::timeout(timeout, call).await.unwrap_or(Err(Error::Timeout {
            procedure: proc_,
            timeout,
        }))
    }

    fn closed_error(&self) -> Error {
        self.inner.closed_error()
    }

    /// Registers a stream for `serial` before the call that opens it, so no
    /// early packet is lost.
    pub(crate) fn register_stream(&self, serial: u32) -> Result<queue::Receiver<StreamEvent>> {
        self.register_stream_with_budget(serial, self.inner.options.stream_budget)
    }

    /// [`Connection::register_stream`] with a budget of its own (a download
    /// whose every byte counts, such as a screenshot).
    pub(crate) fn register_stream_with_budget(
        &self,
        serial: u32,
        budget: usize,
    ) -> Result<queue::Receiver<StreamEvent>> {
        let (tx, rx) = queue::queue(budget);
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
    ) -> Result<queue::Receiver<RawLifecycle>> {
        let (tx, rx) = queue::queue(self.inner.options.event_budget.saturating_mul(EVENT_COST));
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

struct ForgetFdsOnDrop<'a> {
    inner: &'a Inner,
    serial: u32,
}

impl Drop for ForgetFdsOnDrop<'_> {
    fn drop(&mut self) {
        self.inner.routes().received_fds.remove(&self.serial);
    }
}

struct ForgetOnDrop<'a> {
    inner: &'a Inner,
    serial: u32,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        let mut routes = self.inner.routes();
        routes.pending.remove(&self.serial);
        routes.lifecycle_pending.remove(&self.serial);
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// A unix socket's write half, shared between byte writes and descriptor
/// passing (both under the connection's writer lock).
struct SharedWriteHalf(Arc<tokio::net::unix::OwnedWriteHalf>);

impl AsyncWrite for SharedWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        // Writes go to the socket itself: `&UnixStream` writes through try_write.
        let stream: &tokio::net::UnixStream = (*self.0).as_ref();
        loop {
            match stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            match stream.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn read_loop(inner: Arc<Inner>, mut reader: Reader) {
    let reason = loop {
        if let Err(reason) = read_and_route(&inner, &mut reader).await {
            break reason;
        }
    };
    log::debug!("libvirt reader stopping: {reason}");
    inner.close(ClosedReason::Lost(reason));
}

/// Reads exactly `buf.len()` bytes; every byte counts as hearing the daemon.
async fn read_full(inner: &Inner, reader: &mut Reader, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        inner.heard();
        filled += n;
    }
    Ok(())
}

/// Reads past `len` bytes in small pieces, keeping none of them.
async fn skip(inner: &Inner, reader: &mut Reader, mut len: usize) -> std::io::Result<()> {
    let mut scratch = [0u8; 4096];
    while len > 0 {
        let piece = len.min(scratch.len());
        read_full(inner, reader, &mut scratch[..piece]).await?;
        len -= piece;
    }
    Ok(())
}

/// What to do with a packet's payload, decided from its header alone.
enum Take {
    /// Buffer it (at most this many bytes) and route it.
    Keep,
    /// Read past it; `then` says whom to tell.
    Skip(Skipped),
}

enum Skipped {
    /// Nobody wants it (an unknown program, an event nobody listens for).
    Unwanted,
    /// A reply larger than its call accepts.
    ReplyTooLarge { limit: usize },
    /// A stream packet larger than libvirt ever sends.
    ChunkTooLarge,
}

/// Reads one packet and routes it. An error ends the connection (the framing
/// can no longer be trusted, or the peer broke the protocol); anything merely
/// unexpected is logged and ignored.
async fn read_and_route(inner: &Arc<Inner>, reader: &mut Reader) -> std::result::Result<(), String> {
    let mut len_word = [0u8; LEN_SIZE];
    match read_full(inner, reader, &mut len_word).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err("libvirtd closed the connection".into());
        }
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let len = protocol::check_length(u32::from_be_bytes(len_word)).map_err(|e| e.to_string())?;
    let mut header_bytes = [0u8; HEADER_SIZE];
    read_full(inner, reader, &mut header_bytes)
        .await
        .map_err(|e| format!("connection ended inside a {len}-byte packet: {e}"))?;
    let (header, _) = protocol::decode_packet(&header_bytes).map_err(|e| e.to_string())?;
    let payload_len = len - LEN_SIZE - HEADER_SIZE;
    let ended = |e: std::io::Error| format!("connection ended inside a {len}-byte packet: {e}");
    if header.kind == MessageType::ReplyWithFds {
        return read_reply_with_fds(inner, reader, &header, payload_len).await;
    }
    match take(inner, &header, payload_len)? {
        Take::Keep => {
            let mut payload = vec![0u8; payload_len];
            read_full(inner, reader, &mut payload).await.map_err(ended)?;
            dispatch(inner, &header, &payload);
        }
        Take::Skip(why) => {
            skip(inner, reader, payload_len).await.map_err(ended)?;
            skipped(inner, &header, payload_len, why);
        }
    }
    Ok(())
}

/// A REPLY_WITH_FDS: its descriptor count, its payload, then the
/// descriptors themselves, each with its byte on the socket; all are read
/// whoever wants them, so the stream stays in step. They wait for their
/// caller in the routes (a caller that gave up: they are closed).
async fn read_reply_with_fds(
    inner: &Arc<Inner>,
    reader: &mut Reader,
    header: &Header,
    payload_len: usize,
) -> std::result::Result<(), String> {
    if payload_len < 4 || payload_len > inner.options.max_reply {
        return Err(format!(
            "libvirtd sent a {payload_len}-byte REPLY_WITH_FDS (procedure {}): not a descriptor count and a small reply",
            header.procedure
        ));
    }
    let mut payload = vec![0u8; payload_len];
    read_full(inner, reader, &mut payload)
        .await
        .map_err(|e| format!("connection ended inside a REPLY_WITH_FDS: {e}"))?;
    let count = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if count > crate::fdpass::MAX_FDS {
        return Err(format!(
            "libvirtd announced {count} descriptors in one reply; libvirt sends at most {}",
            crate::fdpass::MAX_FDS
        ));
    }
    let Some(source) = inner.fd_source.clone() else {
        return Err("libvirtd sent descriptors over a connection that cannot carry them (not a unix socket)".into());
    };
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket: &tokio::net::UnixStream = (*source).as_ref();
        let fd = crate::fdpass::recv_fd(socket)
            .await
            .map_err(|e| format!("receiving a descriptor of a REPLY_WITH_FDS: {e}"))?;
        inner.heard();
        fds.push(fd);
    }
    let wanted = {
        let mut routes = inner.routes();
        let wanted = routes.pending.contains_key(&header.serial);
        if wanted && !fds.is_empty() {
            routes.received_fds.insert(header.serial, std::mem::take(&mut fds));
        }
        wanted
    };
    if wanted {
        route_reply(inner, header, &payload[4..]);
    } else {
        log::debug!(
            "closing {} descriptors of a late reply to serial {}: its caller gave up",
            fds.len(),
            header.serial
        );
    }
    Ok(())
}

/// Decides from the header whether the payload is wanted and affordable.
fn take(inner: &Inner, header: &Header, payload_len: usize) -> std::result::Result<Take, String> {
    let routes = inner.routes();
    Ok(match (header.program, header.kind) {
        (KEEPALIVE_PROGRAM, _) => Take::Skip(Skipped::Unwanted),
        (REMOTE_PROGRAM, MessageType::Reply | MessageType::ReplyWithFds) => match routes.pending.get(&header.serial) {
            Some(call) if payload_len > call.limit => Take::Skip(Skipped::ReplyTooLarge { limit: call.limit }),
            Some(_) => Take::Keep,
            // A refused stream finish/abort: an error small enough to read.
            None if routes.streams.contains_key(&header.serial) => {
                if payload_len > inner.options.max_reply {
                    Take::Skip(Skipped::ReplyTooLarge {
                        limit: inner.options.max_reply,
                    })
                } else {
                    Take::Keep
                }
            }
            None if header.serial == 0 || header.serial >= inner.serial.load(Ordering::Relaxed) => {
                return Err(format!(
                    "libvirtd sent a reply to serial {} (procedure {}), but no call with that serial was ever made: it does not speak libvirt's protocol as expected",
                    header.serial, header.procedure
                ));
            }
            // The reply to a call that gave up (timed out or was cancelled).
            None => Take::Skip(Skipped::Unwanted),
        },
        (REMOTE_PROGRAM, MessageType::Stream) => match routes.streams.contains_key(&header.serial) {
            true if header.status == Status::Continue && payload_len > STREAM_CHUNK => {
                Take::Skip(Skipped::ChunkTooLarge)
            }
            true if payload_len > STREAM_CHUNK.max(inner.options.max_reply) => Take::Skip(Skipped::ChunkTooLarge),
            true => Take::Keep,
            false => Take::Skip(Skipped::Unwanted),
        },
        (REMOTE_PROGRAM, MessageType::Message)
            if header.procedure == procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE
                && !routes.lifecycle.is_empty()
                && payload_len <= inner.options.max_reply =>
        {
            Take::Keep
        }
        _ => Take::Skip(Skipped::Unwanted),
    })
}

/// Tells the intended receiver of a payload that was read past.
fn skipped(inner: &Arc<Inner>, header: &Header, payload_len: usize, why: Skipped) {
    match why {
        Skipped::Unwanted => match (header.program, header.kind) {
            (KEEPALIVE_PROGRAM, _) if header.procedure == KEEPALIVE_PING => pong(inner),
            (KEEPALIVE_PROGRAM, _) => {}
            (REMOTE_PROGRAM, MessageType::Reply | MessageType::ReplyWithFds) => log::debug!(
                "ignoring a late reply to serial {} (procedure {}): its caller gave up",
                header.serial,
                header.procedure
            ),
            (REMOTE_PROGRAM, MessageType::Stream) => {
                log::debug!("ignoring a stream packet for unknown serial {}", header.serial)
            }
            (REMOTE_PROGRAM, MessageType::Message) => {
                log::debug!("ignoring event procedure {} ({payload_len} bytes)", header.procedure)
            }
            (REMOTE_PROGRAM, other) => log::warn!(
                "ignoring unexpected {other:?} packet from libvirtd (procedure {})",
                header.procedure
            ),
            (other, _) => log::warn!("ignoring a packet of unknown program {other:#x}"),
        },
        Skipped::ReplyTooLarge { limit } => {
            let error = Error::ReplyTooLarge {
                procedure: header.procedure,
                size: payload_len,
                limit,
            };
            let mut routes = inner.routes();
            if let Some(call) = routes.pending.remove(&header.serial) {
                let _ = call.reply.send(Err(error));
            } else if let Some(stream) = routes.streams.remove(&header.serial) {
                stream.push_final(StreamEvent::Failed(error));
            }
        }
        Skipped::ChunkTooLarge => {
            let limit = match header.status {
                Status::Continue => STREAM_CHUNK,
                _ => STREAM_CHUNK.max(inner.options.max_reply),
            };
            if let Some(stream) = inner.routes().streams.remove(&header.serial) {
                stream.push_final(StreamEvent::Failed(Error::ChunkTooLarge {
                    size: payload_len,
                    limit,
                }));
            }
        }
    }
}

/// Answers a PING without the reader waiting for the write.
fn pong(inner: &Arc<Inner>) {
    if inner.pong_owed.swap(true, Ordering::AcqRel) {
        return; // One PONG answers every PING that came before it is sent.
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        // Owed until this task holds the writer: at most one PONG waits for
        // it and one is written, however many PINGs a peer that does not read
        // sends meanwhile.
        let owed = &inner.pong_owed;
        let _ = inner
            .send_then(&Header::keepalive(KEEPALIVE_PONG), &[], &[], || {
                owed.store(false, Ordering::Release)
            })
            .await;
    });
}

/// Routes one wanted payload. Never waits.
fn dispatch(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    match header.kind {
        MessageType::Reply | MessageType::ReplyWithFds => route_reply(inner, header, payload),
        MessageType::Message => route_event(inner, header, payload),
        MessageType::Stream => route_stream(inner, header, payload),
        other => log::warn!(
            "ignoring unexpected {other:?} packet from libvirtd (procedure {})",
            header.procedure
        ),
    }
}

fn decode_failure(procedure: i32, payload: &[u8]) -> Error {
    match protocol::decode_error(payload) {
        Ok(e) => Error::Libvirt(e),
        Err(source) => Error::BadReply { procedure, source },
    }
}

fn route_reply(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
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
        let _ = waiter.reply.send(reply);
        return;
    }
    // A stream's finish/abort may be refused with an error reply on its serial.
    if let Some(stream) = inner.routes().streams.remove(&header.serial) {
        stream.push_final(StreamEvent::Failed(decode_failure(header.procedure, payload)));
    }
}

fn route_event(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    let message = match LifecycleMessage::decode(payload) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("ignoring a malformed lifecycle event: {e}");
            return;
        }
    };
    let listener = inner.routes().lifecycle.get(&message.callback_id).cloned();
    let Some((filter, tx)) = listener else {
        log::debug!(
            "ignoring a lifecycle event for unknown callback {} (procedure {})",
            message.callback_id,
            header.procedure
        );
        return;
    };
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
    match tx.push(event, EVENT_COST, 1) {
        Pushed::Queued => {}
        Pushed::Dropped => log::warn!(
            "lifecycle listener {} is not keeping up: an event was dropped",
            message.callback_id
        ),
        Pushed::ReceiverGone => {
            inner.routes().lifecycle.remove(&message.callback_id);
        }
    }
}

fn route_stream(inner: &Arc<Inner>, header: &Header, payload: &[u8]) {
    let stream = {
        let mut routes = inner.routes();
        if header.status == Status::Continue {
            routes.streams.get(&header.serial).cloned()
        } else {
            routes.streams.remove(&header.serial)
        }
    };
    let Some(stream) = stream else {
        log::debug!("ignoring a stream packet for unknown serial {}", header.serial);
        return;
    };
    match header.status {
        // Each item also costs its bookkeeping, so a flood of empty packets
        // is bounded like a flood of data.
        Status::Continue => match stream.push(
            StreamEvent::Data(payload.to_vec()),
            payload.len() + ITEM_OVERHEAD,
            payload.len() as u64,
        ) {
            Pushed::Queued => {}
            Pushed::Dropped => log::debug!(
                "stream {} is not keeping up: {} bytes dropped",
                header.serial,
                payload.len()
            ),
            Pushed::ReceiverGone => {
                inner.routes().streams.remove(&header.serial);
            }
        },
        Status::Ok => stream.push_final(StreamEvent::Finished),
        Status::Error => stream.push_final(StreamEvent::Failed(decode_failure(header.procedure, payload))),
    }
}
