//! Operations on the running VM, asked of PID 1 by a second shim process in
//! the same container: `kubectl exec POD -- /virtkube-shim reboot`. Whoever
//! may exec into the pod (RBAC `pods/exec`) may operate its VM; nobody else
//! reaches the socket, which lives in the container's own file system.
//!
//! PID 1 holds the VM's only libvirt connection (the gate lets no other
//! process touch the domain), so the second process asks it over a unix
//! socket: one request line, one reply line (and, for a screenshot, the
//! image after it).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use libvirt_wire::protocol::procedure;
use libvirt_wire::{Client, DomainRef, flags};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::runtime::log;

/// Where PID 1 listens (`VIRTKUBE_CONTROL_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/virtkube/control.sock";
/// The largest screenshot taken (a 4K screen as PPM is 25 MiB).
pub const MAX_SCREENSHOT: usize = 64 * 1024 * 1024;
/// How long an operation may take before its requester is told it failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request line.
const MAX_REQUEST: u64 = 64;

/// An operation on the running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Ask the guest to reboot (ACPI); the container keeps running.
    Reboot,
    /// Reset the machine at once, as its reset button would.
    Reset,
    /// Ask the guest to shut down (ACPI); when it powers off the container
    /// ends with exit 0, as for any guest poweroff.
    Shutdown,
    /// The display's image (PNG from QEMU 7 on, else PPM), on stdout.
    Screenshot,
}

impl Op {
    /// All of them, as the command line names them.
    pub const ALL: [Op; 4] = [Op::Reboot, Op::Reset, Op::Shutdown, Op::Screenshot];

    /// The command-line (and wire) name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Reboot => "reboot",
            Op::Reset => "reset",
            Op::Shutdown => "shutdown",
            Op::Screenshot => "screenshot",
        }
    }

    /// The operation named `name`.
    pub fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// PID 1's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done; what happened, for a person.
    Done(String),
    /// An image of this MIME type and length follows the line.
    Image { mime: String, length: usize },
    /// Not done; why, and what to do.
    Failed(String),
}

impl Reply {
    /// The reply line, newline included.
    pub fn line(&self) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Reply::Done(what) => format!("ok {}\n", one_line(what)),
            Reply::Image { mime, length } => format!("image {} {length}\n", one_line(mime).replace(' ', "_")),
            Reply::Failed(why) => format!("error {}\n", one_line(why)),
        }
    }

    /// Parses a reply line (without its newline).
    pub fn parse(line: &str) -> Result<Reply, String> {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "ok" => Ok(Reply::Done(rest.to_owned())),
            "error" => Ok(Reply::Failed(rest.to_owned())),
            "image" => {
                let (mime, length) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("image reply {line:?} has no length"))?;
                let length = length
                    .parse::<usize>()
                    .ok()
                    .filter(|l| *l <= MAX_SCREENSHOT)
                    .ok_or_else(|| format!("image reply {line:?} has no valid length"))?;
                Ok(Reply::Image {
                    mime: mime.to_owned(),
                    length,
                })
            }
            _ => Err(format!(
                "PID 1 answered {line:?}, which this shim does not understand (another version?)"
            )),
        }
    }
}

/// Binds the control socket: its directory made if missing (0700) and the
/// socket itself 0600, so only the container's user reaches it. A socket
/// left by an earlier run of the container is replaced.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves operation requests until the task is dropped. `current` is the
/// connection to libvirtd (none while the shim reconnects).
pub async fn serve(listener: UnixListener, domain: DomainRef, current: watch::Receiver<Option<Client>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log(format!("an operation request could not be accepted: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (domain, current) = (domain.clone(), current.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &domain, &current).await {
                log(format!("an operation request failed: {e}"));
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    domain: &DomainRef,
    current: &watch::Receiver<Option<Client>>,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut limited = BufReader::new(reader).take(MAX_REQUEST);
    if tokio::time::timeout(Duration::from_secs(5), limited.read_line(&mut line))
        .await
        .is_err()
    {
        return Ok(());
    }
    let name = line.trim();
    let Some(op) = Op::parse(name) else {
        let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        let why = format!("unknown operation {name:?}; one of: {}", names.join(", "));
        return writer.write_all(Reply::Failed(why).line().as_bytes()).await;
    };
    let client = current.borrow().clone();
    let Some(client) = client else {
        let why = "the shim is reconnecting to libvirtd (the virthost is restarting); the VM runs on: try again in a few seconds";
        return writer.write_all(Reply::Failed(why.into()).line().as_bytes()).await;
    };
    log(format!("operation {}: requested in the container", op.name()));
    match tokio::time::timeout(OPERATION_TIMEOUT, perform(&client, domain, op)).await {
        Ok(Ok(Performed::Done(what))) => {
            log(format!("operation {}: {what}", op.name()));
            writer.write_all(Reply::Done(what).line().as_bytes()).await
        }
        Ok(Ok(Performed::Image(shot))) => {
            log(format!(
                "operation {}: {} bytes of {}",
                op.name(),
                shot.data.len(),
                shot.mime
            ));
            let head = Reply::Image {
                mime: shot.mime,
                length: shot.data.len(),
            };
            // A requester that stops reading does not hold the image for long.
            let send = async {
                writer.write_all(head.line().as_bytes()).await?;
                writer.write_all(&shot.data).await
            };
            tokio::time::timeout(OPERATION_TIMEOUT, send)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        }
        Ok(Err(why)) => {
            log(format!("operation {} failed: {why}", op.name()));
            writer.write_all(Reply::Failed(why).line().as_bytes()).await
        }
        Err(_) => {
            let why = format!("libvirtd did not answer within {} s", OPERATION_TIMEOUT.as_secs());
            log(format!("operation {} failed: {why}", op.name()));
            writer.write_all(Reply::Failed(why).line().as_bytes()).await
        }
    }
}

enum Performed {
    Done(String),
    Image(libvirt_wire::Screenshot),
}

async fn perform(client: &Client, domain: &DomainRef, op: Op) -> Result<Performed, String> {
    let failed = |call: i32| move |e: libvirt_wire::Error| format!("{} (procedure {call})", e);
    match op {
        Op::Reboot => client
            .reboot(domain, flags::REBOOT_ACPI_POWER_BTN)
            .await
            .map(|()| Performed::Done("the guest was asked to reboot (ACPI)".into()))
            .map_err(failed(procedure::DOMAIN_REBOOT)),
        Op::Reset => client
            .reset(domain, 0)
            .await
            .map(|()| Performed::Done("the machine was reset".into()))
            .map_err(failed(procedure::DOMAIN_RESET)),
        Op::Shutdown => client
            .shutdown(domain, flags::SHUTDOWN_ACPI_POWER_BTN)
            .await
            .map(|()| {
                Performed::Done("the guest was asked to shut down (ACPI); the container ends when it powers off".into())
            })
            .map_err(failed(procedure::DOMAIN_SHUTDOWN_FLAGS)),
        Op::Screenshot => client
            .screenshot(domain, 0, MAX_SCREENSHOT)
            .await
            .map(Performed::Image)
            .map_err(|e| match &e {
                libvirt_wire::Error::Libvirt(inner)
                    if inner.message.contains("graphics") || inner.message.contains("screen") =>
                {
                    format!("{e}; a screenshot needs a display: give the template graphics: {{type: vnc}}")
                }
                _ => failed(procedure::DOMAIN_SCREENSHOT)(e),
            }),
    }
}

/// The second process: asks PID 1 for `op` and prints its answer (an
/// image goes to `out`). Returns the text to print on success.
pub async fn request(socket: &Path, op: Op, out: &mut impl Write) -> Result<String, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the VM's shim at {} ({e}): run this in a running VM container (kubectl exec POD -- /virtkube-shim {})",
            socket.display(),
            op.name()
        )
    })?;
    let (reader, mut writer) = stream.into_split();
    writer
        .write_all(format!("{}\n", op.name()).as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    let wait = OPERATION_TIMEOUT + Duration::from_secs(5);
    let mut limited = (&mut reader).take(1024);
    match tokio::time::timeout(wait, limited.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => return Err("the shim closed the connection without answering".into()),
        Ok(Err(e)) => return Err(format!("cannot read the answer: {e}")),
        Err(_) => return Err(format!("no answer within {} s", wait.as_secs())),
    }
    match Reply::parse(line.trim_end_matches('\n'))? {
        Reply::Done(what) => Ok(what),
        Reply::Failed(why) => Err(why),
        Reply::Image { mime, length } => {
            let mut image = vec![0u8; length];
            reader
                .read_exact(&mut image)
                .await
                .map_err(|e| format!("the image ended early: {e}"))?;
            out.write_all(&image)
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the image: {e}"))?;
            Ok(format!("{length} bytes of {mime}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_named_as_on_the_command_line() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(op));
        }
        assert_eq!(Op::parse("pause"), None);
        assert_eq!(Op::parse("Reboot"), None);
    }

    #[test]
    fn replies_survive_the_line_and_refuse_nonsense() {
        for reply in [
            Reply::Done("the machine was reset".into()),
            Reply::Failed("no display".into()),
            Reply::Image {
                mime: "image/x-portable-pixmap".into(),
                length: 921_615,
            },
        ] {
            let line = reply.line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
            assert_eq!(Reply::parse(line.trim_end()), Ok(reply));
        }
        // A reason with newlines stays one line.
        assert_eq!(Reply::Failed("a\nb".into()).line(), "error a b\n");
        for bad in ["", "maybe", "image x", "image x y", "image x 999999999999"] {
            assert!(Reply::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_socket_is_the_containers_users_only_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("virtkube-control-{}", std::process::id()));
        let path = dir.join("sub").join("control.sock");
        let first = bind(&path).unwrap();
        drop(first);
        // The file of the first run is still there: bound again over it.
        let _second = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_a_shim_the_requester_is_told_where_to_run_it() {
        let missing = std::env::temp_dir().join("virtkube-no-such-control.sock");
        let why = request(&missing, Op::Reboot, &mut Vec::new()).await.unwrap_err();
        assert!(why.contains("kubectl exec POD -- /virtkube-shim reboot"), "{why}");
    }
}
