//! A scripted libvirtd on a unix socket, for shim tests of peers that
//! misbehave in ways a real daemon cannot be made to: calls it never answers,
//! console floods. It speaks just enough of the protocol for the shim: the
//! handshake, capabilities, DOMAIN_CREATE_XML, event registration, the
//! console, state, shutdown and destroy; it answers keepalive PINGs.
#![allow(clippy::unwrap_used, dead_code)] // test helpers: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libvirt_wire::protocol::{
    self, DomainRef, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, LifecycleMessage, MessageType, Status,
    procedure,
};
use libvirt_wire::xdr::Encoder;

const CAPABILITIES: &str = "<capabilities><host><cpu><arch>x86_64</arch></cpu></host>\
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/></arch></guest></capabilities>";

/// How the fake behaves.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// DOMAIN_GET_STATE is read but never answered.
    pub ignore_get_state: bool,
    /// DOMAIN_DESTROY_FLAGS is read but never answered.
    pub ignore_destroy: bool,
    /// Answering DOMAIN_SHUTDOWN_FLAGS, the guest powers off (a STOPPED
    /// event, detail shutdown, follows the reply).
    pub guest_obeys_shutdown: bool,
    /// Bytes of console output sent as soon as the console is opened.
    pub console_flood: usize,
    /// Size of each console packet of the flood (default 64 KiB; libvirt's
    /// own limit is 262120 bytes, a hostile peer may send up to 16 MiB).
    pub console_chunk: usize,
    /// DOMAIN_CREATE_XML fails with this libvirt error message.
    pub create_error: Option<String>,
    /// A lifecycle event that does not decode follows the event registration.
    pub malformed_event: bool,
}

/// What the fake saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every call's procedure and when it arrived.
    pub calls: Vec<(i32, Instant)>,
    /// PONGs received.
    pub pongs: usize,
}

pub struct FakeLibvirtd {
    pub socket: PathBuf,
    pub seen: Arc<Mutex<Seen>>,
    writer: Arc<Mutex<Option<UnixStream>>>,
}

const DOMAIN_UUID: [u8; 16] = [0x42; 16];

impl FakeLibvirtd {
    pub fn start(dir: &std::path::Path, script: Script) -> FakeLibvirtd {
        let socket = dir.join("fake-libvirt-sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let writer = Arc::new(Mutex::new(None));
        let (seen2, writer2) = (seen.clone(), writer.clone());
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else { return };
            *writer2.lock().unwrap() = Some(stream.try_clone().unwrap());
            serve(stream, &script, &seen2, &writer2);
        });
        FakeLibvirtd { socket, seen, writer }
    }

    pub fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.socket.display())
    }

    /// When the first call of `procedure` arrived, waiting up to `timeout`.
    pub fn wait_call(&self, procedure: i32, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, at)) = self.seen.lock().unwrap().calls.iter().find(|(p, _)| *p == procedure) {
                return Some(*at);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a PING and says whether a PONG came back within `timeout`.
    pub fn ping(&self, timeout: Duration) -> bool {
        let before = self.seen.lock().unwrap().pongs;
        send(&self.writer, Header::keepalive(KEEPALIVE_PING), &[]);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen.lock().unwrap().pongs > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

fn send(writer: &Mutex<Option<UnixStream>>, header: Header, payload: &[u8]) {
    if let Some(stream) = writer.lock().unwrap().as_mut() {
        let _ = stream.write_all(&protocol::encode_packet(&header, payload));
    }
}

fn domain() -> DomainRef {
    DomainRef {
        name: "fake".into(),
        uuid: DOMAIN_UUID,
        id: 1,
    }
}

fn lifecycle(writer: &Mutex<Option<UnixStream>>, event: i32, detail: i32) {
    let message = LifecycleMessage {
        callback_id: 1,
        domain: domain(),
        event,
        detail,
    };
    let header = Header::remote(
        procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
        MessageType::Message,
        0,
        Status::Ok,
    );
    send(writer, header, &message.encode());
}

fn serve(mut stream: UnixStream, script: &Script, seen: &Mutex<Seen>, writer: &Arc<Mutex<Option<UnixStream>>>) {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let (header, _args) = protocol::decode_packet(&body).unwrap();
        if header.program == KEEPALIVE_PROGRAM {
            match header.procedure {
                KEEPALIVE_PING => send(writer, Header::keepalive(KEEPALIVE_PONG), &[]),
                KEEPALIVE_PONG => seen.lock().unwrap().pongs += 1,
                _ => {}
            }
            continue;
        }
        if header.kind != MessageType::Call {
            continue; // console input, stream finish
        }
        seen.lock().unwrap().calls.push((header.procedure, Instant::now()));
        let reply = |payload: &[u8]| {
            send(
                writer,
                Header::remote(header.procedure, MessageType::Reply, header.serial, Status::Ok),
                payload,
            )
        };
        let mut e = Encoder::new();
        match header.procedure {
            procedure::AUTH_LIST => {
                e.u32(1).i32(0);
                reply(&e.into_bytes());
            }
            procedure::CONNECT_SUPPORTS_FEATURE => {
                e.i32(1);
                reply(&e.into_bytes());
            }
            procedure::CONNECT_GET_CAPABILITIES => {
                e.string(CAPABILITIES);
                reply(&e.into_bytes());
            }
            procedure::DOMAIN_CREATE_XML if script.create_error.is_some() => {
                let error = libvirt_wire::LibvirtError {
                    code: 1,
                    domain: 10,
                    level: 2,
                    message: script.create_error.clone().unwrap_or_default(),
                };
                send(
                    writer,
                    Header::remote(header.procedure, MessageType::Reply, header.serial, Status::Error),
                    &protocol::encode_error(&error),
                );
            }
            procedure::DOMAIN_CREATE_XML => {
                domain().encode(&mut e);
                reply(&e.into_bytes());
                lifecycle(writer, 2, 0);
            }
            procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY => {
                e.i32(1);
                reply(&e.into_bytes());
                if script.malformed_event {
                    let header = Header::remote(
                        procedure::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
                        MessageType::Message,
                        0,
                        Status::Ok,
                    );
                    send(writer, header, &[0xde, 0xad]);
                }
            }
            procedure::DOMAIN_OPEN_CONSOLE => {
                reply(&[]);
                let (writer, total, serial) = (writer.clone(), script.console_flood, header.serial);
                let chunk = if script.console_chunk == 0 {
                    64 * 1024
                } else {
                    script.console_chunk
                };
                if total > 0 {
                    std::thread::spawn(move || flood(&writer, serial, total, chunk));
                }
            }
            procedure::DOMAIN_GET_STATE if script.ignore_get_state => {}
            procedure::DOMAIN_GET_STATE => {
                e.i32(1).i32(1);
                reply(&e.into_bytes());
            }
            procedure::DOMAIN_SHUTDOWN_FLAGS => {
                reply(&[]);
                if script.guest_obeys_shutdown {
                    lifecycle(writer, 6, 1);
                    lifecycle(writer, 5, 0);
                }
            }
            procedure::DOMAIN_DESTROY_FLAGS if script.ignore_destroy => {}
            procedure::DOMAIN_DESTROY_FLAGS => {
                reply(&[]);
                lifecycle(writer, 5, 1);
            }
            _ => reply(&[]),
        }
    }
}

/// Writes `total` bytes of console output in libvirt-sized packets; each
/// packet holds the writer only while it is written, so replies and PINGs
/// interleave with the flood as they do from a real daemon.
fn flood(writer: &Mutex<Option<UnixStream>>, serial: u32, total: usize, chunk: usize) {
    let chunk = vec![b'#'; chunk];
    let header = Header::remote(
        procedure::DOMAIN_OPEN_CONSOLE,
        MessageType::Stream,
        serial,
        Status::Continue,
    );
    let mut sent = 0;
    while sent < total {
        send(writer, header, &chunk);
        sent += chunk.len();
    }
}
