//! The VM lifecycle through kubectl on a real cluster (KUBECONFIG; in CI the
//! k8s-local single-node cluster with its kubelet on the local Docker engine,
//! where the images are already present).
//!
//! One adaptation to the cluster under test, applied to the manifests here and
//! nowhere else: the node's socket directory is /var/run/virtkube-e2e (so the
//! Docker end-to-end tests' virthost container keeps /var/run/virtkube). Pods
//! reach the API server through the `kubernetes` Service, as on any cluster
//! (on k8s-local, which has no kube-proxy, scripts/k8s-local-service-route.sh
//! routes it; scripts/test.sh runs it).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::{Duration, Instant};

use virtkube_e2e::Interactive;
use virtkube_e2e::cluster::*;

fn template_from_the_api(ns: &str) {
    let template = repo_file("images/tiny/template.yaml")
        .replace("  name: tiny\n", &format!("  name: tiny-api\n  namespace: {ns}\n"))
        .replace("memory: 128Mi", "memory: 144Mi");
    apply(&template);
    apply(&repo_file("deploy/examples/vm-rolebinding.yaml").replace("namespace: default", &format!("namespace: {ns}")));
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: vm-api\n  namespace: {ns}\n  annotations:\n    virtkube.io/template: tiny-api\n    virtkube.io/cpus: \"2\"\nspec:\n  restartPolicy: Never\n  containers:\n    - name: vm\n      image: virtkube/shim:latest\n      imagePullPolicy: IfNotPresent\n      env:\n        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}\n        - {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}\n      volumeMounts:\n        - {{name: libvirt, mountPath: /var/run/libvirt, readOnly: true}}\n  volumes:\n    - {{name: libvirt, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}\n"
    );
    // A new namespace's service account token can take a moment to exist.
    eventually("the pod to be accepted", ns, Duration::from_secs(30), || {
        kubectl_stdin(&["apply", "-f", "-"], Some(&pod)).0
    });
    eventually(
        "the VirtDomain of the API-templated VM",
        ns,
        Duration::from_secs(120),
        || virtdomain_state(ns, "vm-api") == "Running",
    );
    let vd = ok(&[
        "-n",
        ns,
        "get",
        "virtdomain",
        "vm-api",
        "-o",
        "jsonpath={.spec.template} {.status.memory} {.status.vcpus}",
    ]);
    assert_eq!(
        vd.trim(),
        "tiny-api 144Mi 2",
        "template, memory from the API template, vCPUs from the annotation"
    );
    // The kubelet may report the container as started a moment after the VM runs.
    let reading = format!("reading VirtTemplate {ns}/tiny-api from the Kubernetes API");
    eventually("the API-templated VM's log", ns, Duration::from_secs(60), || {
        kubectl(&["-n", ns, "logs", "vm-api"]).1.contains(&reading)
    });
    ok(&["-n", ns, "delete", "pod", "vm-api", "--wait=true", "--timeout=60s"]);
}

/// `kubectl` as service account `account` of `ns` (impersonated).
fn kubectl_as(ns: &str, account: &str, args: &[&str]) -> (bool, String) {
    let who = format!("--as=system:serviceaccount:{ns}:{account}");
    let mut all = vec![who.as_str(), "-n", ns];
    all.extend_from_slice(args);
    kubectl(&all)
}

/// A field of pod `pod` (a jsonpath), trimmed; empty when it cannot be read.
fn pod_field(ns: &str, pod: &str, path: &str) -> String {
    object_field(Some(ns), "pod", pod, path)
}

/// The ticks the guest printed so far: (count, last uptime).
fn ticks(ns: &str, pod: &str) -> (usize, f64) {
    let logs = kubectl(&["-n", ns, "logs", pod]).1;
    let ticks: Vec<f64> = logs
        .lines()
        .filter_map(|l| {
            l.split_once(" at uptime ")
                .map(|(_, up)| up.trim().parse().unwrap_or(0.0))
        })
        .collect();
    (ticks.len(), ticks.last().copied().unwrap_or(0.0))
}

/// `kubectl port-forward` of `port` to a free local port: the forwarder
/// (ends when dropped) and the local address.
fn port_forward(ns: &str, pod: &str, port: u16) -> (Interactive, std::net::SocketAddr) {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let target = format!(":{port}");
    let mut forward = Interactive::spawn(&kubectl, &["-n", ns, "port-forward", &format!("pod/{pod}"), &target]);
    assert!(
        forward.wait_for(&format!(" -> {port}"), Duration::from_secs(30)),
        "port-forward said: {}",
        forward.seen()
    );
    let local = forward
        .seen()
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|rest| rest.split_once(' '))
        .map(|(port, _)| port.parse::<u16>().unwrap())
        .unwrap_or_else(|| panic!("no local port in: {}", forward.seen()));
    (forward, std::net::SocketAddr::from(([127, 0, 0, 1], local)))
}

/// `web/console.html` (noVNC) in headless Chromium, through `kubectl
/// port-forward`: the canvas shows the guest's banner in its top rows and
/// black below.
fn the_screen_in_a_browser(ns: &str, pod: &str) {
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    assert!(
        web.join("node_modules/@novnc/novnc/core/rfb.js").exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs noVNC (cd web && npm ci) and Chromium (apt-get install chromium): scripts/test.sh installs both"
    );
    let (_forward, local) = port_forward(ns, pod, virtkube_api::podnet::VNC_WEBSOCKET_PORT);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = free.local_addr().unwrap().port();
    drop(free);
    let _server = Interactive::spawn(
        "python3",
        &[
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "-d",
            web.to_str().unwrap(),
            &http_port.to_string(),
        ],
    );
    let page = format!("http://127.0.0.1:{http_port}/console.html?port={}", local.port());
    let shot = std::env::temp_dir().join(format!("virtkube-browser-{}.png", std::process::id()));
    let mut said = String::new();
    for _ in 0..20 {
        // The static server takes a moment to listen.
        let out = std::process::Command::new("node")
            .arg(web.join("test/screenshot.mjs"))
            .args([&page, shot.to_str().unwrap()])
            .output()
            .unwrap();
        said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no browser screenshot ({e}): {said}"));
    let (width, height, pixels) = virtkube_e2e::display::decode_screenshot(&png).unwrap();
    let top = virtkube_e2e::display::lit_in_rows(&pixels, width, 0..height / 6);
    // (Scaled to the page, the screen may leave the canvas's last row or two
    // to the page's background.)
    let bottom = virtkube_e2e::display::lit_in_rows(&pixels, width, height * 2 / 3..height - 4);
    assert!(
        top > 1000 && bottom == 0,
        "the browser showed {width}x{height}, lit top {top}, bottom {bottom}: {said}"
    );
    assert!(said.contains(&format!("{ns}_{pod}")), "the page's status: {said}");
    println!("the browser showed the guest's screen ({width}x{height}, {top} lit pixels in the top rows)");
    let _ = std::fs::remove_file(&shot);
}

/// Operating a running VM through the Kubernetes API with its RBAC roles:
/// pause and resume as the VirtDomain's desired state (the guest's clock
/// and console stand still meanwhile), the display through `kubectl
/// port-forward` (RFB and RFB over WebSocket), a screenshot, reboot and
/// shutdown through `kubectl exec`; each told on the pod; a viewer refused.
fn operations_through_kubectl(ns: &str) {
    let template = repo_file("images/tiny/template.yaml")
        .replace("  name: tiny\n", &format!("  name: tiny-ops\n  namespace: {ns}\n"))
        .replace("memory: 128Mi", "memory: 128Mi\n  graphics: {type: vnc}")
        .replace("quiet", "quiet virtkube.tick");
    assert!(
        template.contains("virtkube.tick") && template.contains("type: vnc"),
        "{template}"
    );
    apply(&template);
    apply(
        &repo_file("deploy/examples/vm-user-rolebindings.yaml")
            .replace("namespace: default", &format!("namespace: {ns}"))
            .replace(
                "  - kind: Group\n    name: on-call\n    apiGroup: rbac.authorization.k8s.io",
                &format!("  - kind: ServiceAccount\n    name: operator\n    namespace: {ns}"),
            )
            .replace("    name: ci\n", "    name: viewer\n"),
    );
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: vm-ops\n  namespace: {ns}\n  annotations:\n    virtkube.io/template: tiny-ops\nspec:\n  restartPolicy: Never\n  runtimeClassName: virtkube\n  containers:\n    - name: vm\n      image: virtkube/shim:latest\n      imagePullPolicy: IfNotPresent\n      env:\n        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}\n        - {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}\n      resources: {{limits: {{memory: 160Mi}}}}\n      volumeMounts:\n        - {{name: libvirt, mountPath: /var/run/libvirt, readOnly: true}}\n  volumes:\n    - {{name: libvirt, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}\n"
    );
    apply(&pod);
    eventually("the operated VM's guest ticking", ns, Duration::from_secs(120), || {
        ticks(ns, "vm-ops").0 >= 2
    });

    // Pause: desired state on the VirtDomain, by the operator; a viewer may not.
    let pause = r#"{"spec":{"runState":"Paused"}}"#;
    let (allowed, said) = kubectl_as(ns, "viewer", &["patch", "vd", "vm-ops", "--type", "merge", "-p", pause]);
    assert!(!allowed && said.contains("forbidden"), "a viewer paused the VM: {said}");
    let asked = Instant::now();
    let (allowed, said) = kubectl_as(
        ns,
        "operator",
        &["patch", "vd", "vm-ops", "--type", "merge", "-p", pause],
    );
    assert!(allowed, "the operator could not pause: {said}");
    eventually("the VM paused", ns, Duration::from_secs(10), || {
        virtdomain_state(ns, "vm-ops") == "Paused"
    });
    println!("paused {:?} after the patch", asked.elapsed());
    assert_eq!(
        ok(&[
            "-n",
            ns,
            "get",
            "vd",
            "vm-ops",
            "-o",
            "jsonpath={.spec.runState} {.status.pausedByRequest}"
        ])
        .trim(),
        "Paused true"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (count_paused, uptime_paused) = ticks(ns, "vm-ops");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(ticks(ns, "vm-ops").0, count_paused, "the console went on while paused");
    let resumed_at = Instant::now();
    let (allowed, said) = kubectl_as(
        ns,
        "operator",
        &[
            "patch",
            "vd",
            "vm-ops",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"runState":"Running"}}"#,
        ],
    );
    assert!(allowed, "{said}");
    eventually("the VM running again", ns, Duration::from_secs(10), || {
        virtdomain_state(ns, "vm-ops") == "Running"
    });
    eventually("ticks again", ns, Duration::from_secs(30), || {
        ticks(ns, "vm-ops").0 > count_paused
    });
    let (_, uptime_resumed) = ticks(ns, "vm-ops");
    let wall = 7.0 + resumed_at.elapsed().as_secs_f64();
    assert!(
        uptime_resumed - uptime_paused < wall - 3.0,
        "the guest's clock ran while paused: uptime {uptime_paused} then {uptime_resumed}, {wall:.1} s of wall time"
    );
    let events = describe_events(ns, "vm-ops");
    assert!(events.contains("VMPaused") && events.contains("VMResumed"), "{events}");

    // The display through kubectl port-forward, as a VNC viewer and as a browser.
    for (port, websocket) in [(5900, false), (6080, true)] {
        let (_forward, local) = port_forward(ns, "vm-ops", port);
        let update = if websocket {
            virtkube_e2e::display::first_update_over_websocket(local)
        } else {
            virtkube_e2e::display::first_update(local)
        }
        .unwrap_or_else(|e| panic!("port {port}: {e}\n{}", diagnostics(ns)));
        assert!(update.lit_pixels > 1000, "port {port}: {update:?}");
        assert!(update.name.contains(&format!("{ns}_vm-ops")), "port {port}: {update:?}");
        if websocket {
            let status = virtkube_e2e::display::websocket_status_for_origin(local, "https://evil.example");
            assert!(
                status.as_deref().is_ok_and(|s| s.starts_with("HTTP/1.1 403")),
                "{status:?}"
            );
        }
    }

    the_screen_in_a_browser(ns, "vm-ops");

    // A screenshot through kubectl exec, by the operator; a viewer may not exec.
    let (allowed, said) = kubectl_as(ns, "viewer", &["exec", "vm-ops", "--", "/virtkube-shim", "reboot"]);
    assert!(
        !allowed && said.contains("forbidden"),
        "a viewer operated the VM: {said}"
    );
    let kubectl_bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let operator = format!("--as=system:serviceaccount:{ns}:operator");
    let shot = std::process::Command::new(&kubectl_bin)
        .args([
            &operator,
            "-n",
            ns,
            "exec",
            "vm-ops",
            "--",
            "/virtkube-shim",
            "screenshot",
        ])
        .output()
        .unwrap();
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let (width, _, pixels) = virtkube_e2e::display::decode_screenshot(&shot.stdout).unwrap();
    assert!(virtkube_e2e::display::lit_in_rows(&pixels, width, 0..64) > 1000);

    // Reboot: the guest boots again in the same container.
    let (allowed, said) = kubectl_as(ns, "operator", &["exec", "vm-ops", "--", "/virtkube-shim", "reboot"]);
    assert!(allowed && said.contains("asked to reboot"), "{said}");
    eventually("the guest's second boot", ns, Duration::from_secs(120), || {
        kubectl(&["-n", ns, "logs", "vm-ops"])
            .1
            .matches("virtkube-tiny: booted")
            .count()
            >= 2
    });
    assert_eq!(
        pod_field(ns, "vm-ops", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    eventually("the reset told on the pod", ns, Duration::from_secs(30), || {
        describe_events(ns, "vm-ops").contains("VMReset")
    });

    // Shutdown: the guest powers off and the pod completes with exit 0.
    let (allowed, said) = kubectl_as(ns, "operator", &["exec", "vm-ops", "--", "/virtkube-shim", "shutdown"]);
    assert!(allowed, "{said}");
    eventually("the pod to complete", ns, Duration::from_secs(90), || {
        pod_field(ns, "vm-ops", "{.status.phase}") == "Succeeded"
    });
    assert_eq!(
        pod_field(ns, "vm-ops", "{.status.containerStatuses[0].state.terminated.exitCode}"),
        "0"
    );
    eventually("the shutdown told on the pod", ns, Duration::from_secs(30), || {
        describe_events(ns, "vm-ops").contains("VMShutDown")
    });
    ok(&["-n", ns, "delete", "pod", "vm-ops", "--wait=true", "--timeout=60s"]);
}

/// `kubectl attach -i`, typing `input` after a moment, reading until `needle`
/// (or 30 s); returns what it read. An attach that has already ended (its
/// container did, say for memory) is what the caller's checks then see.
fn attach_and_type(namespace: &str, pod: &str, input: &str, needle: &str) -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut attached = Interactive::spawn(&kubectl, &["-n", namespace, "attach", "-i", pod, "-c", "vm"]);
    std::thread::sleep(Duration::from_secs(2));
    if let Err(e) = attached.try_send(input) {
        eprintln!("kubectl attach to {namespace}/{pod} ended before the input was typed: {e}");
    }
    attached.wait_for(needle, Duration::from_secs(30));
    attached.seen().to_owned()
}

/// An HTTP GET of `/` at `address` (host:port): the body, trimmed.
fn http_get(address: &str) -> Result<String, String> {
    virtkube_e2e::http_get(address.parse().map_err(|e| format!("{address}: {e}"))?)
}

/// The 3 VMs of the Deployment on their pods' network: each at its own pod
/// IP, behind a Service that balances over them (from the node and from
/// another pod), through `kubectl port-forward`; a guest reaches another
/// pod by its IP and the API's Service IP. Returns the Service's ClusterIP.
fn the_deployment_is_on_the_pod_network(ns: &str) -> String {
    let pods = pods_of(ns, "app.kubernetes.io/name=tiny-vm");
    let mut ips = std::collections::BTreeMap::new();
    for pod in &pods {
        let ip = ok(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.status.podIP}"]);
        ips.insert(pod.clone(), ip.trim().to_owned());
        // Each VM at its own pod's address, answering with its pod's name (its DHCP host name).
        assert_eq!(
            http_get(&format!("{}:80", ip.trim())),
            Ok(format!("virtkube-tiny: hello from {pod}")),
            "{pod} at {ip}\n{}",
            diagnostics(ns)
        );
        let logs = kubectl(&["-n", ns, "logs", pod]).1;
        assert!(
            logs.contains("the guest took 10.0.2.2/24 by DHCP") && logs.contains("eth0 has 10.0.2.2/24 by DHCP"),
            "{pod}:\n{logs}"
        );
        let listed = ok(&[
            "-n",
            ns,
            "get",
            "virtdomain",
            pod,
            "-o",
            "jsonpath={.status.interfaces[0].network} {.status.interfaces[0].guestAddress}",
        ]);
        assert_eq!(listed.trim(), "pod 10.0.2.2/24", "{pod}'s VirtDomain");
    }
    let distinct: std::collections::BTreeSet<&String> = ips.values().collect();
    assert_eq!(distinct.len(), 3, "each VM has its own pod IP: {ips:?}");

    apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: tiny-vm, namespace: {ns}}}\nspec:\n  selector: {{app.kubernetes.io/name: tiny-vm}}\n  ports: [{{port: 80, targetPort: 80}}]\n"
    ));
    let service = ok(&[
        "-n",
        ns,
        "get",
        "service",
        "tiny-vm",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
    .trim()
    .to_owned();
    // From the node: 30 requests reach all three.
    let mut answered = std::collections::BTreeSet::new();
    eventually(
        "the Service to reach all 3 VMs from the node",
        ns,
        Duration::from_secs(60),
        || {
            answered.extend((0..30).filter_map(|_| http_get(&format!("{service}:80")).ok()));
            answered.len() == 3
        },
    );
    let expected: std::collections::BTreeSet<String> = pods
        .iter()
        .map(|pod| format!("virtkube-tiny: hello from {pod}"))
        .collect();
    assert_eq!(answered, expected);

    // From another pod (bash's /dev/tcp: the image has no HTTP client).
    let fetch = format!(
        "for i in $(seq 1 30); do exec 3<>/dev/tcp/{service}/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && tail -n 1 <&3; exec 3<&-; done"
    );
    apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {ns}}}\nspec:\n  restartPolicy: Never\n  containers:\n    - name: client\n      image: debian:bookworm-slim\n      imagePullPolicy: Never\n      command: [bash, -c, {fetch:?}]\n"
    ));
    eventually("the client pod to finish", ns, Duration::from_secs(90), || {
        ok(&["-n", ns, "get", "pod", "client", "-o", "jsonpath={.status.phase}"]).trim() == "Succeeded"
    });
    let seen = ok(&["-n", ns, "logs", "client"]);
    let from_pod: std::collections::BTreeSet<String> = seen.lines().map(|l| l.trim().to_owned()).collect();
    assert_eq!(from_pod, expected, "from another pod:\n{seen}");

    // kubectl port-forward connects to 127.0.0.1 in the pod: the guest answers.
    let kubectl_bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut forward = Interactive::spawn(
        &kubectl_bin,
        &["-n", ns, "port-forward", &format!("pod/{}", pods[0]), ":80"],
    );
    assert!(
        forward.wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(30)),
        "{}",
        forward.seen()
    );
    let port = forward
        .seen()
        .split("Forwarding from 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert_eq!(
        http_get(&format!("127.0.0.1:{port}")),
        Ok(format!("virtkube-tiny: hello from {}", pods[0])),
        "through kubectl port-forward"
    );
    drop(forward);

    // The guest reaches another pod by its IP, and the API server's Service IP
    // (a plain HTTP request to its TLS port gets Go's 400 answer).
    let api = ok(&[
        "-n",
        "default",
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let neighbour = &ips[&pods[1]];
    let answer = attach_and_type(
        ns,
        &pods[0],
        &format!(
            "wget -q -O - http://{neighbour}/; timeout 10 wget -O - http://{}:443/ 2>&1 | tail -n 1; echo fetched-$((40+2))\n",
            api.trim()
        ),
        "fetched-42",
    );
    assert!(
        answer.contains(&format!("virtkube-tiny: hello from {}", pods[1])),
        "the guest reached {neighbour}:\n{answer}"
    );
    assert!(
        answer.contains("400 Bad Request"),
        "the guest reached the API at {api}:\n{answer}"
    );
    service
}

#[test]
#[ignore = "needs a Kubernetes cluster with a kubelet (KUBECONFIG) and the images: scripts/test.sh runs it"]
fn vm_lifecycle_through_kubectl() {
    deploy_virtkube();
    // A kubelet that just started (or restarted against old cluster state) takes a
    // while to post a Ready status.
    let mut node = String::new();
    eventually("a Ready node", "virtkube-system", Duration::from_secs(180), || {
        let nodes = kubectl(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])
        .1;
        match nodes.lines().find_map(|l| l.strip_suffix(" True")) {
            Some(ready) => {
                node = ready.to_owned();
                true
            }
            None => false,
        }
    });

    // The VirtNode and the Node labels.
    eventually("the VirtNode", "virtkube-system", Duration::from_secs(60), || {
        kubectl(&["get", "virtnode", &node, "-o", "jsonpath={.status.arch}"])
            .1
            .trim()
            == "x86_64"
    });
    let cpus = ok(&["get", "virtnode", &node, "-o", "jsonpath={.status.cpus}"]);
    assert!(cpus.trim().parse::<u32>().unwrap() > 0);
    eventually("the Node labels", "virtkube-system", Duration::from_secs(60), || {
        kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.metadata.labels.virtkube\\.io/arch}",
        ])
        .1
        .trim()
            == "x86_64"
    });

    let namespace = RunNamespace::create("virtkube-e2e");
    let ns = namespace.name().to_owned();

    // A Deployment of the tiny VM: a VirtDomain reaches Running, with the
    // pod's annotation override (160Mi) applied; kubectl logs shows the guest.
    apply(&vm_manifests(&ns));
    eventually("a Running VirtDomain", &ns, Duration::from_secs(120), || {
        virtdomain_states(&ns).contains("Running")
    });
    assert_eq!(
        ok(&[
            "-n",
            &ns,
            "get",
            "virtdomains",
            "-o",
            "jsonpath={.items[0].status.memory}"
        ])
        .trim(),
        "160Mi"
    );
    let pod = pods_of(&ns, "app.kubernetes.io/name=tiny-vm").remove(0);
    eventually(
        "the guest console in kubectl logs",
        &ns,
        Duration::from_secs(120),
        || kubectl(&["-n", &ns, "logs", &pod]).1.contains("virtkube-tiny: ready"),
    );
    let domain = format!("{ns}_{pod}");
    assert!(virsh_list().contains(&domain), "{}", virsh_list());

    // kubectl attach -i types into the guest's shell and sees the answer.
    let answer = attach_and_type(&ns, &pod, "echo attach-sum=$((40+2))\n", "attach-sum=42");
    assert!(
        answer.contains("attach-sum=42"),
        "kubectl attach saw:\n{answer}\n{}",
        diagnostics(&ns)
    );

    // kubectl delete pod: the guest shuts down, the domain and the VirtDomain go.
    let asked = Instant::now();
    ok(&["-n", &ns, "delete", "pod", &pod, "--wait=true", "--timeout=60s"]);
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "deleting the pod took {:?}",
        asked.elapsed()
    );
    eventually("the domain to go", &ns, Duration::from_secs(10), || {
        !virsh_list().contains(&domain)
    });
    eventually("its VirtDomain to go", &ns, Duration::from_secs(30), || {
        !kubectl(&["-n", &ns, "get", "virtdomain", &pod]).0
    });

    // Scale to 3, then to 1: two domains go.
    ok(&["-n", &ns, "scale", "deployment/tiny-vm", "--replicas=3"]);
    eventually("3 running VirtDomains", &ns, Duration::from_secs(180), || {
        virtdomain_states(&ns).matches("Running").count() == 3
    });
    // And each guest up, and its pod Ready: this cluster's kubelet (1.20) was
    // seen to start killing a pod deleted a second after it started only 90 s
    // later, which is the kubelet's delay, not the VM's.
    eventually(
        "3 guests up and their pods Ready",
        &ns,
        Duration::from_secs(120),
        || {
            let pods = pods_of(&ns, "app.kubernetes.io/name=tiny-vm");
            pods.len() == 3
                && pods.iter().all(|pod| {
                    kubectl(&["-n", &ns, "logs", pod]).1.contains("virtkube-tiny: ready")
                        && kubectl(&[
                            "-n",
                            &ns,
                            "get",
                            "pod",
                            pod,
                            "-o",
                            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                        ])
                        .1
                        .trim()
                            == "True"
                })
        },
    );
    let networked = pods_of(&ns, "app.kubernetes.io/name=tiny-vm");
    let service = the_deployment_is_on_the_pod_network(&ns);
    virthost_restarts_leave_vms_running(&ns);
    // The network survived the virthost's restarts (it lives in the pods).
    let after: std::collections::BTreeSet<String> = (0..30)
        .filter_map(|_| http_get(&format!("{service}:80")).ok())
        .collect();
    assert_eq!(
        after.len(),
        3,
        "after the virthost restarts the Service reaches: {after:?}"
    );
    ok(&["-n", &ns, "scale", "deployment/tiny-vm", "--replicas=1"]);
    eventually("one domain left", &ns, Duration::from_secs(90), || {
        virsh_list().matches(&format!("{ns}_tiny-vm")).count() == 1
    });
    // Nothing of the two gone VMs' network is left on the node: their taps
    // went with their pods' namespaces (and the NAT with them).
    let domains = virsh_list();
    let gone: Vec<String> = networked
        .iter()
        .filter(|pod| !domains.contains(&format!("{ns}_{pod}")))
        .map(|pod| virtkube_api::podnet::tap_name(&format!("{ns}_{pod}")))
        .collect();
    assert_eq!(gone.len(), 2, "two of {networked:?} went");
    for tap in &gone {
        assert!(
            !std::path::Path::new("/sys/class/net").join(tap).exists(),
            "{tap} is left on the node"
        );
    }

    // A Job whose VM powers off completes.
    let job = vm_job(
        &ns,
        "tiny-job",
        "        virtkube.io/cmdline: console=ttyS0 panic=-1 quiet virtkube.poweroff\n",
    );
    apply(&job);
    eventually("the Job to complete", &ns, Duration::from_secs(180), || {
        kubectl(&[
            "-n",
            &ns,
            "get",
            "job",
            "tiny-job",
            "-o",
            "jsonpath={.status.succeeded}",
        ])
        .1
        .trim()
            == "1"
    });

    // A bad annotation: the pod fails, and describe shows why (termination message).
    let describe = failed_vm_job(&ns, "tiny-broken", "        virtkube.io/cpus: lots\n");
    assert!(
        describe.contains("annotation virtkube.io/cpus: \"lots\" is not a whole number of vCPUs"),
        "{describe}"
    );
    assert!(describe.contains("Exit Code:    1"), "{describe}");

    // A guest bigger than its pod can hold (the pod: 160Mi + the
    // RuntimeClass's 128Mi): refused by the gate, with the numbers.
    let describe = failed_vm_job(&ns, "tiny-too-big", "        virtkube.io/memory: 512Mi\n");
    assert!(
        describe.contains(
            "the pod's memory limit (288 MiB) cannot hold the VM: guest memory 512 MiB + QEMU's overhead 128 MiB = 640 MiB"
        ) && describe.contains("runtimeClassName: virtkube"),
        "{describe}"
    );
    assert!(describe.contains("Exit Code:    1"), "{describe}");

    a_vm_outgrowing_its_pod_is_killed_there(&ns);

    // A guest kernel panic (pvpanic): the pod fails with exit 3, and says so.
    let describe = failed_vm_job(
        &ns,
        "tiny-panic",
        "        virtkube.io/cmdline: console=ttyS0 panic=-1 quiet virtkube.panic\n",
    );
    assert!(
        describe.contains("exit 3: the guest crashed: its kernel panicked"),
        "{describe}"
    );
    assert!(describe.contains("Exit Code:    3"), "{describe}");

    // The template by name from the API: the bare base image (no baked
    // template), a VirtTemplate in the namespace, the pod's annotation naming
    // it, and the virtkube-vm role for the pod's service account.
    template_from_the_api(&ns);
    operations_through_kubectl(&ns);

    disks_from_the_pod(&ns);
    the_disk_image_deployment(&ns);
    image_repositories(&ns);
    bare_kubectl_run(&ns);
    the_node_itself_is_refused_over_tcp();
    hostile_pod(&ns, "probe-socket", false);
    hostile_pod(&ns, "probe-tcp", true);

    drop(namespace);
}

/// Each of the namespace's domains and its QEMU's PID, as `DOMAIN PID` lines,
/// read in the virthost.
fn qemu_pids(ns: &str) -> Vec<String> {
    let script = format!(
        "for f in /run/libvirt/qemu/{ns}_*.pid; do [ -e \"$f\" ] && echo \"$(basename \"$f\" .pid) $(cat \"$f\")\"; done"
    );
    let mut lines: Vec<String> = ok(&[
        "-n",
        "virtkube-system",
        "exec",
        "ds/virthost",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .lines()
    .map(str::to_owned)
    .collect();
    lines.sort();
    lines
}

/// Three virthost rollouts under the Deployment's 3 VMs (a restart, a switch
/// to the capabilities mode and back): each VM runs on in the same QEMU, in
/// its pod's cgroup, without a container restart or a second boot, its shim
/// reattaches each time, and `kubectl describe` tells it.
fn virthost_restarts_leave_vms_running(ns: &str) {
    let pods = pods_of(ns, "app.kubernetes.io/name=tiny-vm");
    let before = qemu_pids(ns);
    assert_eq!(before.len(), 3, "{before:?}");
    // QEMU lives in its VM pod's cgroup itself, in every hierarchy (cgroup
    // v2: in its own leaf under the pod), not in a container's.
    for line in &before {
        let (domain, pid) = line.split_once(' ').unwrap();
        let pod = domain.strip_prefix(&format!("{ns}_")).unwrap();
        let uid = ok(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.metadata.uid}"]);
        let cgroups = ok(&[
            "-n",
            "virtkube-system",
            "exec",
            "ds/virthost",
            "--",
            "cat",
            &format!("/proc/{pid}/cgroup"),
        ]);
        let pod_cgroup = format!("pod{}", uid.trim());
        let in_pod = cgroups
            .lines()
            .filter(|l| l.ends_with(&pod_cgroup) || l.ends_with(&format!("{pod_cgroup}/virtkube-qemu")))
            .count();
        assert!(
            in_pod >= cgroups.lines().filter(|l| l.contains("/kubepods")).count() && in_pod > 0,
            "QEMU of {pod} is not in its pod's cgroup:\n{cgroups}"
        );
        let story = describe_events(ns, pod);
        assert!(story.contains("VMStarted"), "{pod}'s events:\n{story}");
    }
    // 1: a rollout restart; 2: an upgrade to the capabilities mode (every
    // capability but CAP_SYS_RESOURCE, deploy/examples); 3: back again, to
    // the manifest's two capabilities (the pod network's).
    let capabilities_patch = repo_file("deploy/examples/virthost-capabilities-patch.yaml");
    let back = r#"[{"op": "replace", "path": "/spec/template/spec/containers/0/securityContext", "value": {"capabilities": {"add": ["NET_ADMIN", "SYS_ADMIN"]}}}]"#;
    assert!(
        repo_file("deploy/03-virthost.yaml").contains("add: [NET_ADMIN, SYS_ADMIN]"),
        "the manifest's capabilities moved: change `back` too"
    );
    for round in 1..=3 {
        let restarted = Instant::now();
        let how = match round {
            1 => ok(&["-n", "virtkube-system", "rollout", "restart", "ds/virthost"]),
            2 => ok(&[
                "-n",
                "virtkube-system",
                "patch",
                "ds/virthost",
                "--patch",
                &capabilities_patch,
            ]),
            _ => ok(&[
                "-n",
                "virtkube-system",
                "patch",
                "ds/virthost",
                "--type",
                "json",
                "--patch",
                back,
            ]),
        };
        wait_for_virthost(&format!("the virthost after change {round} ({})", how.trim()));
        if round == 2 {
            let caps = ok(&[
                "-n",
                "virtkube-system",
                "get",
                "ds/virthost",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].securityContext.capabilities.drop}",
            ]);
            assert!(
                caps.contains("SYS_RESOURCE"),
                "the capabilities patch did not apply: {caps}"
            );
        }
        for pod in &pods {
            eventually(
                &format!("{pod} to reattach ({round})"),
                ns,
                Duration::from_secs(120),
                || {
                    kubectl(&["-n", ns, "logs", pod])
                        .1
                        .matches("reattached to domain")
                        .count()
                        >= round
                },
            );
        }
        eprintln!(
            "virthost change {round}: every VM reattached {:?} after it began",
            restarted.elapsed()
        );
    }
    assert_eq!(qemu_pids(ns), before, "the same QEMUs run the VMs");
    for pod in &pods {
        let restarts = ok(&[
            "-n",
            ns,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ]);
        assert_eq!(restarts.trim(), "0", "{pod} restarted\n{}", diagnostics(ns));
        let logs = kubectl(&["-n", ns, "logs", pod]).1;
        assert_eq!(
            logs.matches("virtkube-tiny: booted").count(),
            1,
            "{pod} booted again:\n{logs}"
        );
        assert_eq!(virtdomain_state(ns, pod), "Running");
        // kubectl describe tells the outage: the VM kept running, and its shim reattached.
        eventually(&format!("{pod}'s events"), ns, Duration::from_secs(60), || {
            describe_events(ns, pod).contains("VMKeptRunning")
        });
        let story = describe_events(ns, pod);
        assert!(story.contains("same QEMU (PID"), "{pod}'s events:\n{story}");
    }
}

/// The Events section of `kubectl describe pod`.
fn describe_events(ns: &str, pod: &str) -> String {
    let describe = kubectl(&["-n", ns, "describe", "pod", pod]).1;
    describe
        .split_once("\nEvents:")
        .map_or_else(String::new, |(_, events)| events.to_owned())
}

/// A Job of the tiny VM with `annotations` that must fail; returns `kubectl describe` of its pod.
fn failed_vm_job(ns: &str, name: &str, annotations: &str) -> String {
    apply(&vm_job(ns, name, annotations));
    let selector = format!("app.kubernetes.io/name={name}");
    eventually(&format!("pod {name} to fail"), ns, Duration::from_secs(180), || {
        kubectl(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            &selector,
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])
        .1
        .contains("Failed")
    });
    let pod = pods_of(ns, &selector).remove(0);
    ok(&["-n", ns, "describe", "pod", &pod])
}

/// A VM that touches more memory than its pod allows (the pod cgroup's limit
/// lowered under the running VM, as a QEMU outgrowing its overhead would):
/// the kernel kills QEMU inside the pod's cgroup, the shim exits 3 pointing
/// at the pod's events, and nodeinfo's OOMKilled event names the cgroup.
fn a_vm_outgrowing_its_pod_is_killed_there(ns: &str) {
    apply(&vm_job(ns, "tiny-oom", ""));
    let selector = "app.kubernetes.io/name=tiny-oom";
    let mut pod = String::new();
    eventually("the tiny-oom guest ready", ns, Duration::from_secs(120), || {
        pod = pods_of(ns, selector).first().cloned().unwrap_or_default();
        !pod.is_empty() && kubectl(&["-n", ns, "logs", &pod]).1.contains("virtkube-tiny: ready")
    });
    let mut cgroup = String::new();
    eventually("QEMU in the pod's cgroup", ns, Duration::from_secs(30), || {
        cgroup = ok(&[
            "-n",
            ns,
            "get",
            "virtdomain",
            &pod,
            "-o",
            "jsonpath={.status.qemu.cgroup}",
        ]);
        cgroup.trim().ends_with(&format!(
            "pod{}",
            ok(&["-n", ns, "get", "pod", &pod, "-o", "jsonpath={.metadata.uid}"]).trim()
        ))
    });
    // 4 MiB above what the pod uses now (cgroup v1 or v2), set from the virthost.
    let squeeze = format!(
        "cd /sys/fs/cgroup/memory{0} 2>/dev/null && echo $(( $(cat memory.usage_in_bytes) + 4194304 )) > memory.limit_in_bytes \
         || {{ cd /sys/fs/cgroup{0} && echo $(( $(cat memory.current) + 4194304 )) > memory.max; }}",
        cgroup.trim()
    );
    ok(&[
        "-n",
        "virtkube-system",
        "exec",
        "ds/virthost",
        "--",
        "sh",
        "-c",
        &squeeze,
    ]);
    // The guest fills its RAM: its root (a RAM file system, up to half the
    // RAM), then an 80 MiB buffer. Pages it touched before and freed come
    // back first, and a NIC's boot touches more of them, so only filling
    // everything is sure to reach pages QEMU never had.
    attach_and_type(
        ns,
        &pod,
        "dd if=/dev/zero of=/fill bs=1M count=120; dd if=/dev/zero of=/dev/null bs=80M count=1; echo filled\n",
        "exit 3",
    );
    eventually("the tiny-oom pod to fail", ns, Duration::from_secs(60), || {
        ok(&["-n", ns, "get", "pod", &pod, "-o", "jsonpath={.status.phase}"]).trim() == "Failed"
    });
    eventually("the OOMKilled event", ns, Duration::from_secs(30), || {
        describe_events(ns, &pod).contains("OOMKilled")
    });
    let describe = ok(&["-n", ns, "describe", "pod", &pod]);
    assert!(describe.contains("Exit Code:    3"), "{describe}");
    assert!(
        describe.contains("if the pod ran out of memory, its events say so"),
        "{describe}"
    );
    let events = describe_events(ns, &pod);
    assert!(
        events.contains(&format!("for memory in cgroup {}", cgroup.trim())),
        "{events}"
    );
}

/// A pod of an image that carries its disk, and one whose disk is a
/// PersistentVolumeClaim: the guest reads the disk the shim passed as a
/// descriptor and writes to it. A second pod of the image sees the image's
/// disk again (the first one's writes went to its private copy); a second
/// pod on the claim sees the first one's write.
fn disks_from_the_pod(ns: &str) {
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-cluster-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let disk = virtkube_e2e::disk_image::original_disk();
    let tag = format!("virtkube/e2e-cluster-disk:{}", std::process::id());
    virtkube_e2e::disk_image::build(&dir, &tag);

    // A volume on the node (this cluster's node is this machine), claimed.
    let volume = format!("/var/lib/virtkube-e2e-volume-{}", std::process::id());
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(format!("{volume}/data.raw"), &disk).unwrap();
    let class = format!("virtkube-e2e-manual-{}", std::process::id());
    apply(&format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {ns}-disk}}\nspec:\n  storageClassName: {class}\n  capacity: {{storage: 16Mi}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: {volume}, type: Directory}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: disk, namespace: {ns}}}\nspec:\n  storageClassName: {class}\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 16Mi}}}}\n"
    ));
    // Cloud-init from a Secret (a volume of links, as the kubelet makes it).
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: seed, namespace: {ns}}}\nstringData:\n  user-data: |\n    #!/bin/sh\n    echo \"hello from $(hostname) via a Secret\"\n"
    ));
    // The pod: `template` picks the image's template; `claim` mounts the
    // claim at /data; `seed` the Secret at /seed; `annotations` as given.
    let pod = |name: &str, template: &str, claim: bool, seed: bool, annotations: &str| {
        let mut mounts = String::new();
        let mut volumes = String::new();
        if claim {
            mounts += "        - {name: data, mountPath: /data}\n";
            volumes += "    - {name: data, persistentVolumeClaim: {claimName: disk}}\n";
        }
        if seed {
            mounts += "        - {name: seed, mountPath: /seed, readOnly: true}\n";
            volumes += "    - {name: seed, secret: {secretName: seed}}\n";
        }
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{{annotations}}}}}\nspec:\n  restartPolicy: Never\n  runtimeClassName: virtkube\n  containers:\n    - name: vm\n      image: {tag}\n      imagePullPolicy: IfNotPresent\n      resources: {{limits: {{memory: 160Mi}}}}\n      env:\n        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}\n        - {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}\n        - {{name: POD_UID, valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}}}\n        - {{name: VIRTKUBE_TEMPLATE_FILE, value: /etc/virtkube/{template}}}\n      volumeMounts:\n        - {{name: libvirt, mountPath: /var/run/libvirt, readOnly: true}}\n{mounts}  volumes:\n    - {{name: libvirt, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}\n{volumes}"
        )
    };
    let run_to_completion = |name: &str, pod: String| -> String {
        apply(&pod);
        eventually(&format!("pod {name} to succeed"), ns, Duration::from_secs(180), || {
            let phase = ok(&["-n", ns, "get", "pod", name, "-o", "jsonpath={.status.phase}"]);
            assert_ne!(phase.trim(), "Failed", "{}", kubectl(&["-n", ns, "logs", name]).1);
            phase.trim() == "Succeeded"
        });
        kubectl(&["-n", ns, "logs", name]).1
    };
    let uid_of = |name: &str| ok(&["-n", ns, "get", "pod", name, "-o", "jsonpath={.metadata.uid}"]);
    // The image's disk, twice: each pod's guest sees the original. The
    // second also has a cloud-init seed from the Secret: its instance-id is
    // its pod's UID, its hostname its pod's name.
    for (name, template, seed) in [
        ("disk-image-1", "template.yaml", false),
        ("disk-image-2", "cloud-init.yaml", true),
    ] {
        let logs = run_to_completion(name, pod(name, template, false, seed, ""));
        assert!(
            logs.contains("vda says: virtkube-disk:ORIGINAL")
                && logs.contains("scribbled on vda: virtkube-disk:SCRIBBLED"),
            "{name}:\n{logs}"
        );
        if seed {
            let expected = format!("cloud-init seed: instance-id {}, hostname {name}", uid_of(name).trim());
            assert!(logs.contains(&expected), "missing {expected:?} in:\n{logs}");
            assert!(
                logs.contains(&format!("user-data: hello from {name} via a Secret")),
                "{logs}"
            );
        }
    }
    let first = run_to_completion("disk-claim-1", pod("disk-claim-1", "volume.yaml", true, false, ""));
    assert!(first.contains("vda says: virtkube-disk:ORIGINAL"), "{first}");
    // The second, with user-data in an annotation (its template has no
    // cloudInit: the annotation adds the seed).
    let user_data = r##"virtkube.io/user-data: "#!/bin/sh\necho annotated user-data on $(hostname)\n""##;
    let second = run_to_completion(
        "disk-claim-2",
        pod("disk-claim-2", "volume.yaml", true, false, user_data),
    );
    assert!(
        second.contains("vda says: virtkube-disk:SCRIBBLED"),
        "the claim lost the write:\n{second}"
    );
    assert!(
        second.contains("user-data: annotated user-data on disk-claim-2"),
        "{second}"
    );
    for name in ["disk-image-1", "disk-image-2", "disk-claim-1", "disk-claim-2"] {
        ok(&["-n", ns, "delete", "pod", name, "--wait=false"]);
    }
    ok(&["-n", ns, "delete", "pvc", "disk", "--wait=false"]);
    ok(&["-n", ns, "delete", "secret", "seed"]);
    let _ = kubectl(&["delete", "pv", &format!("{ns}-disk"), "--wait=false"]);
    let _ = virtkube_e2e::run("/usr/bin/docker", &["rmi", "-f", &tag], None);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&volume);
}

/// The example Deployment of the image that carries its bootable disk
/// (`deploy/examples/disk-deployment.yaml`): two replicas, each guest named
/// after its pod by cloud-init, each finding the image's disk unwritten and
/// signing its own copy. A pod deleted is replaced by one whose guest again
/// finds no note: the writable layer went with the pod.
fn the_disk_image_deployment(ns: &str) {
    let manifest = repo_file("deploy/examples/disk-deployment.yaml")
        .replace("/var/run/virtkube", SOCKET_DIR)
        .replace(
            "metadata:\n  name: disk-vm\n",
            &format!("metadata:\n  name: disk-vm\n  namespace: {ns}\n"),
        );
    apply(&manifest);
    let pods = || -> Vec<String> {
        ok(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=disk-vm",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    };
    let signed = |pod: &str| {
        let logs = kubectl(&["-n", ns, "logs", pod]).1;
        logs.contains(&format!("left a note on the boot disk: written by {pod}"))
    };
    let check_fresh = |pod: &str| {
        let logs = ok(&["-n", ns, "logs", pod]);
        assert!(
            logs.contains("user-data: booted from the image's own disk")
                && logs.contains("the boot disk has no note yet")
                && !logs.contains("the boot disk has a note"),
            "{pod}:\n{logs}"
        );
    };
    let mut first = Vec::new();
    eventually(
        "both disk-vm replicas to sign their disks",
        ns,
        Duration::from_secs(180),
        || {
            first = pods();
            first.len() == 2 && first.iter().all(|pod| signed(pod))
        },
    );
    for pod in &first {
        check_fresh(pod);
    }
    // The VirtDomain lists each disk and where it comes from.
    let listed = |pod: &str| {
        kubectl(&[
            "-n",
            ns,
            "get",
            "virtdomain",
            pod,
            "-o",
            "jsonpath={range .status.disks[*]}{.target} {.source} {.path} {.writes};{end}",
        ])
        .1
    };
    eventually("the VirtDomain to list the disks", ns, Duration::from_secs(30), || {
        listed(&first[0]) == "vda containerFile /disk/root.raw privateCopy;vdb cloudInit  readOnly;"
    });
    ok(&["-n", ns, "delete", "pod", &first[0], "--wait=true", "--timeout=60s"]);
    let mut replacement = String::new();
    eventually(
        "the replacement disk-vm pod to sign its disk",
        ns,
        Duration::from_secs(180),
        || {
            replacement = pods().into_iter().find(|pod| !first.contains(pod)).unwrap_or_default();
            !replacement.is_empty() && signed(&replacement)
        },
    );
    check_fresh(&replacement);
    ok(&[
        "-n",
        ns,
        "delete",
        "deployment",
        "disk-vm",
        "--wait=true",
        "--timeout=60s",
    ]);
    eventually("the disk-vm domains to go", ns, Duration::from_secs(90), || {
        !virsh_list().contains(&format!("{ns}_disk-vm"))
    });
}

/// Bare `kubectl run IMAGE`: no volumes, no downward API. The shim reads its pod
/// from the API (the namespace's default service account has the virtkube-vm
/// role, bound by `template_from_the_api`) and reaches its node's gate over
/// TCP, which knows it by its pod IP. No opt-in.
fn bare_kubectl_run(ns: &str) {
    let image = format!("--image=virtkube/tiny:{}", env!("CARGO_PKG_VERSION"));
    ok(&["-n", ns, "run", "vm-bare", &image]);
    eventually("the bare pod's VirtDomain", ns, Duration::from_secs(120), || {
        virtdomain_state(ns, "vm-bare") == "Running"
    });
    eventually("the bare pod's console", ns, Duration::from_secs(120), || {
        kubectl(&["-n", ns, "logs", "vm-bare"])
            .1
            .contains("virtkube-tiny: ready")
    });
    let logs = ok(&["-n", ns, "logs", "vm-bare"]);
    assert!(logs.contains("over TCP (qemu+tcp://"), "{logs}");
    let domain = format!("{ns}_vm-bare");
    assert!(virsh_list().contains(&domain), "{}", virsh_list());
    let gate_log = ok(&["-n", "virtkube-system", "logs", "ds/virthost"]);
    assert!(gate_log.contains("identified a TCP caller by its pod IP"), "{gate_log}");
    ok(&["-n", ns, "delete", "pod", "vm-bare", "--wait=true", "--timeout=60s"]);
    eventually("the bare pod's domain to go", ns, Duration::from_secs(10), || {
        !virsh_list().contains(&domain)
    });
}

/// The node's address, where the gate listens on TCP.
fn node_ip() -> String {
    ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    ])
    .trim()
    .to_owned()
}

/// The node itself (and any hostNetwork pod) shares the node's address: over
/// TCP the gate cannot tell who it is, and refuses it with that reason.
fn the_node_itself_is_refused_over_tcp() {
    let uri = format!("qemu+tcp://{}:16509/system", node_ip());
    let (success, out) = virtkube_e2e::run("virsh", &["-c", &uri, "version"], None);
    assert!(!success, "virsh on the gate's TCP port got through: {out}");
    assert!(
        out.contains("access denied by virtkube-gate") && out.contains("is the node's own"),
        "{out}"
    );
}

/// The gate's hostile client in a real pod, through the mounted socket
/// (`uri` None) or over TCP to its node's address: every attempt outside its
/// own domain is refused with the gate's reason.
/// Runs the gate probe in pod `name` (over the socket or TCP, with `env`
/// added to its environment as YAML list items); its log and its report lines.
fn run_probe(ns: &str, name: &str, over_tcp: bool, env: &str) -> (String, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("virtkube-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("own.xml"), virtkube_e2e::probe::own_xml(true)).unwrap();
    let link = "/var/lib/virtkube/images/gate-probe-link";
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink("/etc/shadow", link).unwrap();
    let target = if over_tcp {
        "qemu+tcp://$(HOST_IP):16509/system".to_owned()
    } else {
        "/var/run/libvirt/libvirt-sock".to_owned()
    };
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  restartPolicy: Never\n  containers:\n    - name: probe\n      image: debian:bookworm-slim\n      imagePullPolicy: Never\n      command: [/probe/virtkube-gate-probe, \"{target}\", \"$(POD_UID)\", /x/own.xml]\n      env:\n        - {{name: POD_UID, valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}}}\n        - {{name: HOST_IP, valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}}}\n{env}      volumeMounts:\n        - {{name: libvirt, mountPath: /var/run/libvirt, readOnly: true}}\n        - {{name: probe, mountPath: /probe, readOnly: true}}\n        - {{name: xml, mountPath: /x, readOnly: true}}\n  volumes:\n    - {{name: libvirt, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}\n    - {{name: probe, hostPath: {{path: {probe_dir}, type: Directory}}}}\n    - {{name: xml, hostPath: {{path: {xml_dir}, type: Directory}}}}\n",
        probe_dir = virtkube_e2e::probe::binary().parent().unwrap().display(),
        xml_dir = dir.display(),
    );
    apply(&pod);
    eventually(
        &format!("the probe pod {name} to finish"),
        ns,
        Duration::from_secs(120),
        || {
            let phase = kubectl(&["-n", ns, "get", "pod", name, "-o", "jsonpath={.status.phase}"]).1;
            phase == "Succeeded" || phase == "Failed"
        },
    );
    let logs = ok(&["-n", ns, "logs", name]);
    let lines: Vec<String> = logs.lines().take_while(|l| *l != "ready").map(str::to_owned).collect();
    assert!(logs.lines().any(|l| l == "ready"), "the probe did not finish:\n{logs}");
    let _ = std::fs::remove_file(link);
    let _ = std::fs::remove_dir_all(&dir);
    (logs, lines)
}

fn hostile_pod(ns: &str, name: &str, over_tcp: bool) {
    let (logs, lines) = run_probe(ns, name, over_tcp, "");
    let refusals = virtkube_e2e::probe::check_report(&lines);
    assert!(refusals >= 20, "fewer attempts than expected:\n{logs}");
    for (attempt, why) in [
        ("create: another pod's UUID", "must be the calling pod's UID"),
        (
            "create: a symlink out of the images directory",
            "through a symbolic link",
        ),
        (
            "create: the virthost's service account token as a kernel",
            "outside the directories",
        ),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{attempt}\t")) && l.contains(why)),
            "{attempt}: expected a refusal naming {why:?}:\n{logs}"
        );
    }
}

/// SHA-256 of a file, by sha256sum; empty when it cannot be read.
fn sha256_of(path: &str) -> String {
    let (_, out) = virtkube_e2e::run("/usr/bin/sha256sum", &[path], None);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// A field of ImageFile `name` (a jsonpath), trimmed.
fn image_file_field(ns: &str, name: &str, path: &str) -> String {
    object_field(Some(ns), "imagefile", name, path)
}

/// ImageRepository and ImageFile (docs/images.md): a repository on a
/// hostPath volume of the node, a golden image imported from a container
/// image, three copy-on-write clones booted by three VMs that each write
/// their own, the golden image unchanged; a resize; deletion waiting for the
/// VM and the clones; a second writer and another namespace refused by the
/// gate; a repository without its claim saying so.
fn image_repositories(ns: &str) {
    let id = std::process::id();
    let repo = format!("e2e-{id}");
    let pool = format!("virtkube-{repo}");
    let dir = format!("/var/lib/virtkube-e2e-repo-{id}");
    std::fs::create_dir_all(&dir).unwrap();
    let build_dir = std::env::temp_dir().join(format!("virtkube-e2e-repo-image-{id}"));
    let tag = format!("virtkube/e2e-repo-disk:{id}");
    virtkube_e2e::disk_image::build(&build_dir, &tag);
    let original = build_dir.join("root.raw");
    let original_sha = sha256_of(original.to_str().unwrap());
    assert_eq!(original_sha.len(), 64);

    apply(
        &(repository_claim(&repo, &dir, "256Mi")
            + &format!(
                "---\napiVersion: virtkube.io/v1alpha1\nkind: ImageRepository\nmetadata: {{name: {repo}}}\nspec: {{claimName: {repo}}}\n---\napiVersion: virtkube.io/v1alpha1\nkind: ImageRepository\nmetadata: {{name: {repo}-unclaimed}}\nspec: {{claimName: no-such-claim-{id}}}\n"
            )),
    );
    let repo_field = |name: &str, path: &str| object_field(None, "imagerepository", name, path);
    eventually(
        "a repository without its claim to say so",
        ns,
        Duration::from_secs(60),
        || repo_field(&format!("{repo}-unclaimed"), "{.status.conditions[0].reason}") == "ClaimMissing",
    );
    // The manager makes the DaemonSet mount the claim: the virthost rolls.
    eventually("the repository to be Ready", ns, Duration::from_secs(240), || {
        repo_field(&repo, "{.status.phase}") == "Ready"
    });
    wait_for_virthost("the virthost that mounts the repository");
    assert!(
        !repo_field(&format!("{repo}-unclaimed"), "{.status.conditions[0].message}").is_empty(),
        "the unclaimed repository's condition has no message"
    );

    // The golden image, imported from the container image's file.
    let image_file = |name: &str, spec: &str| image_file_manifest(ns, &repo, name, spec);
    apply(&image_file("golden", &import_from(&tag)));
    eventually(
        "the golden ImageFile to be imported",
        ns,
        Duration::from_secs(180),
        || {
            let phase = image_file_field(ns, "golden", "{.status.phase}");
            assert_ne!(
                phase,
                "Failed",
                "{}",
                image_file_field(ns, "golden", "{.status.conditions}")
            );
            phase == "Ready"
        },
    );
    let golden_file = format!("{dir}/{ns}_golden");
    assert_eq!(image_file_field(ns, "golden", "{.status.sha256}"), original_sha);
    assert_eq!(
        sha256_of(&golden_file),
        original_sha,
        "the volume on the node is the image's file"
    );
    assert_eq!(
        image_file_field(ns, "golden", "{.status.pool} {.status.volume} {.status.format}"),
        format!("{pool} {ns}_golden raw")
    );

    // A file whose first bytes are a qcow2 header naming a file of the node
    // as its backing file: imported, it is a raw volume, and stays one.
    let evil_dir = build_dir.join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    let evil_file = evil_dir.join("root.raw");
    let (made, out) = virtkube_e2e::run(
        "/usr/bin/qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            evil_file.to_str().unwrap(),
            "1M",
        ],
        None,
    );
    assert!(made, "qemu-img create: {out}");
    std::fs::set_permissions(&evil_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(
        evil_dir.join("Dockerfile"),
        "FROM virtkube/tiny:latest\nCOPY root.raw /disk/root.raw\n",
    )
    .unwrap();
    let evil_tag = format!("virtkube/e2e-repo-evil:{id}");
    virtkube_e2e::disk_image::build_context(&evil_dir, &evil_tag);
    apply(&image_file("evil", &import_from(&evil_tag)));
    eventually(
        "the qcow2-headed file to be imported",
        ns,
        Duration::from_secs(120),
        || image_file_field(ns, "evil", "{.status.phase}") == "Ready",
    );
    assert_eq!(image_file_field(ns, "evil", "{.status.format}"), "raw");
    // Its owner edits the spec to say it is a blank qcow2 image: the volume
    // was recorded as raw when made, and stays raw (checked again below,
    // many reconciles later, by the gate's refusal).
    ok(&[
        "-n",
        ns,
        "patch",
        "imagefile",
        "evil",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"source":null,"format":"qcow2"}}"#,
    ]);

    // Three copy-on-write clones; the third made larger.
    for i in 1..=3 {
        let capacity = if i == 3 { "  capacity: 2Mi\n" } else { "" };
        apply(&image_file(
            &format!("clone-{i}"),
            &format!("  backingFile: golden\n{capacity}"),
        ));
    }
    for i in 1..=3 {
        let name = format!("clone-{i}");
        eventually(&format!("{name} to be Ready"), ns, Duration::from_secs(60), || {
            image_file_field(ns, &name, "{.status.phase}") == "Ready"
        });
        assert_eq!(image_file_field(ns, &name, "{.status.format}"), "qcow2");
    }
    assert_eq!(image_file_field(ns, "clone-3", "{.status.capacity}"), "2Mi");

    // Three VMs, one on each clone: each sees the golden image's data and
    // writes its own.
    let template = |name: &str, disk: &str, cmdline: &str| {
        tiny_template_with_disk(ns, name, &format!("{{imageFile: {disk}}}"), cmdline)
    };
    let pod = |name: &str, template: &str| templated_vm_pod(ns, name, "virtkube/shim:latest", template);
    let finished = |name: &str| {
        let phase = pod_field(ns, name, "{.status.phase}");
        phase == "Succeeded" || phase == "Failed"
    };
    for i in 1..=3 {
        apply(&template(
            &format!("repo-vm-{i}"),
            &format!("clone-{i}"),
            "virtkube.scribble virtkube.poweroff",
        ));
        apply(&pod(&format!("repo-vm-{i}"), &format!("repo-vm-{i}")));
    }
    let started = Instant::now();
    eventually("the three clone VMs to finish", ns, Duration::from_secs(240), || {
        (1..=3).all(|i| finished(&format!("repo-vm-{i}")))
    });
    println!(
        "three VMs booted from three clones and powered off in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for i in 1..=3 {
        let name = format!("repo-vm-{i}");
        let logs = kubectl(&["-n", ns, "logs", &name]).1;
        assert_eq!(pod_field(ns, &name, "{.status.phase}"), "Succeeded", "{logs}");
        assert!(
            logs.contains("vda says: virtkube-disk:ORIGINAL") && logs.contains("scribbled on vda"),
            "{name}:\n{logs}"
        );
    }
    assert_eq!(sha256_of(&golden_file), original_sha, "a VM wrote the golden image");
    // Each clone kept its own write: a new VM on clone-1 sees it.
    apply(&template("repo-again", "clone-1", "virtkube.poweroff"));
    apply(&pod("repo-again", "repo-again"));
    eventually(
        "the VM on the written clone to finish",
        ns,
        Duration::from_secs(120),
        || finished("repo-again"),
    );
    let again = kubectl(&["-n", ns, "logs", "repo-again"]).1;
    assert!(again.contains("vda says: virtkube-disk:SCRIBBLED"), "{again}");

    // Grown while no VM uses it.
    let set_capacity = |capacity: &str| {
        let patch = format!(r#"{{"spec":{{"capacity":"{capacity}"}}}}"#);
        ok(&[
            "-n",
            ns,
            "patch",
            "imagefile",
            "clone-3",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
    };
    set_capacity("8Mi");
    eventually("clone-3 to grow to 8Mi", ns, Duration::from_secs(60), || {
        image_file_field(ns, "clone-3", "{.status.capacity}") == "8Mi"
    });
    set_capacity("1Mi");
    eventually("clone-3 to refuse shrinking", ns, Duration::from_secs(60), || {
        image_file_field(ns, "clone-3", "{.status.conditions[0].reason}") == "ShrinkRefused"
    });

    // A VM that keeps running on clone-2.
    apply(&template("repo-hold", "clone-2", ""));
    apply(&pod("repo-hold", "repo-hold"));
    eventually("the VM holding clone-2 to run", ns, Duration::from_secs(120), || {
        virtdomain_state(ns, "repo-hold") == "Running"
    });
    // A second writer: refused by the gate, with the reason.
    apply(&pod("repo-second", "repo-hold"));
    eventually(
        "the second writer of clone-2 to fail",
        ns,
        Duration::from_secs(120),
        || finished("repo-second"),
    );
    let second = kubectl(&["-n", ns, "logs", "repo-second"]).1;
    assert_eq!(pod_field(ns, "repo-second", "{.status.phase}"), "Failed", "{second}");
    assert!(second.contains("is in use by running domain"), "{second}");
    // The golden image, writable: refused (it has clones).
    apply(&template("repo-golden", "golden", ""));
    apply(&pod("repo-golden", "repo-golden"));
    eventually(
        "a writer of the golden image to fail",
        ns,
        Duration::from_secs(120),
        || finished("repo-golden"),
    );
    let golden_writer = kubectl(&["-n", ns, "logs", "repo-golden"]).1;
    assert!(
        golden_writer.contains("may be attached read-only only"),
        "{golden_writer}"
    );

    // Another namespace's ImageFile: refused by the gate, whatever the XML says.
    let other = RunNamespace::create("virtkube-e2e-other");
    let env = format!(
        "        - {{name: VIRTKUBE_PROBE_VOLUMES, value: \"{pool}/{ns}_clone-1/qcow2 {pool}/{ns}_golden/raw\"}}\n"
    );
    let (logs, lines) = run_probe(other.name(), "probe-volumes", false, &env);
    // In its own namespace: the raw volume with a qcow2 header may be read
    // as raw only (as qcow2, QEMU would open /etc/shadow for it).
    let own = format!("        - {{name: VIRTKUBE_PROBE_VOLUMES, value: \"{pool}/{ns}_evil/qcow2\"}}\n");
    assert_eq!(image_file_field(ns, "evil", "{.status.format}"), "raw");
    let (own_logs, own_lines) = run_probe(ns, "probe-evil", false, &own);
    assert!(
        own_lines
            .iter()
            .any(|l| l.contains(&format!("ImageFile volume {pool}/{ns}_evil as qcow2"))
                && l.contains("REFUSED")
                && l.contains("must say raw, not qcow2")),
        "the qcow2-headed raw volume was not refused as qcow2:\n{own_logs}"
    );
    for volume in ["clone-1", "golden"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("ImageFile volume {pool}/{ns}_{volume}"))
                    && l.contains("REFUSED")
                    && l.contains("a VM may use the ImageFiles of its own namespace")),
            "{volume}: not refused as another namespace's:\n{logs}"
        );
    }
    drop(other);

    // Deletion waits for the VM and for the clones.
    ok(&["-n", ns, "delete", "imagefile", "clone-2", "--wait=false"]);
    ok(&["-n", ns, "delete", "imagefile", "golden", "--wait=false"]);
    eventually(
        "clone-2's deletion to wait for its VM",
        ns,
        Duration::from_secs(60),
        || {
            image_file_field(ns, "clone-2", "{.status.conditions[0].reason}") == "InUse"
                && image_file_field(ns, "clone-2", "{.status.conditions[0].message}").contains("repo-hold")
        },
    );
    // The VM reads the golden image through its clone's backing chain.
    eventually(
        "the golden image's deletion to wait for the VM",
        ns,
        Duration::from_secs(60),
        || {
            image_file_field(ns, "golden", "{.status.conditions[0].reason}") == "InUse"
                && image_file_field(ns, "golden", "{.status.conditions[0].message}").contains("repo-hold")
        },
    );
    assert!(std::path::Path::new(&format!("{dir}/{ns}_clone-2")).exists());
    ok(&["-n", ns, "delete", "pod", "repo-hold", "--wait=true", "--timeout=60s"]);
    eventually(
        "the golden image's deletion to wait for its clones",
        ns,
        Duration::from_secs(60),
        || image_file_field(ns, "golden", "{.status.conditions[0].reason}") == "HasClones",
    );
    assert!(std::path::Path::new(&golden_file).exists());
    ok(&["-n", ns, "delete", "imagefile", "clone-1", "clone-3", "--wait=false"]);
    ok(&["-n", ns, "delete", "imagefile", "evil", "--wait=false"]);
    let gone = |name: &str| !kubectl(&["-n", ns, "get", "imagefile", name]).0;
    eventually(
        "every ImageFile to go once unused",
        ns,
        Duration::from_secs(120),
        || {
            ["clone-1", "clone-2", "clone-3", "golden", "evil"]
                .iter()
                .all(|n| gone(n))
        },
    );
    for name in ["clone-1", "clone-2", "clone-3", "golden", "evil"] {
        let file = format!("{dir}/{ns}_{name}");
        assert!(!std::path::Path::new(&file).exists(), "{file} is left on the node");
    }
    let volumes = virsh_pool_volumes(&pool);
    assert!(
        !volumes.contains(&format!("{ns}_")),
        "volumes left in the pool: {volumes}"
    );

    for name in [
        "repo-vm-1",
        "repo-vm-2",
        "repo-vm-3",
        "repo-again",
        "repo-second",
        "repo-golden",
    ] {
        ok(&["-n", ns, "delete", "pod", name, "--wait=false"]);
    }
    ok(&[
        "delete",
        "imagerepository",
        &repo,
        &format!("{repo}-unclaimed"),
        "--wait=true",
        "--timeout=60s",
    ]);
    let _ = kubectl(&["-n", "virtkube-system", "delete", "pvc", &repo, "--wait=false"]);
    let _ = kubectl(&["delete", "pv", &repo, "--wait=false"]);
    let _ = virtkube_e2e::run("/usr/bin/docker", &["rmi", "-f", &tag, &evil_tag], None);
    let _ = std::fs::remove_dir_all(&build_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The volumes of pool `pool` in the virthost pod, as `virsh vol-list` prints them.
fn virsh_pool_volumes(pool: &str) -> String {
    let pods = pods_of("virtkube-system", "app.kubernetes.io/name=virthost");
    let pod = pods.first().expect("no virthost pod");
    let (listed, out) = kubectl(&[
        "-n",
        "virtkube-system",
        "exec",
        pod,
        "--",
        "virsh",
        "-c",
        "qemu:///system",
        "vol-list",
        pool,
    ]);
    assert!(listed, "virsh vol-list {pool} failed: {out}");
    out
}
