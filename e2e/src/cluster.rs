//! Helpers for tests and benchmarks against a real cluster (`KUBECONFIG`):
//! kubectl, polling with diagnostics, and virtkube's manifests as deployed there.
#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::time::{Duration, Instant};

use crate::run;

/// The node directory of the virthost's socket in these tests (the Docker
/// end-to-end tests' virthost container keeps /var/run/virtkube).
pub const SOCKET_DIR: &str = "/var/run/virtkube-e2e";

/// Runs kubectl (`$KUBECTL`, else `kubectl`) on `$KUBECONFIG`: success and output.
pub fn kubectl(args: &[&str]) -> (bool, String) {
    kubectl_stdin(args, None)
}

/// [`kubectl`] with `stdin`.
pub fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: run scripts/test.sh or point it at a cluster"
    );
    run(&kubectl, args, stdin)
}

/// kubectl that must succeed; its output.
pub fn ok(args: &[&str]) -> String {
    let (success, out) = kubectl(args);
    assert!(success, "kubectl {args:?}: {out}");
    out
}

/// `kubectl apply` of a manifest that must succeed.
pub fn apply(manifest: &str) {
    let (success, out) = kubectl_stdin(&["apply", "-f", "-"], Some(manifest));
    assert!(success, "kubectl apply: {out}\n{manifest}");
}

/// Pods' logs and events, for a failure report.
pub fn diagnostics(namespace: &str) -> String {
    let pods = kubectl(&["-n", namespace, "get", "pods", "-o", "wide"]).1;
    let events = kubectl(&["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"]).1;
    let mut logs = String::new();
    for pod in kubectl(&["-n", namespace, "get", "pods", "-o", "name"]).1.lines() {
        logs.push_str(&format!(
            "--- {pod}\n{}\n",
            kubectl(&["-n", namespace, "logs", pod, "--tail=30"]).1
        ));
    }
    format!("pods:\n{pods}\nevents:\n{events}\nlogs:\n{logs}")
}

/// Polls `check` every 0.5 s until it holds; fails with diagnostics after `timeout`.
pub fn eventually(what: &str, namespace: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            diagnostics(namespace)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A file of this repository.
pub fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Names of the domains running on the cluster's virthost (virsh in the
/// virthost pod, on libvirtd's own socket: the gate would refuse it).
pub fn virsh_list() -> String {
    kubectl(&[
        "-n",
        "virtkube-system",
        "exec",
        "ds/virthost",
        "--",
        "virsh",
        "-c",
        "qemu:///system",
        "list",
        "--name",
    ])
    .1
}

/// Applies deploy/ (socket dir adapted) and waits for the virthost DaemonSet.
pub fn deploy_virtkube() {
    for file in [
        "deploy/00-namespace.yaml",
        "deploy/01-crds.yaml",
        "deploy/02-rbac.yaml",
        "deploy/04-runtimeclass.yaml",
        "deploy/05-user-roles.yaml",
    ] {
        let mut manifest = repo_file(file);
        // A dockershim node runs ordinary containers with handler "docker".
        if file.ends_with("runtimeclass.yaml") && node_runtime().starts_with("docker://") {
            manifest = manifest.replace("\nhandler: runc\n", "\nhandler: docker\n");
            assert!(manifest.contains("handler: docker"), "the RuntimeClass's handler moved");
        }
        let (success, out) = kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&manifest),
        );
        assert!(success, "{file}: {out}");
    }
    let mut virthost = repo_file("deploy/03-virthost.yaml").replace("/var/run/virtkube", SOCKET_DIR);
    // A rebuilt virtkube/virthost:latest is a new pod template, so the
    // DaemonSet rolls out the image under test (on a node whose engine is local).
    let (built, image_id) = run(
        "/usr/bin/docker",
        &["image", "inspect", "-f", "{{.Id}}", "virtkube/virthost:latest"],
        None,
    );
    if built {
        virthost = virthost.replace(
            "        app.kubernetes.io/part-of: virtkube\n    spec:",
            &format!(
                "        app.kubernetes.io/part-of: virtkube\n      annotations:\n        virtkube.io/image-id: \"{}\"\n    spec:",
                image_id.trim()
            ),
        );
        assert!(
            virthost.contains("virtkube.io/image-id"),
            "the DaemonSet's pod template moved"
        );
    }
    apply(&virthost);
    wait_for_virthost("the virthost DaemonSet");
}

/// The container runtime of the cluster's (first) node, e.g. `docker://20.10.5`.
pub fn node_runtime() -> String {
    ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.nodeInfo.containerRuntimeVersion}",
    ])
}

/// Waits for the virthost DaemonSet's rollout (3 minutes); `what` names the moment.
pub fn wait_for_virthost(what: &str) {
    let (success, out) = kubectl(&[
        "-n",
        "virtkube-system",
        "rollout",
        "status",
        "ds/virthost",
        "--timeout=180s",
    ]);
    assert!(
        success,
        "{what} did not become ready: {out}\n{}",
        diagnostics("virtkube-system")
    );
}

/// The state of VirtDomain `name` (trimmed; empty while it does not exist).
pub fn virtdomain_state(namespace: &str, name: &str) -> String {
    kubectl(&[
        "-n",
        namespace,
        "get",
        "virtdomain",
        name,
        "-o",
        "jsonpath={.status.state}",
    ])
    .1
    .trim()
    .to_owned()
}

/// The states of the VirtDomains in `namespace`, space-separated.
pub fn virtdomain_states(namespace: &str) -> String {
    kubectl(&[
        "-n",
        namespace,
        "get",
        "virtdomains",
        "-o",
        "jsonpath={.items[*].status.state}",
    ])
    .1
}

/// The example Deployment of the tiny VM, in `namespace`.
pub fn vm_manifests(namespace: &str) -> String {
    repo_file("deploy/examples/tiny-deployment.yaml")
        .replace("/var/run/virtkube", SOCKET_DIR)
        .replace(
            "metadata:\n  name: tiny-vm\n",
            &format!("metadata:\n  name: tiny-vm\n  namespace: {namespace}\n"),
        )
}

/// The example Deployment turned into a Job named `name` with `annotations`
/// (YAML lines) instead of the memory override.
pub fn vm_job(namespace: &str, name: &str, annotations: &str) -> String {
    vm_manifests(namespace)
        .replace(
            "apiVersion: apps/v1\nkind: Deployment",
            "apiVersion: batch/v1\nkind: Job",
        )
        .replace(
            "  replicas: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: tiny-vm\n",
            "  backoffLimit: 0\n",
        )
        .replace("tiny-vm", name)
        .replace("        virtkube.io/memory: 160Mi\n", annotations)
        .replace(
            "      terminationGracePeriodSeconds:",
            "      restartPolicy: Never\n      terminationGracePeriodSeconds:",
        )
}

/// Names of the pods in `namespace` matching `selector`.
pub fn pods_of(namespace: &str, selector: &str) -> Vec<String> {
    ok(&[
        "-n",
        namespace,
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    ])
    .lines()
    .filter(|l| !l.is_empty())
    .map(str::to_owned)
    .collect()
}

/// A namespace of one test or benchmark run, deleted when dropped (also when
/// the run fails), so that a failed run leaves no VMs running behind it.
#[derive(Debug)]
pub struct RunNamespace(String);

impl RunNamespace {
    /// Creates `<prefix>-<pid>`.
    pub fn create(prefix: &str) -> RunNamespace {
        let name = format!("{prefix}-{}", std::process::id());
        ok(&["create", "namespace", &name]);
        RunNamespace(name)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for RunNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"]);
    }
}

/// A VirtTemplate `name` in `ns` for the tiny guest (kernel and initrd on
/// the node), with `cmdline` added to its kernel command line and one disk,
/// `disk` (a flow mapping, e.g. `{imageFile: clone-1}`).
pub fn tiny_template_with_disk(ns: &str, name: &str, disk: &str, cmdline: &str) -> String {
    format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  memory: 128Mi\n  boot:\n    kernel: /var/lib/virtkube/images/tiny/vmlinuz\n    initrd: /var/lib/virtkube/images/tiny/initrd.gz\n    cmdline: console=ttyS0 panic=-1 quiet {cmdline}\n  disks:\n    - {disk}\n"
    )
}

/// A VM pod `name` in `ns` of `image` (built FROM the shim base) running
/// VirtTemplate `template` from the API, with the virthost's socket, never
/// restarted.
pub fn templated_vm_pod(ns: &str, name: &str, image: &str, template: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{virtkube.io/template: {template}}}\nspec:\n  restartPolicy: Never\n  containers:\n    - name: vm\n      image: {image}\n      imagePullPolicy: IfNotPresent\n      env:\n        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}\n        - {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}\n      volumeMounts:\n        - {{name: libvirt, mountPath: /var/run/libvirt, readOnly: true}}\n  volumes:\n    - {{name: libvirt, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}\n"
    )
}

/// An ImageFile `name` in `ns` of repository `repo`, with `spec` (indented
/// YAML lines) added to its spec.
pub fn image_file_manifest(ns: &str, repo: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: ImageFile\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  repository: {repo}\n{spec}"
    )
}

/// An ImageFile spec line importing `/disk/root.raw` of container image `image`.
pub fn import_from(image: &str) -> String {
    format!("  source: {{containerImage: {{image: \"{image}\", path: /disk/root.raw}}}}\n")
}

/// A hostPath PersistentVolume `name` of `size` on the node's `dir`, and its
/// claim (same name) in the virthost's namespace.
pub fn repository_claim(name: &str, dir: &str, size: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {name}}}\nspec:\n  storageClassName: {name}\n  capacity: {{storage: {size}}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: {dir}, type: Directory}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: virtkube-system}}\nspec:\n  storageClassName: {name}\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: {size}}}}}\n"
    )
}

/// A field (a jsonpath) of object `kind`/`name`, in namespace `namespace`
/// or cluster-scoped; trimmed, and empty when it cannot be read.
pub fn object_field(namespace: Option<&str>, kind: &str, name: &str, path: &str) -> String {
    let jsonpath = format!("jsonpath={path}");
    let mut args = Vec::new();
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    args.extend(["get", kind, name, "-o", jsonpath.as_str()]);
    kubectl(&args).1.trim().to_owned()
}
