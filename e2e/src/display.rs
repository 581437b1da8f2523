//! A test's VNC viewer: just enough RFB 3.8 (RFC 6143) to shake hands with a
//! VM's display and receive one full framebuffer update, over TCP or over
//! WebSocket as a browser would; and reading the PPM a screenshot is.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// What a viewer learned from the display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstUpdate {
    /// The display's size, from ServerInit.
    pub width: u16,
    pub height: u16,
    /// The desktop name (QEMU: the domain's name).
    pub name: String,
    /// Rectangles in the first FramebufferUpdate.
    pub rectangles: u16,
    /// Pixels (raw encoding, 32 bpp) in it that are not black.
    pub lit_pixels: usize,
}

/// A byte stream to the display: a plain socket, or WebSocket frames.
trait Wire {
    fn send(&mut self, bytes: &[u8]) -> Result<(), String>;
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), String>;
}

impl Wire for TcpStream {
    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.read_exact(buf).map_err(|e| format!("read: {e}"))
    }
}

/// RFB inside WebSocket binary frames (masked from the client, as RFC 6455
/// requires).
struct WebSocket {
    conn: TcpStream,
    pending: Vec<u8>,
}

impl WebSocket {
    fn open(address: SocketAddr) -> Result<WebSocket, String> {
        let mut conn = connect(address)?;
        let request = format!(
            "GET /websockify HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte)
                .map_err(|e| format!("reading the handshake: {e}"))?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101 ") || !head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") {
            return Err(format!("the WebSocket handshake was refused:\n{head}"));
        }
        Ok(WebSocket {
            conn,
            pending: Vec::new(),
        })
    }
}

impl Wire for WebSocket {
    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![0x82];
        match bytes.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(bytes.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.conn.write_all(&frame).map_err(|e| format!("write: {e}"))
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        while self.pending.len() < buf.len() {
            let mut head = [0u8; 2];
            self.conn.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
            if head[1] & 0x80 != 0 {
                return Err("the server masked its frame".into());
            }
            let length = match head[1] & 0x7f {
                126 => {
                    let mut n = [0u8; 2];
                    self.conn.read_exact(&mut n).map_err(|e| format!("read: {e}"))?;
                    u64::from(u16::from_be_bytes(n))
                }
                127 => {
                    let mut n = [0u8; 8];
                    self.conn.read_exact(&mut n).map_err(|e| format!("read: {e}"))?;
                    u64::from_be_bytes(n)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; length as usize];
            self.conn.read_exact(&mut payload).map_err(|e| format!("read: {e}"))?;
            match head[0] & 0x0f {
                0 | 2 => self.pending.extend_from_slice(&payload),
                8 => return Err("the server closed the WebSocket".into()),
                other => return Err(format!("unexpected frame opcode {other}")),
            }
        }
        buf.copy_from_slice(&self.pending[..buf.len()]);
        self.pending.drain(..buf.len());
        Ok(())
    }
}

/// The status line a WebSocket handshake from a page of `origin` gets.
pub fn websocket_status_for_origin(address: SocketAddr, origin: &str) -> Result<String, String> {
    let mut conn = connect(address)?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer
        .lines()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| "no answer".to_owned())
}

fn connect(address: SocketAddr) -> Result<TcpStream, String> {
    let conn = TcpStream::connect_timeout(&address, Duration::from_secs(10)).map_err(|e| format!("{address}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Connects a VNC viewer to `address` (RFB) and takes one full update.
pub fn first_update(address: SocketAddr) -> Result<FirstUpdate, String> {
    view(&mut connect(address)?)
}

/// The same through RFB over WebSocket, as noVNC in a browser.
pub fn first_update_over_websocket(address: SocketAddr) -> Result<FirstUpdate, String> {
    view(&mut WebSocket::open(address)?)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn view(wire: &mut impl Wire) -> Result<FirstUpdate, String> {
    let mut version = [0u8; 12];
    wire.recv_exact(&mut version)?;
    if &version[..4] != b"RFB " {
        return Err(format!("not an RFB server: {:?}", String::from_utf8_lossy(&version)));
    }
    wire.send(b"RFB 003.008\n")?;
    let mut count = [0u8; 1];
    wire.recv_exact(&mut count)?;
    let mut types = vec![0u8; usize::from(count[0])];
    wire.recv_exact(&mut types)?;
    if !types.contains(&1) {
        return Err(format!("the display wants authentication (security types {types:?})"));
    }
    wire.send(&[1])?;
    let mut result = [0u8; 4];
    wire.recv_exact(&mut result)?;
    if u32::from_be_bytes(result) != 0 {
        return Err("security handshake failed".into());
    }
    wire.send(&[1])?; // ClientInit: shared.
    let mut init = [0u8; 24];
    wire.recv_exact(&mut init)?;
    let (width, height) = (u16_at(&init, 0), u16_at(&init, 2));
    let mut name = vec![0u8; u32_at(&init, 20) as usize];
    wire.recv_exact(&mut name)?;
    // SetPixelFormat: 32 bpp, depth 24, little-endian true colour; and only
    // the raw encoding, so the pixels can be counted.
    wire.send(&[0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])?;
    wire.send(&[2, 0, 0, 1, 0, 0, 0, 0])?;
    let mut request = vec![3u8, 0];
    for value in [0u16, 0, width, height] {
        request.extend_from_slice(&value.to_be_bytes());
    }
    wire.send(&request)?;
    // Messages before the update (a colour map, a bell) are not sent for
    // true colour; the first message must be the update.
    let mut head = [0u8; 4];
    wire.recv_exact(&mut head)?;
    if head[0] != 0 {
        return Err(format!("expected a FramebufferUpdate, got message type {}", head[0]));
    }
    let rectangles = u16_at(&head, 2);
    let mut lit_pixels = 0;
    for _ in 0..rectangles {
        let mut rect = [0u8; 12];
        wire.recv_exact(&mut rect)?;
        let (w, h, encoding) = (u16_at(&rect, 4), u16_at(&rect, 6), u32_at(&rect, 8) as i32);
        if encoding != 0 {
            return Err(format!("rectangle in encoding {encoding}, not raw"));
        }
        let mut pixels = vec![0u8; usize::from(w) * usize::from(h) * 4];
        wire.recv_exact(&mut pixels)?;
        lit_pixels += pixels.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    }
    Ok(FirstUpdate {
        width,
        height,
        name: String::from_utf8_lossy(&name).into_owned(),
        rectangles,
        lit_pixels,
    })
}

/// A binary PPM (P6, maxval 255): its size and its RGB bytes.
pub fn read_ppm(data: &[u8]) -> Result<(usize, usize, &[u8]), String> {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while at < data.len() && data[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while at < data.len() && !data[at].is_ascii_whitespace() {
            at += 1;
        }
        if start == at {
            return Err("the PPM header ends early".into());
        }
        fields.push(String::from_utf8_lossy(&data[start..at]).into_owned());
    }
    at += 1;
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(format!("not a P6 PPM with maxval 255: {fields:?}"));
    }
    let (w, h): (usize, usize) = (
        fields[1].parse().map_err(|_| "bad width")?,
        fields[2].parse().map_err(|_| "bad height")?,
    );
    let pixels = data.get(at..at + w * h * 3).ok_or("the PPM's pixels end early")?;
    Ok((w, h, pixels))
}

/// A screenshot as RGB: PNG (what QEMU 7 and later give) or PPM (older).
pub fn decode_screenshot(data: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    if data.starts_with(b"P6") {
        let (w, h, pixels) = read_ppm(data)?;
        return Ok((w, h, pixels.to_vec()));
    }
    let mut decoder = png::Decoder::new(std::io::Cursor::new(data));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| format!("not a PNG or PPM: {e}"))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| format!("PNG: {e}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let rgb = buf[..info.buffer_size()]
        .chunks(channels)
        .flat_map(|p| if channels >= 3 { [p[0], p[1], p[2]] } else { [p[0]; 3] })
        .collect();
    Ok((w, h, rgb))
}

/// How many pixels of rows `rows` of an RGB image `width` wide are not black.
pub fn lit_in_rows(pixels: &[u8], width: usize, rows: std::ops::Range<usize>) -> usize {
    pixels[rows.start * width * 3..rows.end * width * 3]
        .chunks(3)
        .filter(|p| *p != [0, 0, 0])
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ppm_is_read_and_its_lit_rows_counted() {
        let mut ppm = b"P6\n2 2\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let (w, h, pixels) = read_ppm(&ppm).unwrap();
        assert_eq!((w, h), (2, 2));
        assert_eq!(lit_in_rows(pixels, w, 0..1), 1);
        assert_eq!(lit_in_rows(pixels, w, 1..2), 0);
        assert!(read_ppm(b"P3\n2 2\n255\n").is_err());
        assert!(read_ppm(b"P6\n2 2\n255\n\0").is_err());
    }
}
