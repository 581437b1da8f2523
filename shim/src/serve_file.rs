//! `virtkube-shim serve-file PATH`: the import pod of an ImageFile made from
//! a container image. It serves the one file, whole, to whoever asks (the
//! virthost's repository manager, which streams it into a libvirt volume),
//! over plain HTTP/1.0 on [`IMPORT_PORT`]. The pod runs the user's own image
//! with no service account; it can offer only the bytes of its own image.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use virtkube_api::podnet::IMPORT_PORT;

/// Longest a request head may be.
const MAX_HEAD: usize = 8192;

/// Checks the file: it must be a non-empty regular file. Its size.
pub fn check(path: &Path) -> Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() == 0 {
        return Err(format!("{} is empty: a disk image has a size", path.display()));
    }
    Ok(meta.len())
}

/// The reply head for a file of `length` bytes, or a 400 for a request
/// that is not a GET.
pub fn reply_head(request_line: &str, length: u64) -> String {
    if request_line.starts_with("GET ") {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    } else {
        "HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    }
}

/// Serves `path` on `0.0.0.0:port` until the process is ended.
pub fn serve(path: PathBuf, port: u16) -> Result<(), String> {
    let length = check(&path)?;
    // Opened once now, as the pod's user: a file it cannot read ends the
    // pod at once, with the reason, rather than every request.
    std::fs::File::open(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (the import pod runs as an unprivileged user: make the file readable by all)",
            path.display()
        )
    })?;
    // As PID 1, SIGTERM would be ignored without a handler: stop at once,
    // there is nothing to clean up.
    extern "C" fn stop(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGTERM, stop as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("cannot listen on port {port}: {e}"))?;
    eprintln!(
        "virtkube-shim serve-file: serving {} ({length} bytes) on port {port}",
        path.display()
    );
    for connection in listener.incoming() {
        let Ok(connection) = connection else { continue };
        let path = path.clone();
        std::thread::spawn(move || {
            if let Err(e) = answer(connection, &path) {
                eprintln!("virtkube-shim serve-file: {e}");
            }
        });
    }
    Ok(())
}

fn answer(mut connection: TcpStream, path: &Path) -> Result<(), String> {
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_HEAD || connection.read(&mut byte).map_err(|e| e.to_string())? == 0 {
            return Err("a request without a complete head".into());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let length = file.metadata().map_err(|e| e.to_string())?.len();
    let reply = reply_head(text.lines().next().unwrap_or_default(), length);
    connection.write_all(reply.as_bytes()).map_err(|e| e.to_string())?;
    if reply.starts_with("HTTP/1.0 200") {
        let sent = std::io::copy(&mut file, &mut connection).map_err(|e| e.to_string())?;
        eprintln!(
            "virtkube-shim serve-file: sent {sent} bytes to {:?}",
            connection.peer_addr().ok()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_empty_regular_file_is_served() {
        let dir = std::env::temp_dir().join(format!("virtkube-serve-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("root.raw");
        std::fs::write(&file, b"").unwrap();
        assert!(check(&file).unwrap_err().contains("is empty"));
        std::fs::write(&file, b"disk").unwrap();
        assert_eq!(check(&file), Ok(4));
        assert!(check(&dir).unwrap_err().contains("not a regular file"));
        assert!(check(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_get_has_the_length_and_anything_else_a_400() {
        assert!(
            reply_head("GET / HTTP/1.0", 33).contains("200 OK\r\n")
                && reply_head("GET / HTTP/1.0", 33).contains("Content-Length: 33\r\n")
        );
        assert!(reply_head("PUT / HTTP/1.0", 33).starts_with("HTTP/1.0 400"));
    }

    #[test]
    fn the_file_is_served_whole_over_http() {
        let dir = std::env::temp_dir().join(format!("virtkube-serve-file-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("root.raw");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let served = file.clone();
        std::thread::spawn(move || {
            let (connection, _) = listener.accept().unwrap();
            answer(connection, &served).unwrap();
        });
        let mut client = TcpStream::connect(address).unwrap();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(String::from_utf8_lossy(&reply[..split]).contains("Content-Length: 100000"));
        assert_eq!(&reply[split..], &data[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
