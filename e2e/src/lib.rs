//! Helpers for the end-to-end tests in `tests/`, which drive the real images
//! with the `docker` and `kubectl` CLIs, as users do. Prepare the images with
//! `scripts/build-images.sh` and the virthost with `scripts/virthost-up.sh`
//! (scripts/test.sh does both).

pub mod cluster;
pub mod disk_image;
pub mod display;
pub mod probe;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Runs a command to completion, optionally feeding `stdin`; returns whether
/// it succeeded and its stdout followed by its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if let Some(text) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {program}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `virsh` on libvirtd's own socket inside the Docker virthost container
/// `container` (VM containers reach only the gate, which refuses virsh).
pub fn virthost_virsh(container: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["exec", container, "virsh", "-c", "qemu:///system"];
    full.extend_from_slice(args);
    run("/usr/bin/docker", &full, None)
}

/// Whether process `pid` (the node's) runs: it exists and is not a zombie
/// awaiting its reaper.
pub fn process_runs(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// A running command whose stdin we type into and whose stdout we watch
/// (`docker run -i`, `kubectl attach -i`). Killed when dropped.
#[derive(Debug)]
pub struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    seen: String,
}

impl Interactive {
    /// Starts `program args` with piped stdin and stdout (stderr discarded).
    pub fn spawn(program: &str, args: &[&str]) -> Interactive {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let mut stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("{program}: no stdout pipe"));
        let (tx, output) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Interactive {
            stdin: child.stdin.take(),
            child,
            output,
            seen: String::new(),
        }
    }

    /// Types `text`.
    pub fn send(&mut self, text: &str) {
        self.try_send(text).unwrap_or_else(|e| panic!("typing {text:?}: {e}"));
    }

    /// Types `text`, or says why it could not (the command has exited).
    pub fn try_send(&mut self, text: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        stdin.write_all(text.as_bytes())?;
        stdin.flush()
    }

    /// Reads until the output contains `needle`; false after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(bytes) = self.output.recv_timeout(left.min(Duration::from_millis(500))) {
                self.seen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        true
    }

    /// All output read so far.
    pub fn seen(&self) -> &str {
        &self.seen
    }

    /// Closes stdin and waits for the command to exit.
    pub fn wait(mut self) -> ExitStatus {
        self.stdin = None;
        self.child.wait().unwrap_or_else(|e| panic!("waiting: {e}"))
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The median of `samples` in seconds (the mean of the middle two for an even count).
pub fn p50_secs(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    (sorted[(n - 1) / 2] + sorted[n / 2]).as_secs_f64() / 2.0
}

/// The largest of `samples` in seconds.
pub fn max_secs(samples: &[Duration]) -> f64 {
    samples.iter().max().map_or(f64::NAN, Duration::as_secs_f64)
}

/// An HTTP/1.0 GET of `/` at `address` over a new connection: the body,
/// trimmed, or why not.
pub fn http_get(address: std::net::SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut conn =
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map_or(reply.as_str(), |(_, body)| body)
        .trim()
        .to_owned())
}

/// A one-request web server on all of this host's addresses: its port, and
/// a handle that yields the address the request came from once it has
/// answered with `body`.
pub fn serve_once(body: String) -> (u16, std::thread::JoinHandle<std::net::IpAddr>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("a port for the test's web server");
    let port = listener.local_addr().expect("the web server's port").port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("a request to the test's web server");
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request);
        let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let _ = conn.write_all(reply.as_bytes());
        peer.ip()
    });
    (port, server)
}

/// A port on this host leading to `port` on 127.0.0.1 inside a Docker
/// container's network namespace, as `kubectl port-forward` leads into a
/// pod's (socat and nsenter, as dockershim does it). Ends when dropped.
#[derive(Debug)]
pub struct Forward {
    child: Child,
    /// Where to connect.
    pub address: std::net::SocketAddr,
}

impl Forward {
    /// Forwards a free local port to `port` in `container`.
    pub fn into_container(container: &str, port: u16) -> Forward {
        let (ok, pid) = run("/usr/bin/docker", &["inspect", "-f", "{{.State.Pid}}", container], None);
        assert!(ok, "docker inspect {container}: {pid}");
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free local port");
        let address = free.local_addr().expect("its address");
        drop(free);
        let child = Command::new("socat")
            .args([
                &format!("TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork", address.port()),
                &format!("EXEC:nsenter -t {} -n socat STDIO TCP\\:127.0.0.1\\:{port}", pid.trim()),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run socat: {e}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {address}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Forward { child, address }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
