//! Runs the real shim binary and watches it like a container runtime would.
#![allow(clippy::unwrap_used, dead_code)] // test helpers: a panic is the failure report

pub mod fake_libvirtd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Shim {
    child: Child,
    pub stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pub dir: PathBuf,
}

fn pump(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("virtkube-shim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Shim {
    /// Starts the shim with a template (YAML text), extra environment, and
    /// optionally a stdin pipe.
    pub fn start(name: &str, template: &str, env: &[(&str, &str)], args: &[&str], piped_stdin: bool) -> Shim {
        Shim::start_with(name, template, env, args, piped_stdin, true)
    }

    /// As [`Shim::start`]; with `read_stdout` false, stdout is a pipe nobody
    /// reads (a stalled log collector, a terminal paused with Ctrl-S).
    pub fn start_with(
        name: &str,
        template: &str,
        env: &[(&str, &str)],
        args: &[&str],
        piped_stdin: bool,
        read_stdout: bool,
    ) -> Shim {
        let dir = scratch(name);
        let template_file = dir.join("template.yaml");
        std::fs::write(&template_file, template).unwrap();
        // As Kubernetes does, provide an (empty) termination message file.
        std::fs::write(dir.join("termination-log"), "").unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtkube-shim"));
        cmd.args(args)
            .env_clear()
            .env("VIRTKUBE_TEMPLATE_FILE", &template_file)
            .env("VIRTKUBE_ANNOTATIONS_FILE", dir.join("annotations"))
            .env("VIRTKUBE_TERMINATION_LOG", dir.join("termination-log"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if piped_stdin { Stdio::piped() } else { Stdio::null() });
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = match read_stdout {
            true => pump(child.stdout.take().unwrap()),
            // Keep the read end open in the child handle, unread.
            false => Arc::new(Mutex::new(Vec::new())),
        };
        let stderr = pump(child.stderr.take().unwrap());
        Shim {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn report(&self) -> String {
        format!(
            "--- shim stderr ---\n{}\n--- shim stdout ---\n{}",
            self.stderr(),
            self.stdout()
        )
    }

    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) {
        self.wait_for(|s| s.stdout().contains(needle), timeout, needle);
    }

    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) {
        self.wait_for(|s| s.stderr().contains(needle), timeout, needle);
    }

    fn wait_for(&self, done: impl Fn(&Shim) -> bool, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the exit code (128+N for a signal death), failing after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the pumps drain
                use std::os::unix::process::ExitStatusExt;
                return status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the shim did not exit within {timeout:?}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn expect_exit(&mut self, code: i32, timeout: Duration) {
        let got = self.wait_exit(timeout);
        assert_eq!(got, code, "unexpected exit code\n{}", self.report());
    }

    pub fn termination_message(&self) -> String {
        std::fs::read_to_string(self.dir.join("termination-log")).unwrap_or_default()
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// virsh, as an independent observer.
pub fn virsh(uri: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh").arg("-c").arg(uri).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn domstate(uri: &str, domain: &str) -> Option<String> {
    let (ok, out) = virsh(uri, &["domstate", domain]);
    ok.then(|| out.trim().to_owned())
}

/// A libvirtd of its own (test driver only), in a private mount namespace so
/// it shares no state with the system one; for tests that kill libvirtd.
pub struct DisposableLibvirtd {
    pub dir: PathBuf,
    child: Child,
}

impl DisposableLibvirtd {
    pub fn start(name: &str) -> DisposableLibvirtd {
        let dir = scratch(&format!("libvirtd-{name}"));
        let conf = dir.join("libvirtd.conf");
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0770\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let pidfile = dir.join("libvirtd.pid");
        let script = format!(
            "mount -t tmpfs tmpfs /run/libvirt && mount -t tmpfs tmpfs /var/lib/libvirt && mount -t tmpfs tmpfs /var/cache/libvirt && exec libvirtd --config {} --pid-file {}",
            conf.display(),
            pidfile.display()
        );
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = DisposableLibvirtd {
            dir: dir.clone(),
            child,
        };
        let uri = daemon.uri();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !virsh(&uri, &["version"]).0 {
            assert!(
                Instant::now() < deadline,
                "disposable libvirtd did not start: {}",
                std::fs::read_to_string(dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    pub fn uri(&self) -> String {
        format!(
            "test+unix:///default?socket={}",
            self.dir.join("libvirt-sock").display()
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DisposableLibvirtd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}
