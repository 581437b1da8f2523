//! The VM's display, served inside its pod: QEMU listens nowhere; for each
//! viewer the shim asks libvirt for a connection to the display
//! (DOMAIN_OPEN_GRAPHICS_FD, whose socket comes back over the gate's unix
//! socket) and joins the two. On 127.0.0.1 only, so a viewer comes through
//! `kubectl port-forward` (RBAC `pods/portforward`), never over the pod
//! network: RFB on [`VNC_PORT`] for any VNC viewer, RFB over WebSocket on
//! [`VNC_WEBSOCKET_PORT`] for a browser (noVNC).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use libvirt_wire::{Client, DomainRef, flags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Semaphore, watch};
pub use virtkube_api::podnet::{VNC_PORT, VNC_WEBSOCKET_PORT};

use crate::runtime::log;
use crate::websocket::{self, Opcode};

/// Viewers served at once (each holds a connection into QEMU).
pub const MAX_VIEWERS: usize = 4;
/// How long a viewer may take to send its WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long libvirt may take to open the display.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a viewer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Rfb,
    WebSocket,
}

/// Listens on both ports (on `address`, 127.0.0.1 in a pod) and serves
/// viewers until the task is dropped. A port that cannot be bound is
/// reported and left out; the VM runs on.
pub async fn serve(address: Ipv4Addr, domain: DomainRef, current: watch::Receiver<Option<Client>>) {
    let viewers = Arc::new(Semaphore::new(MAX_VIEWERS));
    let mut servers = tokio::task::JoinSet::new();
    for (port, flavour) in [(VNC_PORT, Flavour::Rfb), (VNC_WEBSOCKET_PORT, Flavour::WebSocket)] {
        let at = SocketAddr::from((address, port));
        match TcpListener::bind(at).await {
            Ok(listener) => {
                servers.spawn(accept(
                    listener,
                    flavour,
                    domain.clone(),
                    current.clone(),
                    viewers.clone(),
                ));
            }
            Err(e) => log(format!("the display is not served on {at}: {e}")),
        }
    }
    if !servers.is_empty() {
        log(format!(
            "display: VNC on {address}:{VNC_PORT}, WebSocket on {address}:{VNC_WEBSOCKET_PORT} (kubectl port-forward pod/NAME {VNC_PORT} {VNC_WEBSOCKET_PORT})"
        ));
    }
    while servers.join_next().await.is_some() {}
}

async fn accept(
    listener: TcpListener,
    flavour: Flavour,
    domain: DomainRef,
    current: watch::Receiver<Option<Client>>,
    viewers: Arc<Semaphore>,
) {
    loop {
        let (mut viewer, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: not a loop that starves the VM's console.
                log(format!("display: cannot accept a viewer: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = viewers.clone().try_acquire_owned() else {
            log(format!(
                "display: refused a viewer from {from}: {MAX_VIEWERS} are connected already"
            ));
            if flavour == Flavour::WebSocket {
                let _ = viewer
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
            continue;
        };
        let (domain, current) = (domain.clone(), current.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = viewer.set_nodelay(true);
            let result = match flavour {
                Flavour::Rfb => serve_rfb(viewer, &domain, &current).await,
                Flavour::WebSocket => serve_websocket(viewer, &domain, &current).await,
            };
            match result {
                Ok(()) => log(format!("display: viewer {from} left")),
                Err(why) => log(format!("display: viewer {from}: {why}")),
            }
        });
    }
}

/// A new connection into QEMU's display, opened by libvirt.
async fn open_display(domain: &DomainRef, current: &watch::Receiver<Option<Client>>) -> Result<UnixStream, String> {
    let client = current.borrow().clone().ok_or_else(|| {
        "the shim is reconnecting to libvirtd (the virthost is restarting); connect again in a few seconds".to_owned()
    })?;
    let fd: OwnedFd = tokio::time::timeout(
        OPEN_TIMEOUT,
        client.open_graphics_fd(domain, 0, flags::OPEN_GRAPHICS_SKIPAUTH),
    )
    .await
    .map_err(|_| format!("libvirtd did not open the display within {} s", OPEN_TIMEOUT.as_secs()))?
    .map_err(|e| format!("libvirtd could not open the display: {e}"))?;
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(stream))
        .map_err(|e| format!("the display's socket cannot be used: {e}"))
}

async fn serve_rfb(
    mut viewer: TcpStream,
    domain: &DomainRef,
    current: &watch::Receiver<Option<Client>>,
) -> Result<(), String> {
    let mut display = open_display(domain, current).await?;
    log("display: a VNC viewer connected");
    tokio::io::copy_bidirectional(&mut viewer, &mut display)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn serve_websocket(
    mut viewer: TcpStream,
    domain: &DomainRef,
    current: &watch::Receiver<Option<Client>>,
) -> Result<(), String> {
    // The handshake: the request head, then the answer.
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            if let Some(length) = websocket::head_length(&buf) {
                return Ok(length);
            }
            if buf.len() >= websocket::MAX_REQUEST_HEAD {
                return Err("a request head over 8 KiB".to_owned());
            }
            let mut chunk = [0u8; 1024];
            match viewer.read(&mut chunk).await {
                Ok(0) => return Err("the viewer left before its handshake".to_owned()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no WebSocket handshake within 10 s".to_owned())??;
    let upgrade = match websocket::parse_upgrade(&buf[..head]) {
        Ok(upgrade) => upgrade,
        Err(why) => {
            let _ = viewer.write_all(websocket::refusal(&why).as_bytes()).await;
            return Err(why.to_string());
        }
    };
    let display = match open_display(domain, current).await {
        Ok(display) => display,
        Err(why) => {
            let answer = websocket::http_answer("503 Service Unavailable", &why);
            let _ = viewer.write_all(answer.as_bytes()).await;
            return Err(why);
        }
    };
    viewer
        .write_all(websocket::accept_response(&upgrade).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    log("display: a WebSocket viewer connected");
    buf.drain(..head);
    pump_websocket(viewer, display, buf).await
}

/// Joins a WebSocket viewer and the display until either ends. `pending`
/// holds viewer bytes read past the handshake.
async fn pump_websocket(viewer: TcpStream, display: UnixStream, mut pending: Vec<u8>) -> Result<(), String> {
    let (mut from_viewer, to_viewer) = viewer.into_split();
    let (mut from_display, mut to_display) = display.into_split();
    let to_viewer = Arc::new(tokio::sync::Mutex::new(to_viewer));
    let writer = to_viewer.clone();
    // Display → viewer: each read becomes one binary frame.
    let mut downstream = tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match from_display.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let frame = websocket::encode_frame(Opcode::Binary, &chunk[..n]);
            if writer.lock().await.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = writer
            .lock()
            .await
            .write_all(&websocket::encode_frame(Opcode::Close, &1000u16.to_be_bytes()))
            .await;
    });
    // Viewer → display: frames unmasked; data goes on, pings are answered.
    let upstream = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some((frame, used)) = websocket::decode_client_frame(&pending).map_err(|e| e.to_string())? {
                pending.drain(..used);
                match frame.opcode {
                    Opcode::Binary | Opcode::Continuation => {
                        to_display.write_all(&frame.payload).await.map_err(|e| e.to_string())?;
                    }
                    Opcode::Text => return Err("a text frame: RFB over WebSocket is binary".to_owned()),
                    Opcode::Ping => {
                        let pong = websocket::encode_frame(Opcode::Pong, &frame.payload);
                        to_viewer
                            .lock()
                            .await
                            .write_all(&pong)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Opcode::Pong => {}
                    Opcode::Close => {
                        let close =
                            websocket::encode_frame(Opcode::Close, &frame.payload[..frame.payload.len().min(2)]);
                        let _ = to_viewer.lock().await.write_all(&close).await;
                        return Ok(());
                    }
                }
            }
            match from_viewer.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let result = tokio::select! {
        result = upstream => result,
        _ = &mut downstream => Ok(()),
    };
    downstream.abort();
    result
}
