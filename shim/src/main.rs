//! virtkube-shim: the VM's PID 1. See the README's "The shim" section for its
//! contract: environment, flags and exit codes.

use std::collections::HashMap;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use virtkube_shim::config::{self, Config, Mode};
use virtkube_shim::exit::Exit;
use virtkube_shim::pid1;
use virtkube_shim::render::{self, HostFacts};
use virtkube_shim::runtime::{self, log};
use virtkube_shim::startup;

fn main() {
    runtime::install_logger();
    let environment = config::Environment::from_os(std::env::vars_os());
    let config = environment
        .check()
        .and_then(|()| config::args_from_os(std::env::args_os().skip(1)))
        .and_then(|args| config::from_env(|k| environment.get(k), &args));
    let config = match config {
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
        Mode::Operate(op) => std::process::exit(operate(&config, op)),
        Mode::ServeFile(path) => {
            if let Err(e) = virtkube_shim::serve_file::serve(path, virtkube_shim::serve_file::IMPORT_PORT) {
                eprintln!("virtkube-shim serve-file: {e}");
                std::process::exit(1);
            }
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
    let exit = runtime.block_on(async_main(&config, environment.into_map()));
    finish(Some(&config), exit)
}

/// The second process: asks PID 1 for `op`. 0 when done, 1 when not.
fn operate(config: &Config, op: virtkube_shim::control::Op) -> i32 {
    use std::io::IsTerminal;
    if op == virtkube_shim::control::Op::Screenshot && std::io::stdout().is_terminal() {
        eprintln!(
            "virtkube-shim: a screenshot is an image: send it to a file (kubectl exec POD -- /virtkube-shim screenshot > screen.png)"
        );
        return 1;
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|runtime| {
            let mut stdout = std::io::stdout().lock();
            runtime.block_on(virtkube_shim::control::request(&config.control_socket, op, &mut stdout))
        });
    match result {
        Ok(what) => {
            eprintln!("virtkube-shim {}: {what}", op.name());
            0
        }
        Err(why) => {
            eprintln!("virtkube-shim {}: {why}", op.name());
            1
        }
    }
}

/// Logs why the shim exits, leaves the reason where Kubernetes shows it
/// (`kubectl describe pod`), and exits. Never returns.
fn finish(config: Option<&Config>, exit: Exit) -> ! {
    let line = format!("exit {}: {exit}", exit.code());
    log(&line);
    let line = virtkube_shim::text::printable(&line, virtkube_shim::text::MAX_TERMINATION_MESSAGE);
    let path = config.map_or_else(|| config::DEFAULT_TERMINATION_LOG.into(), |c| c.termination_log.clone());
    // Kubernetes mounts the file; elsewhere (Docker) it does not exist and is not created.
    if path.exists() {
        let _ = std::fs::write(&path, format!("{line}\n"));
    }
    std::process::exit(exit.code())
}

async fn async_main(config: &Config, env: HashMap<String, String>) -> Exit {
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

    // Until the VM exists there is nothing to stop: a stop signal ends the
    // shim at once, also while it waits for a file or the Kubernetes API.
    let world = startup::Live::default();
    let loaded = tokio::select! {
        loaded = startup::load(config, env, &world) => loaded,
        signal = runtime::stop_signal(&mut signals) => {
            log(format!("signal {signal} before the VM started: exiting"));
            return Exit::Signal(signal);
        }
    };
    let (template, facts, endpoint) = match loaded {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    if config.mode == Mode::PrintXml {
        // Without a connection the node's facts are unknown: assume TCG (no KVM).
        return match render::render(&template, &facts.instance, &HostFacts::qemu(false)) {
            Ok(xml) => {
                print!("{xml}");
                Exit::PrintedXml
            }
            Err(e) => Exit::StartFailed(e.to_string()),
        };
    }
    runtime::run(config, &endpoint, &template, &facts.instance, &mut signals).await
}

/// Delivers SIGTERM, SIGINT, SIGQUIT and SIGHUP as numbers.
fn forward_signals() -> std::io::Result<mpsc::Receiver<runtime::Signal>> {
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
                if tx.send((number, tokio::time::Instant::now())).await.is_err() {
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
