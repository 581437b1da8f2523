//! virtkube-sched deployed as users do (`deploy/06-sched.yaml`: its
//! Deployment, Service and RBAC, the image of scripts/build-images.sh) and
//! wired into a real kube-scheduler (k8s-local's, restarted with
//! `deploy/examples/scheduler-config.yaml` through K8S_LOCAL_SCHEDULER_CONFIG,
//! reaching the extender at its Service's ClusterIP): a VM pod needing KVM
//! (absent here) stays Pending with the extender's reason in its
//! FailedScheduling event; the same pod without that need is scheduled; with
//! the extender scaled to zero, a plain pod is still scheduled (ignorable).
//! The scheduler's default configuration is restored after, also on failure.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kubectl(args: &[&str]) -> (bool, String) {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(kubectl).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn apply(manifest: &str) {
    let kubectl_bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut child = Command::new(kubectl_bin)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), manifest.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// k8s-local's up.sh, with `config` as the scheduler's configuration (or
/// the default).
fn scheduler_with(config: Option<&std::path::Path>) {
    let up = std::env::var("K8S_LOCAL")
        .map(|dir| format!("{dir}/up.sh"))
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/k8s-local/up.sh").to_owned());
    let mut command = Command::new("bash");
    command.arg(&up).env_remove("NO_KUBELET");
    match config {
        Some(file) => command.env("K8S_LOCAL_SCHEDULER_CONFIG", file),
        None => command.env_remove("K8S_LOCAL_SCHEDULER_CONFIG"),
    };
    let out = command.output().unwrap();
    assert!(out.status.success(), "{up}: {}", String::from_utf8_lossy(&out.stdout));
}

/// Restores the default scheduler and the extender's replica, and removes
/// the namespace, when dropped.
struct Restore {
    namespace: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        scheduler_with(None);
        let _ = kubectl(&[
            "-n",
            "virtkube-system",
            "scale",
            "deployment/virtkube-sched",
            "--replicas=1",
        ]);
        let _ = kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
    }
}

fn pod(namespace: &str, name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  annotations: {{{annotations}}}\nspec:\n  restartPolicy: Never\n  containers:\n    - name: main\n      image: k8s-local/pause:3.2\n      imagePullPolicy: IfNotPresent\n"
    )
}

fn node_of(namespace: &str, name: &str) -> String {
    kubectl(&["-n", namespace, "get", "pod", name, "-o", "jsonpath={.spec.nodeName}"])
        .1
        .trim()
        .to_owned()
}

#[test]
#[ignore = "needs k8s-local (its up.sh restarts kube-scheduler) and KUBECONFIG: scripts/test.sh runs it"]
fn vm_pods_go_only_where_their_virthost_can_run_them() {
    // Only k8s-local's scheduler can be reconfigured from here (its up.sh).
    let k8s_local_dir = std::env::var("K8S_LOCAL_DIR").unwrap_or_else(|_| "/var/lib/k8s-local".into());
    let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_default();
    if !kubeconfig.starts_with(&k8s_local_dir) {
        eprintln!(
            "skipped: KUBECONFIG ({kubeconfig:?}) is not k8s-local's, whose scheduler this test reconfigures; wire virtkube-sched in as docs/scheduling.md says"
        );
        return;
    }
    let namespace = format!("virtkube-sched-{}", std::process::id());
    let _restore = Restore {
        namespace: namespace.clone(),
    };
    apply(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/06-sched.yaml")).unwrap());
    let (ready, said) = kubectl(&[
        "-n",
        "virtkube-system",
        "rollout",
        "status",
        "deployment/virtkube-sched",
        "--timeout=120s",
    ]);
    assert!(ready, "the extender's Deployment did not become ready: {said}");
    let cluster_ip = kubectl(&[
        "-n",
        "virtkube-system",
        "get",
        "svc",
        "virtkube-sched",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
    .1
    .trim()
    .to_owned();
    assert!(
        cluster_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "the Service's ClusterIP: {cluster_ip:?}"
    );
    let k8s_local = std::env::var("K8S_LOCAL_DIR").unwrap_or_else(|_| "/var/lib/k8s-local".into());
    let config = std::env::temp_dir().join(format!("virtkube-sched-config-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/scheduler-config.yaml"
        ))
        .unwrap()
        .replace(
            "/etc/kubernetes/scheduler.conf",
            &format!("{k8s_local}/scheduler.kubeconfig"),
        )
        .replace("http://10.32.0.88:8888", &format!("http://{cluster_ip}:8888"))
        // k8s-local's single scheduler runs without leader election.
        .replace("extenders:", "leaderElection:\n  leaderElect: false\nextenders:"),
    )
    .unwrap();
    assert!(kubectl(&["create", "namespace", &namespace]).0);
    // The default scheduler first, for the side-by-side number.
    let asked = Instant::now();
    apply(&pod(&namespace, "before", "virtkube.io/requires: arch=x86_64"));
    eventually("a pod with the default scheduler", Duration::from_secs(60), || {
        !node_of(&namespace, "before").is_empty()
    });
    println!(
        "a VM pod with the default scheduler: scheduled {:?} after it was created",
        asked.elapsed()
    );
    scheduler_with(Some(&config));
    // Which nodes have a virthost (the cluster tests deploy one on each).
    let nodes = kubectl(&["get", "virtnodes", "-o", "jsonpath={.items[*].metadata.name}"]).1;
    assert!(
        !nodes.trim().is_empty(),
        "no VirtNode: deploy virtkube's virthost first (the cluster tests do)"
    );
    let kvm_here = kubectl(&["get", "virtnodes", "-o", "jsonpath={.items[*].status.kvm}"]).1;
    assert!(
        !kvm_here.contains("true"),
        "this test needs a node without KVM: {kvm_here}"
    );

    // A VM pod needing KVM: Pending, with the extender's reason.
    let started = Instant::now();
    apply(&pod(&namespace, "needs-kvm", "virtkube.io/requires: kvm"));
    eventually("the KVM pod's FailedScheduling event", Duration::from_secs(60), || {
        let describe = kubectl(&["-n", &namespace, "describe", "pod", "needs-kvm"]).1;
        describe.contains("FailedScheduling") && describe.contains("needs KVM")
    });
    assert_eq!(
        node_of(&namespace, "needs-kvm"),
        "",
        "a pod needing KVM was placed on a node without it"
    );
    // The same pod without that need is scheduled.
    let asked = Instant::now();
    apply(&pod(&namespace, "no-kvm", "virtkube.io/requires: arch=x86_64"));
    eventually(
        "the pod without the need to be scheduled",
        Duration::from_secs(60),
        || !node_of(&namespace, "no-kvm").is_empty(),
    );
    println!(
        "a VM pod through the extender: scheduled {:?} after it was created",
        asked.elapsed()
    );
    // A bad annotation is the pod's reason too.
    apply(&pod(&namespace, "bad", "virtkube.io/requires: gpu"));
    eventually("the bad pod's reason", Duration::from_secs(60), || {
        kubectl(&["-n", &namespace, "describe", "pod", "bad"])
            .1
            .contains("is not a need virtkube knows")
    });

    // The extender stopped: a plain pod is still scheduled (ignorable).
    assert!(
        kubectl(&[
            "-n",
            "virtkube-system",
            "scale",
            "deployment/virtkube-sched",
            "--replicas=0"
        ])
        .0
    );
    eventually("the extender's pod to be gone", Duration::from_secs(90), || {
        kubectl(&[
            "-n",
            "virtkube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=virtkube-sched",
            "-o",
            "name",
        ])
        .1
        .trim()
        .is_empty()
    });
    let asked = Instant::now();
    apply(&pod(&namespace, "plain", ""));
    eventually("a plain pod with the extender down", Duration::from_secs(60), || {
        !node_of(&namespace, "plain").is_empty()
    });
    println!(
        "a plain pod with the extender down: scheduled {:?} after it was created (whole test {:?})",
        asked.elapsed(),
        started.elapsed()
    );
    let _ = std::fs::remove_file(&config);
}
