//! The shim's I/O: connect, create the domain, stream its console, and drive
//! the [`Supervisor`] with lifecycle events, signals and timers until the VM
//! is gone. Every libvirt call used is listed here, so a future filtering
//! gate can allow exactly these: AUTH_LIST, CONNECT_OPEN,
//! CONNECT_SUPPORTS_FEATURE, CONNECT_GET_CAPABILITIES, DOMAIN_CREATE_XML,
//! CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY, DOMAIN_OPEN_CONSOLE,
//! DOMAIN_GET_STATE, DOMAIN_SHUTDOWN_FLAGS, DOMAIN_DESTROY_FLAGS, CONNECT_CLOSE.

use std::time::Duration;

use libvirt_wire::{Client, ConsoleReader, ConsoleWriter, DomainRef, LibvirtError, Options, flags};
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
/// the guest's console on stdout.
pub fn log(message: impl AsRef<str>) {
    eprintln!("[virtkube-shim] {}", message.as_ref());
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
    signals: &mut mpsc::Receiver<i32>,
) -> Exit {
    let started = tokio::select! {
        started = start(config, endpoint, template, instance) => started,
        Some(signal) = signals.recv() => {
            log(format!("signal {signal} before the VM started: exiting"));
            return Exit::Signal(signal);
        }
    };
    let (client, domain) = match started {
        Ok(started) => started,
        Err(exit) => return exit,
    };
    let exit = supervise(config, &client, &domain, signals).await;
    if !config.autodestroy
        && !matches!(
            exit,
            Exit::GuestStopped | Exit::DestroyedExternally | Exit::ForcedStop(_) | Exit::LostLibvirtd(_)
        )
    {
        // Without AUTODESTROY nothing else would end the domain.
        let _ = client.destroy(&domain, 0).await;
    }
    exit
}

async fn start(
    config: &Config,
    endpoint: &Endpoint,
    template: &ResolvedTemplate,
    instance: &Instance,
) -> Result<(Client, DomainRef), Exit> {
    let (client, uri) = connect(endpoint, config.connect_timeout).await.map_err(|e| {
        // Only a missing or refusing libvirtd is retried; other errors end the first try.
        let waited = match config.connect_timeout.as_secs() {
            secs if secs > 0 && is_retryable(&e) => format!(" (tried for {secs} s)"),
            _ => String::new(),
        };
        match endpoint.advice() {
            Some(advice) => Exit::StartFailed(format!("{e}{waited}; {advice}")),
            None => Exit::StartFailed(format!("{e}{waited}")),
        }
    })?;
    let caps = client
        .capabilities()
        .await
        .map_err(|e| Exit::StartFailed(format!("cannot read the node's capabilities: {e}")))?;
    let host = host::facts_from_capabilities(&caps, template.arch.as_str()).map_err(Exit::StartFailed)?;
    let xml = render::render(template, instance, &host).map_err(|e| Exit::StartFailed(e.to_string()))?;
    let mut create_flags = flags::START_VALIDATE;
    if config.autodestroy {
        create_flags |= flags::START_AUTODESTROY;
    }
    let domain = client
        .create_xml(&xml, create_flags)
        .await
        .map_err(|e| Exit::StartFailed(format!("libvirt refused the domain: {e}")))?;
    log(format!(
        "started domain {} ({}) on {}{}",
        domain.name,
        domain.uuid_string(),
        uri,
        if config.autodestroy { "" } else { " without AUTODESTROY" }
    ));
    Ok((client, domain))
}

/// Connects, trying again while libvirtd is not there yet (its socket missing,
/// the connection refused) for up to `patience`: a virthost that is starting or
/// restarting. Other errors (a refused handshake, a bad URI) fail at once.
async fn connect(endpoint: &Endpoint, patience: Duration) -> Result<(Client, String), libvirt_wire::Error> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut said_so = false;
    loop {
        let uri = endpoint.uri_now(std::path::Path::new(DEFAULT_SOCKET).exists());
        let attempt = tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, Client::connect(uri, Options::default()));
        let error = match attempt.await {
            Ok(Ok(client)) => return Ok((client, uri.to_owned())),
            Ok(Err(e)) => e,
            Err(_) => libvirt_wire::Error::Connect {
                target: uri.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", CONNECT_ATTEMPT_TIMEOUT.as_secs()),
                ),
            },
        };
        if !is_retryable(&error) || tokio::time::Instant::now() + CONNECT_RETRY_INTERVAL > deadline {
            return Err(error);
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

async fn supervise(config: &Config, client: &Client, domain: &DomainRef, signals: &mut mpsc::Receiver<i32>) -> Exit {
    let mut events = match client.lifecycle_events(domain).await {
        Ok(events) => events,
        Err(e) => {
            let _ = client.destroy(domain, 0).await;
            return Exit::StartFailed(format!("cannot subscribe to the domain's events: {e}"));
        }
    };
    let console_output = match client.open_console(domain, None, flags::CONSOLE_FORCE).await {
        Ok(console) => {
            let (reader, writer) = console.split();
            tokio::spawn(copy_stdin_to_console(writer));
            Some(tokio::spawn(copy_console_to_stdout(reader)))
        }
        Err(e) => {
            log(format!("no serial console: {e}"));
            None
        }
    };

    let mut supervisor = Supervisor::new(config.shutdown_timeout);
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let shutdown_deadline = tokio::time::sleep_until(far_future);
    tokio::pin!(shutdown_deadline);
    let mut poll = tokio::time::interval(STATE_POLL);
    poll.tick().await;

    let exit = loop {
        let input = tokio::select! {
            event = events.next() => match event {
                Some(event) => Input::Lifecycle(event),
                None => Input::ConnectionLost(client.closed().await.to_string()),
            },
            Some(signal) = signals.recv() => Input::Signal(signal),
            () = &mut shutdown_deadline => {
                shutdown_deadline.as_mut().reset(far_future);
                Input::ShutdownTimeout
            }
            error = client.closed() => Input::ConnectionLost(error.to_string()),
            _ = poll.tick() => match client.get_state(domain).await {
                // The poll only stands in for a lost event: a STOPPED event may
                // still be on its way (the domain can vanish before it is sent),
                // and it says why the domain stopped.
                Err(e) if e.libvirt().is_some_and(|l| l.is_no_domain()) => {
                    match tokio::time::timeout(LATE_EVENT_GRACE, events.next()).await {
                        Ok(Some(event)) => Input::Lifecycle(event),
                        _ => Input::DomainGone,
                    }
                }
                Err(e) if e.is_connection_lost() => Input::ConnectionLost(e.to_string()),
                _ => continue,
            },
        };
        match supervisor.on(input) {
            Action::None => {}
            Action::Log(line) => log(line),
            Action::Shutdown { timeout } => {
                log(format!(
                    "stop requested: asking the guest to shut down (ACPI), destroying it after {}s",
                    timeout.as_secs()
                ));
                let mut request = client.shutdown(domain, flags::SHUTDOWN_ACPI_POWER_BTN).await;
                if let Err(e) = &request
                    && e.libvirt()
                        .is_some_and(|l| l.code == LibvirtError::INVALID_ARG || l.code == LibvirtError::NO_SUPPORT)
                {
                    // Drivers without ACPI (libvirt's test driver) take the default method.
                    request = client.shutdown(domain, 0).await;
                }
                if let Err(e) = request {
                    log(format!("the shutdown request failed: {e}"));
                }
                shutdown_deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
            Action::Destroy(exit) => {
                log(format!("destroying the domain: {exit}"));
                match client.destroy(domain, 0).await {
                    Ok(()) => break exit,
                    Err(e)
                        if e.libvirt()
                            .is_some_and(|l| l.is_no_domain() || l.code == LibvirtError::OPERATION_INVALID) =>
                    {
                        break exit;
                    }
                    Err(e) if e.is_connection_lost() => break Exit::LostLibvirtd(e.to_string()),
                    Err(e) => log(format!("destroy failed, waiting for the domain to stop: {e}")),
                }
            }
            Action::Exit(exit) => break exit,
        }
    };
    if let Some(output) = console_output {
        flush_console(output).await;
    }
    exit
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
            Ok(Some(bytes)) => {
                if stdout.write_all(&bytes).await.is_err() || stdout.flush().await.is_err() {
                    return;
                }
            }
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

async fn copy_stdin_to_console(writer: ConsoleWriter) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 4096];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return, // stdin closed (e.g. /dev/null): the console stays output-only.
            Ok(n) => {
                if writer.write(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
