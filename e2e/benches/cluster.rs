//! The VM lifecycle's speed on a real cluster (`KUBECONFIG`; scripts/test.sh's
//! set-up brings up k8s-local): prints numbers, asserts none.
//!
//! 1. Ten VM pods one after another: pod created → its VirtDomain Running, and
//!    → the first guest console line in `kubectl logs` (p50 and max).
//! 2. Memory: the VM pod's container (the shim) next to its QEMU process (RSS).
//! 3. Twenty VM pods created at once → all twenty VirtDomains Running.
//! 4. The VM that boots from the disk its image carries (virtkube/disk: BIOS,
//!    SYSLINUX, the kernel read from the disk) against the same guest booted
//!    from files on the node (virtkube/tiny: direct kernel boot), alternating:
//!    pod created → the guest's first line.
//!
//! 5. The pod network: HTTP request latency and TCP throughput to the
//!    guest's web server through its pod IP against busybox httpd in a plain
//!    pod on the same node (same run, interleaved), and the time the gate's
//!    network plumbing adds before the guest runs (from the gate's log).
//!
//! Run: `KUBECONFIG=… cargo bench -p virtkube-e2e --bench cluster`
//! (`VIRTKUBE_BENCH_ONLY=disks` or `=network` for the fourth or fifth part alone). Times are
//! polled with kubectl every 50 ms (each poll costs a kubectl start), so they
//! are accurate to about 0.2 s.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::time::{Duration, Instant};

use virtkube_e2e::cluster::{
    RunNamespace, SOCKET_DIR, apply, deploy_virtkube, diagnostics, eventually, kubectl, ok, virsh_list,
    virtdomain_state, virtdomain_states, vm_manifests,
};
use virtkube_e2e::{max_secs, p50_secs};

const SEQUENTIAL: usize = 10;
const AT_ONCE: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(300);
const SHIM_PREFIX: &str = "[virtkube-shim]";

fn main() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("this benchmark needs a cluster: set KUBECONFIG (scripts/test.sh brings up k8s-local)");
        std::process::exit(2);
    }
    deploy_virtkube();
    let namespace = RunNamespace::create("virtkube-bench");
    let ns = namespace.name().to_owned();
    // VIRTKUBE_BENCH_ONLY=disks runs the fourth part alone.
    match std::env::var("VIRTKUBE_BENCH_ONLY").as_deref() {
        Ok("disks") => {
            disk_image_against_host_files(&ns);
            let _ = kubectl(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"]);
            return;
        }
        Ok("network") => {
            pod_network_against_a_plain_pod(&ns);
            let _ = kubectl(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"]);
            return;
        }
        _ => {}
    }
    println!("virtkube cluster benchmark (namespace {ns}; the tiny TCG guest, 128Mi)");

    let mut to_running = Vec::new();
    let mut to_console = Vec::new();
    let mut memory = None;
    for i in 0..SEQUENTIAL {
        let name = format!("bench-{i}");
        let created = Instant::now();
        apply(&vm_pod(&ns, &name));
        let (running, console) = wait_running_and_console(&ns, &name, created);
        println!(
            "  run {:2}: VirtDomain Running {:5.2} s, first console line {:5.2} s",
            i + 1,
            running.as_secs_f64(),
            console.as_secs_f64()
        );
        to_running.push(running);
        to_console.push(console);
        if memory.is_none() {
            memory = Some(rss_of_pod(&ns, &name));
        }
        // The VM ends within seconds; this kubelet (1.20) sometimes deletes
        // the pod object only at its next periodic sync, up to a minute on.
        ok(&["-n", &ns, "delete", "pod", &name, "--wait=true", "--timeout=120s"]);
    }
    println!(
        "pod created → VirtDomain Running:     p50 {:5.2} s   max {:5.2} s   ({SEQUENTIAL} runs)",
        p50_secs(&to_running),
        max_secs(&to_running)
    );
    println!(
        "pod created → first line of console:  p50 {:5.2} s   max {:5.2} s   ({SEQUENTIAL} runs)",
        p50_secs(&to_console),
        max_secs(&to_console)
    );
    let virsh_create = virsh_create_baseline(&ns);
    println!(
        "baseline, the same domain by `virsh create` on the virthost's socket: p50 {:5.2} s   max {:5.2} s   ({SEQUENTIAL} runs)",
        p50_secs(&virsh_create),
        max_secs(&virsh_create)
    );
    println!("KubeVirt's published figure for comparison: VMI create → Running p50 16–19 s");
    if let Some((shim, qemu)) = memory {
        println!(
            "memory (RSS): the VM pod's container (shim) {:.1} MiB, its QEMU process {:.1} MiB",
            kib_to_mib(shim),
            kib_to_mib(qemu)
        );
    }

    let started = Instant::now();
    let pods: Vec<String> = (0..AT_ONCE).map(|i| vm_pod(&ns, &format!("many-{i}"))).collect();
    apply(&pods.join("---\n"));
    let applied = started.elapsed();
    let mut first_all = None;
    eventually(&format!("{AT_ONCE} running VirtDomains"), &ns, TIMEOUT, || {
        let states = virtdomain_states(&ns);
        let running = states.matches("Running").count();
        if running >= AT_ONCE {
            first_all = Some(started.elapsed());
        }
        running >= AT_ONCE
    });
    println!(
        "{AT_ONCE} VM pods created at once (kubectl apply took {:.2} s) → all Running: {:.2} s",
        applied.as_secs_f64(),
        first_all.unwrap().as_secs_f64()
    );
    let domains = virsh_list().lines().filter(|l| l.starts_with(&ns)).count();
    println!("  domains of this namespace on the virthost: {domains} (socket dir {SOCKET_DIR})");

    let pods: Vec<String> = (0..AT_ONCE).map(|i| format!("many-{i}")).collect();
    let mut delete = vec!["-n", ns.as_str(), "delete", "pod", "--wait=true", "--timeout=180s"];
    delete.extend(pods.iter().map(String::as_str));
    ok(&delete);
    disk_image_against_host_files(&ns);

    // Waits here, so that the next run does not share the node with these VMs.
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"]);
    drop(namespace);
}

/// A bare VM Pod: the example Deployment's pod template, named `name`, without
/// the memory override (the template's 128Mi).
fn vm_pod(ns: &str, name: &str) -> String {
    let deployment: serde_json::Value = serde_saphyr::from_str(&vm_manifests(ns)).unwrap();
    let mut template = deployment["spec"]["template"].clone();
    let metadata = template["metadata"].as_object_mut().unwrap();
    metadata.insert("name".into(), name.into());
    metadata.insert("namespace".into(), ns.into());
    metadata.remove("annotations");
    let pod = template.as_object_mut().unwrap();
    pod.insert("apiVersion".into(), "v1".into());
    pod.insert("kind".into(), "Pod".into());
    pod["spec"]
        .as_object_mut()
        .unwrap()
        .insert("restartPolicy".into(), "Never".into());
    serde_saphyr::to_string(&template).unwrap()
}

/// Times `virsh create` (the command returns once the domain runs) of the
/// domain the shim renders for the tiny image, with no Kubernetes and no shim.
fn virsh_create_baseline(ns: &str) -> Vec<Duration> {
    let uri = format!("qemu+unix:///system?socket={SOCKET_DIR}/libvirt-sock");
    let dir = std::env::temp_dir().join(format!("virtkube-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (0..SEQUENTIAL)
        .map(|i| {
            let name = format!("virsh-{i}");
            let env_ns = format!("POD_NAMESPACE={ns}");
            let env_name = format!("POD_NAME={name}");
            let (success, xml) = virtkube_e2e::run(
                "/usr/bin/docker",
                &[
                    "run",
                    "--rm",
                    "-e",
                    &env_ns,
                    "-e",
                    &env_name,
                    "virtkube/tiny:latest",
                    "--print-xml",
                ],
                None,
            );
            assert!(success, "--print-xml: {xml}");
            // The shim's log lines (stderr) may surround the XML.
            let (Some(start), Some(end)) = (xml.find("<domain"), xml.find("</domain>")) else {
                panic!("no domain XML in: {xml}");
            };
            let file = dir.join(format!("{name}.xml"));
            std::fs::write(&file, &xml[start..end + "</domain>".len()]).unwrap();
            let started = Instant::now();
            let (success, out) = virtkube_e2e::run("virsh", &["-c", &uri, "create", file.to_str().unwrap()], None);
            let took = started.elapsed();
            assert!(success, "virsh create: {out}");
            let domain = format!("{ns}_{name}");
            let (success, out) = virtkube_e2e::run("virsh", &["-c", &uri, "destroy", &domain], None);
            assert!(success, "virsh destroy {domain}: {out}");
            took
        })
        .collect()
}

/// Pod created → the tiny guest's banner, for the image's own disk and for
/// files on the node, alternating so both see the same node.
fn disk_image_against_host_files(ns: &str) {
    const RUNS: usize = 5;
    const BANNER: &str = "virtkube-tiny: booted";
    let (mut from_disk, mut from_host) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        for (image, times) in [
            ("virtkube/disk:latest", &mut from_disk),
            ("virtkube/tiny:latest", &mut from_host),
        ] {
            let name = format!("{}-{i}", if image.contains("disk") { "disk" } else { "host" });
            let pod = vm_pod(ns, &name).replace("virtkube/tiny:latest", image);
            let created = Instant::now();
            apply(&pod);
            loop {
                assert!(created.elapsed() < TIMEOUT, "{name} did not boot\n{}", diagnostics(ns));
                if kubectl(&["-n", ns, "logs", &name]).1.contains(BANNER) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            times.push(created.elapsed());
            ok(&["-n", ns, "delete", "pod", &name, "--wait=true", "--timeout=120s"]);
        }
    }
    println!(
        "pod created → the guest's banner, booting from the image's own disk (BIOS, SYSLINUX): p50 {:5.2} s   max {:5.2} s   ({RUNS} runs)",
        p50_secs(&from_disk),
        max_secs(&from_disk)
    );
    println!(
        "pod created → the guest's banner, the same guest from files on the node (direct kernel boot): p50 {:5.2} s   max {:5.2} s   ({RUNS} runs)",
        p50_secs(&from_host),
        max_secs(&from_host)
    );
}

/// One HTTP GET over a new connection: the time to the whole answer and its size.
fn timed_get(ip: &str, path: &str) -> (Duration, usize) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut conn = std::net::TcpStream::connect((ip, 80)).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    (started.elapsed(), reply.len())
}

fn p99_secs(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)].as_secs_f64()
}

fn pod_network_against_a_plain_pod(ns: &str) {
    const REQUESTS: usize = 100;
    const TRANSFERS: usize = 5;
    const BIG: usize = 8 << 20;
    // The guest serves an 8 MiB /big when its command line asks.
    let cmdline = "console=ttyS0 panic=-1 quiet virtkube.bigfile";
    apply(&vm_pod(ns, "vm").replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations:\n    virtkube.io/cmdline: {cmdline}\n"),
        1,
    ));
    // busybox httpd in a plain pod, serving the same two files.
    apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: plain, namespace: {ns}}}\nspec:\n  containers:\n    - name: httpd\n      image: debian:bookworm-slim\n      imagePullPolicy: Never\n      command: [sh, -c, 'mkdir /www && echo hello > /www/index.html && head -c {BIG} /dev/zero > /www/big && exec /bb/busybox httpd -f -p 80 -h /www']\n      volumeMounts: [{{name: bb, mountPath: /bb/busybox, readOnly: true}}]\n  volumes: [{{name: bb, hostPath: {{path: /bin/busybox, type: File}}}}]\n"
    ));
    eventually("both web servers", ns, TIMEOUT, || {
        kubectl(&["-n", ns, "logs", "vm"])
            .1
            .contains("virtkube-tiny: serving /big")
            && ok(&["-n", ns, "get", "pod", "plain", "-o", "jsonpath={.status.phase}"]).trim() == "Running"
    });
    let ip = |pod: &str| {
        ok(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.status.podIP}"])
            .trim()
            .to_owned()
    };
    let (vm_ip, plain_ip) = (ip("vm"), ip("plain"));
    let (mut vm_latency, mut plain_latency) = (Vec::new(), Vec::new());
    for _ in 0..REQUESTS {
        vm_latency.push(timed_get(&vm_ip, "/").0);
        plain_latency.push(timed_get(&plain_ip, "/").0);
    }
    let (mut vm_rate, mut plain_rate) = (Vec::new(), Vec::new());
    for _ in 0..TRANSFERS {
        for (target, rates) in [(&vm_ip, &mut vm_rate), (&plain_ip, &mut plain_rate)] {
            let (took, size) = timed_get(target, "/big");
            assert!(size > BIG, "{target}/big: {size} bytes");
            rates.push(size as f64 / took.as_secs_f64() / 1e6);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("the pod network (masquerade) against a plain pod, busybox httpd in both, from the node:");
    println!(
        "  GET / (new connection each, {REQUESTS} runs): guest at its pod IP p50 {:6.2} ms  p99 {:6.2} ms   plain pod p50 {:6.2} ms  p99 {:6.2} ms",
        p50_secs(&vm_latency) * 1e3,
        p99_secs(&vm_latency) * 1e3,
        p50_secs(&plain_latency) * 1e3,
        p99_secs(&plain_latency) * 1e3
    );
    println!(
        "  GET 8 MiB (median of {TRANSFERS}): guest {:7.1} MB/s   plain pod {:7.1} MB/s",
        median(&mut vm_rate),
        median(&mut plain_rate)
    );
    // The plumbing the gate did for this namespace's VMs, as it logged it.
    let log = kubectl(&["-n", "virtkube-system", "logs", "ds/virthost", "--tail=2000"]).1;
    let plumbing: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("the guest's NIC is in the caller's network namespace") && l.contains(ns))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .trim_matches('"')
                .parse()
                .ok()
        })
        .collect();
    println!(
        "  the gate's network plumbing (tap into the pod, address, forwarding, nft) before the guest runs: {}",
        plumbing
            .iter()
            .map(|ms| format!("{ms:.1} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Polls until the pod's VirtDomain is Running and its logs hold a guest line.
fn wait_running_and_console(ns: &str, name: &str, created: Instant) -> (Duration, Duration) {
    let (mut running, mut console) = (None, None);
    while running.is_none() || console.is_none() {
        assert!(
            created.elapsed() < TIMEOUT,
            "{name} did not start within {TIMEOUT:?}\n{}",
            diagnostics(ns)
        );
        if running.is_none() && virtdomain_state(ns, name) == "Running" {
            running = Some(created.elapsed());
        }
        if console.is_none() {
            let (success, logs) = kubectl(&["-n", ns, "logs", name]);
            // The shim's own lines (stderr, prefixed) share the log with the console.
            if success
                && logs
                    .lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with(SHIM_PREFIX))
            {
                console = Some(created.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (running.unwrap(), console.unwrap())
}

/// VmRSS (KiB) of the pod's container process (the shim) and of its QEMU.
fn rss_of_pod(ns: &str, name: &str) -> (u64, u64) {
    let container = ok(&[
        "-n",
        ns,
        "get",
        "pod",
        name,
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ]);
    let id = container.trim().trim_start_matches("docker://");
    let (success, pid) = virtkube_e2e::run("/usr/bin/docker", &["inspect", "-f", "{{.State.Pid}}", id], None);
    assert!(success, "docker inspect {id}: {pid}");
    let shim_pid: u32 = pid.trim().parse().unwrap();
    let guest = format!("guest={ns}_{name},");
    let qemu_pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&guest))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no QEMU process with {guest} on this host"));
    (vm_rss_kib(shim_pid), vm_rss_kib(qemu_pid))
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
