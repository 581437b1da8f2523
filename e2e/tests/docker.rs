//! virtkube on plain Docker, the way a user runs it: the FROM-scratch base
//! image, a VM image built FROM it, the virthost container, `docker run`,
//! `docker logs`, `docker stop`, `docker kill`.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use virtkube_e2e::{Interactive, run};

const DOCKER: &str = "/usr/bin/docker";
const SOCKET_DIR: &str = "/var/run/virtkube";
const VIRTHOST: &str = "virtkube-virthost";
const BOOT: Duration = Duration::from_secs(90);

fn docker(args: &[&str]) -> (bool, String) {
    run(DOCKER, args, None)
}

fn docker_ok(args: &[&str]) -> String {
    let (ok, out) = docker(args);
    assert!(ok, "docker {args:?} failed: {out}");
    out
}

fn require_setup() {
    for image in [
        "virtkube/shim:latest",
        "virtkube/tiny:latest",
        "virtkube/disk:latest",
        "virtkube/virthost:latest",
    ] {
        assert!(
            docker(&["image", "inspect", image]).0,
            "image {image} is missing: run scripts/build-images.sh"
        );
    }
    let (ok, _) = virsh(&["version"]);
    assert!(ok, "the virthost container is not running: run scripts/virthost-up.sh");
}

/// virsh inside the virthost container, on libvirtd's own socket (VM
/// containers only reach the gate's).
fn virsh(args: &[&str]) -> (bool, String) {
    virtkube_e2e::virthost_virsh(VIRTHOST, args)
}

/// A VM container, removed when dropped.
struct Vm {
    name: String,
}

impl Vm {
    fn run(name: &str, extra: &[&str], image: &str, args: &[&str]) -> Vm {
        let name = format!("{name}-{}", std::process::id());
        let _ = docker(&["rm", "-f", &name]);
        let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
        let mut cmd = vec!["run", "-d", "--name", &name, "-v", &volume];
        cmd.extend_from_slice(extra);
        cmd.push(image);
        cmd.extend_from_slice(args);
        docker_ok(&cmd);
        Vm { name }
    }

    fn logs(&self) -> String {
        docker(&["logs", &self.name]).1
    }

    fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {needle:?} in the logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exit_code(&self, timeout: Duration) -> i32 {
        let out = Command::new(DOCKER)
            .args(["wait", &self.name])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut child = out;
        loop {
            if let Some(_status) = child.try_wait().unwrap() {
                let mut s = String::new();
                std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut s).unwrap();
                return s.trim().parse().unwrap_or_else(|_| panic!("docker wait said {s:?}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {timeout:?}:\n{}", self.name, self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The domain name: in Docker mode the container's hostname (its short id).
    fn domain(&self) -> String {
        docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &self.name])
            .trim()
            .to_owned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

fn domain_exists(domain: &str) -> bool {
    virsh(&["domstate", domain]).0
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_base_image_is_the_shim_and_nothing_else() {
    require_setup();
    let size: u64 = docker_ok(&["image", "inspect", "-f", "{{.Size}}", "virtkube/shim:latest"])
        .trim()
        .parse()
        .unwrap();
    let binary = std::fs::metadata(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/x86_64-unknown-linux-gnu/release/virtkube-shim"
    ))
    .map(|m| m.len())
    .unwrap_or(size);
    println!("virtkube/shim image: {size} bytes; shim binary: {binary} bytes");
    assert!(
        size <= binary + 100 * 1024,
        "image {size} bytes > binary {binary} + 100 KiB"
    );
    // One layer, one file.
    let history = docker_ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}",
        "virtkube/shim:latest",
    ]);
    let copies = history.lines().filter(|l| l.contains("COPY")).count();
    assert_eq!(copies, 1, "{history}");
    let entrypoint = docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Entrypoint}}",
        "virtkube/shim:latest",
    ]);
    assert_eq!(entrypoint.trim(), r#"["/virtkube-shim"]"#);
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn print_xml_shows_what_would_run_without_libvirtd() {
    require_setup();
    let out = docker_ok(&["run", "--rm", "virtkube/tiny:latest", "--print-xml"]);
    assert!(
        out.contains("<domain type=\"qemu\">") && out.contains("/var/lib/virtkube/images/tiny/vmlinuz"),
        "{out}"
    );
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn vm_boots_shows_its_console_in_docker_logs_and_docker_stop_powers_it_off() {
    require_setup();
    let vm = Vm::run("e2e-boot", &[], "virtkube/tiny:latest", &[]);
    vm.wait_for_log("virtkube-tiny: ready", BOOT);
    let domain = vm.domain();
    assert!(domain_exists(&domain), "no domain {domain} on the virthost");
    let asked = Instant::now();
    docker_ok(&["stop", "-t", "30", &vm.name]);
    assert_eq!(vm.exit_code(Duration::from_secs(5)), 0, "{}", vm.logs());
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "docker stop took {:?}: no clean ACPI shutdown",
        asked.elapsed()
    );
    assert!(
        vm.logs().contains("[virtkube-shim] exit 0: the guest stopped"),
        "{}",
        vm.logs()
    );
    assert!(!domain_exists(&domain), "domain {domain} left behind");
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn docker_run_interactive_gives_a_console() {
    require_setup();
    let name = format!("e2e-interactive-{}", std::process::id());
    let volume = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let mut console = Interactive::spawn(
        DOCKER,
        &[
            "run",
            "--rm",
            "-i",
            "--name",
            &name,
            "-v",
            &volume,
            "virtkube/tiny:latest",
        ],
    );
    assert!(console.wait_for("virtkube-tiny: ready", BOOT), "{}", console.seen());
    console.send("echo hello-from-$((6*7))\n");
    assert!(console.wait_for("hello-from-42", BOOT), "{}", console.seen());
    console.send("poweroff -f\n");
    let seen = console.seen().to_owned();
    assert_eq!(console.wait().code(), Some(0), "{seen}");
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn docker_kill_takes_the_vm_with_it() {
    require_setup();
    let vm = Vm::run("e2e-kill", &[], "virtkube/tiny:latest", &[]);
    vm.wait_for_log("started domain", BOOT);
    let domain = vm.domain();
    assert!(domain_exists(&domain));
    docker_ok(&["kill", "-s", "KILL", &vm.name]);
    let killed = Instant::now();
    while domain_exists(&domain) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "domain {domain} outlived its container by 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn a_broken_template_fails_the_container_with_a_clear_message() {
    require_setup();
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("template.yaml"), "memory: 12 GB\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM virtkube/shim:latest\nCOPY template.yaml /etc/virtkube/template.yaml\n",
    )
    .unwrap();
    let tag = format!("virtkube/e2e-broken:{}", std::process::id());
    virtkube_e2e::disk_image::build_context(&dir, &tag);
    let vm = Vm::run("e2e-broken", &[], &tag, &[]);
    assert_eq!(vm.exit_code(Duration::from_secs(30)), 1);
    assert!(
        vm.logs()
            .contains(r#"spec.memory: "12 GB" is not a Kubernetes quantity"#),
        "{}",
        vm.logs()
    );
    drop(vm);
    let _ = docker(&["rmi", &tag]);
}

/// QEMU runs in the VM container's cgroup, so its memory limit must hold the
/// guest and QEMU: the gate refuses a smaller one before anything starts,
/// with the numbers and the flag to use; and a QEMU that outgrows the limit
/// anyway (lowered under the running VM with `docker update`) is killed
/// inside the container's cgroup, which the shim's exit 3 message says.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_container_memory_limit_bounds_the_vm() {
    require_setup();
    let small = Vm::run("e2e-small", &["-m", "200m"], "virtkube/tiny:latest", &[]);
    assert_eq!(small.exit_code(Duration::from_secs(30)), 1, "{}", small.logs());
    let logs = small.logs();
    assert!(
        logs.contains(
            "container's memory limit (200 MiB) cannot hold the VM: guest memory 128 MiB + QEMU's overhead 128 MiB = 256 MiB"
        ) && logs.contains("--memory 256m"),
        "{logs}"
    );
    drop(small);

    let starved = Vm::run(
        "e2e-oom",
        &["-m", "256m", "--memory-swap", "256m"],
        "virtkube/tiny:latest",
        &[],
    );
    starved.wait_for_log("started domain", Duration::from_secs(60));
    // QEMU has not touched the guest's memory yet: a limit below what the
    // booted VM needs is accepted now and runs out as the guest boots.
    let (lowered, why) = docker(&["update", "--memory", "100m", "--memory-swap", "100m", &starved.name]);
    assert!(lowered, "docker update: {why}\n{}", starved.logs());
    assert_eq!(starved.exit_code(Duration::from_secs(90)), 3, "{}", starved.logs());
    assert!(
        starved
            .logs()
            .contains("the kernel killed QEMU for memory in this container's cgroup"),
        "{}",
        starved.logs()
    );
}

/// The gate's hostile client in a real Docker container, mounting the socket
/// as a VM container does: every attempt outside its own domain is refused
/// with the gate's reason, and `docker kill` ends the domain it may have.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn a_hostile_docker_container_reaches_only_its_own_domain() {
    require_setup();
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("own.xml"), virtkube_e2e::probe::own_xml(false)).unwrap();
    // The images directory (read-only in the virthost) with a link pointing out of it.
    let link = "/var/lib/virtkube/images/gate-probe-link";
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink("/etc/shadow", link).unwrap();
    let name = format!("e2e-probe-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    let probe = format!("{}:/probe:ro", virtkube_e2e::probe::binary().display());
    let xml = format!("{}:/x:ro", dir.display());
    let socket = format!("{SOCKET_DIR}:/var/run/libvirt:ro");
    let id = docker_ok(&[
        "create",
        "-i",
        "--name",
        &name,
        "-v",
        &socket,
        "-v",
        &probe,
        "-v",
        &xml,
        "debian:bookworm-slim",
        "/probe",
        "/var/run/libvirt/libvirt-sock",
        "@HOSTNAME@",
        "/x/own.xml",
    ]);
    let _vm = Vm { name: name.clone() };
    let short_id = &id.trim()[..12];
    let mut attached = Interactive::spawn(DOCKER, &["start", "-ai", &name]);
    attached.send("go\n");
    assert!(
        attached.wait_for("\nready", Duration::from_secs(60)),
        "the probe did not finish:\n{}",
        attached.seen()
    );
    let lines: Vec<String> = attached
        .seen()
        .lines()
        .take_while(|l| *l != "ready")
        .map(str::to_owned)
        .collect();
    let refusals = virtkube_e2e::probe::check_report(&lines);
    assert!(refusals >= 20, "fewer attempts than expected:\n{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.starts_with("create: another pod's UUID\t")
            && l.contains(&format!("must be named after the container ({short_id})"))),
        "{}",
        lines.join("\n")
    );
    let gate_log = docker_ok(&["logs", VIRTHOST]);
    assert!(
        gate_log.contains(&format!("who=container {short_id}")) && gate_log.contains("refused"),
        "the gate logged no refusal for {short_id}"
    );
    assert!(domain_exists(short_id), "the probe's own domain is not running");
    docker_ok(&["kill", "-s", "KILL", &name]);
    let killed = Instant::now();
    while domain_exists(short_id) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the probe's domain outlived its container by 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(link);
}

/// The tiny guest on a user-mode NIC, through the gate: it takes an address
/// by DHCP, starts its web server, and fetches a page from a server of this
/// test on the node (through QEMU's user-mode NAT, from the virthost's
/// network to Docker's bridge gateway).
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_guest_gets_an_address_by_dhcp_and_reaches_the_node() {
    require_setup();
    let gateway = bridge_gateway();
    let nonce = format!("hello-from-the-node-{}", std::process::id());
    let (port, server) = virtkube_e2e::serve_once(format!("{nonce}\n"));
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("net.yaml"),
        format!(
            "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {{name: net}}\nspec:\n  memory: 128Mi\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet virtkube.fetch=http://{gateway}:{port}/ virtkube.poweroff\n  interfaces:\n    - type: user\n"
        ),
    )
    .unwrap();
    let template = format!("{}:/etc/virtkube/net.yaml:ro", dir.join("net.yaml").display());
    let vm = Vm::run(
        "e2e-net",
        &["-v", &template, "-e", "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/net.yaml"],
        "virtkube/tiny:latest",
        &[],
    );
    assert_eq!(vm.exit_code(BOOT), 0, "{}", vm.logs());
    let logs = vm.logs();
    for line in [
        "virtkube-tiny: eth0 has 10.0.2.15/24 by DHCP (router 10.0.2.2)".to_owned(),
        "virtkube-tiny: serving http on port 80".to_owned(),
        format!("virtkube-tiny: fetched http://{gateway}:{port}/: {nonce}"),
    ] {
        assert!(logs.contains(&line), "missing {line:?} in:\n{logs}");
    }
    server.join().unwrap();
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Docker's bridge gateway: the node as containers see it.
fn bridge_gateway() -> String {
    // The virthost container's gateway: the bridge's address on the node.
    // (The network's IPAM config names no gateway when dockerd chose it.)
    let gateway = docker_ok(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", VIRTHOST])
        .trim()
        .to_owned();
    assert!(
        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
        "the virthost container has no IPv4 gateway ({gateway:?}): is it on Docker's default bridge?"
    );
    gateway
}

/// The tiny image with no interfaces in its template: its NIC is on the
/// container's own network. The shim leases the guest 10.0.2.2 and the
/// container's name as its host name; the guest answers at the container's
/// address (and at a port `docker run -p` publishes), and its own requests
/// leave with the container's address. When the container stops, its tap
/// is gone from the virthost.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_vm_answers_at_its_container_address_and_goes_out_with_it() {
    require_setup();
    let gateway = bridge_gateway();
    let nonce = format!("seen-by-the-node-{}", std::process::id());
    let (port, server) = virtkube_e2e::serve_once(format!("{nonce}\n"));
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-podnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pod.yaml"),
        format!(
            "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {{name: pod}}\nspec:\n  memory: 128Mi\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet virtkube.fetch=http://{gateway}:{port}/\n"
        ),
    )
    .unwrap();
    let template = format!("{}:/etc/virtkube/pod.yaml:ro", dir.join("pod.yaml").display());
    let vm = Vm::run(
        "e2e-podnet",
        &[
            "-v",
            &template,
            "-e",
            "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/pod.yaml",
            "-p",
            "127.0.0.1::80",
        ],
        "virtkube/tiny:latest",
        &[],
    );
    vm.wait_for_log("virtkube-tiny: ready", BOOT);
    let address: std::net::IpAddr = docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &vm.name])
        .trim()
        .parse()
        .unwrap();
    let hostname = docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &vm.name]);
    let logs = vm.logs();
    for line in [
        "[virtkube-shim] the guest took 10.0.2.2/24 by DHCP (router 10.0.2.1)".to_owned(),
        "virtkube-tiny: eth0 has 10.0.2.2/24 by DHCP (router 10.0.2.1)".to_owned(),
        format!("virtkube-tiny: fetched http://{gateway}:{port}/: {nonce}"),
    ] {
        assert!(logs.contains(&line), "missing {line:?} in:\n{logs}");
    }
    assert_eq!(
        server.join().unwrap(),
        address,
        "the guest's request left with the container's address"
    );
    let expected = format!("virtkube-tiny: hello from {}", hostname.trim());
    let direct = virtkube_e2e::http_get(std::net::SocketAddr::new(address, 80));
    assert_eq!(
        direct.as_deref().map(str::trim),
        Ok(expected.as_str()),
        "at the container's address"
    );
    let published = docker_ok(&["port", &vm.name, "80/tcp"]);
    let published: std::net::SocketAddr = published.lines().next().unwrap().trim().parse().unwrap();
    let through = virtkube_e2e::http_get(published);
    assert_eq!(
        through.as_deref().map(str::trim),
        Ok(expected.as_str()),
        "at the published port {published}"
    );
    // Its own tap only: other tests' VMs may have one there for a moment,
    // between libvirtd creating it and the gate moving it.
    let tap = virtkube_api::podnet::tap_name(&vm.domain());
    let in_virthost = || {
        let links = docker_ok(&["exec", VIRTHOST, "ls", "/sys/class/net"]);
        assert!(links.lines().any(|l| l == "lo"), "the virthost's links: {links}");
        links.lines().any(|l| l == tap)
    };
    assert!(!in_virthost(), "{tap} left the virthost's namespace");

    docker_ok(&["stop", "-t", "30", &vm.name]);
    assert_eq!(vm.exit_code(Duration::from_secs(5)), 0, "{}", vm.logs());
    assert!(!in_virthost(), "{tap} is left in the virthost");
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example image that carries its bootable disk (`images/disk`): no
/// kernel on the node, SYSLINUX on the disk boots the guest. Two containers
/// of it side by side each find the image's disk unwritten and leave their
/// own note on their own copy; `docker stop` still powers the guest off.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn the_disk_image_boots_from_its_own_disk_and_each_container_writes_its_own_copy() {
    require_setup();
    let printed = docker_ok(&["run", "--rm", "virtkube/disk:latest", "--print-xml"]);
    assert!(
        !printed.contains("<kernel>") && printed.contains(r#"<boot order="1"/>"#),
        "{printed}"
    );
    let vms: Vec<Vm> = (1..=2)
        .map(|n| Vm::run(&format!("e2e-disk-image-{n}"), &[], "virtkube/disk:latest", &[]))
        .collect();
    for vm in &vms {
        vm.wait_for_log("virtkube-tiny: ready", BOOT);
        let hostname = docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &vm.name]);
        let logs = vm.logs();
        for line in [
            "virtkube-tiny: user-data: booted from the image's own disk".to_owned(),
            "virtkube-tiny: the boot disk has no note yet".to_owned(),
            format!(
                "virtkube-tiny: left a note on the boot disk: written by {}",
                hostname.trim()
            ),
        ] {
            assert!(logs.contains(&line), "{}: missing {line:?} in:\n{logs}", vm.name);
        }
    }
    for vm in &vms {
        docker_ok(&["stop", "-t", "30", &vm.name]);
        assert_eq!(vm.exit_code(Duration::from_secs(5)), 0, "{}", vm.logs());
    }
}

/// Cloud-init from a directory of the container (here a bind mount; on
/// Kubernetes a Secret): the guest finds the `cidata` disk, takes its
/// hostname from the meta-data the shim completed, and runs the user-data
/// script. A directory without user-data is refused, naming what it holds.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn cloud_init_seeds_the_guest_from_a_directory() {
    require_setup();
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-cidata-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("seed")).unwrap();
    std::fs::write(
        dir.join("seed/user-data"),
        "#!/bin/sh\necho \"hello from $(hostname), seeded files: $(ls /cidata | tr '\\n' ' ')\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("seed/network-config"), "version: 2\n").unwrap();
    let tag = format!("virtkube/e2e-cidata:{}", std::process::id());
    virtkube_e2e::disk_image::build(&dir.join("context"), &tag);
    let template = ["-e", "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/cloud-init.yaml"];

    let mut print = vec!["run", "--rm"];
    print.extend_from_slice(&template);
    print.extend_from_slice(&[tag.as_str(), "--print-xml"]);
    let printed = docker_ok(&print);
    assert!(
        printed.contains(
            "<source file=\"/virtkube-fd/vdb\" fdgroup=\"vdb\"/>\n      <target dev=\"vdb\" bus=\"virtio\"/>\n      <readonly/>"
        ),
        "{printed}"
    );

    let seed = format!("{}:/seed:ro", dir.join("seed").display());
    let mut extra = vec!["-v", seed.as_str()];
    extra.extend_from_slice(&template);
    let vm = Vm::run("e2e-cidata", &extra, &tag, &[]);
    assert_eq!(vm.exit_code(BOOT), 0, "{}", vm.logs());
    // Outside Kubernetes the VM is named after its container's hostname.
    let hostname = docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &vm.name]);
    let hostname = hostname.trim();
    let logs = vm.logs();
    for line in [
        "virtkube-tiny: vda says: virtkube-disk:ORIGINAL".to_owned(),
        format!("virtkube-tiny: cloud-init seed: instance-id {hostname}, hostname {hostname}"),
        format!("virtkube-tiny: user-data: hello from {hostname}, seeded files: meta-data network-config user-data"),
    ] {
        assert!(logs.contains(&line), "missing {line:?} in:\n{logs}");
    }

    std::fs::remove_file(dir.join("seed/user-data")).unwrap();
    let refused = Vm::run("e2e-cidata-none", &extra, &tag, &[]);
    assert_eq!(refused.exit_code(Duration::from_secs(30)), 1, "{}", refused.logs());
    assert!(
        refused
            .logs()
            .contains(r#"spec.cloudInit.directory "/seed" has no user-data file (it holds: network-config)"#),
        "{}",
        refused.logs()
    );
    drop((vm, refused));
    let _ = docker(&["rmi", &tag]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM image that carries its own disk (`COPY root.raw /disk/`), through
/// the gate: the guest reads the disk the shim passed as a descriptor. By
/// default it writes to a private copy, so a second container of the same
/// image sees the image's disk again; a persistent disk on a volume keeps
/// what the guest wrote. `--print-xml` shows the descriptor group.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn a_vm_image_carries_its_disk() {
    require_setup();
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let disk = virtkube_e2e::disk_image::original_disk();
    std::fs::create_dir_all(dir.join("volume")).unwrap();
    std::fs::write(dir.join("volume/data.raw"), &disk).unwrap();
    let tag = format!("virtkube/e2e-disk:{}", std::process::id());
    virtkube_e2e::disk_image::build(&dir.join("context"), &tag);

    let printed = docker_ok(&["run", "--rm", &tag, "--print-xml"]);
    assert!(
        printed.contains(r#"<source file="/virtkube-fd/vda" fdgroup="vda"/>"#),
        "{printed}"
    );

    // The image's disk, twice: each container's guest sees the original.
    for round in 1..=2 {
        let vm = Vm::run(&format!("e2e-disk-{round}"), &[], &tag, &[]);
        assert_eq!(vm.exit_code(BOOT), 0, "{}", vm.logs());
        let logs = vm.logs();
        assert!(
            logs.contains("virtkube-tiny: vda says: virtkube-disk:ORIGINAL")
                && logs.contains("virtkube-tiny: scribbled on vda: virtkube-disk:SCRIBBLED"),
            "round {round}:\n{logs}"
        );
    }
    assert_eq!(
        std::fs::read(dir.join("context/root.raw")).unwrap(),
        disk,
        "the build context is untouched"
    );

    // A persistent disk on a volume: the second boot sees the first's write.
    let volume = format!("{}:/data", dir.join("volume").display());
    let persistent = ["-v", &volume, "-e", "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/volume.yaml"];
    let first = Vm::run("e2e-disk-volume-1", &persistent, &tag, &[]);
    assert_eq!(first.exit_code(BOOT), 0, "{}", first.logs());
    assert!(
        first.logs().contains("vda says: virtkube-disk:ORIGINAL"),
        "{}",
        first.logs()
    );
    let second = Vm::run("e2e-disk-volume-2", &persistent, &tag, &[]);
    assert_eq!(second.exit_code(BOOT), 0, "{}", second.logs());
    assert!(
        second.logs().contains("vda says: virtkube-disk:SCRIBBLED"),
        "{}",
        second.logs()
    );
    assert!(
        std::fs::read(dir.join("volume/data.raw"))
            .unwrap()
            .starts_with(b"virtkube-disk:SCRIBBLED")
    );

    // Persistent but in the container's own layer: refused, saying why.
    let misplaced = Vm::run(
        "e2e-disk-misplaced",
        &["-e", "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/misplaced.yaml"],
        &tag,
        &[],
    );
    assert_eq!(misplaced.exit_code(Duration::from_secs(30)), 1, "{}", misplaced.logs());
    assert!(
        misplaced
            .logs()
            .contains(r#"disks[0].containerFile "/disk/root.raw": a persistent disk must be on a volume"#),
        "{}",
        misplaced.logs()
    );
    drop((first, second, misplaced));
    let _ = docker(&["rmi", &tag]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `docker exec` of a second shim process: its exit, stdout (bytes) and stderr.
fn shim_exec(container: &str, operation: &str) -> (i32, Vec<u8>, String) {
    let out = Command::new(DOCKER)
        .args(["exec", container, "/virtkube-shim", operation])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The operations a user runs in the VM's container, and its display: a
/// screenshot shows the guest's banner in the screen's top rows; a VNC
/// viewer and a WebSocket viewer each get a full update with the same
/// text, through the container's 127.0.0.1 (which the pod network's rules
/// leave to the shim on these ports); reboot and reset boot the guest again
/// in the same container; shutdown ends the container with exit 0.
#[test]
#[ignore = "needs dockerd, the images and the virthost container: scripts/test.sh runs it"]
fn operations_and_the_display_of_a_running_vm() {
    require_setup();
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vnc.yaml"),
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: vnc}\nspec:\n  memory: 128Mi\n  graphics: {type: vnc}\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet\n",
    )
    .unwrap();
    let template = format!("{}:/etc/virtkube/vnc.yaml:ro", dir.join("vnc.yaml").display());
    let vm = Vm::run(
        "e2e-ops",
        &["-v", &template, "-e", "VIRTKUBE_TEMPLATE_FILE=/etc/virtkube/vnc.yaml"],
        "virtkube/tiny:latest",
        &[],
    );
    vm.wait_for_log("virtkube-tiny: ready", BOOT);
    let count = |needle: &str| vm.logs().matches(needle).count();

    // A screenshot: the banner lights the top rows; the bottom stays black.
    let (code, image, said) = shim_exec(&vm.name, "screenshot");
    assert_eq!(code, 0, "screenshot: {said}");
    let (width, height, pixels) = virtkube_e2e::display::decode_screenshot(&image).unwrap();
    let pixels = pixels.as_slice();
    assert!(width >= 640 && height >= 400, "{width}x{height}");
    let top = virtkube_e2e::display::lit_in_rows(pixels, width, 0..64);
    let bottom = virtkube_e2e::display::lit_in_rows(pixels, width, height - 64..height);
    assert!(top > 1000, "the banner's text lights the top rows: {top} pixels");
    assert_eq!(bottom, 0, "nothing is written at the bottom of the screen");
    assert!(said.contains("image/png"), "QEMU 7 gives PNG: {said}");

    // A VNC viewer and a WebSocket viewer, each through 127.0.0.1 in the
    // container (on Docker there are no pod-network rules: the shim's ports
    // are simply the container's).
    for (port, websocket) in [(5900, false), (6080, true)] {
        let forward = virtkube_e2e::Forward::into_container(&vm.name, port);
        let update = if websocket {
            virtkube_e2e::display::first_update_over_websocket(forward.address)
        } else {
            virtkube_e2e::display::first_update(forward.address)
        }
        .unwrap_or_else(|e| panic!("port {port}: {e}\n{}", vm.logs()));
        assert_eq!((update.width as usize, update.height as usize), (width, height));
        if websocket {
            // A page from elsewhere, which the browser would let open a
            // WebSocket to localhost, is refused.
            let status = virtkube_e2e::display::websocket_status_for_origin(forward.address, "https://evil.example");
            assert!(
                status.as_deref().is_ok_and(|s| s.starts_with("HTTP/1.1 403")),
                "{status:?}"
            );
        }
        assert!(update.lit_pixels > top / 2, "port {port}: {update:?}");
        assert!(update.name.contains(&vm.domain()), "port {port}: {update:?}");
    }
    let logs = vm.logs();
    assert!(logs.contains("display: a VNC viewer connected"), "{logs}");
    assert!(logs.contains("display: a WebSocket viewer connected"), "{logs}");

    // Reboot (ACPI) and reset: the guest boots again, the container runs on.
    for (operation, said_expected, boots) in [("reboot", "asked to reboot", 2), ("reset", "the machine was reset", 3)] {
        let (code, _, said) = shim_exec(&vm.name, operation);
        assert_eq!(code, 0, "{operation}: {said}");
        assert!(said.contains(said_expected), "{operation}: {said}");
        let deadline = Instant::now() + BOOT;
        while count("virtkube-tiny: ready") < boots {
            assert!(
                Instant::now() < deadline,
                "no new boot after {operation}:\n{}",
                vm.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(count("virtkube-tiny: booted"), boots, "{}", vm.logs());
        assert_eq!(
            docker_ok(&["inspect", "-f", "{{.State.Running}}", &vm.name]).trim(),
            "true"
        );
    }
    let logs = vm.logs();
    assert!(
        logs.contains("operation reboot: the guest was asked to reboot (ACPI)"),
        "{logs}"
    );

    // Operations the shim does not know are usage errors.
    let (code, _, said) = shim_exec(&vm.name, "pause");
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("unknown argument \"pause\""), "{said}");

    // Shutdown: the guest powers off and the container ends as for any poweroff.
    let (code, _, said) = shim_exec(&vm.name, "shutdown");
    assert_eq!(code, 0, "shutdown: {said}");
    assert_eq!(vm.exit_code(Duration::from_secs(60)), 0, "{}", vm.logs());
    // The guest powered off twice: for the ACPI reboot, and now.
    assert_eq!(count("reboot: Power down"), 2, "{}", vm.logs());
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}
