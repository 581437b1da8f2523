//! The shim's I/O: connect, create the domain, stream its console, and drive
//! the [`Supervisor`] with lifecycle events, signals and timers until the VM
//! is gone. When libvirtd (or the gate before it) goes away, the VM runs on:
//! the shim reconnects, finds its domain by UUID, subscribes to its events
//! and console again, and carries on. Every libvirt call used is listed
//! here, and the gate allows exactly these: AUTH_LIST, CONNECT_OPEN,
//! CONNECT_SUPPORTS_FEATURE, CONNECT_GET_CAPABILITIES, DOMAIN_CREATE_XML,
//! DOMAIN_LOOKUP_BY_UUID, CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
//! DOMAIN_OPEN_CONSOLE, DOMAIN_GET_STATE, DOMAIN_SHUTDOWN_FLAGS,
//! DOMAIN_DESTROY_FLAGS, CONNECT_CLOSE.

use std::time::Duration;

use libvirt_wire::protocol::procedure;
use libvirt_wire::{
    Client, ConsoleOutput, ConsoleReader, ConsoleWriter, DomainRef, DomainState, LibvirtError, LifecycleEvent, Options,
    flags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use virtkube_api::ResolvedTemplate;

use crate::config::Config;
use crate::endpoint::{DEFAULT_SOCKET, Endpoint};
use crate::exit::Exit;
use crate::host;
use crate::render::{self, Instance};
use crate::supervisor::{Action, Input, Supervisor};

/// A line of the shim's own log, on stderr, prefixed so it stands apart from
/// the guest's console on stdout. Messages carry text from outside (libvirt's
/// errors, template values): it is kept on one line and cut to a bounded length.
pub fn log(message: impl AsRef<str>) {
    eprintln!(
        "[virtkube-shim] {}",
        crate::text::printable(message.as_ref(), crate::text::MAX_LOG_LINE)
    );
}

/// Prints libvirt-wire's warnings and errors (a reply nobody waited for, a
/// listener that fell behind, a malformed event) as the shim's own log lines;
/// its debug chatter stays off.
struct WireLogger;

impl log::Log for WireLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            log(format!("libvirt-wire: {}", record.args()));
        }
    }

    fn flush(&self) {}
}

/// Installs [`WireLogger`] (once; later calls do nothing).
pub fn install_logger() {
    static LOGGER: WireLogger = WireLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// How often the shim checks the domain still exists, in case an event is lost.
const STATE_POLL: Duration = Duration::from_secs(5);
/// How long a poll that finds the domain gone waits for its STOPPED event.
const LATE_EVENT_GRACE: Duration = Duration::from_secs(2);

/// Runs the VM until it is gone. `signals` delivers signal numbers.
pub async fn run(
    config: &Config,
    endpoint: &Endpoint,
    template: &ResolvedTemplate,
    instance: &Instance,
    signals: &mut mpsc::Receiver<Signal>,
) -> Exit {
    let prepared = tokio::select! {
        prepared = prepare(config, endpoint, template, instance) => prepared,
        signal = stop_signal(signals) => {
            log(format!("signal {signal} before the VM started: exiting"));
            return Exit::Signal(signal);
        }
    };
    let (client, uri, xml, disks) = match prepared {
        Ok(prepared) => prepared,
        Err(exit) => return exit,
    };
    // Once DOMAIN_CREATE_XML is sent the domain may exist: the call is not
    // abandoned for a signal (which waits in the channel, its deadline
    // running from its arrival), so the domain is never left behind.
    let domain = match create(config, &client, &uri, &xml, &disks).await {
        Ok(domain) => domain,
        Err(exit) => return exit,
    };
    // QEMU holds its own duplicates now.
    drop(disks);
    // The gate put the guest's pod NIC here before the guest ran; its DHCP
    // is the shim's. (libvirt's test driver runs no guest and has no tap.)
    let test_driver = uri.split(['+', ':']).next() == Some("test");
    if let Some((tap, mac)) = crate::podnet::pod_nic(template, instance)
        && !test_driver
        && let Err(why) = crate::podnet::serve(&tap, mac)
    {
        let _ = timed(
            DESTROY_TIMEOUT,
            procedure::DOMAIN_DESTROY_FLAGS,
            client.destroy(&domain, 0),
        )
        .await;
        return Exit::StartFailed(why);
    }
    // Operations and the display use the connection of the moment (none
    // while the shim reconnects); both end with the shim.
    let (current, watching) = tokio::sync::watch::channel(Some(client.clone()));
    let mut services = tokio::task::JoinSet::new();
    match crate::control::bind(&config.control_socket) {
        Ok(listener) => {
            services.spawn(crate::control::serve(listener, domain.clone(), watching.clone()));
        }
        Err(e) => log(format!(
            "operations (kubectl exec POD -- /virtkube-shim reboot|reset|shutdown|screenshot) are unavailable: cannot listen on {}: {e}; set VIRTKUBE_CONTROL_SOCKET to a writable place",
            config.control_socket.display()
        )),
    }
    if template.vnc == Some(virtkube_api::resolve::VncDisplay::InPod) && !test_driver {
        services.spawn(crate::vnc::serve(
            std::net::Ipv4Addr::LOCALHOST,
            domain.clone(),
            watching,
        ));
    }
    let oom_before = oom_kills();
    let (exit, client) = supervise(config, endpoint, client, &domain, signals, &current).await;
    services.abort_all();
    let _ = std::fs::remove_file(&config.control_socket);
    // On Docker QEMU runs in this container's cgroup: a kill for memory there
    // is why it failed. In a pod it runs in the pod's cgroup, which the shim
    // cannot see; the virthost reports a kill there as an event on the pod.
    let exit = match exit {
        Exit::GuestCrashed(why) if oom_kills() > oom_before => Exit::GuestCrashed(format!(
            "{why}; the kernel killed QEMU for memory in this container's cgroup: raise the container's memory limit (guest memory + QEMU's overhead, VIRTKUBE_QEMU_OVERHEAD {} MiB)",
            config.qemu_overhead.div_ceil(1024 * 1024)
        )),
        Exit::GuestCrashed(why) if instance.pod_uid.is_some() => Exit::GuestCrashed(format!(
            "{why}; if the pod ran out of memory, its events say so (kubectl describe pod: OOMKilled from virtkube-nodeinfo)"
        )),
        other => other,
    };
    if !config.autodestroy
        && !matches!(
            exit,
            Exit::GuestStopped | Exit::DestroyedExternally | Exit::ForcedStop(_) | Exit::LostLibvirtd(_)
        )
    {
        // Without AUTODESTROY nothing else would end the domain.
        let _ = timed(
            DESTROY_TIMEOUT,
            procedure::DOMAIN_DESTROY_FLAGS,
            client.destroy(&domain, 0),
        )
        .await;
    }
    exit
}

/// How many processes the kernel killed for memory in this container's cgroup so far.
fn oom_kills() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    crate::sizing::oom_kills(
        read("/sys/fs/cgroup/memory.events").as_deref(),
        read("/sys/fs/cgroup/memory/memory.oom_control").as_deref(),
    )
}

/// Opens the disks from the container, connects, reads the node's
/// capabilities and renders the domain: nothing exists yet, so a stop signal
/// may cut this short.
async fn prepare(
    config: &Config,
    endpoint: &Endpoint,
    template: &ResolvedTemplate,
    instance: &Instance,
) -> Result<(Client, String, String, Vec<crate::disks::Opened>), Exit> {
    // A private copy may take a while: off the runtime's thread, so that a
    // stop signal is heard meanwhile.
    let (disk_template, scratch) = (template.clone(), config.scratch_dir.clone());
    let seed = crate::disks::Seed::of(instance);
    let disks = tokio::task::spawn_blocking(move || crate::disks::open_all(&disk_template, &scratch, &seed))
        .await
        .map_err(|e| Exit::StartFailed(format!("opening the disks failed: {e}")))?
        .map_err(Exit::StartFailed)?;
    // A limit too small for the VM is the gate's to refuse (it knows the
    // cgroup QEMU joins); no limit at all is worth a warning.
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let limit = crate::sizing::memory_limit(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
    );
    if let Some(warning) = crate::sizing::unlimited_warning(limit, template.memory_bytes, config.qemu_overhead) {
        log(warning);
    }
    let (client, uri) = connect(endpoint, config.connect_timeout).await.map_err(|failed| {
        let waited = match failed.attempts {
            1 => String::new(),
            n => format!(" ({n} attempts over {:.0} s)", failed.waited.as_secs_f64()),
        };
        match endpoint.advice() {
            Some(advice) => Exit::StartFailed(format!("{}{waited}; {advice}", failed.error)),
            None => Exit::StartFailed(format!("{}{waited}", failed.error)),
        }
    })?;
    let over_unix = matches!(
        libvirt_wire::uri::parse(&uri).map(|target| target.transport),
        Ok(libvirt_wire::uri::Transport::Unix(_))
    );
    if let (Some(disk), false) = (disks.first(), over_unix) {
        return Err(Exit::StartFailed(format!(
            "disk {} ({}) comes from the VM container and is passed as a file descriptor, which needs the virthost's unix socket, but the shim reached libvirt at {uri}; mount the node's /var/run/virtkube at /var/run/libvirt (a pod reaching the gate over TCP, like a bare kubectl run, cannot pass files)",
            disk.group, disk.path
        )));
    }
    let caps = client
        .capabilities()
        .await
        .map_err(|e| Exit::StartFailed(format!("cannot read the node's capabilities: {e}")))?;
    let host = host::facts_from_capabilities(&caps, template.arch.as_str()).map_err(Exit::StartFailed)?;
    let xml = render::render(template, instance, &host).map_err(|e| Exit::StartFailed(e.to_string()))?;
    Ok((client, uri, xml, disks))
}

/// Longest the shim waits for libvirtd to create the domain (QEMU starts
/// within a second or two; a loaded node takes longer).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

async fn create(
    config: &Config,
    client: &Client,
    uri: &str,
    xml: &str,
    disks: &[crate::disks::Opened],
) -> Result<DomainRef, Exit> {
    let refused = |e: libvirt_wire::Error| {
        Exit::StartFailed(match e {
            libvirt_wire::Error::Libvirt(e) => format!("libvirt refused the domain: {e}"),
            libvirt_wire::Error::InvalidRequest(why) => format!("the domain cannot be sent to libvirt: {why}"),
            other => format!("creating the domain failed: {other}"),
        })
    };
    let domain = if disks.is_empty() {
        let mut create_flags = flags::START_VALIDATE;
        if config.autodestroy {
            create_flags |= flags::START_AUTODESTROY;
        }
        let creating = client.create_xml(xml, create_flags);
        timed(CREATE_TIMEOUT, procedure::DOMAIN_CREATE_XML, creating)
            .await
            .map_err(refused)?
    } else {
        timed(
            CREATE_TIMEOUT,
            procedure::DOMAIN_CREATE_WITH_FLAGS,
            create_with_disks(config, client, xml, disks),
        )
        .await
        .map_err(refused)?
    };
    log(format!(
        "started domain {} ({}) on {}{}",
        domain.name,
        domain.uuid_string(),
        uri,
        if config.autodestroy { "" } else { " without AUTODESTROY" }
    ));
    Ok(domain)
}

/// A domain with disks passed as descriptors: defined, its descriptors
/// associated, started, and made transient (libvirt takes descriptors only
/// for a domain that exists). A failure before the start undefines it again.
async fn create_with_disks(
    config: &Config,
    client: &Client,
    xml: &str,
    disks: &[crate::disks::Opened],
) -> libvirt_wire::Result<DomainRef> {
    use std::os::fd::AsFd;
    let defined = client.define_xml(xml, flags::DEFINE_VALIDATE).await?;
    let started = async {
        for disk in disks {
            let label = if disk.writable {
                flags::FD_ASSOCIATE_SECLABEL_WRITABLE
            } else {
                0
            };
            client
                .fd_associate(&defined, &disk.group, &[disk.fd.as_fd()], label)
                .await?;
        }
        let start_flags = if config.autodestroy {
            flags::START_AUTODESTROY
        } else {
            0
        };
        client.create_defined(&defined, start_flags).await
    };
    match started.await {
        Ok(running) => {
            // Through the gate it is transient already, and libvirt says so.
            if let Err(e) = client.undefine(&running, 0).await
                && e.libvirt().is_none_or(|e| e.code != OPERATION_INVALID)
            {
                log(format!("the domain runs, but its definition could not be removed: {e}"));
            }
            Ok(running)
        }
        Err(e) => {
            let _ = client.undefine(&defined, 0).await;
            Err(e)
        }
    }
}

/// libvirt's `VIR_ERR_OPERATION_INVALID` (e.g. undefining a transient domain).
const OPERATION_INVALID: i32 = 55;

/// Why connecting failed, after how many attempts and how long.
struct ConnectFailed {
    error: libvirt_wire::Error,
    attempts: u32,
    waited: Duration,
}

/// The shim's connection settings: a console whose stdout is slow keeps at
/// most 256 KiB of guest output (the rest is dropped and reported), so the
/// shim's memory stays small whatever the guest or libvirtd sends.
pub fn wire_options() -> Options {
    Options {
        stream_budget: 256 * 1024,
        ..Options::default()
    }
}

/// The next signal that stops the shim before its VM runs: any but SIGHUP,
/// which is ignored throughout, as documented. Never returns if the signal
/// channel closes (then nothing can stop the shim but SIGKILL, as before).
pub async fn stop_signal(signals: &mut mpsc::Receiver<Signal>) -> i32 {
    loop {
        match signals.recv().await {
            Some((crate::supervisor::signals::HUP, _)) => log("SIGHUP ignored"),
            Some((signal, _)) => return signal,
            None => std::future::pending::<()>().await,
        }
    }
}

/// Connects, trying again while libvirtd is not there yet (its socket missing,
/// the connection refused) for up to `patience`: a virthost that is starting or
/// restarting. Other errors (a refused handshake, a bad URI) fail at once.
async fn connect(endpoint: &Endpoint, patience: Duration) -> Result<(Client, String), ConnectFailed> {
    let started = tokio::time::Instant::now();
    let deadline = started + patience;
    let mut said_so = false;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let uri = endpoint.uri_now(std::path::Path::new(DEFAULT_SOCKET).exists());
        let attempt = tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, Client::connect(uri, wire_options()));
        let error = match attempt.await {
            Ok(Ok(client)) => return Ok((client, uri.to_owned())),
            Ok(Err(e)) => e,
            // The socket accepted, but the handshake was not answered.
            Err(_) => libvirt_wire::Error::Connect {
                target: uri.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the connection was accepted but the handshake got no answer within {} s",
                        CONNECT_ATTEMPT_TIMEOUT.as_secs()
                    ),
                ),
            },
        };
        if !is_retryable(&error) || tokio::time::Instant::now() + CONNECT_RETRY_INTERVAL > deadline {
            return Err(ConnectFailed {
                error,
                attempts,
                waited: started.elapsed(),
            });
        }
        if !said_so {
            log(format!("{error}; trying again for up to {} s", patience.as_secs()));
            said_so = true;
        }
        tokio::time::sleep(CONNECT_RETRY_INTERVAL).await;
    }
}

/// Whether libvirtd is merely not there yet (socket missing, connection refused
/// or unanswered), as opposed to there and refusing us.
fn is_retryable(error: &libvirt_wire::Error) -> bool {
    matches!(error, libvirt_wire::Error::Connect { .. })
}

const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(500);
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the shim waits for libvirtd to answer a call while the VM runs
/// (a state check, the ACPI request). Liveness is the keepalive's to judge:
/// a call that times out is logged, not fatal.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the shim waits for libvirtd to confirm a destroy before it exits
/// anyway, so a stop always ends within the shutdown timeout plus this.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(3);

/// A signal and when it arrived: a stop's deadline runs from the signal, not
/// from when the shim got round to it.
pub type Signal = (i32, tokio::time::Instant);

/// The result of a libvirt call made in the background, so no call ever
/// delays a signal, a timer or an event.
enum Done {
    StateChecked(Result<(DomainState, i32), libvirt_wire::Error>),
    ShutdownRequested {
        result: Result<(), libvirt_wire::Error>,
        acpi: bool,
    },
    Destroyed(Result<(), libvirt_wire::Error>),
}

async fn timed<T>(
    limit: Duration,
    procedure: i32,
    call: impl Future<Output = Result<T, libvirt_wire::Error>>,
) -> Result<T, libvirt_wire::Error> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(libvirt_wire::Error::Timeout {
            procedure,
            timeout: limit,
        }))
}

fn spawn_call(done: &mpsc::UnboundedSender<Done>, call: impl Future<Output = Done> + Send + 'static) {
    let done = done.clone();
    tokio::spawn(async move {
        let _ = done.send(call.await);
    });
}

fn request_shutdown(client: &Client, domain: &DomainRef, done: &mpsc::UnboundedSender<Done>, acpi: bool) {
    let (client, domain) = (client.clone(), domain.clone());
    let flags = if acpi { flags::SHUTDOWN_ACPI_POWER_BTN } else { 0 };
    spawn_call(done, async move {
        let result = timed(
            CALL_TIMEOUT,
            procedure::DOMAIN_SHUTDOWN_FLAGS,
            client.shutdown(&domain, flags),
        )
        .await;
        Done::ShutdownRequested { result, acpi }
    });
}

fn check_state(client: &Client, domain: &DomainRef, done: &mpsc::UnboundedSender<Done>) {
    let (client, domain) = (client.clone(), domain.clone());
    spawn_call(done, async move {
        Done::StateChecked(timed(CALL_TIMEOUT, procedure::DOMAIN_GET_STATE, client.get_state(&domain)).await)
    });
}

fn destroy(client: &Client, domain: &DomainRef, done: &mpsc::UnboundedSender<Done>) {
    let (client, domain) = (client.clone(), domain.clone());
    spawn_call(done, async move {
        Done::Destroyed(
            timed(
                DESTROY_TIMEOUT,
                procedure::DOMAIN_DESTROY_FLAGS,
                client.destroy(&domain, 0),
            )
            .await,
        )
    });
}

/// How one attachment to the domain (a libvirtd connection with its events
/// and console) ended.
enum Detached {
    /// The VM is gone or stopped: exit with this.
    Exit(Exit),
    /// The connection was lost, and the VM may run on.
    Lost(String),
    /// Reattaching failed after the domain was found (its events could not
    /// be subscribed to again): the same outage goes on.
    NotAttached(String),
}

/// The supervision of one VM across attachments.
struct Supervision {
    supervisor: Supervisor,
    /// When the grace period of a requested stop ends.
    stop_deadline: Option<tokio::time::Instant>,
    /// How many times the shim found its domain again after losing libvirtd.
    reattached: u32,
}

/// The container's stdin, read once for the whole run: each attachment's
/// console takes what arrives while it is attached.
type StdinChunks = std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>>;

fn read_stdin() -> StdinChunks {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                // stdin closed (e.g. /dev/null): the console stays output-only.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::sync::Arc::new(tokio::sync::Mutex::new(rx))
}

/// Supervises the running VM until it is gone, reattaching after each loss
/// of libvirtd. Returns the exit and the last connection.
async fn supervise(
    config: &Config,
    endpoint: &Endpoint,
    mut client: Client,
    domain: &DomainRef,
    signals: &mut mpsc::Receiver<Signal>,
    current: &tokio::sync::watch::Sender<Option<Client>>,
) -> (Exit, Client) {
    let mut supervision = Supervision {
        supervisor: Supervisor::new(config.shutdown_timeout),
        stop_deadline: None,
        reattached: 0,
    };
    let stdin = read_stdin();
    // When the current outage began: every attempt of one outage shares its deadline.
    let mut outage: Option<tokio::time::Instant> = None;
    loop {
        let first = supervision.reattached == 0;
        let why = match attend(config, &client, domain, signals, &mut supervision, &stdin, first).await {
            Detached::Exit(exit) => return (exit, client),
            Detached::Lost(why) => {
                outage = None;
                why
            }
            Detached::NotAttached(why) => why,
        };
        current.send_replace(None);
        let lost = *outage.get_or_insert_with(tokio::time::Instant::now);
        log(format!(
            "lost libvirtd ({why}); the VM runs on: reconnecting for up to {} s",
            config
                .reattach_timeout
                .saturating_sub(lost.elapsed())
                .as_secs_f64()
                .ceil()
        ));
        let give_up = lost + config.reattach_timeout;
        match reattach(config, endpoint, domain, signals, &mut supervision, &why, give_up).await {
            Ok(found) => {
                supervision.reattached += 1;
                log(format!(
                    "reattached to domain {} after {:.1} s (reattachment {})",
                    domain.name,
                    lost.elapsed().as_secs_f64(),
                    supervision.reattached
                ));
                current.send_replace(Some(found.clone()));
                client = found;
            }
            Err(exit) => return (exit, client),
        }
    }
}

/// Reconnects and finds the domain again, for up to the reattach timeout,
/// while still taking signals: a stop requested meanwhile is carried out
/// once reattached, and one that runs out of time (or a second signal)
/// ends the shim. Its exit ends the VM: the gate destroys a domain whose
/// container is gone.
async fn reattach(
    config: &Config,
    endpoint: &Endpoint,
    domain: &DomainRef,
    signals: &mut mpsc::Receiver<Signal>,
    supervision: &mut Supervision,
    why: &str,
    give_up: tokio::time::Instant,
) -> Result<Client, Exit> {
    let far_future = give_up + Duration::from_secs(86_400 * 365);
    let finding = find_again(endpoint, domain, give_up);
    tokio::pin!(finding);
    loop {
        let stop_at = supervision.stop_deadline.unwrap_or(far_future);
        let action = tokio::select! {
            found = &mut finding => {
                return match found {
                    Found::Again(client) => Ok(client),
                    // libvirtd (or the gate) answered: the domain is no longer there for us.
                    Found::Gone(e) if supervision.stop_deadline.is_some() => {
                        log(format!("the domain is gone after the requested stop: {e}"));
                        Err(Exit::GuestStopped)
                    }
                    Found::Gone(e) => Err(Exit::LostLibvirtd(format!(
                        "{why}; when libvirtd came back the domain was gone: {e}"
                    ))),
                    Found::TimedOut(last) => Err(Exit::LostLibvirtd(format!(
                        "{why}; it did not come back within {} s (last: {last})",
                        config.reattach_timeout.as_secs()
                    ))),
                };
            }
            Some((signal, at)) = signals.recv() => match supervision.supervisor.on(Input::Signal(signal)) {
                Action::Shutdown { timeout } => {
                    supervision.stop_deadline = Some(at + timeout);
                    log(format!(
                        "stop requested while libvirtd is away: the guest is asked to shut down once reattached; this container ends after {} s",
                        timeout.as_secs()
                    ));
                    continue;
                }
                other => other,
            },
            () = tokio::time::sleep_until(stop_at) => {
                supervision.stop_deadline = None;
                supervision.supervisor.on(Input::ShutdownTimeout)
            }
        };
        match action {
            Action::Destroy(exit) | Action::Exit(exit) => {
                log(format!(
                    "{exit}; exiting without libvirtd: the gate destroys the VM when this container ends"
                ));
                return Err(exit);
            }
            Action::Log(line) => log(line),
            Action::None | Action::Shutdown { .. } => {}
        }
    }
}

/// How a search for the domain after an outage ended.
enum Found {
    /// Connected, and the domain is there.
    Again(Client),
    /// libvirtd (or the gate) answered that it is not.
    Gone(LibvirtError),
    /// The deadline passed; the last error.
    TimedOut(String),
}

/// How often the shim tries to reach libvirtd again during an outage.
const REATTACH_RETRY: Duration = Duration::from_millis(500);

/// Connects and looks the domain up until `give_up`. Every failure but an
/// answer about the domain is worth another try: during an outage the socket
/// may be missing, refuse, or lead to a gate still waiting for its libvirtd.
async fn find_again(endpoint: &Endpoint, domain: &DomainRef, give_up: tokio::time::Instant) -> Found {
    let mut last = String::from("no attempt finished");
    loop {
        let attempt = async {
            // Whatever connecting fails with (even a gate's refusal while its
            // libvirtd is away) is part of the outage.
            let (client, _) = connect(endpoint, Duration::ZERO)
                .await
                .map_err(|failed| failed.error.to_string())?;
            let lookup = client.lookup_by_uuid(&domain.uuid);
            match timed(CALL_TIMEOUT, procedure::DOMAIN_LOOKUP_BY_UUID, lookup).await {
                Ok(_) => Ok(Found::Again(client)),
                Err(libvirt_wire::Error::Libvirt(e)) => Ok(Found::Gone(e)),
                Err(e) => Err(e.to_string()),
            }
        };
        match tokio::time::timeout_at(give_up, attempt).await {
            Ok(Ok(found)) => return found,
            Ok(Err(error)) => last = error,
            Err(_) => return Found::TimedOut(last),
        }
        if tokio::time::Instant::now() + REATTACH_RETRY >= give_up {
            return Found::TimedOut(last);
        }
        tokio::time::sleep(REATTACH_RETRY).await;
    }
}

/// One attachment: subscribes to the domain's events, opens its console and
/// drives the supervisor until the VM is gone or the connection is lost.
async fn attend(
    config: &Config,
    client: &Client,
    domain: &DomainRef,
    signals: &mut mpsc::Receiver<Signal>,
    supervision: &mut Supervision,
    stdin: &StdinChunks,
    first: bool,
) -> Detached {
    let mut events = match timed(
        CALL_TIMEOUT,
        procedure::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
        client.lifecycle_events(domain),
    )
    .await
    {
        Ok(events) => events,
        Err(e) if !first => {
            return Detached::NotAttached(format!("cannot subscribe to the domain's events again: {e}"));
        }
        Err(e) => {
            let _ = timed(
                DESTROY_TIMEOUT,
                procedure::DOMAIN_DESTROY_FLAGS,
                client.destroy(domain, 0),
            )
            .await;
            return Detached::Exit(Exit::StartFailed(format!(
                "cannot subscribe to the domain's events: {e}"
            )));
        }
    };
    let console = timed(
        CALL_TIMEOUT,
        procedure::DOMAIN_OPEN_CONSOLE,
        client.open_console(domain, None, flags::CONSOLE_FORCE),
    )
    .await;
    let (console_output, console_input) = match console {
        Ok(console) => {
            let (reader, writer) = console.split();
            (
                Some(tokio::spawn(copy_console_to_stdout(reader))),
                Some(tokio::spawn(copy_stdin_to_console(stdin.clone(), writer))),
            )
        }
        Err(e) => {
            log(format!("no serial console: {e}"));
            (None, None)
        }
    };

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    // Each timer is one sleep re-armed as needed: the shutdown grace period,
    // the wait for a STOPPED event after a poll found the domain gone, and
    // the wait for libvirtd to confirm a destroy.
    let shutdown_deadline = tokio::time::sleep_until(supervision.stop_deadline.unwrap_or(far_future));
    let gone_deadline = tokio::time::sleep_until(far_future);
    let destroy_deadline = tokio::time::sleep_until(far_future);
    tokio::pin!(shutdown_deadline, gone_deadline, destroy_deadline);
    if supervision.stop_deadline.is_some() {
        // A stop requested while libvirtd was away (or whose request it may have lost).
        request_shutdown(client, domain, &done_tx, true);
    }
    let mut poll = tokio::time::interval(STATE_POLL);
    poll.tick().await;
    let mut poll_in_flight = false;
    // The exit a requested destroy ends in, once libvirtd confirms it.
    let mut destroying: Option<Exit> = None;
    let mut destroy_refused: Option<String> = None;
    let mut signal_time = tokio::time::Instant::now();

    let detached = loop {
        // A lost connection while destroying ends the shim: its exit ends the VM.
        let lost = |why: String, destroying: &mut Option<Exit>| match destroying.take() {
            Some(exit) => Detached::Exit(exit),
            None => Detached::Lost(why),
        };
        let input = tokio::select! {
            event = events.next() => match event {
                Some(LifecycleEvent::Missed(n)) => {
                    log(format!("{n} lifecycle events were dropped (the shim fell behind): re-reading the domain's state"));
                    if !poll_in_flight {
                        poll_in_flight = true;
                        check_state(client, domain, &done_tx);
                    }
                    continue;
                }
                Some(event) => Input::Lifecycle(event),
                None => break lost(client.closed().await.to_string(), &mut destroying),
            },
            Some((signal, at)) = signals.recv() => {
                signal_time = at;
                Input::Signal(signal)
            }
            () = &mut shutdown_deadline => {
                shutdown_deadline.as_mut().reset(far_future);
                supervision.stop_deadline = None;
                Input::ShutdownTimeout
            }
            () = &mut gone_deadline => {
                gone_deadline.as_mut().reset(far_future);
                Input::DomainGone
            }
            () = &mut destroy_deadline => {
                let exit = destroying.take().unwrap_or(Exit::ForcedStop("a destroy was requested".into()));
                let what = match destroy_refused.take() {
                    Some(why) => format!("libvirtd refused the destroy ({why}) and the domain did not stop within {} s", DESTROY_TIMEOUT.as_secs()),
                    None => format!("libvirtd did not confirm the destroy within {} s", DESTROY_TIMEOUT.as_secs()),
                };
                log(format!(
                    "{what}; exiting anyway{}",
                    if config.autodestroy { " (the gate, or AUTODESTROY, ends the domain with this container)" } else { ": the domain may be left running" }
                ));
                break Detached::Exit(exit);
            }
            error = client.closed() => break lost(error.to_string(), &mut destroying),
            _ = poll.tick() => {
                if !poll_in_flight {
                    poll_in_flight = true;
                    check_state(client, domain, &done_tx);
                }
                continue;
            }
            Some(done) = done_rx.recv() => match done {
                Done::StateChecked(result) => {
                    poll_in_flight = false;
                    match result {
                        // The poll only stands in for a lost event: a STOPPED event
                        // may still be on its way (the domain can vanish before it is
                        // sent), and it says why the domain stopped.
                        Err(e) if e.libvirt().is_some_and(|l| l.is_no_domain()) => {
                            if gone_deadline.deadline() == far_future {
                                gone_deadline.as_mut().reset(tokio::time::Instant::now() + LATE_EVENT_GRACE);
                            }
                            continue;
                        }
                        Err(e) if e.is_connection_lost() => break lost(e.to_string(), &mut destroying),
                        Err(e) => {
                            log(format!("state check failed: {e}"));
                            continue;
                        }
                        Ok(_) => continue,
                    }
                }
                Done::ShutdownRequested { result: Err(e), acpi: true }
                    if e.libvirt().is_some_and(|l| l.code == LibvirtError::INVALID_ARG || l.code == LibvirtError::NO_SUPPORT) =>
                {
                    // Drivers without ACPI (libvirt's test driver) take the default method.
                    request_shutdown(client, domain, &done_tx, false);
                    continue;
                }
                Done::ShutdownRequested { result: Err(e), .. } => {
                    log(format!("the shutdown request failed: {e}"));
                    continue;
                }
                Done::ShutdownRequested { result: Ok(()), .. } => continue,
                Done::Destroyed(result) => {
                    let Some(exit) = destroying.take() else { continue };
                    match result {
                        Ok(()) => break Detached::Exit(exit),
                        Err(e) if e.libvirt().is_some_and(|l| l.is_no_domain() || l.code == LibvirtError::OPERATION_INVALID) => break Detached::Exit(exit),
                        Err(e) if e.is_connection_lost() => break Detached::Exit(exit),
                        Err(e) => {
                            log(format!("destroy failed, waiting for the domain to stop: {e}"));
                            destroy_refused = Some(e.to_string());
                            destroying = Some(exit);
                            continue;
                        }
                    }
                }
            },
        };
        match supervision.supervisor.on(input) {
            Action::None => {}
            Action::Log(line) => log(line),
            Action::Shutdown { timeout } => {
                log(format!(
                    "stop requested: asking the guest to shut down (ACPI), destroying it after {}s",
                    timeout.as_secs()
                ));
                supervision.stop_deadline = Some(signal_time + timeout);
                shutdown_deadline.as_mut().reset(signal_time + timeout);
                request_shutdown(client, domain, &done_tx, true);
            }
            Action::Destroy(exit) => {
                log(format!("destroying the domain: {exit}"));
                destroying = Some(exit);
                destroy_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + DESTROY_TIMEOUT);
                destroy(client, domain, &done_tx);
            }
            Action::Exit(exit) => break Detached::Exit(exit),
        }
    };
    if let Some(input) = console_input {
        input.abort();
    }
    if let (Some(output), Detached::Exit(_)) = (console_output, &detached) {
        flush_console(output).await;
    }
    detached
}

/// Gives the console a moment to deliver the guest's last words.
async fn flush_console(output: JoinHandle<()>) {
    if tokio::time::timeout(Duration::from_secs(1), output).await.is_err() {
        // The stream did not end on its own (the domain may linger); stop waiting.
    }
}

async fn copy_console_to_stdout(mut reader: ConsoleReader) {
    let mut stdout = tokio::io::stdout();
    loop {
        match reader.read().await {
            Ok(Some(ConsoleOutput::Data(bytes))) => {
                if stdout.write_all(&bytes).await.is_err() || stdout.flush().await.is_err() {
                    return;
                }
            }
            Ok(Some(ConsoleOutput::Lost(n))) => log(format!(
                "{n} bytes of guest console output were dropped: stdout was not being read fast enough"
            )),
            Ok(None) => return,
            Err(e) => {
                if !e.is_connection_lost() {
                    log(format!("console stream ended: {e}"));
                }
                return;
            }
        }
    }
}

async fn copy_stdin_to_console(stdin: StdinChunks, writer: ConsoleWriter) {
    let mut stdin = stdin.lock().await;
    while let Some(chunk) = stdin.recv().await {
        if writer.write(&chunk).await.is_err() {
            return;
        }
    }
}
