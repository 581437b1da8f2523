//! virtkube-shim: the VM's PID 1. See the README's "The shim" section for its
//! contract: environment, flags and exit codes.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use virtkube_api::{Overrides, ResolvedTemplate, resolve};
use virtkube_shim::config::{self, Config, Mode};
use virtkube_shim::exit::Exit;
use virtkube_shim::instance::{self, Facts};
use virtkube_shim::pid1;
use virtkube_shim::render::{self, HostFacts};
use virtkube_shim::runtime::{self, log};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match config::from_env(|k| std::env::var(k).ok(), &args) {
        Ok(config) => config,
        Err(e) => finish(None, Exit::Usage(e)),
    };
    match config.mode {
        Mode::Help => {
            print!("{}", config::USAGE);
            std::process::exit(0);
        }
        Mode::Version => {
            println!("virtkube-shim {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        Mode::Run | Mode::PrintXml => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => finish(
            Some(&config),
            Exit::StartFailed(format!("cannot start the async runtime: {e}")),
        ),
    };
    let exit = runtime.block_on(async_main(&config));
    finish(Some(&config), exit)
}

/// Logs why the shim exits, leaves the reason where Kubernetes shows it
/// (`kubectl describe pod`), and exits. Never returns.
fn finish(config: Option<&Config>, exit: Exit) -> ! {
    let line = format!("exit {}: {exit}", exit.code());
    log(&line);
    let path = config.map_or_else(|| config::DEFAULT_TERMINATION_LOG.into(), |c| c.termination_log.clone());
    // Kubernetes mounts the file; elsewhere (Docker) it does not exist and is not created.
    if path.exists() {
        let _ = std::fs::write(&path, format!("{line}\n"));
    }
    std::process::exit(exit.code())
}

async fn async_main(config: &Config) -> Exit {
    let mut signals = match forward_signals() {
        Ok(rx) => rx,
        Err(e) => return Exit::StartFailed(format!("cannot install signal handlers: {e}")),
    };
    let sys = pid1::Linux;
    match pid1::take_init_duty(&sys) {
        Ok(true) => {}
        Ok(false) => log("not PID 1: reaping orphans as a subreaper"),
        Err(e) => log(format!("cannot become a subreaper ({e}); orphans may stay zombies")),
    }
    tokio::spawn(reap_on_sigchld());

    let (template, facts) = match load(config) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    if config.mode == Mode::PrintXml {
        // Without a connection the node's facts are unknown: assume TCG (no KVM).
        return match render::render(&template, &facts.instance, &HostFacts::qemu(false)) {
            Ok(xml) => {
                print!("{xml}");
                Exit::GuestStopped
            }
            Err(e) => Exit::StartFailed(e.to_string()),
        };
    }
    runtime::run(config, &template, &facts.instance, &mut signals).await
}

fn load(config: &Config) -> Result<(ResolvedTemplate, Facts), Exit> {
    let annotations_text = match std::fs::read_to_string(&config.annotations_file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Exit::Usage(format!(
                "cannot read the annotations file {}: {e}",
                config.annotations_file.display()
            )));
        }
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let facts = instance::gather(
        |k| std::env::var(k).ok(),
        annotations_text.as_deref(),
        &hostname,
        config.template_name.clone(),
    )
    .map_err(Exit::Usage)?;
    if let Some(name) = &facts.instance.template_name
        && !config.template_file.exists()
    {
        return Err(Exit::StartFailed(format!(
            "template {name:?} is to be read from the Kubernetes API, which this shim does not do yet; bake the template into the image at {}",
            config.template_file.display()
        )));
    }
    let text = std::fs::read_to_string(&config.template_file).map_err(|e| {
        Exit::StartFailed(format!(
            "cannot read the template file {}: {e} (bake a VirtTemplate into the image there, or set VIRTKUBE_TEMPLATE_FILE)",
            config.template_file.display()
        ))
    })?;
    let mut template = resolve::parse_yaml(&text)
        .map_err(|e| Exit::StartFailed(format!("{}: {e}", config.template_file.display())))?;
    Overrides::from_annotations(&facts.annotations)
        .and_then(|o| o.apply(&mut template))
        .map_err(|e| Exit::StartFailed(e.to_string()))?;
    let mut facts = facts;
    if facts.instance.template_name.is_none() {
        facts.instance.template_name = template.name.clone();
    }
    Ok((template, facts))
}

/// Delivers SIGTERM, SIGINT, SIGQUIT and SIGHUP as numbers.
fn forward_signals() -> std::io::Result<mpsc::Receiver<i32>> {
    let (tx, rx) = mpsc::channel(16);
    for (kind, number) in [
        (SignalKind::terminate(), 15),
        (SignalKind::interrupt(), 2),
        (SignalKind::quit(), 3),
        (SignalKind::hangup(), 1),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(number).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

async fn reap_on_sigchld() {
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        log("cannot watch SIGCHLD; orphans may stay zombies");
        return;
    };
    loop {
        for (pid, status) in pid1::reap_zombies(&pid1::Linux) {
            log(format!("reaped orphan {pid} (status {status:#x})"));
        }
        // Also wake periodically: SIGCHLDs coalesce.
        let _ = tokio::time::timeout(Duration::from_secs(30), sigchld.recv()).await;
    }
}
