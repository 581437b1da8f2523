//! The shim's configuration from its flags and environment (DESIGN.md's
//! contract). Pure: the environment is passed in.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Default template file baked into VM images.
pub const DEFAULT_TEMPLATE_FILE: &str = "/etc/virtkube/template.yaml";
/// Default libvirt URI.
pub const DEFAULT_URI: &str = "qemu:///system";
/// Default seconds between the ACPI request and destroy (under Kubernetes' 30 s grace).
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 25;
/// Default seconds to keep trying to reach libvirtd: long enough for a virthost
/// pod that is (re)starting, so a VM pod does not crash-loop meanwhile.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 30;
/// How long a running VM's shim keeps reconnecting after losing libvirtd
/// (a virthost restart or upgrade), in seconds.
pub const DEFAULT_REATTACH_TIMEOUT: u64 = 300;
/// Where Kubernetes reads a container's termination message.
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";
/// Where a downward API volume puts the pod's annotations.
pub const DEFAULT_ANNOTATIONS_FILE: &str = "/etc/podinfo/annotations";

/// Usage text (`--help`).
pub const USAGE: &str = "\
virtkube-shim: runs the VM of this container image for as long as the container runs.

usage: virtkube-shim [--print-xml] [--help] [--version]
       virtkube-shim reboot|reset|shutdown|screenshot

  --print-xml   render the domain XML and print it, without connecting to libvirtd
  --help        this text
  --version     the shim's version

operations on the running VM, from a second process in its container
(kubectl exec POD -- /virtkube-shim OPERATION):
  reboot        ask the guest to reboot (ACPI); the container keeps running
  reset         reset the machine at once
  shutdown      ask the guest to shut down (ACPI); the container then ends with exit 0
  screenshot    the display's image (PNG) on stdout: ... screenshot > screen.png

serve-file PATH  serve the file to virtkube's repository manager (an ImageFile's
                 import pod runs this; docs/images.md)

environment:
  VIRTKUBE_TEMPLATE_FILE     template baked into the image (default /etc/virtkube/template.yaml)
  VIRTKUBE_TEMPLATE          template name to read from the Kubernetes API instead
  VIRTKUBE_LIBVIRT_URI       qemu:///system, qemu+unix:///system?socket=PATH,
                             qemu+tcp://HOST[:PORT]/system, test+unix:///default;
                             unset: qemu:///system when its socket is mounted, else in a
                             pod the node's virthost gate over TCP (HOST_IP:16509,
                             which knows the pod by its IP)
  VIRTKUBE_SHUTDOWN_TIMEOUT  seconds between the ACPI shutdown request and destroy (default 25)
  VIRTKUBE_CONNECT_TIMEOUT   seconds to keep trying to reach libvirtd (default 30)
  VIRTKUBE_AUTODESTROY       1 (default): the VM dies with the shim's connection;
                             0: create without it (libvirt's test driver needs this) and
                             destroy the domain on exit instead
  VIRTKUBE_ANNOTATIONS_FILE  the pod's annotations from a downward API volume
                             (default /etc/podinfo/annotations)
  VIRTKUBE_SCRATCH_DIR       where the guest's private copies of containerFile disks go
                             (default /, the container's writable layer; an emptyDir has room)
  VIRTKUBE_CONTROL_SOCKET    where PID 1 takes operation requests (default /run/virtkube/control.sock)
  POD_NAME, POD_NAMESPACE, POD_UID  the pod, from the downward API (else read from the API)
  HOST_IP                    the node's IP, from the downward API (else read from the API)

exit codes: 0 guest stopped · 1 could not start · 2 configuration error · 3 guest crashed ·
4 lost libvirtd · 5 destroyed by someone else · 6 destroyed after a stop timed out · 128+N signal N
";

/// The process environment, read without panicking (`std::env::vars()`
/// panics on any value that is not UTF-8, even of a variable nobody reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: HashMap<String, String>,
    /// Variables whose name or value is not UTF-8, as text for messages.
    not_utf8: Vec<String>,
}

/// Whether the shim reads the variable `name` (its own, the downward API's,
/// the in-cluster API's).
pub fn is_read_by_shim(name: &str) -> bool {
    name.starts_with("VIRTKUBE_")
        || matches!(
            name,
            "POD_NAME"
                | "POD_NAMESPACE"
                | "POD_UID"
                | "HOST_IP"
                | "KUBERNETES_SERVICE_HOST"
                | "KUBERNETES_SERVICE_PORT"
        )
}

impl Environment {
    /// From `std::env::vars_os()` (or a test's list).
    pub fn from_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Environment {
        let mut env = Environment::default();
        for (name, value) in vars {
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => {
                    env.vars.insert(name, value);
                }
                (Ok(name), Err(_)) => env.not_utf8.push(name),
                (Err(name), _) => env.not_utf8.push(name.to_string_lossy().into_owned()),
            }
        }
        env
    }

    /// From UTF-8 pairs.
    pub fn from_pairs<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Environment {
        Environment {
            vars: vars.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            not_utf8: Vec::new(),
        }
    }

    /// A variable that is not UTF-8 is an error only if the shim reads it;
    /// the others are none of its business.
    pub fn check(&self) -> Result<(), String> {
        match self.not_utf8.iter().find(|name| is_read_by_shim(name)) {
            Some(name) => Err(format!(
                "environment variable {name} is not valid UTF-8 text; set it to plain text"
            )),
            None => Ok(()),
        }
    }

    /// One variable's value.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    /// All UTF-8 variables.
    pub fn into_map(self) -> HashMap<String, String> {
        self.vars
    }
}

/// The command-line arguments as text; one that is not UTF-8 is a usage error.
pub fn args_from_os(args: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, String> {
    args.into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {:?} is not valid UTF-8; run with --help for usage", arg))
        })
        .collect()
}

/// What the shim was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run the VM.
    Run,
    /// Print the domain XML and exit.
    PrintXml,
    /// Print usage.
    Help,
    /// Print the version.
    Version,
    /// Ask PID 1 (the running shim) for an operation on its VM.
    Operate(crate::control::Op),
    /// Serve one file to the repository manager (an ImageFile's import pod).
    ServeFile(PathBuf),
}

/// The shim's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// What to do.
    pub mode: Mode,
    /// Template file.
    pub template_file: PathBuf,
    /// Template name in the API (cluster mode).
    pub template_name: Option<String>,
    /// `VIRTKUBE_LIBVIRT_URI`; `None`: found by [`crate::endpoint::choose`].
    pub uri: Option<String>,
    /// Grace period after the ACPI request.
    pub shutdown_timeout: Duration,
    /// How long to keep trying to reach libvirtd before giving up (exit 1).
    pub connect_timeout: Duration,
    /// How long to keep reconnecting to a running VM after losing libvirtd (exit 4 after).
    pub reattach_timeout: Duration,
    /// QEMU's memory beyond the guest's, in bytes (`VIRTKUBE_QEMU_OVERHEAD`).
    pub qemu_overhead: u64,
    /// Create with AUTODESTROY.
    pub autodestroy: bool,
    /// Termination message path.
    pub termination_log: PathBuf,
    /// Downward API annotations file.
    pub annotations_file: PathBuf,
    /// Where private copies of `containerFile` disks go (`VIRTKUBE_SCRATCH_DIR`).
    pub scratch_dir: PathBuf,
    /// Where PID 1 takes operation requests (`VIRTKUBE_CONTROL_SOCKET`).
    pub control_socket: PathBuf,
}

/// Reads the configuration. `env` looks up a variable; `args` excludes argv[0].
pub fn from_env(env: impl Fn(&str) -> Option<String>, args: &[String]) -> Result<Config, String> {
    let mut mode = Mode::Run;
    if args.first().map(String::as_str) == Some("serve-file") {
        return match args {
            [_, path] if path.starts_with('/') => Ok(Config {
                mode: Mode::ServeFile(PathBuf::from(path)),
                ..from_env(env, &[])?
            }),
            _ => Err("serve-file takes one absolute path: virtkube-shim serve-file /disk/root.raw".into()),
        };
    }
    for arg in args {
        mode = match arg.as_str() {
            "--print-xml" => Mode::PrintXml,
            "--help" | "-h" => Mode::Help,
            "--version" | "-V" => Mode::Version,
            other => match crate::control::Op::parse(other) {
                Some(op) if args.len() == 1 => Mode::Operate(op),
                Some(op) => {
                    return Err(format!(
                        "{} takes no other arguments; run with --help for usage",
                        op.name()
                    ));
                }
                None => return Err(format!("unknown argument {other:?}; run with --help for usage")),
            },
        };
    }
    let non_empty = |key: &str| env(key).filter(|v| !v.trim().is_empty());
    let shutdown_timeout = seconds(non_empty, "VIRTKUBE_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT)?;
    let connect_timeout = seconds(non_empty, "VIRTKUBE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)?;
    let reattach_timeout = seconds(non_empty, "VIRTKUBE_REATTACH_TIMEOUT", DEFAULT_REATTACH_TIMEOUT)?;
    let qemu_overhead = match non_empty("VIRTKUBE_QEMU_OVERHEAD") {
        None => crate::sizing::DEFAULT_QEMU_OVERHEAD,
        Some(text) => virtkube_api::quantity::parse_bytes(text.trim()).map_err(|e| {
            format!("VIRTKUBE_QEMU_OVERHEAD={text:?} {e}; it is QEMU's memory beyond the guest's, e.g. 128Mi")
        })?,
    };
    let autodestroy = match non_empty("VIRTKUBE_AUTODESTROY").as_deref().map(str::trim) {
        None | Some("1" | "true" | "yes") => true,
        Some("0" | "false" | "no") => false,
        Some(other) => return Err(format!("VIRTKUBE_AUTODESTROY={other:?} is not a boolean; use 1 or 0")),
    };
    let uri = non_empty("VIRTKUBE_LIBVIRT_URI");
    if let Some(uri) = &uri {
        libvirt_wire::uri::parse(uri).map_err(|e| format!("VIRTKUBE_LIBVIRT_URI: {e}"))?;
    }
    Ok(Config {
        mode,
        template_file: non_empty("VIRTKUBE_TEMPLATE_FILE")
            .unwrap_or_else(|| DEFAULT_TEMPLATE_FILE.to_owned())
            .into(),
        template_name: non_empty("VIRTKUBE_TEMPLATE"),
        uri,
        shutdown_timeout,
        connect_timeout,
        reattach_timeout,
        qemu_overhead,
        autodestroy,
        termination_log: non_empty("VIRTKUBE_TERMINATION_LOG")
            .unwrap_or_else(|| DEFAULT_TERMINATION_LOG.to_owned())
            .into(),
        annotations_file: non_empty("VIRTKUBE_ANNOTATIONS_FILE")
            .unwrap_or_else(|| DEFAULT_ANNOTATIONS_FILE.to_owned())
            .into(),
        scratch_dir: non_empty("VIRTKUBE_SCRATCH_DIR")
            .unwrap_or_else(|| "/".to_owned())
            .into(),
        control_socket: non_empty("VIRTKUBE_CONTROL_SOCKET")
            .unwrap_or_else(|| crate::control::DEFAULT_SOCKET.to_owned())
            .into(),
    })
}

/// The duration variable `name`: whole seconds from 0 to 3600.
fn seconds(lookup: impl Fn(&str) -> Option<String>, name: &str, default: u64) -> Result<Duration, String> {
    match lookup(name) {
        None => Ok(Duration::from_secs(default)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(secs) if secs <= 3600 => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "{name}={v:?} is not a number of seconds from 0 to 3600 (e.g. {default})"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn config(vars: &[(&str, &str)], args: &[&str]) -> Result<Config, String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        from_env(|k| vars.get(k).cloned(), &args)
    }

    #[test]
    fn defaults() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(c.mode, Mode::Run);
        assert_eq!(c.template_file, PathBuf::from(DEFAULT_TEMPLATE_FILE));
        assert_eq!(c.uri, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.connect_timeout, Duration::from_secs(30));
        assert_eq!(c.reattach_timeout, Duration::from_secs(300));
        assert_eq!(c.qemu_overhead, 128 * 1024 * 1024);
        assert!(c.autodestroy);
        assert_eq!(c.template_name, None);
    }

    #[test]
    fn serve_file_takes_one_absolute_path() {
        let c = config(&[], &["serve-file", "/disk/root.raw"]).unwrap();
        assert_eq!(c.mode, Mode::ServeFile(PathBuf::from("/disk/root.raw")));
        for bad in [
            &["serve-file"][..],
            &["serve-file", "disk/root.raw"],
            &["serve-file", "/a", "/b"],
        ] {
            let why = config(&[], bad).unwrap_err();
            assert!(why.contains("serve-file takes one absolute path"), "{why}");
        }
    }

    #[test]
    fn values_and_flags() {
        let c = config(
            &[
                ("VIRTKUBE_LIBVIRT_URI", "test+unix:///default"),
                ("VIRTKUBE_SHUTDOWN_TIMEOUT", "3"),
                ("VIRTKUBE_AUTODESTROY", "0"),
                ("VIRTKUBE_TEMPLATE", "tiny"),
            ],
            &["--print-xml"],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::PrintXml);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        assert!(!c.autodestroy);
        assert_eq!(c.template_name.as_deref(), Some("tiny"));
    }

    #[test]
    fn bad_values_name_the_variable_and_the_fix() {
        let cases = [
            (
                ("VIRTKUBE_SHUTDOWN_TIMEOUT", "soon"),
                "VIRTKUBE_SHUTDOWN_TIMEOUT=\"soon\" is not a number of seconds",
            ),
            (("VIRTKUBE_SHUTDOWN_TIMEOUT", "99999"), "from 0 to 3600"),
            (
                ("VIRTKUBE_CONNECT_TIMEOUT", "-1"),
                "VIRTKUBE_CONNECT_TIMEOUT=\"-1\" is not a number of seconds from 0 to 3600 (e.g. 30)",
            ),
            (
                ("VIRTKUBE_AUTODESTROY", "maybe"),
                "VIRTKUBE_AUTODESTROY=\"maybe\" is not a boolean",
            ),
            (
                ("VIRTKUBE_LIBVIRT_URI", "xen:///"),
                "VIRTKUBE_LIBVIRT_URI: libvirt URI \"xen:///\"",
            ),
        ];
        for ((k, v), expected) in cases {
            let err = config(&[(k, v)], &[]).unwrap_err();
            assert!(err.contains(expected), "{k}={v}: {err}");
        }
        assert!(
            config(&[], &["--frobnicate"])
                .unwrap_err()
                .contains("unknown argument \"--frobnicate\"")
        );
    }

    #[test]
    fn a_value_that_is_not_utf8_is_an_error_only_where_the_shim_reads_it() {
        let bad = || OsString::from_vec(vec![0x66, 0xff, 0xfe]);
        let env = Environment::from_os([
            (OsString::from("LANG_OF_SOMEONE_ELSE"), bad()),
            (OsString::from("POD_NAME"), OsString::from("vm")),
        ]);
        assert_eq!(env.check(), Ok(()), "a variable the shim never reads is ignored");
        assert_eq!(env.get("POD_NAME").as_deref(), Some("vm"));
        let env = Environment::from_os([(OsString::from("VIRTKUBE_SHUTDOWN_TIMEOUT"), bad())]);
        let err = env.check().unwrap_err();
        assert!(err.contains("VIRTKUBE_SHUTDOWN_TIMEOUT is not valid UTF-8"), "{err}");
        let env = Environment::from_os([(OsString::from("POD_UID"), bad())]);
        assert!(env.check().unwrap_err().contains("POD_UID"));
        let err = args_from_os([OsString::from_vec(vec![0x2d, 0xff])]).unwrap_err();
        assert!(err.contains("not valid UTF-8"), "{err}");
    }
}
