//! libvirt-wire against a scripted fake daemon on an in-process socket pair:
//! framing, multiplexing, keepalive, error decoding, event routing, and
//! hostile peers (truncated frames, oversized lengths, garbage XDR, unknown
//! procedures, replies nobody asked for).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use libvirt_wire::protocol::{
    self, DomainRef, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, LifecycleMessage, MessageType, Status,
    procedure,
};
use libvirt_wire::uri;
use libvirt_wire::xdr::{Decoder, Encoder};
use libvirt_wire::{Client, ConsoleOutput, DomainState, Error, LibvirtError, LifecycleEvent, Options, StoppedReason};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

struct FakeDaemon<S = DuplexStream> {
    io: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FakeDaemon<S> {
    async fn read(&mut self) -> (Header, Vec<u8>) {
        let mut len = [0u8; 4];
        self.io.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        self.io.read_exact(&mut body).await.unwrap();
        let (header, payload) = protocol::decode_packet(&body).unwrap();
        (header, payload.to_vec())
    }

    /// Reads the next call, answering keepalive PINGs on the way.
    async fn read_call(&mut self) -> (Header, Vec<u8>) {
        loop {
            let (header, payload) = self.read().await;
            if header.program == KEEPALIVE_PROGRAM {
                continue;
            }
            assert_eq!(header.kind, MessageType::Call);
            return (header, payload);
        }
    }

    async fn send(&mut self, header: Header, payload: &[u8]) {
        self.io
            .write_all(&protocol::encode_packet(&header, payload))
            .await
            .unwrap();
    }

    async fn reply(&mut self, call: &Header, payload: &[u8]) {
        self.send(
            Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Ok),
            payload,
        )
        .await;
    }

    async fn reply_error(&mut self, call: &Header, err: &LibvirtError) {
        let header = Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Error);
        self.send(header, &protocol::encode_error(err)).await;
    }

    async fn handshake(&mut self, keepalive: bool) {
        let (call, _) = self.read_call().await;
        assert_eq!(call.procedure, procedure::AUTH_LIST);
        let mut e = Encoder::new();
        e.u32(1).i32(0);
        self.reply(&call, &e.into_bytes()).await;
        let (call, args) = self.read_call().await;
        assert_eq!(call.procedure, procedure::CONNECT_OPEN);
        let mut d = Decoder::new(&args);
        assert_eq!(d.opt_string("name").unwrap().as_deref(), Some("qemu:///system"));
        self.reply(&call, &[]).await;
        let (call, args) = self.read_call().await;
        assert_eq!(call.procedure, procedure::CONNECT_SUPPORTS_FEATURE);
        assert_eq!(Decoder::new(&args).i32("feature").unwrap(), 10, "keepalive probe");
        let mut e = Encoder::new();
        e.i32(i32::from(keepalive));
        self.reply(&call, &e.into_bytes()).await;
    }
}

fn options() -> Options {
    Options {
        keepalive_interval: Duration::from_millis(50),
        keepalive_count: 3,
        call_timeout: Duration::from_secs(5),
        stream_budget: 64 * 1024,
        event_budget: 8,
        max_reply: 64 * 1024,
    }
}

async fn pair(keepalive: bool) -> (Client, FakeDaemon) {
    let (client_io, daemon_io) = tokio::io::duplex(1 << 20);
    let mut daemon = FakeDaemon { io: daemon_io };
    let target = uri::parse("qemu:///system").unwrap();
    let (client, ()) = tokio::join!(
        async { Client::open(client_io, &target, options()).await.unwrap() },
        daemon.handshake(keepalive)
    );
    (client, daemon)
}

fn data_of(bytes: &[u8]) -> ConsoleOutput {
    ConsoleOutput::Data(bytes.to_vec())
}

fn domain(name: &str, byte: u8) -> DomainRef {
    DomainRef {
        name: name.into(),
        uuid: [byte; 16],
        id: 1,
    }
}

fn state_reply(state: i32, reason: i32) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(state).i32(reason);
    e.into_bytes()
}

#[tokio::test]
async fn replies_out_of_order_reach_their_callers() {
    let (client, mut daemon) = pair(false).await;
    let a = domain("a", 1);
    let b = domain("b", 2);
    let (ca, cb) = (client.clone(), client.clone());
    let (da, db) = (a.clone(), b.clone());
    let first = tokio::spawn(async move { ca.get_state(&da).await });
    let (call1, args1) = daemon.read_call().await;
    let second = tokio::spawn(async move { cb.get_state(&db).await });
    let (call2, args2) = daemon.read_call().await;
    // The arguments name the right domains.
    assert_eq!(DomainRef::decode(&mut Decoder::new(&args1)).unwrap(), a);
    assert_eq!(DomainRef::decode(&mut Decoder::new(&args2)).unwrap(), b);
    assert_ne!(call1.serial, call2.serial);
    // Answer the second first.
    daemon.reply(&call2, &state_reply(5, 1)).await;
    daemon.reply(&call1, &state_reply(1, 1)).await;
    assert_eq!(first.await.unwrap().unwrap(), (DomainState::Running, 1));
    assert_eq!(second.await.unwrap().unwrap(), (DomainState::Shutoff, 1));
}

#[tokio::test]
async fn libvirt_errors_decode_with_code_domain_and_message() {
    let (client, mut daemon) = pair(false).await;
    let task = tokio::spawn(async move { client.lookup_by_uuid(&[3; 16]).await });
    let (call, _) = daemon.read_call().await;
    let err = LibvirtError {
        code: 42,
        domain: 10,
        level: 2,
        message: "Domain not found: no domain with matching uuid".into(),
    };
    daemon.reply_error(&call, &err).await;
    let got = task.await.unwrap().unwrap_err();
    assert_eq!(got.libvirt(), Some(&err));
    assert!(got.to_string().contains("Domain not found"), "{got}");
}

#[tokio::test]
async fn events_reach_only_their_own_listener() {
    let (client, mut daemon) = pair(false).await;
    let a = domain("a", 1);
    let b = domain("b", 2);
    let mut listeners = Vec::new();
    for (dom, id) in [(a.clone(), 7), (b.clone(), 8)] {
        let c = client.clone();
        let registered = dom.clone();
        let task = tokio::spawn(async move { c.lifecycle_events(&registered).await.unwrap() });
        let (call, _) = daemon.read_call().await;
        assert_eq!(call.procedure, procedure::CONNECT_SUPPORTS_FEATURE);
        let mut e = Encoder::new();
        e.i32(1);
        daemon.reply(&call, &e.into_bytes()).await;
        let (call, args) = daemon.read_call().await;
        assert_eq!(call.procedure, procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY);
        let mut d = Decoder::new(&args);
        assert_eq!(d.i32("eventID").unwrap(), 0);
        assert!(d.bool("dom").unwrap());
        assert_eq!(DomainRef::decode(&mut d).unwrap(), dom);
        let mut e = Encoder::new();
        e.i32(id);
        daemon.reply(&call, &e.into_bytes()).await;
        // An event right behind the reply must not be lost.
        let started = LifecycleMessage {
            callback_id: id,
            domain: dom.clone(),
            event: 2,
            detail: 0,
        };
        daemon
            .send(
                Header::remote(
                    procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
                    MessageType::Message,
                    0,
                    Status::Ok,
                ),
                &started.encode(),
            )
            .await;
        listeners.push(task.await.unwrap());
    }
    let event = |callback_id, domain: &DomainRef, event, detail| {
        LifecycleMessage {
            callback_id,
            domain: domain.clone(),
            event,
            detail,
        }
        .encode()
    };
    let header = Header::remote(
        procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
        MessageType::Message,
        0,
        Status::Ok,
    );
    // For a: stopped/destroyed. An event on b's callback that names a (a confused
    // daemon) and one for an unknown callback are both dropped.
    daemon.send(header, &event(8, &a, 5, 1)).await;
    daemon.send(header, &event(99, &a, 5, 1)).await;
    daemon.send(header, &event(7, &a, 5, 1)).await;
    let (mut la, mut lb) = (listeners.remove(0), listeners.remove(0));
    assert_eq!(next(&mut la).await, Some(LifecycleEvent::Started(0)));
    assert_eq!(
        next(&mut la).await,
        Some(LifecycleEvent::Stopped(StoppedReason::Destroyed))
    );
    assert_eq!(next(&mut lb).await, Some(LifecycleEvent::Started(0)));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), lb.next())
            .await
            .is_err(),
        "b got a's event"
    );
}

async fn next(listener: &mut libvirt_wire::LifecycleEvents) -> Option<LifecycleEvent> {
    tokio::time::timeout(Duration::from_secs(2), listener.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn pings_are_answered_with_pongs() {
    let (_client, mut daemon) = pair(false).await;
    let ping = Header::keepalive(KEEPALIVE_PING);
    daemon.send(ping, &[]).await;
    let (header, payload) = daemon.read().await;
    assert_eq!((header.program, header.procedure), (KEEPALIVE_PROGRAM, KEEPALIVE_PONG));
    assert!(payload.is_empty());
}

#[tokio::test]
async fn a_silent_daemon_is_declared_dead_and_calls_fail() {
    let (client, mut daemon) = pair(true).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.capabilities().await });
    // The daemon reads but never answers: after 3 × 50 ms of silence the client gives up.
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            let (header, _) = daemon.read().await;
            if header.program == KEEPALIVE_PROGRAM && header.procedure == KEEPALIVE_PING {
                pings += 1;
            }
            if pings >= 2 {
                return (pings, daemon);
            }
        }
    });
    let err = tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .expect("call hung")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::KeepaliveTimeout(_)), "{err}");
    assert!(client.connection().is_closed());
    let (pings, _daemon) = reader.await.unwrap();
    assert!(pings >= 2, "the client should have pinged before giving up");
    assert!(matches!(client.closed().await, Error::KeepaliveTimeout(_)));
}

#[tokio::test]
async fn a_daemon_that_answers_pings_stays_alive() {
    let (client, mut daemon) = pair(true).await;
    let answering = tokio::spawn(async move {
        loop {
            let (header, _) = daemon.read().await;
            if header.program == KEEPALIVE_PROGRAM && header.procedure == KEEPALIVE_PING {
                daemon
                    .send(
                        Header {
                            procedure: KEEPALIVE_PONG,
                            ..header
                        },
                        &[],
                    )
                    .await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !client.connection().is_closed(),
        "closed although the daemon answered every ping"
    );
    answering.abort();
}

/// A CONNECT_GET_CAPABILITIES call in flight.
fn spawn_capabilities(client: &Client) -> tokio::task::JoinHandle<libvirt_wire::Result<String>> {
    let c = client.clone();
    tokio::spawn(async move { c.capabilities().await })
}

async fn expect_connection_lost(client: &Client) -> Error {
    tokio::time::timeout(Duration::from_secs(2), client.closed())
        .await
        .expect("connection did not close")
}

#[tokio::test]
async fn oversized_length_closes_the_connection_without_allocating() {
    let (client, mut daemon) = pair(false).await;
    let pending = spawn_capabilities(&client);
    daemon.read_call().await;
    daemon.io.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let err = expect_connection_lost(&client).await;
    assert!(err.to_string().contains("exceeds the 16777216-byte limit"), "{err}");
    let call_err = pending.await.unwrap().unwrap_err();
    assert!(call_err.is_connection_lost(), "{call_err}");
}

#[tokio::test]
async fn a_length_shorter_than_a_header_closes_the_connection() {
    let (client, mut daemon) = pair(false).await;
    daemon.io.write_all(&8u32.to_be_bytes()).await.unwrap();
    let err = expect_connection_lost(&client).await;
    assert!(err.to_string().contains("shorter than the 28-byte header"), "{err}");
}

#[tokio::test]
async fn a_truncated_frame_fails_pending_calls_instead_of_hanging() {
    let (client, mut daemon) = pair(false).await;
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    let full = protocol::encode_packet(
        &Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Ok),
        &[0, 0, 0, 9, 1, 2],
    );
    daemon.io.write_all(&full[..full.len() - 3]).await.unwrap();
    drop(daemon);
    let err = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("hung")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("connection ended inside a"), "{err}");
}

#[tokio::test]
async fn garbage_xdr_in_a_reply_fails_that_call_only() {
    let (client, mut daemon) = pair(false).await;
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    // A string that claims 4 GiB.
    daemon.reply(&call, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]).await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::BadReply { procedure: 7, .. }), "{err}");
    // An error reply whose error is garbage.
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    daemon
        .send(
            Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Error),
            &[0, 0],
        )
        .await;
    assert!(matches!(pending.await.unwrap().unwrap_err(), Error::BadReply { .. }));
    // The connection still works.
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    let mut e = Encoder::new();
    e.string("<capabilities/>");
    daemon.reply(&call, &e.into_bytes()).await;
    assert_eq!(pending.await.unwrap().unwrap(), "<capabilities/>");
}

#[tokio::test]
async fn strays_are_ignored_and_the_connection_goes_on() {
    let (client, mut daemon) = pair(false).await;
    // A late reply nobody waits for any more, an event of an unknown procedure,
    // a malformed lifecycle event, a stream packet for no stream, a packet of
    // an unknown program and a call from the server.
    // A reply to a call that gave up waiting (serial 1 was the handshake's).
    daemon
        .send(
            Header::remote(procedure::CONNECT_GET_CAPABILITIES, MessageType::Reply, 1, Status::Ok),
            &[1, 2, 3],
        )
        .await;
    daemon
        .send(Header::remote(4242, MessageType::Message, 0, Status::Ok), &[0; 8])
        .await;
    daemon
        .send(
            Header::remote(
                procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
                MessageType::Message,
                0,
                Status::Ok,
            ),
            &[0xde, 0xad],
        )
        .await;
    daemon
        .send(
            Header::remote(
                procedure::DOMAIN_OPEN_CONSOLE,
                MessageType::Stream,
                555,
                Status::Continue,
            ),
            b"hello",
        )
        .await;
    daemon
        .send(
            Header {
                program: 0x1234_5678,
                ..Header::remote(1, MessageType::Message, 0, Status::Ok)
            },
            &[],
        )
        .await;
    daemon
        .send(Header::remote(1, MessageType::Call, 1, Status::Ok), &[])
        .await;
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get_state(&domain("a", 1)).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &state_reply(1, 1)).await;
    assert_eq!(pending.await.unwrap().unwrap().0, DomainState::Running);
    assert!(!client.connection().is_closed());
}

#[tokio::test]
async fn a_bad_header_type_closes_the_connection() {
    let (client, mut daemon) = pair(false).await;
    let mut packet = protocol::encode_packet(&Header::remote(1, MessageType::Reply, 1, Status::Ok), &[]);
    packet[19] = 77; // type
    daemon.io.write_all(&packet).await.unwrap();
    let err = expect_connection_lost(&client).await;
    assert!(err.to_string().contains("invalid type 77"), "{err}");
}

#[tokio::test]
async fn auth_other_than_none_is_a_clear_error() {
    let (client_io, daemon_io) = tokio::io::duplex(1 << 16);
    let mut daemon = FakeDaemon { io: daemon_io };
    let target = uri::parse("qemu+tcp://node/system").unwrap();
    let daemon_task = tokio::spawn(async move {
        let (call, _) = daemon.read_call().await;
        let mut e = Encoder::new();
        e.u32(1).i32(1); // sasl
        daemon.reply(&call, &e.into_bytes()).await;
        daemon
    });
    let err = Client::open(client_io, &target, options()).await.unwrap_err();
    assert!(
        err.to_string().contains("requires authentication (sasl)") && err.to_string().contains("auth_tcp"),
        "{err}"
    );
    daemon_task.await.unwrap();
}

#[tokio::test]
async fn console_stream_data_finish_and_error() {
    let (client, mut daemon) = pair(false).await;
    let dom = domain("a", 1);
    let c = client.clone();
    let d2 = dom.clone();
    let open = tokio::spawn(async move { c.open_console(&d2, None, 0).await });
    let (call, args) = daemon.read_call().await;
    assert_eq!(call.procedure, procedure::DOMAIN_OPEN_CONSOLE);
    let mut d = Decoder::new(&args);
    assert_eq!(DomainRef::decode(&mut d).unwrap(), dom);
    assert_eq!(d.opt_string("dev").unwrap(), None);
    // Data may arrive before the reply wakes the caller; it must not be lost.
    daemon.reply(&call, &[]).await;
    let data = Header::remote(
        procedure::DOMAIN_OPEN_CONSOLE,
        MessageType::Stream,
        call.serial,
        Status::Continue,
    );
    daemon.send(data, b"boot ").await;
    daemon.send(data, b"log").await;
    let console = open.await.unwrap().unwrap();
    let (mut reader, writer) = console.split();
    assert_eq!(reader.read().await.unwrap().unwrap(), data_of(b"boot "));
    assert_eq!(reader.read().await.unwrap().unwrap(), data_of(b"log"));
    writer.write(b"ls\n").await.unwrap();
    let (header, payload) = daemon.read().await;
    assert_eq!(
        (header.kind, header.status, header.serial),
        (MessageType::Stream, Status::Continue, call.serial)
    );
    assert_eq!(payload, b"ls\n");
    writer.finish().await.unwrap();
    let (header, payload) = daemon.read().await;
    assert_eq!((header.kind, header.status), (MessageType::Stream, Status::Ok));
    assert!(payload.is_empty());
    daemon
        .send(
            Header {
                status: Status::Ok,
                ..data
            },
            &[],
        )
        .await;
    assert_eq!(reader.read().await.unwrap(), None);
    assert_eq!(reader.read().await.unwrap(), None);

    // A second console that the daemon ends with an error.
    let c = client.clone();
    let open = tokio::spawn(async move { c.open_console(&dom, Some("serial0"), 0).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &[]).await;
    let mut console = open.await.unwrap().unwrap();
    let err = LibvirtError {
        code: 1,
        domain: 10,
        level: 2,
        message: "internal error: character device serial0 is not using a PTY".into(),
    };
    daemon
        .send(
            Header::remote(
                procedure::DOMAIN_OPEN_CONSOLE,
                MessageType::Stream,
                call.serial,
                Status::Error,
            ),
            &protocol::encode_error(&err),
        )
        .await;
    assert_eq!(console.read().await.unwrap_err().libvirt(), Some(&err));
}

#[tokio::test]
async fn the_daemon_closing_fails_every_waiter() {
    let (client, mut daemon) = pair(false).await;
    let pending = spawn_capabilities(&client);
    daemon.read_call().await;
    drop(daemon);
    let err = pending.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("libvirtd closed the connection"), "{err}");
    let later = client.lib_version().await.unwrap_err();
    assert!(later.is_connection_lost(), "{later}");
}

/// The console-stream header for `serial`.
fn console_data(serial: u32) -> Header {
    Header::remote(
        procedure::DOMAIN_OPEN_CONSOLE,
        MessageType::Stream,
        serial,
        Status::Continue,
    )
}

async fn open_console(client: &Client, daemon: &mut FakeDaemon) -> (libvirt_wire::Console, u32) {
    let c = client.clone();
    let open = tokio::spawn(async move { c.open_console(&domain("a", 1), None, 0).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &[]).await;
    (open.await.unwrap().unwrap(), call.serial)
}

/// Answers one GET_STATE call while the test checks the connection still works.
async fn state_round_trip(client: &Client, daemon: &mut FakeDaemon) -> libvirt_wire::Result<(DomainState, i32)> {
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get_state(&domain("a", 1)).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &state_reply(1, 1)).await;
    tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the reply never reached its caller: the reader is stalled")
        .unwrap()
}

#[tokio::test]
async fn a_console_nobody_reads_never_stalls_replies_pings_or_events() {
    let (client, mut daemon) = pair(false).await;
    let (mut console, serial) = open_console(&client, &mut daemon).await;
    // 4 MiB of guest output that nobody reads: 64× the stream budget.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..64 {
        daemon.send(console_data(serial), &chunk).await;
    }
    // The connection still hears and answers.
    daemon.send(Header::keepalive(KEEPALIVE_PING), &[]).await;
    let (header, _) = tokio::time::timeout(Duration::from_secs(2), daemon.read())
        .await
        .expect("no PONG: the reader is stalled behind the console");
    assert_eq!((header.program, header.procedure), (KEEPALIVE_PROGRAM, KEEPALIVE_PONG));
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
    // The reader gets what fit in the budget, then how much was dropped, and
    // data sent after the reader caught up again.
    let mut kept = 0;
    let lost = loop {
        match console.read().await.unwrap().unwrap() {
            ConsoleOutput::Data(bytes) => kept += bytes.len(),
            ConsoleOutput::Lost(n) => break n as usize,
        }
    };
    assert!(kept <= 64 * 1024 + chunk.len(), "kept {kept} bytes, over the budget");
    assert_eq!(
        kept + lost,
        64 * chunk.len(),
        "every byte is either kept or counted as lost"
    );
    daemon.send(console_data(serial), b"after").await;
    assert_eq!(console.read().await.unwrap().unwrap(), data_of(b"after"));
}

#[tokio::test]
async fn a_listener_that_falls_behind_is_told_how_many_events_it_missed() {
    let (client, mut daemon) = pair(false).await;
    let dom = domain("a", 1);
    let c = client.clone();
    let registered = dom.clone();
    let task = tokio::spawn(async move { c.lifecycle_events(&registered).await.unwrap() });
    let (call, _) = daemon.read_call().await;
    let mut e = Encoder::new();
    e.i32(1);
    daemon.reply(&call, &e.into_bytes()).await;
    let (call, _) = daemon.read_call().await;
    let mut e = Encoder::new();
    e.i32(7);
    daemon.reply(&call, &e.into_bytes()).await;
    let mut listener = task.await.unwrap();
    let header = Header::remote(
        procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
        MessageType::Message,
        0,
        Status::Ok,
    );
    for detail in 0..20 {
        let message = LifecycleMessage {
            callback_id: 7,
            domain: dom.clone(),
            event: 3,
            detail,
        };
        daemon.send(header, &message.encode()).await;
    }
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
    for detail in 0..8 {
        assert_eq!(next(&mut listener).await, Some(LifecycleEvent::Suspended(detail)));
    }
    assert_eq!(next(&mut listener).await, Some(LifecycleEvent::Missed(12)));
}

#[tokio::test]
async fn an_oversized_stream_packet_ends_that_stream_only() {
    let (client, mut daemon) = pair(false).await;
    let (mut console, serial) = open_console(&client, &mut daemon).await;
    daemon.send(console_data(serial), &vec![0u8; 1024 * 1024]).await;
    let err = console.read().await.unwrap_err();
    assert!(matches!(err, Error::ChunkTooLarge { size: 1_048_576, .. }), "{err}");
    assert!(err.to_string().contains("at most 262120 bytes"), "{err}");
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
}

#[tokio::test]
async fn a_reply_larger_than_its_call_accepts_fails_that_call_only() {
    let (client, mut daemon) = pair(false).await;
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get_state(&domain("a", 1)).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &vec![0u8; 8 * 1024 * 1024]).await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReplyTooLarge {
                size: 8_388_608,
                limit: 65_536,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
    // A document-returning call accepts a large reply.
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    let big = "c".repeat(2 * 1024 * 1024);
    let mut e = Encoder::new();
    e.string(&big);
    daemon.reply(&call, &e.into_bytes()).await;
    assert_eq!(pending.await.unwrap().unwrap().len(), big.len());
}

#[tokio::test]
async fn a_slowly_arriving_packet_keeps_the_connection_alive() {
    // Keepalive: 50 ms × 3. A 256 KiB reply that trickles in over 600 ms, with
    // no PONG, is a daemon that is alive: every byte counts as hearing it.
    let (client, mut daemon) = pair(true).await;
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    let mut e = Encoder::new();
    e.string(&"t".repeat(256 * 1024));
    let packet = protocol::encode_packet(
        &Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Ok),
        &e.into_bytes(),
    );
    let pieces = packet
        .chunks(packet.len() / 12 + 1)
        .map(<[u8]>::to_vec)
        .collect::<Vec<_>>();
    let (mut daemon_read, mut daemon_write) = tokio::io::split(daemon.io);
    let drain = tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while daemon_read.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    for piece in pieces {
        daemon_write.write_all(&piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caps = pending.await.unwrap();
    assert!(caps.is_ok(), "a daemon sending bytes was declared dead: {caps:?}");
    drain.abort();
}

#[tokio::test]
async fn the_keepalive_never_waits_behind_a_blocked_write() {
    // The daemon neither reads nor writes. A console write fills the socket and
    // blocks, holding the writer; the keepalive must still declare the daemon
    // dead after 3 × 50 ms instead of waiting to send its PING.
    let (client_io, daemon_io) = tokio::io::duplex(64 * 1024);
    let mut daemon = FakeDaemon { io: daemon_io };
    let target = uri::parse("qemu:///system").unwrap();
    let (client, ()) = tokio::join!(
        async { Client::open(client_io, &target, options()).await.unwrap() },
        daemon.handshake(true)
    );
    let (console, _) = open_console(&client, &mut daemon).await;
    let writer = tokio::spawn(async move { console.write(&vec![0u8; 1024 * 1024]).await });
    let closed = tokio::time::timeout(Duration::from_secs(2), client.closed())
        .await
        .expect("the keepalive waited behind a blocked write");
    assert!(matches!(closed, Error::KeepaliveTimeout(_)), "{closed}");
    writer.abort();
    drop(daemon);
}

#[tokio::test]
async fn a_reply_to_a_serial_never_called_closes_the_connection_and_says_so() {
    let (client, mut daemon) = pair(false).await;
    let pending = spawn_capabilities(&client);
    let (call, _) = daemon.read_call().await;
    let wrong = Header::remote(call.procedure, MessageType::Reply, call.serial + 1000, Status::Ok);
    daemon.send(wrong, &[]).await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(err.is_connection_lost(), "{err}");
    assert!(
        err.to_string().contains("reply to serial") && err.to_string().contains("no call with that serial"),
        "{err}"
    );
}

#[tokio::test]
async fn a_string_libvirt_would_refuse_is_refused_before_sending() {
    let (client, mut daemon) = pair(false).await;
    let err = client.create_xml(&"x".repeat(5 * 1024 * 1024), 0).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("at most 4194304 bytes"), "{err}");
    // Nothing was sent: the next packet the daemon reads is the next call.
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
}

#[tokio::test]
async fn a_flood_of_empty_stream_packets_is_bounded_like_data() {
    let (client, mut daemon) = pair(false).await;
    let (mut console, serial) = open_console(&client, &mut daemon).await;
    for _ in 0..5000 {
        daemon.send(console_data(serial), &[]).await;
    }
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
    let mut queued = 0;
    while let ConsoleOutput::Data(_) = console.read().await.unwrap().unwrap() {
        queued += 1;
    }
    // 64 KiB of budget at 64 bytes of bookkeeping per packet.
    assert!(queued <= 1025, "{queued} empty packets were queued");
}

/// A file holding `text`, already unlinked.
fn scratch_file(text: &str) -> std::fs::File {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("wire-fake-peer-{}-{text}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

#[tokio::test]
async fn descriptors_follow_their_call_on_a_unix_socket_and_nowhere_else() {
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;
    let (client_io, daemon_io) = tokio::net::UnixStream::pair().unwrap();
    let mut daemon = FakeDaemon { io: daemon_io };
    let target = uri::parse("qemu:///system").unwrap();
    let (client, ()) = tokio::join!(
        async { Client::open_unix(client_io, &target, options()).await.unwrap() },
        daemon.handshake(false)
    );
    let (first, second) = (scratch_file("first"), scratch_file("second"));
    let caller = client.clone();
    let call = tokio::spawn(async move {
        caller
            .fd_associate(&domain("vm", 7), "root", &[first.as_fd(), second.as_fd()], 0)
            .await
    });
    let (header, payload) = daemon.read().await;
    assert_eq!(header.kind, MessageType::CallWithFds);
    assert_eq!(header.procedure, procedure::DOMAIN_FD_ASSOCIATE);
    let mut args = Decoder::new(&payload);
    assert_eq!(args.u32("nfds").unwrap(), 2);
    assert_eq!(DomainRef::decode(&mut args).unwrap(), domain("vm", 7));
    assert_eq!(args.string("name").unwrap(), "root");
    assert_eq!(args.u32("flags").unwrap(), 0);
    args.finish().unwrap();
    // Each descriptor after the message, in order, opening the caller's file.
    for expected in ["first", "second"] {
        let fd = libvirt_wire::fdpass::recv_fd(&daemon.io).await.unwrap();
        let mut file = std::fs::File::from(fd);
        file.rewind().unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, expected);
    }
    daemon.reply(&header, &[]).await;
    call.await.unwrap().unwrap();
    // The next call is an ordinary one again.
    let caller = client.clone();
    let state = tokio::spawn(async move { caller.get_state(&domain("vm", 7)).await });
    let (header, _) = daemon.read_call().await;
    daemon.reply(&header, &state_reply(1, 1)).await;
    assert_eq!(state.await.unwrap().unwrap().0, DomainState::Running);

    // A byte stream (TCP, or this duplex) cannot carry descriptors; an empty
    // group is no group. Neither call reaches the daemon.
    let (plain, _daemon) = pair(false).await;
    let file = scratch_file("plain");
    let e = plain
        .fd_associate(&domain("vm", 7), "root", &[file.as_fd()], 0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidRequest(_)) && e.to_string().contains("unix socket"),
        "{e}"
    );
    let e = client.fd_associate(&domain("vm", 7), "root", &[], 0).await.unwrap_err();
    assert!(e.to_string().contains("no file descriptors"), "{e}");
}

#[tokio::test]
async fn a_screenshot_is_downloaded_and_its_stream_finished() {
    let (client, mut daemon) = pair(false).await;
    let dom = domain("a", 1);
    let c = client.clone();
    let d2 = dom.clone();
    let shot = tokio::spawn(async move { c.screenshot(&d2, 0, 1024).await });
    let (call, args) = daemon.read_call().await;
    assert_eq!(call.procedure, procedure::DOMAIN_SCREENSHOT);
    let mut d = Decoder::new(&args);
    assert_eq!(DomainRef::decode(&mut d).unwrap(), dom);
    assert_eq!((d.u32("screen").unwrap(), d.u32("flags").unwrap()), (0, 0));
    let mut mime = Encoder::new();
    mime.opt_string(Some("image/png"));
    daemon.reply(&call, &mime.into_bytes()).await;
    let data = Header::remote(
        procedure::DOMAIN_SCREENSHOT,
        MessageType::Stream,
        call.serial,
        Status::Continue,
    );
    daemon.send(data, b"\x89PNG").await;
    daemon.send(data, b" pixels").await;
    // The end of the data is an empty CONTINUE; the client finishes, the daemon confirms.
    daemon.send(data, &[]).await;
    let (header, payload) = daemon.read().await;
    assert_eq!(
        (header.kind, header.status, header.serial, payload.len()),
        (MessageType::Stream, Status::Ok, call.serial, 0)
    );
    daemon
        .send(
            Header {
                status: Status::Ok,
                ..data
            },
            &[],
        )
        .await;
    let shot = tokio::time::timeout(Duration::from_secs(2), shot)
        .await
        .expect("the screenshot never finished")
        .unwrap()
        .unwrap();
    assert_eq!(
        (shot.mime.as_str(), shot.data.as_slice()),
        ("image/png", &b"\x89PNG pixels"[..])
    );

    // An image over the limit is refused (and the download aborted), not kept.
    let c = client.clone();
    let shot = tokio::spawn(async move { c.screenshot(&dom, 0, 4).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &[0, 0, 0, 0]).await;
    let data = Header::remote(
        procedure::DOMAIN_SCREENSHOT,
        MessageType::Stream,
        call.serial,
        Status::Continue,
    );
    daemon.send(data, b"too big").await;
    let (header, _) = daemon.read().await;
    assert_eq!((header.kind, header.status), (MessageType::Stream, Status::Error));
    let err = shot.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::ReplyTooLarge { limit: 4, .. }), "{err}");
    // The connection goes on.
    assert_eq!(
        state_round_trip(&client, &mut daemon).await.unwrap().0,
        DomainState::Running
    );
}

#[tokio::test]
async fn a_display_descriptor_comes_back_with_its_reply() {
    use std::io::{Read, Write};
    let (client_io, daemon_io) = tokio::net::UnixStream::pair().unwrap();
    let mut daemon = FakeDaemon { io: daemon_io };
    let target = uri::parse("qemu:///system").unwrap();
    let (client, ()) = tokio::join!(
        async { Client::open_unix(client_io, &target, options()).await.unwrap() },
        daemon.handshake(false)
    );
    let dom = domain("a", 1);
    let reply_with = |call: &Header| Header::remote(call.procedure, MessageType::ReplyWithFds, call.serial, Status::Ok);
    for passed in [1usize, 0] {
        let c = client.clone();
        let d2 = dom.clone();
        let open = tokio::spawn(async move {
            c.open_graphics_fd(&d2, 0, libvirt_wire::flags::OPEN_GRAPHICS_SKIPAUTH)
                .await
        });
        let (call, args) = daemon.read_call().await;
        assert_eq!(call.procedure, procedure::DOMAIN_OPEN_GRAPHICS_FD);
        let mut d = Decoder::new(&args);
        assert_eq!(DomainRef::decode(&mut d).unwrap(), dom);
        assert_eq!((d.u32("idx").unwrap(), d.u32("flags").unwrap()), (0, 1));
        // The count leads the (empty) reply; the descriptor follows it.
        daemon.send(reply_with(&call), &(passed as u32).to_be_bytes()).await;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        if passed == 1 {
            libvirt_wire::fdpass::send_fd(&daemon.io, std::os::fd::AsFd::as_fd(&theirs))
                .await
                .unwrap();
        }
        drop(theirs);
        let result = tokio::time::timeout(Duration::from_secs(2), open)
            .await
            .unwrap()
            .unwrap();
        if passed == 0 {
            assert!(result.unwrap_err().to_string().contains("passed no descriptor back"));
            continue;
        }
        // The same socket: what goes in one end comes out of the other.
        let mut display = std::os::unix::net::UnixStream::from(result.unwrap());
        display.write_all(b"RFB 003.008\n").unwrap();
        let mut got = [0u8; 12];
        (&ours).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"RFB 003.008\n");
    }
    // The stream stayed in step: an ordinary call still works.
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get_state(&domain("a", 1)).await });
    let (call, _) = daemon.read_call().await;
    daemon.reply(&call, &state_reply(1, 1)).await;
    assert_eq!(pending.await.unwrap().unwrap().0, DomainState::Running);
}
