//! The gate's I/O: accept a VM container on the socket it mounts, learn who
//! it is from the kernel, open a connection of its own to libvirtd for it,
//! and relay: every call from the container is checked (the allow-list, the
//! domain XML, the domain it names) before it reaches libvirtd; a refused one
//! gets libvirt's own "access denied" error with the reason, and one log line.
//! Replies, events and console data from libvirtd pass back unchanged.
//!
//! A VM lives as long as the process that created it (the container's shim),
//! not as long as a connection: the gate creates the domain paused and
//! without AUTODESTROY, places QEMU in the caller's cgroups, hands the domain
//! to the [`Keeper`], and only then lets it run. So libvirtd and the gate may
//! restart under running VMs; the shim reconnects and finds its domain again
//! by UUID (allowed only to the same process).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use libvirt_wire::LibvirtError;
use libvirt_wire::protocol::{
    self, DomainRef, HEADER_SIZE, Header, KEEPALIVE_PROGRAM, LEN_SIZE, MessageType, REMOTE_PROGRAM, Status, procedure,
};
use libvirt_wire::xdr::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::identity::{self, Identity};
use crate::keeper::{Keeper, Owner};
use crate::placement;
use crate::pods::UnknownAddress;
use crate::policy::{self, Admitted, Denied, Policy, RealPaths};
use crate::sizing;

/// The default of [`Gate::max_connections_per_caller`].
pub const DEFAULT_MAX_CONNECTIONS_PER_CALLER: usize = 4;

/// libvirt's `VIR_ERR_ACCESS_DENIED`.
pub const ERR_ACCESS_DENIED: i32 = 88;
/// libvirt's `VIR_FROM_ACCESS`.
pub const FROM_ACCESS: i32 = 55;
use libvirt_wire::flags::{
    DEFINE_VALIDATE, OPEN_GRAPHICS_SKIPAUTH, REBOOT_ACPI_POWER_BTN as REBOOT_ACPI, START_AUTODESTROY, START_PAUSED,
    START_VALIDATE,
};

/// The largest packet a VM container may send: a domain XML (libvirt takes
/// at most 4 MiB in one string) and its header. Larger is not a shim.
pub const MAX_CLIENT_PACKET: usize = 4 * 1024 * 1024 + 1024;
/// How long an unidentified caller may take to send its first call.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);

/// The gate's settings and its shared state.
#[derive(Debug)]
pub struct Gate {
    /// libvirtd's own socket (never mounted in VM containers).
    pub libvirtd: PathBuf,
    /// Where processes are read (`/proc`; the host's, with hostPID).
    pub proc_root: PathBuf,
    /// What VM containers may do.
    pub policy: Policy,
    /// The cgroup the kubelet's `kubepods` cgroup is under (its `--cgroup-root`).
    pub kubepods_parent: String,
    /// Most connections one caller may hold at once (each costs a libvirtd
    /// connection; the shim needs one).
    pub max_connections_per_caller: usize,
    /// Connections held now, per caller.
    pub connections: Connections,
    /// Where libvirtd's QEMU driver writes `<domain>.pid` files.
    pub qemu_run_dir: PathBuf,
    /// Whether QEMU is moved into its caller's cgroups.
    pub place_qemu: bool,
    /// Where the gate's own mounts are read (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// QEMU's memory beyond the guest's, in bytes: the cgroup QEMU joins
    /// must allow the guest's memory plus this.
    pub qemu_overhead: u64,
    /// The ImageFiles VM pods may use, once the gate reads them from the
    /// Kubernetes API; without them every ImageFile disk is refused.
    pub volumes: std::sync::OnceLock<Arc<dyn policy::Volumes + Send + Sync>>,
    keeper: std::sync::OnceLock<Arc<Keeper>>,
}

impl Gate {
    /// The register of domains and their owners (made on first use, from
    /// the settings then).
    pub fn keeper(&self) -> Arc<Keeper> {
        self.keeper
            .get_or_init(|| {
                Arc::new(Keeper::new(
                    &self.libvirtd,
                    self.proc_root.clone(),
                    self.qemu_run_dir.clone(),
                ))
            })
            .clone()
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            libvirtd: PathBuf::from("/var/run/libvirt/libvirt-sock"),
            proc_root: PathBuf::from("/proc"),
            policy: Policy::default(),
            kubepods_parent: "/".into(),
            max_connections_per_caller: DEFAULT_MAX_CONNECTIONS_PER_CALLER,
            connections: Connections::default(),
            qemu_run_dir: PathBuf::from("/run/libvirt/qemu"),
            place_qemu: true,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            qemu_overhead: crate::sizing::DEFAULT_QEMU_OVERHEAD,
            volumes: std::sync::OnceLock::new(),
            keeper: std::sync::OnceLock::new(),
        }
    }
}

/// How many connections each caller holds.
#[derive(Debug, Default)]
pub struct Connections(std::sync::Mutex<std::collections::HashMap<Identity, usize>>);

/// One held connection; released when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    connections: &'a Connections,
    who: Identity,
}

impl Connections {
    /// Takes one of `who`'s at most `max` connections, or says why not.
    pub fn hold(&self, who: &Identity, max: usize) -> Result<Held<'_>, String> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(who.clone()).or_insert(0);
        if *count >= max {
            return Err(format!(
                "{who} already holds {count} connections to the gate (at most {max}); a VM container needs one"
            ));
        }
        *count += 1;
        Ok(Held {
            connections: self,
            who: who.clone(),
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut counts = self.connections.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.who) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.who);
            }
        }
    }
}

/// Accepts VM containers on the socket they mount, for ever.
pub async fn serve(listener: UnixListener, gate: Arc<Gate>) -> std::io::Result<()> {
    tokio::spawn(gate.keeper().run());
    let mut backoff = Backoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted(listener.accept().await).await else {
            continue;
        };
        let accepted = identity::now_ticks();
        let gate = gate.clone();
        tokio::spawn(async move { client(stream, accepted, &gate).await });
    }
}

/// Accepts VM pods over TCP (those that cannot mount the socket), for ever:
/// each is known by its source address, the pod IP (see [`crate::pods`]).
pub async fn serve_tcp(listener: TcpListener, gate: Arc<Gate>, pods: Arc<NodePods>) -> std::io::Result<()> {
    let mut backoff = Backoff::default();
    loop {
        let Some((stream, peer)) = backoff.accepted(listener.accept().await).await else {
            continue;
        };
        // Callers still being identified are capped: each may wait up to
        // TCP_IDENTIFY_WAIT, and anyone who reaches the port can open them.
        let Ok(identifying) = pods.identifying.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many TCP callers being identified; dropped");
            continue;
        };
        let (gate, pods) = (gate.clone(), pods.clone());
        tokio::spawn(async move { tcp_client(stream, peer, identifying, &gate, &pods).await });
    }
}

/// Running out of descriptors (a container holding many connections) must
/// not end the gate, and with it every VM's connection: accept errors are
/// retried, slower and slower up to a second.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(10))
    }
}

impl Backoff {
    async fn accepted<T>(&mut self, result: std::io::Result<T>) -> Option<T> {
        match result {
            Ok(accepted) => {
                *self = Backoff::default();
                Some(accepted)
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in {:?}", self.0);
                tokio::time::sleep(self.0).await;
                self.0 = (self.0 * 2).min(Duration::from_secs(1));
                None
            }
        }
    }
}

/// This node's pods, as the gate's reflector sees them.
#[derive(Debug)]
pub struct NodePods {
    /// The node the gate serves.
    pub node: String,
    /// The reflector's store of the node's pods.
    pub store: Store<Pod>,
    /// Permits for TCP callers still being identified.
    pub identifying: Arc<tokio::sync::Semaphore>,
}

/// The most TCP callers being identified at once; more are dropped unanswered.
pub const MAX_TCP_IDENTIFYING: usize = 64;

impl NodePods {
    /// The pods of `node` from `store`.
    pub fn new(node: String, store: Store<Pod>) -> NodePods {
        NodePods {
            node,
            store,
            identifying: Arc::new(tokio::sync::Semaphore::new(MAX_TCP_IDENTIFYING)),
        }
    }
}

/// How long the gate waits for a TCP caller's address to appear among its
/// node's pods: the kubelet may start the container before the API has
/// its pod IP, and the watch lags the API.
const TCP_IDENTIFY_WAIT: Duration = Duration::from_secs(10);
/// How often a TCP caller's pod is checked while connected.
const TCP_LIVENESS_PERIOD: Duration = Duration::from_secs(1);

/// The UID of the pod whose address `ip` is.
async fn tcp_identity(pods: &NodePods, ip: std::net::IpAddr) -> Result<String, UnknownAddress> {
    let deadline = tokio::time::Instant::now() + TCP_IDENTIFY_WAIT;
    if tokio::time::timeout(TCP_IDENTIFY_WAIT, pods.store.wait_until_ready())
        .await
        .is_err()
    {
        return Err(UnknownAddress::NotSynced {
            node: pods.node.clone(),
            why: "its watch has not listed them yet".into(),
        });
    }
    loop {
        match crate::pods::identify(&pods.store.state(), ip, &pods.node) {
            Err(why) if why.may_resolve() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            result => return result,
        }
    }
}

async fn tcp_client(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    identifying: tokio::sync::OwnedSemaphorePermit,
    gate: &Gate,
    pods: &NodePods,
) {
    let ip = peer.ip().to_canonical();
    let who = match tcp_identity(pods, ip).await {
        Ok(uid) => uid,
        Err(why) => {
            let why = why.to_string();
            tracing::warn!(%ip, %why, "refused an unidentified TCP caller");
            refuse_connection(stream, &why).await;
            return;
        }
    };
    // The address names a pod; the connection must also come from that
    // pod's network namespace, not from someone sending with its address.
    let origin = match stream.local_addr() {
        Ok(local) => {
            let (proc_root, parent, uid) = (gate.proc_root.clone(), gate.kubepods_parent.clone(), who.clone());
            let remote = std::net::SocketAddr::new(ip, peer.port());
            tokio::task::spawn_blocking(move || connection_is_from_pod(&proc_root, &parent, &uid, remote, local))
                .await
                .unwrap_or_else(|e| Err(format!("the check failed: {e}")))
        }
        Err(e) => Err(format!("the gate cannot read its own address: {e}")),
    };
    let caller = match origin {
        Ok(caller) => caller,
        Err(why) => {
            tracing::warn!(%ip, uid = %who, %why, "refused a TCP caller");
            refuse_connection(stream, &why).await;
            return;
        }
    };
    drop(identifying);
    // Its pod gone from the API (or ended, or past its deletion deadline) ends
    // the connection, even if no FIN ever arrives from a torn-down network
    // namespace. (The VM ends with its owner, the process holding it.)
    let uid = who.clone();
    let gone = async move {
        loop {
            tokio::time::sleep(TCP_LIVENESS_PERIOD).await;
            if !crate::pods::still_holds(&pods.store.state(), &uid, ip, k8s_openapi::jiff::Timestamp::now()) {
                tracing::info!(%uid, %ip, "the pod has gone: closing its connection");
                return;
            }
        }
    };
    let who = Identity::Pod { uid: who };
    tracing::info!(%who, %ip, pid = caller.pid, "identified a TCP caller by its pod IP and network namespace");
    connect_and_relay(stream, who, caller, gate, gone).await;
}

/// The process of pod `uid` (found by its cgroup, as for socket callers)
/// that holds the connection `remote` → `local`, established in the pod's
/// network namespace. Blocking: it reads /proc.
fn connection_is_from_pod(
    proc_root: &std::path::Path,
    kubepods_parent: &str,
    uid: &str,
    remote: std::net::SocketAddr,
    local: std::net::SocketAddr,
) -> Result<CallerProcess, String> {
    let entries = std::fs::read_dir(proc_root).map_err(|e| format!("cannot read {}: {e}", proc_root.display()))?;
    let own = Identity::Pod { uid: uid.to_owned() };
    let members: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
                .ok()
                .and_then(|text| identity::from_cgroup_under(*pid, &text, kubepods_parent).ok())
                .as_ref()
                == Some(&own)
        })
        .collect();
    let Some(member) = members.first() else {
        return Err(format!(
            "no process of pod {uid} is visible to the gate, so it cannot check where the connection comes from"
        ));
    };
    let inode = ["net/tcp", "net/tcp6"]
        .iter()
        .find_map(|table| {
            std::fs::read_to_string(proc_root.join(member.to_string()).join(table))
                .ok()
                .and_then(|text| crate::pods::netns_connection_inode(&text, remote, local))
        })
        .ok_or_else(|| {
            format!("the connection from {remote} is not in the network namespace of pod {uid}, whose address it uses")
        })?;
    // The VM lives as long as the process holding the connection.
    let socket = format!("socket:[{inode}]");
    members
        .iter()
        .find(|pid| {
            std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")).is_ok_and(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|target| target.as_os_str() == socket.as_str())
            })
        })
        .and_then(|pid| CallerProcess::read(proc_root, *pid))
        .ok_or_else(|| format!("no process of pod {uid} holds the connection from {remote}"))
}

/// The process on the other end of a connection: the owner of the domain it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerProcess {
    /// Its PID (the host's).
    pub pid: i32,
    /// Its start time (clock ticks since boot).
    pub start_ticks: u64,
}

impl CallerProcess {
    /// Process `pid` as `proc_root` shows it now.
    pub fn read(proc_root: &std::path::Path, pid: i32) -> Option<CallerProcess> {
        let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
        Some(CallerProcess {
            pid,
            start_ticks: identity::start_ticks(&stat)?,
        })
    }

    /// The owner record of a domain this process creates as `who`.
    pub fn owner(&self, who: &Identity) -> Owner {
        Owner {
            pid: self.pid,
            start_ticks: self.start_ticks,
            caller: who.to_string(),
            reattached: 0,
        }
    }

    fn owns(&self, owner: &Owner) -> bool {
        owner.pid == self.pid && owner.start_ticks == self.start_ticks
    }
}

async fn client(stream: UnixStream, accepted_ticks: u64, gate: &Gate) {
    use std::os::fd::AsFd;
    // The pidfd pins the process that connected: if it has exited (and its
    // PID may have been reused) by the time its cgroup is read, it is refused.
    let pidfd = identity::peer_pidfd(stream.as_fd());
    let who = match stream.peer_cred() {
        Ok(cred) => match cred.pid() {
            // The kernel reports 0 for a process outside the gate's PID namespace.
            Some(0) | None => Err(
                "the caller's process is invisible to the gate: the virthost must run in the host's PID namespace (hostPID: true, or docker run --pid=host)"
                    .to_owned(),
            ),
            Some(pid) => identity::of_process(&gate.proc_root, pid, accepted_ticks, &gate.kubepods_parent)
                .and_then(|who| match &pidfd {
                    Some(pidfd) if !identity::pidfd_is(pidfd, pid) => Err(identity::Unidentified::PidReused { pid }),
                    _ => Ok(who),
                })
                .map_err(|e| e.to_string()),
        },
        Err(e) => Err(format!("cannot read the caller's credentials: {e}")),
    };
    // The owner-to-be, read with the same checks as the identity: started
    // before the connection was accepted, and still the pidfd's process.
    let who = who.and_then(|who| {
        let pid = stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0);
        CallerProcess::read(&gate.proc_root, pid)
            .filter(|caller| caller.start_ticks <= accepted_ticks)
            .filter(|_| pidfd.as_ref().is_none_or(|pidfd| identity::pidfd_is(pidfd, pid)))
            .map(|caller| (who, caller))
            .ok_or_else(|| format!("the calling process {pid} exited while it was being identified"))
    });
    let (who, caller) = match who {
        Ok(identified) => identified,
        Err(why) => {
            tracing::warn!(%why, "refused an unidentified caller");
            refuse_connection(stream, &why).await;
            return;
        }
    };
    // The VM's life is its connecting process's (the shim, the container's
    // PID 1): when it exits, the connection closes, whoever else may hold a
    // copy of its descriptor.
    let exited = async move {
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same
        // descriptor until the AsyncFd is dropped.
        let registered = pidfd
            .map(|fd| unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) });
        match registered {
            Some(Ok(pidfd)) => {
                let _ = pidfd.readable().await;
            }
            _ => std::future::pending().await,
        }
    };
    connect_and_relay(stream, who, caller, gate, exited).await;
}

/// Opens the caller's own libvirtd connection and relays until either side
/// closes or `revoked` completes.
async fn connect_and_relay<S: ClientStream>(
    stream: S,
    who: Identity,
    caller: CallerProcess,
    gate: &Gate,
    revoked: impl Future<Output = ()>,
) {
    let _held = match gate.connections.hold(&who, gate.max_connections_per_caller) {
        Ok(held) => held,
        Err(why) => {
            tracing::warn!(%who, %why, "refused");
            refuse_connection(stream, &why).await;
            return;
        }
    };
    let upstream = match connect_libvirtd(&gate.libvirtd).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let why = format!("the gate cannot reach libvirtd at {}: {e}", gate.libvirtd.display());
            tracing::error!(%who, %why, "no libvirtd");
            refuse_connection(stream, &why).await;
            return;
        }
    };
    // A shim finding its domain again must find what the gate before kept.
    if tokio::time::timeout(LIBVIRTD_WAIT, gate.keeper().reconciled())
        .await
        .is_err()
    {
        let why = "the gate has not taken over the running domains yet (libvirtd does not answer it); try again";
        tracing::warn!(%who, why, "refused");
        refuse_connection(stream, why).await;
        return;
    }
    tracing::info!(%who, pid = caller.pid, "VM container connected");
    relay(stream, upstream, who.clone(), caller, gate, revoked).await;
    tracing::info!(%who, "VM container disconnected");
}

/// How long a caller waits for a libvirtd that is (re)starting before it is
/// refused: a restart takes a second or two.
const LIBVIRTD_WAIT: Duration = Duration::from_secs(30);

/// Connects to libvirtd, waiting up to [`LIBVIRTD_WAIT`] while it is not there.
async fn connect_libvirtd(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + LIBVIRTD_WAIT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Answers the caller's first call with the reason it is refused, then hangs
/// up. Only the call's header is read (a refused caller's body is never
/// buffered), and a little of the rest is drained afterwards so that the
/// caller reads the answer rather than a reset.
async fn refuse_connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, why: &str) {
    let mut head = [0u8; LEN_SIZE + HEADER_SIZE];
    let Ok(Ok(_)) = tokio::time::timeout(REFUSAL_WAIT, stream.read_exact(&mut head)).await else {
        return;
    };
    let Ok((header, _)) = protocol::decode_packet(&head[LEN_SIZE..]) else {
        return;
    };
    if header.kind != MessageType::Call || stream.write_all(&denial(&header, why)).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    let drain = async {
        let mut left = REFUSAL_DRAIN;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// How much of a refused caller's input is read and dropped after the answer.
const REFUSAL_DRAIN: usize = 64 * 1024;

fn denial(call: &Header, why: &str) -> Vec<u8> {
    let error = LibvirtError {
        code: ERR_ACCESS_DENIED,
        domain: FROM_ACCESS,
        level: 2,
        message: format!("access denied by virtkube-gate: {why}"),
    };
    protocol::encode_packet(
        &Header::remote(call.procedure, MessageType::Reply, call.serial, Status::Error),
        &protocol::encode_error(&error),
    )
}

/// One packet of at most `max` bytes: its header and the whole frame as it
/// came (to forward unchanged). `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> std::io::Result<Option<(Header, Vec<u8>)>> {
    let mut len_word = [0u8; LEN_SIZE];
    match reader.read_exact(&mut len_word).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let len = protocol::check_length(u32::from_be_bytes(len_word)).map_err(|e| invalid(e.to_string()))?;
    if len > max {
        return Err(invalid(format!(
            "a {len}-byte packet is more than this side sends ({max})"
        )));
    }
    let mut frame = vec![0u8; len];
    frame[..LEN_SIZE].copy_from_slice(&len_word);
    reader.read_exact(&mut frame[LEN_SIZE..]).await?;
    let (header, _) =
        protocol::decode_packet(&frame[LEN_SIZE..LEN_SIZE + HEADER_SIZE]).map_err(|e| invalid(e.to_string()))?;
    Ok(Some((header, frame)))
}

/// What one VM container's connection has been allowed so far.
#[derive(Debug, Default)]
pub struct Session {
    /// The process that connected (the owner of what it creates).
    pub caller: Option<CallerProcess>,
    /// The domain it created or found again (one per connection), as
    /// libvirtd named it in its reply: the gate trusts no name or UUID
    /// before libvirtd has answered with it.
    domain: Option<Admitted>,
    /// An admitted DOMAIN_CREATE_XML whose reply is awaited.
    creating: Option<Creating>,
    /// The serial and UUID of an admitted DOMAIN_LOOKUP_BY_UUID whose reply is awaited.
    finding: Option<(u32, [u8; 16])>,
    /// An admitted DOMAIN_DEFINE_XML_FLAGS whose reply is awaited.
    defining: Option<Defining>,
    /// The domain it defined (not yet started), and its descriptor groups:
    /// each to be associated once before DOMAIN_CREATE_WITH_FLAGS.
    defined: Option<Defined>,
    /// Serials of the consoles it opened: its stream packets go only there.
    consoles: Vec<u32>,
    /// Serials of screenshots under way: their only stream packet from the
    /// caller is the one that finishes (or aborts) the download.
    screenshots: Vec<u32>,
    /// Descriptors can be passed back to the caller (a unix socket): a
    /// display's connection, DOMAIN_OPEN_GRAPHICS_FD, needs it.
    pub passes_descriptors: bool,
    /// Event registrations it made.
    event_registrations: usize,
    /// Volumes the admitted create or define writes exclusively: checked
    /// against the running domains before the call goes to libvirtd.
    exclusive_volumes: Vec<(String, String)>,
}

impl Session {
    /// Whether this connection has (or is getting) its one domain.
    fn busy(&self) -> bool {
        self.domain.is_some()
            || self.creating.is_some()
            || self.finding.is_some()
            || self.defining.is_some()
            || self.defined.is_some()
    }

    /// Forgets an admitted create or define that is not sent after all.
    fn abandon_admission(&mut self) {
        self.creating = None;
        self.defining = None;
    }

    /// The session of a connection from `caller`.
    pub fn of(caller: CallerProcess) -> Session {
        Session {
            caller: Some(caller),
            ..Session::default()
        }
    }
}

/// A define the gate let through, until its reply.
#[derive(Debug, Clone)]
struct Defining {
    serial: u32,
    /// The domain's name, as admitted (to forget it if the reply never comes).
    name: String,
    groups: Vec<String>,
    /// The tap of its pod interface.
    pod_tap: Option<String>,
}

/// A domain defined through this connection and not started yet.
#[derive(Debug, Clone)]
struct Defined {
    /// As libvirtd named it.
    domain: DomainRef,
    /// Descriptor groups its disks name, and whether each has its descriptors.
    groups: Vec<(String, bool)>,
    /// The files (device, inode) passed for them.
    given: Vec<(u64, u64)>,
    /// The tap of its pod interface.
    pod_tap: Option<String>,
}

/// A create the gate let through, paused, until its reply.
#[derive(Debug, Clone)]
struct Creating {
    serial: u32,
    /// The caller did not ask for a paused domain: resume it once placed.
    run: bool,
    /// DOMAIN_CREATE_WITH_FLAGS of a defined domain (made transient once started).
    defined: bool,
    /// The domain's name, as admitted.
    name: String,
    /// The files (device, inode) passed for its disks.
    given: Vec<(u64, u64)>,
    /// The tap of its pod interface, to move into the caller's namespace.
    pod_tap: Option<String>,
}

/// Consoles and event registrations one connection may make (the shim makes
/// one of each); each costs libvirtd memory.
pub const MAX_PER_CONNECTION: usize = 2;

/// The gate's verdict on one packet from a VM container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it to libvirtd unchanged.
    Forward,
    /// Pass it to libvirtd with this payload instead (a create made paused
    /// and without AUTODESTROY: the gate owns the VM's lifetime).
    Rewrite(Vec<u8>),
    /// Answer it with libvirt's "access denied" error and this reason.
    Deny(String),
    /// End the connection: a packet the shim never sends.
    Close(String),
}

/// Decides one packet (its header and payload, and the files — device and
/// inode — of the descriptors that came with it) from a VM container. Pure
/// apart from resolving file paths in the domain XML; fuzzed in `gate/fuzz`.
pub fn decide(
    header: &Header,
    payload: &[u8],
    passed: &[(u64, u64)],
    who: &Identity,
    gate: &Gate,
    session: &mut Session,
) -> Verdict {
    match (header.program, header.kind) {
        (KEEPALIVE_PROGRAM, MessageType::Message) => Verdict::Forward,
        (REMOTE_PROGRAM, MessageType::Call) => judge(header, payload, who, gate, session),
        (REMOTE_PROGRAM, MessageType::CallWithFds) => match judge_fds(header, payload, passed, session) {
            Ok(()) => Verdict::Forward,
            Err(Denied(why)) => Verdict::Deny(why),
        },
        (REMOTE_PROGRAM, MessageType::Stream) if session.consoles.contains(&header.serial) => Verdict::Forward,
        (REMOTE_PROGRAM, MessageType::Stream)
            if session.screenshots.contains(&header.serial) && header.status != Status::Continue =>
        {
            session.screenshots.retain(|serial| *serial != header.serial);
            Verdict::Forward
        }
        (program, kind) => Verdict::Close(format!(
            "a packet the shim never sends (program {program:#x}, {kind:?}, serial {})",
            header.serial
        )),
    }
}

/// A VM container's connection: a unix socket (which can carry file
/// descriptors) or TCP.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Its reading and writing halves, and for a unix socket a second handle
    /// on it through which descriptors are passed to the caller.
    fn into_halves(self) -> (ClientReader, Box<dyn AsyncWrite + Send + Unpin>, Option<UnixStream>);
}

impl ClientStream for UnixStream {
    fn into_halves(self) -> (ClientReader, Box<dyn AsyncWrite + Send + Unpin>, Option<UnixStream>) {
        // A duplicate of the descriptor: the same socket, usable beside the
        // writing half (and only under its lock, so frames stay whole).
        let passing = std::os::fd::AsFd::as_fd(&self)
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixStream::from)
            .and_then(UnixStream::from_std)
            .map_err(|e| tracing::warn!(error = %e, "no descriptors can be passed back on this connection"))
            .ok();
        let (reader, writer) = self.into_split();
        (ClientReader::Unix(reader), Box::new(writer), passing)
    }
}

impl ClientStream for TcpStream {
    fn into_halves(self) -> (ClientReader, Box<dyn AsyncWrite + Send + Unpin>, Option<UnixStream>) {
        let (reader, writer) = self.into_split();
        (ClientReader::Other(Box::new(reader)), Box::new(writer), None)
    }
}

/// The reading half of a VM container's connection.
enum ClientReader {
    /// A unix socket's: descriptors can be received from it.
    Unix(tokio::net::unix::OwnedReadHalf),
    /// Any other.
    Other(Box<dyn AsyncRead + Send + Sync + Unpin>),
}

impl ClientReader {
    /// The socket, if descriptors can come through it.
    fn unix(&self) -> Option<&UnixStream> {
        match self {
            ClientReader::Unix(reader) => Some(reader.as_ref()),
            ClientReader::Other(_) => None,
        }
    }
}

impl AsyncRead for ClientReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientReader::Unix(reader) => std::pin::Pin::new(reader).poll_read(cx, buf),
            ClientReader::Other(reader) => std::pin::Pin::new(reader).poll_read(cx, buf),
        }
    }
}

/// Receives the descriptors a CALL_WITH_FDS announces (its payload's first
/// word) and judges each ([`libvirt_wire::disk_fd::check`]), returning them
/// with their files' device and inode. The error is the verdict: refuse the
/// call, or end the connection (framing broken, or a file that cannot be
/// examined in time).
async fn receive_passed(from_client: &ClientReader, payload: &[u8]) -> Result<Passed, Verdict> {
    let count = payload
        .get(..4)
        .map(|word| u32::from_be_bytes([word[0], word[1], word[2], word[3]]) as usize)
        .ok_or_else(|| Verdict::Close("a CALL_WITH_FDS without a descriptor count".to_owned()))?;
    if count > libvirt_wire::fdpass::MAX_FDS {
        return Err(Verdict::Close(format!(
            "a call announcing {count} descriptors; libvirt passes at most {}",
            libvirt_wire::fdpass::MAX_FDS
        )));
    }
    let Some(socket) = from_client.unix() else {
        return Err(Verdict::Close(
            "file descriptors can only be passed over the unix socket".to_owned(),
        ));
    };
    let mut passed = Vec::with_capacity(count);
    for _ in 0..count {
        // They follow their call at once; a caller that announces and never
        // sends them ends its own connection.
        let received = tokio::time::timeout(PASSED_FD_WAIT, libvirt_wire::fdpass::recv_fd(socket))
            .await
            .map_err(|_| Verdict::Close(format!("announced descriptors did not come within {PASSED_FD_WAIT:?}")))?;
        passed.push(received.map_err(|e| Verdict::Close(format!("receiving a passed descriptor: {e}")))?);
    }
    // fstat and fstatfs of a file on an unresponsive network file system
    // block: off the runtime's threads, and bounded.
    let examined = tokio::time::timeout(
        PASSED_FD_EXAMINE,
        tokio::task::spawn_blocking(move || examine_passed(passed)),
    )
    .await
    .map_err(|_| {
        Verdict::Close(format!(
            "a passed descriptor could not be examined within {PASSED_FD_EXAMINE:?} (a file on an unresponsive server?)"
        ))
    })?
    .map_err(|e| Verdict::Close(format!("examining the passed descriptors failed: {e}")))?;
    examined.map_err(Verdict::Deny)
}

/// Descriptors passed with a call, and their files' (device, inode).
type Passed = (Vec<std::os::fd::OwnedFd>, Vec<(u64, u64)>);

/// Judges each passed descriptor and identifies its file. Blocking.
fn examine_passed(passed: Vec<std::os::fd::OwnedFd>) -> Result<Passed, String> {
    let ids = passed
        .iter()
        .enumerate()
        .map(|(index, fd)| libvirt_wire::disk_fd::check(index, std::os::fd::AsFd::as_fd(fd)).map(|disk| disk.file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|refused| refused.to_string())?;
    Ok((passed, ids))
}

/// How long examining the passed descriptors may take.
const PASSED_FD_EXAMINE: Duration = Duration::from_secs(5);

/// How long the descriptors a call announced may take to follow it.
const PASSED_FD_WAIT: Duration = Duration::from_secs(10);

async fn relay<S: ClientStream>(
    client: S,
    upstream: UnixStream,
    who: Identity,
    caller: CallerProcess,
    gate: &Gate,
    revoked: impl Future<Output = ()>,
) {
    let (mut from_client, to_client, passing) = client.into_halves();
    let (mut from_libvirtd, mut to_libvirtd) = upstream.into_split();
    let to_client = Arc::new(Mutex::new(to_client));
    // libvirtd → VM container: whole frames, so a denial written meanwhile
    // never lands inside one.
    let writer = to_client.clone();
    let session = Arc::new(std::sync::Mutex::new(Session {
        passes_descriptors: passing.is_some(),
        ..Session::of(caller)
    }));
    let replies = session.clone();
    let finisher = Arc::new(Finisher {
        keeper: gate.keeper(),
        proc_root: gate.proc_root.clone(),
        qemu_run_dir: gate.qemu_run_dir.clone(),
        mountinfo: gate.place_qemu.then(|| gate.mountinfo.clone()),
        kubepods_parent: gate.kubepods_parent.clone(),
        // ImageFile volumes are opened by libvirt by path, with the backing
        // chains the repository manager made.
        image_roots: gate
            .policy
            .roots
            .iter()
            .cloned()
            .chain([PathBuf::from(virtkube_api::image::REPOSITORIES_DIR)])
            .collect(),
        who: who.clone(),
        caller,
    });
    let mut downstream = tokio::spawn(async move {
        while let Ok(Some((header, frame))) = read_packet(&mut from_libvirtd, protocol::MAX_PACKET).await {
            if header.kind == MessageType::ReplyWithFds {
                // Its descriptors follow it on libvirtd's socket: all are
                // taken, and passed on only for a display the caller opened
                // (the gate let only DOMAIN_OPEN_GRAPHICS_FD through).
                let fds = match take_passed_back(&from_libvirtd, &header, &frame).await {
                    Ok(fds) => fds,
                    Err(why) => {
                        tracing::warn!(who = %finisher.who, %why, "closing: libvirtd's descriptors could not be taken");
                        return;
                    }
                };
                let mut writer = writer.lock().await;
                match (&passing, header.procedure == procedure::DOMAIN_OPEN_GRAPHICS_FD) {
                    (Some(socket), true) => {
                        if writer.write_all(&frame).await.is_err() {
                            return;
                        }
                        for fd in &fds {
                            if libvirt_wire::fdpass::send_fd(socket, std::os::fd::AsFd::as_fd(fd))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                    (None, true) => {
                        // (Refused before it is asked; a failed duplicate lands here.)
                        let why = "the display's descriptor cannot be passed on this connection";
                        if writer.write_all(&denial(&header, why)).await.is_err() {
                            return;
                        }
                    }
                    (_, false) => {
                        let why = "libvirtd passed descriptors the gate does not pass on";
                        tracing::warn!(who = %finisher.who, procedure = header.procedure, why);
                        if writer.write_all(&denial(&header, why)).await.is_err() {
                            return;
                        }
                    }
                }
                continue;
            }
            note_screenshot_end(&replies, &header);
            let frame = match note_reply(&replies, &header, &frame[LEN_SIZE + HEADER_SIZE..]) {
                Some(Noted::Found(domain)) => {
                    let keeper = finisher.keeper.clone();
                    tokio::spawn(async move { keeper.note_reattached(&domain).await });
                    frame
                }
                Some(Noted::TookOver(domain)) => {
                    tracing::warn!(who = %finisher.who, domain = %domain.name, "a definition landed on a running domain: undoing it");
                    if let Ok(control) = finisher.keeper.control().await {
                        let _ = control.undefine(&domain, 0).await;
                    }
                    denial(
                        &header,
                        &format!(
                            "domain {:?} runs already; a definition may not take it over",
                            domain.name
                        ),
                    )
                }
                Some(Noted::Created(Created {
                    domain,
                    run,
                    defined,
                    given,
                    pod_tap,
                })) => {
                    // Its own task: the hand-over completes (or the domain is
                    // destroyed) even if this connection ends meanwhile.
                    let (handing, created) = (finisher.clone(), domain.clone());
                    let handed = tokio::spawn(async move {
                        handing
                            .hand_over(&created, run, defined, &given, pod_tap.as_deref())
                            .await
                    });
                    match handed.await {
                        Ok(Ok(())) => {
                            admit(&replies, &domain);
                            frame
                        }
                        Ok(Err(why)) => denial(&header, &format!("the domain could not be set up: {why}")),
                        Err(e) => denial(&header, &format!("the domain could not be set up: {e}")),
                    }
                }
                None => frame,
            };
            if writer.lock().await.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let upstream_loop = async {
        loop {
            let (header, frame) = match read_packet(&mut from_client, MAX_CLIENT_PACKET).await {
                Ok(Some(packet)) => packet,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%who, error = %e, "closing a VM container's connection: it broke the protocol");
                    return;
                }
            };
            let payload = &frame[LEN_SIZE + HEADER_SIZE..];
            // Descriptors follow their call on the socket: all are taken
            // (the stream stays in step), and judged before the call is.
            let (mut passed, mut passed_files) = (Vec::new(), Vec::new());
            let verdict = if header.kind == MessageType::CallWithFds {
                match receive_passed(&from_client, payload).await {
                    Ok((fds, files)) => {
                        (passed, passed_files) = (fds, files);
                        None
                    }
                    Err(verdict) => Some(verdict),
                }
            } else {
                None
            };
            let verdict = verdict.unwrap_or_else(|| {
                let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
                decide(&header, payload, &passed_files, &who, gate, &mut session)
            });
            let exclusive = std::mem::take(&mut session.lock().unwrap_or_else(|p| p.into_inner()).exclusive_volumes);
            let verdict = match (verdict, exclusive.is_empty()) {
                (verdict @ (Verdict::Forward | Verdict::Rewrite(_)), false) => {
                    match writers_of(gate, &exclusive).await {
                        Ok(()) => verdict,
                        Err(why) => {
                            session.lock().unwrap_or_else(|p| p.into_inner()).abandon_admission();
                            Verdict::Deny(why)
                        }
                    }
                }
                (verdict, _) => verdict,
            };
            match verdict {
                Verdict::Forward => {
                    if to_libvirtd.write_all(&frame).await.is_err() {
                        return;
                    }
                    for fd in &passed {
                        let socket: &UnixStream = to_libvirtd.as_ref();
                        if libvirt_wire::fdpass::send_fd(socket, std::os::fd::AsFd::as_fd(fd))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    if !passed.is_empty() {
                        tracing::info!(%who, count = passed.len(), "passed descriptors on to libvirtd");
                    }
                }
                Verdict::Rewrite(payload) => {
                    if to_libvirtd
                        .write_all(&protocol::encode_packet(&header, &payload))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Verdict::Deny(why) => {
                    tracing::warn!(%who, procedure = header.procedure, %why, "refused");
                    if to_client.lock().await.write_all(&denial(&header, &why)).await.is_err() {
                        return;
                    }
                }
                Verdict::Close(why) => {
                    tracing::warn!(%who, %why, "closing a VM container's connection");
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = upstream_loop => {}
        _ = &mut downstream => {}
        () = revoked => {}
    }
    // Both halves of both sockets close here, whichever side ended it.
    downstream.abort();
    // A create whose reply never came back: libvirtd may still create the
    // domain, which its caller will never know of. It is destroyed.
    let (abandoned, defined, defining) = {
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        (session.creating.take(), session.defined.take(), session.defining.take())
    };
    // A definition this connection made or asked for, and did not start:
    // forgotten (a start in flight makes it run; it is then ended below).
    let definition = match (&abandoned, defined, defining) {
        (Some(creating), _, _) if creating.defined => Some(creating.name.clone()),
        (None, Some(defined), _) => Some(defined.domain.name),
        (None, None, Some(defining)) => Some(defining.name),
        _ => None,
    };
    if let Some(name) = definition {
        let keeper = gate.keeper();
        let owner = caller.owner(&who);
        let ending = abandoned.is_some();
        tokio::spawn(async move {
            keeper.forget_definition(&name, &owner).await;
            if ending {
                keeper.end_abandoned(&name, &owner).await;
            }
        });
    } else if let Some(creating) = abandoned {
        let keeper = gate.keeper();
        let owner = caller.owner(&who);
        tokio::spawn(async move { keeper.end_abandoned(&creating.name, &owner).await });
    }
}

/// A screenshot that libvirtd ended (an error reply, or the stream's last
/// packet) is no longer under way: its serial is forgotten, so failed
/// screenshots never use up the connection's allowance.
pub fn note_screenshot_end(session: &std::sync::Mutex<Session>, header: &Header) {
    let ended = header.procedure == procedure::DOMAIN_SCREENSHOT
        && match header.kind {
            MessageType::Reply => header.status == Status::Error,
            MessageType::Stream => header.status != Status::Continue,
            _ => false,
        };
    if ended {
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        session.screenshots.retain(|serial| *serial != header.serial);
    }
}

/// The descriptors that follow a REPLY_WITH_FDS from libvirtd (its count
/// leads the payload), each with its byte, so the stream stays in step.
async fn take_passed_back(
    from_libvirtd: &tokio::net::unix::OwnedReadHalf,
    header: &Header,
    frame: &[u8],
) -> Result<Vec<std::os::fd::OwnedFd>, String> {
    let payload = &frame[LEN_SIZE + HEADER_SIZE..];
    let count = Decoder::new(payload).u32("descriptor count").map_err(|e| {
        format!(
            "a REPLY_WITH_FDS (procedure {}) without its count: {e}",
            header.procedure
        )
    })? as usize;
    if count > libvirt_wire::fdpass::MAX_FDS {
        return Err(format!("libvirtd announced {count} descriptors in one reply"));
    }
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket: &UnixStream = from_libvirtd.as_ref();
        fds.push(
            libvirt_wire::fdpass::recv_fd(socket)
                .await
                .map_err(|e| format!("receiving a descriptor from libvirtd: {e}"))?,
        );
    }
    Ok(fds)
}

/// A domain libvirtd has just created for a caller, paused.
#[derive(Debug)]
pub struct Created {
    /// As libvirtd named it.
    pub domain: DomainRef,
    /// Whether to resume it once handed over (the caller did not ask for it paused).
    pub run: bool,
    /// Started from a definition: the gate makes it transient.
    pub defined: bool,
    /// The files (device, inode) passed for its disks: all QEMU may hold
    /// besides the node's files the policy allows.
    pub given: Vec<(u64, u64)>,
    /// The tap of its pod interface, to move into the caller's namespace.
    pub pod_tap: Option<String>,
}

/// Notes a reply from libvirtd: the reply to an admitted lookup makes the
/// domain it names this connection's; the reply to an admitted create is
/// returned, to be handed over ([`Finisher::finish`]) before the caller sees
/// it. A refused create or lookup admits nothing.
pub fn note_reply(session: &std::sync::Mutex<Session>, header: &Header, payload: &[u8]) -> Option<Noted> {
    if header.kind != MessageType::Reply || header.program != REMOTE_PROGRAM {
        return None;
    }
    let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
    let ok = header.status == Status::Ok;
    let domain = || DomainRef::decode(&mut Decoder::new(payload)).ok();
    // By serial and procedure: a caller may reuse a serial for another call.
    if let Some(creating) = session.creating.as_ref()
        && creating.serial == header.serial
        && header.procedure
            == if creating.defined {
                procedure::DOMAIN_CREATE_WITH_FLAGS
            } else {
                procedure::DOMAIN_CREATE_XML
            }
    {
        let (run, defined, given, pod_tap) = (
            creating.run,
            creating.defined,
            creating.given.clone(),
            creating.pod_tap.clone(),
        );
        session.creating = None;
        if defined && ok {
            session.defined = None;
        }
        return ok.then(domain).flatten().map(|domain| {
            Noted::Created(Created {
                domain,
                run,
                defined,
                given,
                pod_tap,
            })
        });
    }
    if let Some(defining) = session.defining.as_ref()
        && defining.serial == header.serial
        && header.procedure == procedure::DOMAIN_DEFINE_XML_FLAGS
    {
        let groups = defining.groups.iter().map(|g| (g.clone(), false)).collect();
        let pod_tap = defining.pod_tap.clone();
        session.defining = None;
        return match (ok, domain()) {
            // A definition that landed on a running domain (same name or
            // UUID) made it persistent: not this connection's to start.
            (true, Some(domain)) if domain.id != -1 => Some(Noted::TookOver(domain)),
            (true, Some(domain)) => {
                session.defined = Some(Defined {
                    domain,
                    groups,
                    given: Vec::new(),
                    pod_tap,
                });
                None
            }
            _ => None,
        };
    }
    if let Some((serial, uuid)) = session.finding
        && serial == header.serial
        && header.procedure == procedure::DOMAIN_LOOKUP_BY_UUID
    {
        session.finding = None;
        if ok && let Some(domain) = domain().filter(|d| d.uuid == uuid) {
            session.domain = Some(Admitted {
                name: domain.name.clone(),
                uuid: Some(domain.uuid),
            });
            return Some(Noted::Found(domain));
        }
    }
    None
}

/// What a reply from libvirtd settled.
#[derive(Debug)]
pub enum Noted {
    /// A domain was created: hand it over before the caller sees the reply.
    Created(Created),
    /// The caller found its domain again after a lost connection.
    Found(DomainRef),
    /// A definition landed on a domain that runs: to be undone (undefined:
    /// transient again) and refused.
    TookOver(DomainRef),
}

/// The created domain becomes the connection's.
fn admit(session: &std::sync::Mutex<Session>, domain: &DomainRef) {
    session.lock().unwrap_or_else(|p| p.into_inner()).domain = Some(Admitted {
        name: domain.name.clone(),
        uuid: Some(domain.uuid),
    });
}

/// Hands a new domain over: kept by the keeper for its creator, QEMU moved
/// into the creator's cgroups, then resumed.
#[derive(Debug)]
struct Finisher {
    keeper: Arc<Keeper>,
    proc_root: PathBuf,
    qemu_run_dir: PathBuf,
    /// The gate's mountinfo, when QEMU is to be placed.
    mountinfo: Option<PathBuf>,
    /// The kubelet's cgroup root: a pod's QEMU joins the pod's cgroup.
    kubepods_parent: String,
    /// The node's files a domain may name (the policy's roots).
    image_roots: Vec<PathBuf>,
    who: Identity,
    caller: CallerProcess,
}

impl Finisher {
    /// [`Finisher::finish`], destroying the domain when it fails.
    async fn hand_over(
        &self,
        domain: &DomainRef,
        run: bool,
        defined: bool,
        given: &[(u64, u64)],
        pod_tap: Option<&str>,
    ) -> Result<(), String> {
        let finished = self.finish(domain, run, defined, given, pod_tap).await;
        if let Err(why) = &finished {
            tracing::error!(who = %self.who, domain = %domain.name, %why, "the new domain could not be handed over; destroying it");
            self.keeper.end(domain.uuid, None, why).await;
            if defined {
                self.keeper
                    .forget_definition(&domain.name, &self.caller.owner(&self.who))
                    .await;
            }
        }
        finished
    }

    /// The keeper's control connection, to do `what`.
    async fn control(&self, what: &str) -> Result<libvirt_wire::Client, String> {
        self.keeper
            .control()
            .await
            .map_err(|e| format!("the gate cannot reach libvirtd to {what}: {e}"))
    }

    async fn finish(
        &self,
        domain: &DomainRef,
        run: bool,
        defined: bool,
        given: &[(u64, u64)],
        pod_tap: Option<&str>,
    ) -> Result<(), String> {
        self.keeper.adopt(domain, self.caller.owner(&self.who))?;
        if defined {
            // Transient from now on, as a created domain is: destroying it
            // leaves nothing behind.
            self.control("make the domain transient")
                .await?
                .undefine(domain, 0)
                .await
                .map_err(|e| format!("libvirtd did not forget the domain's definition: {e}"))?;
        }
        if let Some(mountinfo) = &self.mountinfo {
            let (proc_root, run_dir, mountinfo) =
                (self.proc_root.clone(), self.qemu_run_dir.clone(), mountinfo.clone());
            let (name, caller) = (domain.name.clone(), self.caller);
            let pod_of = matches!(self.who, Identity::Pod { .. }).then(|| self.kubepods_parent.clone());
            let placed = tokio::task::spawn_blocking(move || {
                let scope = match &pod_of {
                    Some(kubepods_parent) => placement::Scope::Pod { kubepods_parent },
                    None => placement::Scope::Container,
                };
                place_qemu(&proc_root, &run_dir, &mountinfo, &name, caller, scope)
            })
            .await
            .map_err(|e| format!("placing QEMU failed: {e}"))??;
            tracing::info!(who = %self.who, domain = %domain.name, qemu = placed.0, cgroups = placed.1, "QEMU placed in the caller's pod or container cgroups");
        }
        if defined {
            // Its disks came as descriptors: still paused, QEMU may hold no
            // file of the node it was not given (defence in depth: raw
            // images name no other file, but a way QEMU finds a name in
            // what it was given would show here).
            let (proc_root, run_dir, name) = (self.proc_root.clone(), self.qemu_run_dir.clone(), domain.name.clone());
            let (given, roots) = (given.to_vec(), self.image_roots.clone());
            tokio::task::spawn_blocking(move || {
                let qemu = crate::keeper::qemu_of(&proc_root, &run_dir, &name)?;
                qemu_holds_only(&proc_root.join(qemu.to_string()).join("fd"), &given, &run_dir, &roots)
            })
            .await
            .map_err(|e| format!("checking QEMU's files failed: {e}"))??;
        }
        if let Some(tap) = pod_tap {
            let (proc_root, caller, tap) = (self.proc_root.clone(), self.caller, tap.to_owned());
            let started = std::time::Instant::now();
            let plumbed = tokio::task::spawn_blocking(move || crate::podnet::plumb(&proc_root, caller, &tap))
                .await
                .map_err(|e| format!("plumbing the pod network failed: {e}"))?
                .map_err(|e| format!("the pod network: {e}"))?;
            tracing::info!(
                who = %self.who,
                domain = %domain.name,
                tap = %plumbed.tap,
                pod_address = %plumbed.pod_address,
                mtu = plumbed.mtu,
                took_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "the guest's NIC is in the caller's network namespace, behind its address"
            );
        }
        if run {
            self.control("start the domain")
                .await?
                .resume(domain)
                .await
                .map_err(|e| format!("libvirtd did not start the domain's CPUs: {e}"))?;
        }
        Ok(())
    }
}

/// Checks the regular files a QEMU holds (its `/proc/<pid>/fd`): each must
/// be one it was given (device and inode), libvirt's own (in `run_dir`, its
/// PID file, or under [`LIBVIRT_AND_SYSTEM_FILES`]: EFI firmware and NVRAM)
/// or under the images roots. Anything else came from a name QEMU found in
/// what it was given: an error naming it.
fn qemu_holds_only(
    fd_dir: &std::path::Path,
    given: &[(u64, u64)],
    run_dir: &std::path::Path,
    roots: &[PathBuf],
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let entries =
        std::fs::read_dir(fd_dir).map_err(|e| format!("cannot list QEMU's files ({}): {e}", fd_dir.display()))?;
    for entry in entries.flatten() {
        // The file itself (the link is followed, deleted or not); one closed
        // meanwhile is no concern.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if !meta.is_file() || given.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let allowed = target.starts_with(run_dir)
            || LIBVIRT_AND_SYSTEM_FILES.iter().any(|dir| target.starts_with(dir))
            || roots.iter().any(|root| target.starts_with(root));
        if !allowed {
            return Err(format!(
                "QEMU opened {}, a file of the node it was not given; the domain was destroyed before it ran",
                target.display()
            ));
        }
    }
    Ok(())
}

/// Where QEMU may hold files libvirt chose for it: the distribution's
/// read-only files (EFI firmware) and libvirt's state (EFI NVRAM).
const LIBVIRT_AND_SYSTEM_FILES: [&str; 2] = ["/usr/share/", "/var/lib/libvirt/"];

/// Moves domain `name`'s QEMU into every cgroup of the caller. Returns
/// QEMU's PID and how many cgroups it joined. Blocking: it reads /proc and
/// writes cgroupfs.
fn place_qemu(
    proc_root: &std::path::Path,
    run_dir: &std::path::Path,
    mountinfo: &std::path::Path,
    name: &str,
    caller: CallerProcess,
    scope: placement::Scope<'_>,
) -> Result<(i32, usize), String> {
    let qemu = crate::keeper::qemu_of(proc_root, run_dir, name)?;
    let (cgroups, mounts) = caller_cgroups(proc_root, mountinfo, caller)?;
    let places = placement::placement(&cgroups, &mounts, scope).map_err(|e| e.to_string())?;
    if !places.unmounted.is_empty() {
        tracing::debug!(unmounted = ?places.unmounted, "hierarchies of the caller the gate has not mounted");
    }
    for dir in &places.make_dirs {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("cannot make QEMU's cgroup {}: {e}", dir.display()));
            }
            _ => {}
        }
    }
    for procs in &places.procs_files {
        std::fs::write(procs, qemu.to_string())
            .map_err(|e| format!("cannot move QEMU (PID {qemu}) into {}: {e}", procs.display()))?;
    }
    Ok((qemu, places.procs_files.len()))
}

/// The caller's `/proc/<pid>/cgroup` text and the gate's cgroup mounts,
/// provided the caller still runs.
fn caller_cgroups(
    proc_root: &std::path::Path,
    mountinfo: &std::path::Path,
    caller: CallerProcess,
) -> Result<(String, Vec<placement::CgroupMount>), String> {
    let cgroups = std::fs::read_to_string(proc_root.join(caller.pid.to_string()).join("cgroup"))
        .map_err(|e| format!("cannot read the caller's cgroups: {e}"))?;
    if CallerProcess::read(proc_root, caller.pid) != Some(caller) {
        return Err("the caller exited while its VM was being created".into());
    }
    let mounts = placement::cgroup_mounts(
        &std::fs::read_to_string(mountinfo).map_err(|e| format!("cannot read {}: {e}", mountinfo.display()))?,
    );
    Ok((cgroups, mounts))
}

/// Where QEMU goes for `who`: its pod's cgroup, or its container's.
fn scope_of<'a>(gate: &'a Gate, who: &Identity) -> placement::Scope<'a> {
    match who {
        Identity::Pod { .. } => placement::Scope::Pod {
            kubepods_parent: &gate.kubepods_parent,
        },
        _ => placement::Scope::Container,
    }
}

/// Refuses a VM of `guest` bytes that the cgroup its QEMU will join cannot
/// hold with QEMU's overhead. A cgroup the gate cannot read is the
/// placement's failure to report, after the create.
fn check_fit(gate: &Gate, who: &Identity, caller: CallerProcess, guest: u64) -> Result<(), Denied> {
    let Ok((cgroups, mounts)) = caller_cgroups(&gate.proc_root, &gate.mountinfo, caller) else {
        return Ok(());
    };
    let scope = scope_of(gate, who);
    let Some(memory_cgroup) = placement::placement(&cgroups, &mounts, scope)
        .ok()
        .and_then(|placed| placed.memory_cgroup)
    else {
        return Ok(());
    };
    let bound = match scope {
        placement::Scope::Pod { .. } => sizing::Bound::Pod,
        placement::Scope::Container => sizing::Bound::Container,
    };
    sizing::check(
        sizing::memory_limit_of(&memory_cgroup),
        guest,
        gate.qemu_overhead,
        bound,
        &memory_cgroup.display().to_string(),
    )
    .map_err(Denied)
}

/// Decides one call from a VM container.
fn judge(call: &Header, args: &[u8], who: &Identity, gate: &Gate, session: &mut Session) -> Verdict {
    match check_call(call, args, who, gate, session) {
        Ok(None) => Verdict::Forward,
        Ok(Some(payload)) => Verdict::Rewrite(payload),
        Err(Denied(why)) => Verdict::Deny(why),
    }
}

fn bad_args(what: &str) -> impl Fn(libvirt_wire::xdr::XdrError) -> Denied + '_ {
    move |e| Denied(format!("malformed {what} arguments: {e}"))
}

/// `Ok(Some(payload))`: forward with this payload instead.
fn check_call(
    call: &Header,
    args: &[u8],
    who: &Identity,
    gate: &Gate,
    session: &mut Session,
) -> Result<Option<Vec<u8>>, Denied> {
    let Some(name) = policy::allowed_call(call.procedure) else {
        return Err(Denied(format!(
            "procedure {} is not one a VM container may call (allow-list v{}: the shim's calls only)",
            call.procedure,
            policy::ALLOWED_CALLS_VERSION
        )));
    };
    let mut d = Decoder::new(args);
    match call.procedure {
        procedure::CONNECT_OPEN => {
            let uri = d.opt_string("name").map_err(bad_args(name))?;
            match uri {
                Some(uri) if gate.policy.uris.contains(&uri) => Ok(None),
                other => Err(Denied(format!(
                    "connection URI {other:?} is not allowed (allowed: {})",
                    gate.policy.uris.join(", ")
                ))),
            }
        }
        procedure::DOMAIN_CREATE_XML => {
            if session.busy() {
                return Err(Denied(
                    "this connection already has its domain; one VM per container".into(),
                ));
            }
            let xml = d.string("xml").map_err(bad_args(name))?;
            let create_flags = d.u32("flags").map_err(bad_args(name))?;
            // VALIDATE makes libvirt check the XML against its schema.
            if create_flags & START_VALIDATE == 0 {
                return Err(Denied(format!(
                    "a domain must be created with VALIDATE (flags {create_flags:#x})"
                )));
            }
            let (xml, admitted, fd_groups, pod_tap) = admit_domain_xml(&xml, who, gate, session)?;
            if !fd_groups.is_empty() {
                return Err(Denied(format!(
                    "disks passed as descriptors ({}) need DOMAIN_DEFINE_XML_FLAGS, DOMAIN_FD_ASSOCIATE and DOMAIN_CREATE_WITH_FLAGS, not DOMAIN_CREATE_XML",
                    fd_groups.join(", ")
                )));
            }
            tracing::info!(%who, domain = %admitted.name, "domain admitted");
            session.creating = Some(Creating {
                serial: call.serial,
                run: create_flags & START_PAUSED == 0,
                defined: false,
                given: Vec::new(),
                name: admitted.name,
                pod_tap,
            });
            // Paused until QEMU is in the caller's cgroups and the gate keeps
            // it; no AUTODESTROY: the gate, not a connection, ends it.
            let mut rewritten = libvirt_wire::xdr::Encoder::new();
            rewritten
                .string(&xml)
                .u32((create_flags & !START_AUTODESTROY) | START_PAUSED);
            Ok(Some(rewritten.into_bytes()))
        }
        procedure::DOMAIN_LOOKUP_BY_UUID => {
            let uuid = d.fixed_opaque::<16>("uuid").map_err(bad_args(name))?;
            if session.busy() {
                return Err(Denied(
                    "this connection already has its domain; one VM per container".into(),
                ));
            }
            let uuid_text = protocol::format_uuid(&uuid);
            match (gate.keeper().owner_of(&uuid), session.caller) {
                (Some(owner), Some(caller)) if caller.owns(&owner) => {
                    session.finding = Some((call.serial, uuid));
                    Ok(None)
                }
                (Some(owner), _) => Err(Denied(format!(
                    "domain {uuid_text} belongs to another process ({}, PID {}); only the process that created a domain may find it again",
                    owner.caller, owner.pid
                ))),
                (None, _) => Err(Denied(format!(
                    "the gate keeps no domain {uuid_text}: it has ended, or it was never this container's"
                ))),
            }
        }
        procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY => {
            let event = d.i32("eventID").map_err(bad_args(name))?;
            if event != 0 {
                return Err(Denied(format!(
                    "only lifecycle events (0) may be watched, not event {event}"
                )));
            }
            if !d.bool("dom").map_err(bad_args(name))? {
                return Err(Denied(
                    "events of every domain may not be watched; name your own domain".into(),
                ));
            }
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session)?;
            if session.event_registrations >= MAX_PER_CONNECTION {
                return Err(Denied(format!(
                    "this connection already registered for events {MAX_PER_CONNECTION} times"
                )));
            }
            session.event_registrations += 1;
            Ok(None)
        }
        procedure::DOMAIN_OPEN_CONSOLE => {
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session)?;
            if session.consoles.len() >= MAX_PER_CONNECTION {
                return Err(Denied(format!(
                    "this connection already opened {MAX_PER_CONNECTION} consoles"
                )));
            }
            session.consoles.push(call.serial);
            Ok(None)
        }
        procedure::DOMAIN_DEFINE_XML_FLAGS => {
            if session.busy() {
                return Err(Denied(
                    "this connection already has its domain; one VM per container".into(),
                ));
            }
            let xml = d.string("xml").map_err(bad_args(name))?;
            let define_flags = d.u32("flags").map_err(bad_args(name))?;
            if define_flags != DEFINE_VALIDATE {
                return Err(Denied(format!(
                    "a domain must be defined with VALIDATE and nothing else (flags {define_flags:#x})"
                )));
            }
            let (xml, admitted, fd_groups, pod_tap) = admit_domain_xml(&xml, who, gate, session)?;
            tracing::info!(%who, domain = %admitted.name, groups = ?fd_groups, "domain definition admitted");
            session.defining = Some(Defining {
                serial: call.serial,
                name: admitted.name,
                groups: fd_groups,
                pod_tap,
            });
            let mut rewritten = libvirt_wire::xdr::Encoder::new();
            rewritten.string(&xml).u32(define_flags);
            Ok(Some(rewritten.into_bytes()))
        }
        procedure::DOMAIN_CREATE_WITH_FLAGS => {
            let named = DomainRef::decode(&mut d).map_err(bad_args(name))?;
            let create_flags = d.u32("flags").map_err(bad_args(name))?;
            if session.creating.is_some() || session.domain.is_some() {
                return Err(Denied(
                    "this connection is starting or has its domain already; one start per definition".into(),
                ));
            }
            let defined = own_defined(&named, session)?;
            if let Some((group, _)) = defined.groups.iter().find(|(_, associated)| !associated) {
                return Err(Denied(format!(
                    "descriptor group {group:?} has no descriptors yet: DOMAIN_FD_ASSOCIATE it first"
                )));
            }
            if create_flags & !(START_PAUSED | START_AUTODESTROY) != 0 {
                return Err(Denied(format!(
                    "start flags {create_flags:#x}: only PAUSED and AUTODESTROY are known"
                )));
            }
            let (name_of, given, pod_tap) = (
                defined.domain.name.clone(),
                defined.given.clone(),
                defined.pod_tap.clone(),
            );
            session.creating = Some(Creating {
                serial: call.serial,
                run: create_flags & START_PAUSED == 0,
                defined: true,
                name: name_of,
                given,
                pod_tap,
            });
            // As for a create: paused until handed over; no AUTODESTROY.
            let mut rewritten = libvirt_wire::xdr::Encoder::new();
            named.encode(&mut rewritten);
            rewritten.u32((create_flags & !START_AUTODESTROY) | START_PAUSED);
            Ok(Some(rewritten.into_bytes()))
        }
        procedure::DOMAIN_UNDEFINE_FLAGS => {
            let named = DomainRef::decode(&mut d).map_err(bad_args(name))?;
            if d.u32("flags").map_err(bad_args(name))? != 0 {
                return Err(Denied("undefine takes no flags here".into()));
            }
            if own_defined(&named, session).is_err() {
                own_domain(&named, session)?;
            }
            Ok(None)
        }
        procedure::DOMAIN_GET_STATE | procedure::DOMAIN_SHUTDOWN_FLAGS | procedure::DOMAIN_DESTROY_FLAGS => {
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session).map(|()| None)
        }
        procedure::DOMAIN_REBOOT | procedure::DOMAIN_RESET => {
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session)?;
            let flags = d.u32("flags").map_err(bad_args(name))?;
            // Reboot: default or ACPI, never the guest agent's flag (the
            // default could pick the agent only through an agent channel,
            // which the domain policy never admits). Reset takes none.
            let known = if call.procedure == procedure::DOMAIN_REBOOT {
                REBOOT_ACPI
            } else {
                0
            };
            if flags & !known != 0 {
                return Err(Denied(format!("{name} flags {flags:#x} are not allowed")));
            }
            Ok(None)
        }
        procedure::DOMAIN_SCREENSHOT => {
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session)?;
            let screen = d.u32("screen").map_err(bad_args(name))?;
            if d.u32("flags").map_err(bad_args(name))? != 0 || screen != 0 {
                return Err(Denied("a screenshot is of screen 0, without flags".into()));
            }
            if session.screenshots.len() >= MAX_PER_CONNECTION {
                return Err(Denied(format!(
                    "this connection has {MAX_PER_CONNECTION} screenshots under way already"
                )));
            }
            session.screenshots.push(call.serial);
            Ok(None)
        }
        procedure::DOMAIN_OPEN_GRAPHICS_FD => {
            own_domain(&DomainRef::decode(&mut d).map_err(bad_args(name))?, session)?;
            // Refused before libvirtd makes QEMU take a viewer nobody gets.
            if !session.passes_descriptors {
                return Err(Denied(
                    "a display's connection is a descriptor, which only the gate's unix socket can pass; this connection is TCP (mount the socket to use the VM's screen)".into(),
                ));
            }
            let index = d.u32("idx").map_err(bad_args(name))?;
            let flags = d.u32("flags").map_err(bad_args(name))?;
            if index != 0 || flags & !OPEN_GRAPHICS_SKIPAUTH != 0 {
                return Err(Denied(format!(
                    "{name} opens display 0 with no flags but SKIPAUTH (asked: display {index}, flags {flags:#x})"
                )));
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Checks a domain XML to create or define (the policy, and that the VM fits
/// where its QEMU will run) and adds its owner's record, so that the domain
/// has its owner from the moment it exists and no break before the
/// hand-over leaves it unowned. Returns the XML to send, the domain, its
/// descriptor groups and its pod tap.
fn admit_domain_xml(
    xml: &str,
    who: &Identity,
    gate: &Gate,
    session: &mut Session,
) -> Result<(String, Admitted, Vec<String>, Option<String>), Denied> {
    let policy::Admission {
        domain,
        memory_kib,
        fd_groups,
        pod_tap,
        exclusive_volumes,
    } = match gate.volumes.get() {
        Some(volumes) => policy::check_domain_xml_with(xml, who, &gate.policy, &RealPaths, volumes.as_ref())?,
        None => policy::check_domain_xml(xml, who, &gate.policy, &RealPaths)?,
    };
    session.exclusive_volumes = exclusive_volumes;
    let Some(caller) = session.caller else {
        return Err(Denied("the gate does not know the calling process".into()));
    };
    if gate.place_qemu {
        check_fit(gate, who, caller, memory_kib.saturating_mul(1024))?;
    }
    let xml = crate::keeper::with_owner_record(xml, &caller.owner(who))
        .map_err(|why| Denied(format!("cannot record the domain's owner: {why}")))?;
    Ok((xml, domain, fd_groups, pod_tap))
}

/// Refuses when a running domain already uses one of `volumes` (pool,
/// volume): an ImageFile that is not shareable has one writer. QEMU's own
/// image locking backs this up for two starts at the same moment.
async fn writers_of(gate: &Gate, volumes: &[(String, String)]) -> Result<(), String> {
    let control = gate
        .keeper()
        .control()
        .await
        .map_err(|e| format!("the gate cannot reach libvirtd to see who uses the volumes: {e}"))?;
    let domains = control
        .list_all_domains(libvirt_wire::flags::LIST_DOMAINS_ACTIVE)
        .await
        .map_err(|e| format!("the gate cannot list the running domains: {e}"))?;
    for domain in domains {
        let Ok(xml) = control.xml_desc(&domain, 0).await else {
            continue; // ended meanwhile
        };
        if let Some((pool, volume)) = volumes
            .iter()
            .find(|(pool, volume)| policy::uses_volume(&xml, pool, volume))
        {
            return Err(format!(
                "volume {pool}/{volume} is in use by running domain {:?}; its ImageFile is not shareable (spec.shareable), so no second VM may write it",
                domain.name
            ));
        }
    }
    Ok(())
}

/// The domain this connection defined and has not started, if `named` is it.
fn own_defined<'a>(named: &DomainRef, session: &'a Session) -> Result<&'a Defined, Denied> {
    match &session.defined {
        Some(defined) if defined.domain.uuid == named.uuid && defined.domain.name == named.name => Ok(defined),
        Some(defined) => Err(Denied(format!(
            "domain {:?} ({}) is not the one this connection defined ({:?})",
            named.name,
            named.uuid_string(),
            defined.domain.name
        ))),
        None => Err(Denied(format!(
            "domain {:?} was not defined through this connection (or has started)",
            named.name
        ))),
    }
}

/// Judges a DOMAIN_FD_ASSOCIATE (a CALL_WITH_FDS whose payload is the
/// descriptor count, then the arguments): for this connection's defined
/// domain, a group its disks name, once. The descriptors themselves are
/// judged by [`libvirt_wire::disk_fd::check`] as they arrive.
fn judge_fds(call: &Header, payload: &[u8], passed: &[(u64, u64)], session: &mut Session) -> Result<(), Denied> {
    if call.procedure != procedure::DOMAIN_FD_ASSOCIATE {
        return Err(Denied(format!(
            "procedure {} may not pass file descriptors (only DOMAIN_FD_ASSOCIATE)",
            call.procedure
        )));
    }
    let bad = bad_args("DOMAIN_FD_ASSOCIATE");
    let mut d = Decoder::new(payload);
    let count = d.u32("nfds").map_err(&bad)?;
    let named = DomainRef::decode(&mut d).map_err(&bad)?;
    let group = d.string("name").map_err(&bad)?;
    let flags = d.u32("flags").map_err(&bad)?;
    d.finish().map_err(&bad)?;
    if count == 0 {
        return Err(Denied("DOMAIN_FD_ASSOCIATE with no descriptors".into()));
    }
    if flags & !libvirt_wire::flags::FD_ASSOCIATE_SECLABEL_WRITABLE != 0 {
        return Err(Denied(format!(
            "descriptor flags {flags:#x}: only SECLABEL_WRITABLE ({:#x}) may be asked",
            libvirt_wire::flags::FD_ASSOCIATE_SECLABEL_WRITABLE
        )));
    }
    own_defined(&named, session)?;
    let Some(defined) = session.defined.as_mut() else {
        return Err(Denied("no domain defined".into()));
    };
    match defined.groups.iter_mut().find(|(known, _)| *known == group) {
        Some((_, associated)) if *associated => Err(Denied(format!(
            "descriptor group {group:?} already has its descriptors"
        ))),
        Some((_, associated)) => {
            // What they are, for the hand-over's check of QEMU's files.
            *associated = true;
            defined.given.extend_from_slice(passed);
            Ok(())
        }
        None => Err(Denied(format!(
            "descriptor group {group:?} is named by none of the domain's disks ({})",
            defined
                .groups
                .iter()
                .map(|(g, _)| g.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A call may name only the domain this connection created.
fn own_domain(named: &DomainRef, session: &Session) -> Result<(), Denied> {
    let Some(own) = &session.domain else {
        return Err(Denied(format!(
            "domain {:?} is not this container's: it has created none",
            named.name
        )));
    };
    if named.name != own.name || own.uuid != Some(named.uuid) {
        return Err(Denied(format!(
            "domain {:?} ({}) is not this container's ({:?})",
            named.name,
            named.uuid_string(),
            own.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_may_hold_only_what_it_was_given_libvirt_s_files_and_the_roots() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("gate-qemu-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (fds, run, roots, elsewhere) = (dir.join("fd"), dir.join("run"), dir.join("images"), dir.join("etc"));
        for d in [&fds, &run, &roots, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        let file = |path: PathBuf| {
            std::fs::write(&path, b"x").unwrap();
            path
        };
        let given = file(dir.join("given.raw"));
        let links = [
            given.clone(),
            file(run.join("vm.pid")),
            file(roots.join("kernel")),
            PathBuf::from("/dev/null"),
        ];
        for (n, target) in links.iter().enumerate() {
            std::os::unix::fs::symlink(target, fds.join(n.to_string())).unwrap();
        }
        let meta = std::fs::metadata(&given).unwrap();
        let ids = [(meta.dev(), meta.ino())];
        let roots = [roots];
        qemu_holds_only(&fds, &ids, &run, &roots).unwrap();
        // Given by name only is not given: the same check without its id.
        let e = qemu_holds_only(&fds, &[], &run, &roots).unwrap_err();
        assert!(e.contains("given.raw, a file of the node it was not given"), "{e}");
        let shadow = file(elsewhere.join("shadow"));
        std::os::unix::fs::symlink(&shadow, fds.join("9")).unwrap();
        let e = qemu_holds_only(&fds, &ids, &run, &roots).unwrap_err();
        assert!(e.starts_with(&format!("QEMU opened {}", shadow.display())), "{e}");
        // EFI firmware and NVRAM, which libvirt chooses, are allowed.
        std::fs::remove_file(fds.join("9")).unwrap();
        for (n, system) in ["/usr/share/misc", "/var/lib/libvirt"].iter().enumerate() {
            let Some(file) = std::fs::read_dir(system)
                .ok()
                .and_then(|entries| entries.flatten().map(|e| e.path()).find(|p| p.is_file()))
            else {
                continue;
            };
            std::os::unix::fs::symlink(file, fds.join(format!("{}", 20 + n))).unwrap();
        }
        qemu_holds_only(&fds, &ids, &run, &roots).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_create_reply_is_known_by_serial_and_procedure() {
        let session = std::sync::Mutex::new(Session {
            creating: Some(Creating {
                serial: 7,
                run: true,
                defined: false,
                given: Vec::new(),
                name: "d".into(),
                pod_tap: None,
            }),
            ..Session::default()
        });
        let domain = DomainRef {
            name: "d".into(),
            uuid: [7; 16],
            id: 1,
        };
        let mut payload = libvirt_wire::xdr::Encoder::new();
        domain.encode(&mut payload);
        let payload = payload.into_bytes();
        // Another call reusing the create's serial: its reply settles nothing.
        let other = Header::remote(procedure::CONNECT_GET_CAPABILITIES, MessageType::Reply, 7, Status::Ok);
        assert!(note_reply(&session, &other, &payload).is_none());
        assert!(
            session.lock().unwrap().creating.is_some(),
            "the create is still awaited"
        );
        // The create's own reply is handed over.
        let reply = Header::remote(procedure::DOMAIN_CREATE_XML, MessageType::Reply, 7, Status::Ok);
        match note_reply(&session, &reply, &payload) {
            Some(Noted::Created(created)) => assert_eq!(created.domain, domain),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn operations_name_the_connections_own_domain_and_a_display_needs_the_unix_socket() {
        let who = Identity::Pod {
            uid: "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b".into(),
        };
        let gate = Gate::default();
        let own = DomainRef {
            name: "ns_vm".into(),
            uuid: [7; 16],
            id: 3,
        };
        let other = DomainRef {
            name: "ns_other".into(),
            uuid: [8; 16],
            id: 4,
        };
        let session = std::sync::Mutex::new(Session {
            domain: Some(Admitted {
                name: own.name.clone(),
                uuid: Some(own.uuid),
            }),
            ..Session::of(CallerProcess {
                pid: 4242,
                start_ticks: 1,
            })
        });
        let decided =
            |header: &Header, payload: &[u8]| decide(header, payload, &[], &who, &gate, &mut session.lock().unwrap());
        let args = |domain: &DomainRef, words: &[u32]| {
            let mut e = libvirt_wire::xdr::Encoder::new();
            domain.encode(&mut e);
            for word in words {
                e.u32(*word);
            }
            e.into_bytes()
        };
        let denied = |verdict: Verdict, expected: &str| match verdict {
            Verdict::Deny(why) => assert!(why.contains(expected), "expected {expected:?}, got {why:?}"),
            other => panic!("{other:?}, expected a denial with {expected:?}"),
        };
        let mut serial = 10;
        let mut next = |procedure: i32| {
            serial += 1;
            call(procedure, MessageType::Call, serial)
        };
        // Reboot and reset: its own domain only; no guest-agent reboot, no reset flags.
        denied(
            decided(&next(procedure::DOMAIN_REBOOT), &args(&other, &[0])),
            "is not this container's",
        );
        assert_eq!(
            decided(&next(procedure::DOMAIN_REBOOT), &args(&own, &[1])),
            Verdict::Forward
        );
        denied(decided(&next(procedure::DOMAIN_REBOOT), &args(&own, &[2])), "flags 0x2");
        assert_eq!(
            decided(&next(procedure::DOMAIN_RESET), &args(&own, &[0])),
            Verdict::Forward
        );
        denied(decided(&next(procedure::DOMAIN_RESET), &args(&own, &[1])), "flags 0x1");
        // Pausing is nodeinfo's (spec.runState), not the container's.
        denied(
            decided(&next(procedure::DOMAIN_SUSPEND), &args(&own, &[])),
            "not one a VM container may call",
        );
        // Screenshots: screen 0, two at a time; libvirtd ending one gives its place back.
        denied(
            decided(&next(procedure::DOMAIN_SCREENSHOT), &args(&own, &[1, 0])),
            "screen 0",
        );
        denied(
            decided(&next(procedure::DOMAIN_SCREENSHOT), &args(&other, &[0, 0])),
            "is not this container's",
        );
        let first = next(procedure::DOMAIN_SCREENSHOT);
        assert_eq!(decided(&first, &args(&own, &[0, 0])), Verdict::Forward);
        let second = next(procedure::DOMAIN_SCREENSHOT);
        assert_eq!(decided(&second, &args(&own, &[0, 0])), Verdict::Forward);
        denied(
            decided(&next(procedure::DOMAIN_SCREENSHOT), &args(&own, &[0, 0])),
            "under way already",
        );
        note_screenshot_end(
            &session,
            &Header::remote(
                procedure::DOMAIN_SCREENSHOT,
                MessageType::Reply,
                first.serial,
                Status::Error,
            ),
        );
        assert_eq!(
            decided(&next(procedure::DOMAIN_SCREENSHOT), &args(&own, &[0, 0])),
            Verdict::Forward
        );
        // The caller's only stream packet on a screenshot is its finish.
        let data = Header::remote(
            procedure::DOMAIN_SCREENSHOT,
            MessageType::Stream,
            second.serial,
            Status::Continue,
        );
        assert!(matches!(decided(&data, b"upload"), Verdict::Close(_)));
        let finish = Header {
            status: Status::Ok,
            ..data
        };
        assert_eq!(decided(&finish, &[]), Verdict::Forward);
        assert!(matches!(decided(&finish, &[]), Verdict::Close(_)), "finished once");
        // The display: its own, display 0, SKIPAUTH at most, and only where
        // descriptors can come back.
        denied(
            decided(&next(procedure::DOMAIN_OPEN_GRAPHICS_FD), &args(&own, &[0, 1])),
            "only the gate's unix socket can pass",
        );
        session.lock().unwrap().passes_descriptors = true;
        assert_eq!(
            decided(&next(procedure::DOMAIN_OPEN_GRAPHICS_FD), &args(&own, &[0, 1])),
            Verdict::Forward
        );
        denied(
            decided(&next(procedure::DOMAIN_OPEN_GRAPHICS_FD), &args(&own, &[1, 0])),
            "display 1",
        );
        denied(
            decided(&next(procedure::DOMAIN_OPEN_GRAPHICS_FD), &args(&own, &[0, 2])),
            "flags 0x2",
        );
        denied(
            decided(&next(procedure::DOMAIN_OPEN_GRAPHICS_FD), &args(&other, &[0, 1])),
            "is not this container's",
        );
    }

    fn call(procedure: i32, kind: MessageType, serial: u32) -> Header {
        Header::remote(procedure, kind, serial, Status::Ok)
    }

    fn reply_naming(procedure: i32, serial: u32, domain: &DomainRef) -> (Header, Vec<u8>) {
        let mut payload = libvirt_wire::xdr::Encoder::new();
        domain.encode(&mut payload);
        (
            Header::remote(procedure, MessageType::Reply, serial, Status::Ok),
            payload.into_bytes(),
        )
    }

    fn associate(domain: &DomainRef, group: &str, count: u32) -> Vec<u8> {
        let mut args = libvirt_wire::xdr::Encoder::new();
        args.u32(count);
        domain.encode(&mut args);
        args.string(group).u32(0);
        args.into_bytes()
    }

    fn start(domain: &DomainRef, flags: u32) -> Vec<u8> {
        let mut args = libvirt_wire::xdr::Encoder::new();
        domain.encode(&mut args);
        args.u32(flags);
        args.into_bytes()
    }

    #[test]
    fn a_domain_with_descriptor_disks_is_defined_associated_then_started_paused() {
        let uid = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b";
        let who = Identity::Pod { uid: uid.into() };
        let gate = Gate {
            place_qemu: false,
            ..Gate::default()
        };
        let session = std::sync::Mutex::new(Session::of(CallerProcess {
            pid: 4242,
            start_ticks: 1,
        }));
        let xml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shim/tests/golden/tiny.xml"))
            .unwrap()
            .replace(
                "<devices>",
                r#"<devices><disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/virtkube-fd/root" fdgroup="root"/><target dev="vda" bus="virtio"/></disk>"#,
            );
        let decided =
            |header: &Header, payload: &[u8]| decide(header, payload, &[], &who, &gate, &mut session.lock().unwrap());
        // CREATE_XML cannot carry such disks.
        let mut create = libvirt_wire::xdr::Encoder::new();
        create.string(&xml).u32(START_VALIDATE);
        let create = create.into_bytes();
        match decided(&call(procedure::DOMAIN_CREATE_XML, MessageType::Call, 1), &create) {
            Verdict::Deny(why) => assert!(why.contains("need DOMAIN_DEFINE_XML_FLAGS"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Defined with the owner's record.
        let mut define = libvirt_wire::xdr::Encoder::new();
        define.string(&xml).u32(DEFINE_VALIDATE);
        match decided(
            &call(procedure::DOMAIN_DEFINE_XML_FLAGS, MessageType::Call, 2),
            &define.into_bytes(),
        ) {
            Verdict::Rewrite(payload) => {
                let rewritten = Decoder::new(&payload).string("xml").unwrap();
                assert!(rewritten.contains(crate::keeper::OWNER_NAMESPACE), "{rewritten}");
            }
            other => panic!("{other:?}"),
        }
        let domain = DomainRef {
            name: "virtkube-golden_tiny-0".into(),
            uuid: libvirt_wire::protocol::parse_uuid(uid).unwrap(),
            id: -1,
        };
        let (header, payload) = reply_naming(procedure::DOMAIN_DEFINE_XML_FLAGS, 2, &domain);
        assert!(note_reply(&session, &header, &payload).is_none());
        assert!(
            session.lock().unwrap().defined.is_some(),
            "the definition is this connection's"
        );
        // Not started before its group has descriptors.
        let starting = call(procedure::DOMAIN_CREATE_WITH_FLAGS, MessageType::Call, 3);
        match decided(&starting, &start(&domain, 0)) {
            Verdict::Deny(why) => assert!(why.contains(r#"group "root" has no descriptors yet"#), "{why}"),
            other => panic!("{other:?}"),
        }
        // Descriptors: only for its own domain, a group its disks name, once.
        let passing = call(procedure::DOMAIN_FD_ASSOCIATE, MessageType::CallWithFds, 4);
        let other = DomainRef {
            name: "someone-else".into(),
            uuid: [9; 16],
            id: -1,
        };
        for (payload, why) in [
            (associate(&other, "root", 1), "not the one this connection defined"),
            (
                associate(&domain, "data", 1),
                "named by none of the domain's disks (root)",
            ),
            (associate(&domain, "root", 0), "with no descriptors"),
        ] {
            match decided(&passing, &payload) {
                Verdict::Deny(reason) => assert!(reason.contains(why), "{reason}"),
                verdict => panic!("{verdict:?}"),
            }
        }
        assert_eq!(decided(&passing, &associate(&domain, "root", 1)), Verdict::Forward);
        match decided(&passing, &associate(&domain, "root", 1)) {
            Verdict::Deny(why) => assert!(why.contains("already has its descriptors"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Descriptors with any other call: refused.
        match decided(
            &call(procedure::DOMAIN_GET_STATE, MessageType::CallWithFds, 5),
            &[0, 0, 0, 1],
        ) {
            Verdict::Deny(why) => assert!(why.contains("only DOMAIN_FD_ASSOCIATE"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Started paused, without AUTODESTROY, whatever was asked.
        match decided(&starting, &start(&domain, START_AUTODESTROY)) {
            Verdict::Rewrite(payload) => {
                let mut d = Decoder::new(&payload);
                assert_eq!(DomainRef::decode(&mut d).unwrap(), domain);
                assert_eq!(d.u32("flags").unwrap(), START_PAUSED);
            }
            other => panic!("{other:?}"),
        }
        let (header, payload) = reply_naming(procedure::DOMAIN_CREATE_WITH_FLAGS, 3, &domain);
        match note_reply(&session, &header, &payload) {
            Some(Noted::Created(created)) => {
                assert!(created.defined && created.run, "{created:?}");
                assert_eq!(created.domain, domain);
            }
            other => panic!("{other:?}"),
        }
        assert!(session.lock().unwrap().defined.is_none());
    }

    #[test]
    fn each_caller_holds_at_most_its_share_of_connections() {
        let connections = Connections::default();
        let a = Identity::Pod { uid: "a".into() };
        let b = Identity::Pod { uid: "b".into() };
        let first = connections.hold(&a, 2).unwrap();
        let _second = connections.hold(&a, 2).unwrap();
        let refused = connections.hold(&a, 2).unwrap_err();
        assert!(refused.contains("pod a already holds 2 connections"), "{refused}");
        // Another caller is not affected.
        let _other = connections.hold(&b, 2).unwrap();
        drop(first);
        assert!(connections.hold(&a, 2).is_ok());
    }
}
