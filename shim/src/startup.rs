//! The shim's start: where the template, the pod's identity and libvirtd's
//! address come from. The policy is the branchiest part of the shim, so it is
//! written against a small [`World`] (files, the Kubernetes API, the clock) and
//! every branch is tested with a fake one, as `pid1` is with its syscalls.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::time::Duration;

use virtkube_api::resolve::DiskSource;
use virtkube_api::{Overrides, ResolvedTemplate, resolve};

use crate::config::Config;
use crate::endpoint::{self, Endpoint};
use crate::exit::Exit;
use crate::instance::{self, Facts};

/// Where the service account's namespace is mounted.
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Most bytes of pod annotations read: Kubernetes allows 256 KiB in all.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// How often, and how many times, the pod is read again while the API has no
/// `status.hostIP` for it yet (the kubelet can start the container first).
pub const HOST_IP_RETRY: Duration = Duration::from_millis(500);
/// 20 × 500 ms: 10 s.
pub const HOST_IP_RETRIES: u32 = 20;

/// What the API says about the shim's own pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// metadata.uid.
    pub uid: Option<String>,
    /// metadata.annotations.
    pub annotations: BTreeMap<String, String>,
    /// status.hostIP: the node, for reaching its virthost over TCP.
    pub host_ip: Option<String>,
}

/// Everything the start reads from outside the process.
// Used on the shim's single-threaded runtime only: no `Send` bound is needed.
#[allow(async_fn_in_trait)]
pub trait World {
    /// A text file of at most `max` bytes (an error of kind `NotFound` when absent).
    async fn read_file(&self, path: &Path, max: usize) -> io::Result<String>;
    /// Whether a path exists.
    fn exists(&self, path: &Path) -> bool;
    /// The container's hostname (the pod name in Kubernetes).
    fn hostname(&self) -> String;
    /// Whether the shim runs in a pod with a service account.
    fn in_cluster(&self) -> bool;
    /// The service account's namespace.
    async fn service_account_namespace(&self) -> Result<String, String>;
    /// The shim's own pod, from the API.
    async fn fetch_pod(&self, namespace: &str, name: &str) -> Result<PodFacts, String>;
    /// A VirtTemplate by name, from the API.
    async fn fetch_template(&self, namespace: &str, name: &str) -> Result<ResolvedTemplate, String>;
    /// An ImageFile by name, from the API.
    async fn fetch_image_file(&self, namespace: &str, name: &str) -> Result<virtkube_api::ImageFile, String>;
    /// Waits before asking again.
    async fn pause(&self, how_long: Duration);
    /// A line of the shim's log.
    fn log(&self, line: String);
}

/// Loads the template, the instance facts and libvirtd's endpoint.
pub async fn load(
    config: &Config,
    mut env: HashMap<String, String>,
    world: &impl World,
) -> Result<(ResolvedTemplate, Facts, Endpoint), Exit> {
    let mut annotations = match world.read_file(&config.annotations_file, MAX_ANNOTATIONS_BYTES).await {
        Ok(text) => Some(instance::parse_downward_annotations(&text).map_err(Exit::Usage)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Exit::Usage(format!(
                "cannot read the annotations file {}: {e}",
                config.annotations_file.display()
            )));
        }
    };
    let hostname = world.hostname();
    let socket_mounted = world.exists(Path::new(endpoint::DEFAULT_SOCKET));
    let need_node = config.uri.is_none() && !socket_mounted && !env.contains_key("HOST_IP");
    cluster_inputs(world, &mut env, &mut annotations, &hostname, need_node).await?;
    let endpoint = endpoint::choose(&endpoint::Clues {
        explicit_uri: config.uri.as_deref(),
        socket_mounted,
        host_ip: env.get("HOST_IP").map(String::as_str),
    })
    .map_err(|e| Exit::StartFailed(e.to_string()))?;
    if let endpoint::Source::NodeTcp { host_ip } = &endpoint.source {
        world.log(format!(
            "no libvirt socket at {}: using the virthost of node {host_ip} over TCP ({}, unauthenticated)",
            endpoint::DEFAULT_SOCKET,
            endpoint.uri
        ));
    }
    let mut facts = instance::gather(
        |k| env.get(k).cloned(),
        annotations.unwrap_or_default(),
        &hostname,
        config.template_name.clone(),
    )
    .map_err(Exit::Usage)?;
    let mut template = match &facts.instance.template_name {
        Some(name) if world.in_cluster() => {
            let namespace = facts.instance.namespace.clone().unwrap_or_else(|| "default".into());
            world.log(format!(
                "reading VirtTemplate {namespace}/{name} from the Kubernetes API"
            ));
            world
                .fetch_template(&namespace, name)
                .await
                .map_err(Exit::StartFailed)?
        }
        // The named template wins wherever it can be read; elsewhere naming one
        // is an error, never a silent switch to the baked file under its name.
        Some(name) if !world.exists(&config.template_file) => {
            return Err(Exit::StartFailed(format!(
                "template {name:?} is to be read from the Kubernetes API, but this shim is not running in a pod with a service account; bake the template into the image at {}",
                config.template_file.display()
            )));
        }
        Some(name) => {
            return Err(Exit::StartFailed(format!(
                "template {name:?} is named (VIRTKUBE_TEMPLATE or the virtkube.io/template annotation), but this shim is not running in a pod with a service account, so it cannot be read; the image's baked template {} would run under a name that is not its own: remove the name to use the baked template",
                config.template_file.display()
            )));
        }
        None => {
            let text = world
                .read_file(&config.template_file, resolve::MAX_TEMPLATE_BYTES)
                .await
                .map_err(|e| {
                    Exit::StartFailed(format!(
                        "cannot read the template file {}: {e} (bake a VirtTemplate into the image there, or set VIRTKUBE_TEMPLATE_FILE)",
                        config.template_file.display()
                    ))
                })?;
            resolve::parse_yaml(&text)
                .map_err(|e| Exit::StartFailed(format!("{}: {e}", config.template_file.display())))?
        }
    };
    Overrides::from_annotations(&facts.annotations)
        .and_then(|o| o.apply(&mut template))
        .map_err(|e| Exit::StartFailed(e.to_string()))?;
    if facts.instance.template_name.is_none() {
        facts.instance.template_name = template.name.clone();
    }
    let namespace = facts.instance.namespace.clone().unwrap_or_else(|| "default".into());
    bind_image_files(world, &mut template, &namespace).await?;
    Ok((template, facts, endpoint))
}

/// Makes each `imageFile` disk the volume of that ImageFile in the pod's
/// own namespace (the gate admits no other), in the ImageFile's format.
async fn bind_image_files(world: &impl World, template: &mut ResolvedTemplate, namespace: &str) -> Result<(), Exit> {
    for (i, disk) in template.disks.iter_mut().enumerate() {
        let DiskSource::ImageFile(name) = &disk.source else {
            continue;
        };
        if !world.in_cluster() {
            return Err(Exit::StartFailed(format!(
                "disks[{i}].imageFile {name:?}: an ImageFile is found through the Kubernetes API, and this shim is not running in a pod with a service account"
            )));
        }
        let image = world
            .fetch_image_file(namespace, name)
            .await
            .map_err(|e| Exit::StartFailed(format!("disks[{i}].imageFile: {e}")))?;
        let (pool, volume, format) = virtkube_api::image::volume_for_disk(&image, disk.read_only)
            .map_err(|e| Exit::StartFailed(format!("disks[{i}].imageFile: {e}")))?;
        world.log(format!(
            "disks[{i}]: ImageFile {namespace}/{name} is volume {volume} of pool {pool}"
        ));
        disk.format = match format {
            virtkube_api::image::ImageFormat::Raw => virtkube_api::template::DiskFormat::Raw,
            virtkube_api::image::ImageFormat::Qcow2 => virtkube_api::template::DiskFormat::Qcow2,
        };
        disk.source = DiskSource::Volume { pool, volume };
    }
    Ok(())
}

/// In a pod without downward API settings (bare `kubectl run`), asks the API
/// for the pod's identity and annotations, and for its node's IP when
/// `need_node` (no libvirt socket mounted, no `HOST_IP`).
async fn cluster_inputs(
    world: &impl World,
    env: &mut HashMap<String, String>,
    annotations: &mut Option<BTreeMap<String, String>>,
    hostname: &str,
    need_node: bool,
) -> Result<(), Exit> {
    let identity_known = env.contains_key("POD_NAME") && annotations.is_some();
    if !world.in_cluster() || (identity_known && !need_node) {
        return Ok(());
    }
    let namespace = match env.get("POD_NAMESPACE") {
        Some(ns) => ns.clone(),
        None => world
            .service_account_namespace()
            .await
            .map(|ns| ns.trim().to_owned())
            .map_err(Exit::Usage)?,
    };
    let name = env
        .get("POD_NAME")
        .cloned()
        .unwrap_or_else(|| hostname.trim().to_owned());
    let mut pod = match world.fetch_pod(&namespace, &name).await {
        Ok(pod) => pod,
        // Only the node's IP was wanted: without it the shim waits for the socket.
        Err(e) if identity_known => {
            world.log(format!("cannot look up the node for the TCP fallback: {e}"));
            return Ok(());
        }
        Err(e) => return Err(Exit::StartFailed(e)),
    };
    let mut retries = 0;
    while need_node && pod.host_ip.is_none() && retries < HOST_IP_RETRIES {
        retries += 1;
        world.pause(HOST_IP_RETRY).await;
        match world.fetch_pod(&namespace, &name).await {
            Ok(again) => pod = again,
            Err(e) => {
                world.log(format!("cannot read the pod's hostIP: {e}"));
                break;
            }
        }
    }
    env.entry("POD_NAMESPACE".into()).or_insert(namespace);
    env.entry("POD_NAME".into()).or_insert(name);
    if let Some(uid) = pod.uid {
        env.entry("POD_UID".into()).or_insert(uid);
    }
    if annotations.is_none() {
        *annotations = Some(pod.annotations);
    }
    if let Some(host_ip) = pod.host_ip {
        env.entry("HOST_IP".into()).or_insert(host_ip);
    }
    Ok(())
}

/// The real world: files off the async runtime, the API through the pod's
/// service account (a client made only when something is to be read).
#[derive(Default)]
pub struct Live {
    #[cfg(feature = "kube")]
    client: tokio::sync::OnceCell<kube::Client>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

#[cfg(feature = "kube")]
impl Live {
    async fn client(&self) -> Result<&kube::Client, String> {
        self.client.get_or_try_init(crate::cluster::client).await
    }
}

#[cfg(not(feature = "kube"))]
const NO_KUBE: &str = "this shim was built without Kubernetes support";

impl World for Live {
    async fn read_file(&self, path: &Path, max: usize) -> io::Result<String> {
        read_capped(path, max).await
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn hostname(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
    }

    fn in_cluster(&self) -> bool {
        #[cfg(feature = "kube")]
        return crate::cluster::in_cluster();
        #[cfg(not(feature = "kube"))]
        return false;
    }

    async fn service_account_namespace(&self) -> Result<String, String> {
        let file = NAMESPACE_FILE;
        read_capped(Path::new(file), 253)
            .await
            .map_err(|e| format!("cannot read {file}: {e}"))
    }

    async fn fetch_pod(&self, namespace: &str, name: &str) -> Result<PodFacts, String> {
        #[cfg(feature = "kube")]
        return crate::cluster::fetch_pod(self.client().await?, namespace, name).await;
        #[cfg(not(feature = "kube"))]
        return Err(format!("{NO_KUBE}: cannot read pod {namespace}/{name}"));
    }

    async fn fetch_template(&self, namespace: &str, name: &str) -> Result<ResolvedTemplate, String> {
        #[cfg(feature = "kube")]
        return crate::cluster::fetch_template(self.client().await?, namespace, name).await;
        #[cfg(not(feature = "kube"))]
        return Err(format!("{NO_KUBE}: cannot read VirtTemplate {namespace}/{name}"));
    }

    async fn fetch_image_file(&self, namespace: &str, name: &str) -> Result<virtkube_api::ImageFile, String> {
        #[cfg(feature = "kube")]
        return crate::cluster::fetch_image_file(self.client().await?, namespace, name).await;
        #[cfg(not(feature = "kube"))]
        return Err(format!("{NO_KUBE}: cannot read ImageFile {namespace}/{name}"));
    }

    async fn pause(&self, how_long: Duration) {
        tokio::time::sleep(how_long).await;
    }

    fn log(&self, line: String) {
        crate::runtime::log(line);
    }
}

/// Reads a text file of at most `max` bytes (`/dev/zero` must not grow to
/// gigabytes), off the async runtime (a FIFO or a stalled network filesystem
/// must not keep signals from being handled).
pub async fn read_capped(path: &Path, max: usize) -> io::Result<String> {
    use std::io::Read;
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::fs::File::open(&path)?
            .take(max as u64 + 1)
            .read_to_string(&mut text)?;
        if text.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it is larger than the {max} bytes the shim reads"),
            ));
        }
        Ok(text)
    });
    read.await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::path::PathBuf;

    use crate::endpoint::Source;

    const BAKED: &str =
        "apiVersion: virtkube.io/v1alpha1\nkind: VirtTemplate\nmetadata: {name: baked}\nspec: {memory: 64Mi}\n";
    const UID: &str = "4b7d3e62-5b2f-4c3a-9a8e-0c1d2e3f4a5b";

    /// A world of files, a pod and templates, that records what was asked.
    #[derive(Default)]
    struct Fake {
        files: BTreeMap<PathBuf, String>,
        hostname: String,
        in_cluster: bool,
        namespace_file: Option<String>,
        /// Successive answers to fetch_pod; the last repeats.
        pods: RefCell<Vec<Result<PodFacts, String>>>,
        templates: BTreeMap<String, String>,
        /// ImageFiles as JSON, by name.
        image_files: BTreeMap<String, String>,
        pod_reads: RefCell<u32>,
        paused: RefCell<Duration>,
        logged: RefCell<Vec<String>>,
    }

    impl World for Fake {
        async fn read_file(&self, path: &Path, max: usize) -> io::Result<String> {
            match self.files.get(path) {
                Some(text) if text.len() > max => Err(io::Error::new(io::ErrorKind::InvalidData, "too large")),
                Some(text) => Ok(text.clone()),
                None => Err(io::ErrorKind::NotFound.into()),
            }
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.contains_key(path)
        }
        fn hostname(&self) -> String {
            self.hostname.clone()
        }
        fn in_cluster(&self) -> bool {
            self.in_cluster
        }
        async fn service_account_namespace(&self) -> Result<String, String> {
            self.namespace_file.clone().ok_or_else(|| "no namespace file".into())
        }
        async fn fetch_pod(&self, namespace: &str, name: &str) -> Result<PodFacts, String> {
            *self.pod_reads.borrow_mut() += 1;
            let mut pods = self.pods.borrow_mut();
            let answer = if pods.len() > 1 {
                pods.remove(0)
            } else {
                pods.first()
                    .cloned()
                    .unwrap_or(Err(format!("no pod {namespace}/{name}")))
            };
            answer.map_err(|e| format!("{e} ({namespace}/{name})"))
        }
        async fn fetch_template(&self, namespace: &str, name: &str) -> Result<ResolvedTemplate, String> {
            let text = self
                .templates
                .get(name)
                .ok_or_else(|| format!("VirtTemplate {namespace}/{name} not found"))?;
            resolve::parse_yaml(text).map_err(|e| e.to_string())
        }
        async fn fetch_image_file(&self, namespace: &str, name: &str) -> Result<virtkube_api::ImageFile, String> {
            let text = self
                .image_files
                .get(name)
                .ok_or_else(|| format!("ImageFile {namespace}/{name} not found"))?;
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
        async fn pause(&self, how_long: Duration) {
            *self.paused.borrow_mut() += how_long;
        }
        fn log(&self, line: String) {
            self.logged.borrow_mut().push(line);
        }
    }

    fn config() -> Config {
        crate::config::from_env(|_| None, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn with_baked(mut fake: Fake) -> Fake {
        fake.files.insert(config().template_file, BAKED.into());
        fake
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod_env() -> HashMap<String, String> {
        env(&[("POD_NAME", "vm"), ("POD_NAMESPACE", "ns"), ("POD_UID", UID)])
    }

    async fn load_with(
        fake: &Fake,
        config: &Config,
        env: HashMap<String, String>,
    ) -> Result<(ResolvedTemplate, Facts, Endpoint), Exit> {
        load(config, env, fake).await
    }

    fn start_failure(result: Result<(ResolvedTemplate, Facts, Endpoint), Exit>) -> String {
        match result {
            Err(Exit::StartFailed(why)) => why,
            other => panic!("expected a start failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_baked_template_runs_under_its_own_name_without_asking_the_api() {
        let fake = with_baked(Fake {
            in_cluster: true,
            ..Fake::default()
        });
        let mut fake = fake;
        fake.files.insert(config().annotations_file, String::new());
        fake.files.insert(endpoint::DEFAULT_SOCKET.into(), String::new());
        let (template, facts, endpoint) = load_with(&fake, &config(), pod_env()).await.unwrap();
        assert_eq!(template.memory_bytes, 64 << 20);
        assert_eq!(facts.instance.template_name.as_deref(), Some("baked"));
        assert_eq!(facts.instance.uuid.as_deref(), Some(UID));
        assert_eq!(endpoint.source, Source::MountedSocket);
        assert_eq!(
            *fake.pod_reads.borrow(),
            0,
            "identity known and socket mounted: no API call"
        );
    }

    #[tokio::test]
    async fn a_named_template_is_read_from_the_api_in_a_pod_and_the_baked_file_ignored() {
        let mut fake = with_baked(Fake {
            in_cluster: true,
            ..Fake::default()
        });
        fake.templates.insert("big".into(), "memory: 2Gi".into());
        fake.files
            .insert(config().annotations_file, "virtkube.io/template=\"big\"\n".into());
        fake.files.insert(endpoint::DEFAULT_SOCKET.into(), String::new());
        let (template, facts, _) = load_with(&fake, &config(), pod_env()).await.unwrap();
        assert_eq!(template.memory_bytes, 2 << 30);
        assert_eq!(facts.instance.template_name.as_deref(), Some("big"));
        assert!(
            fake.logged
                .borrow()
                .iter()
                .any(|l| l.contains("reading VirtTemplate ns/big"))
        );
        // A name the API does not have is an error naming it.
        let mut config = config();
        config.template_name = Some("missing".into());
        let why = start_failure(load_with(&fake, &config, pod_env()).await);
        assert!(why.contains("VirtTemplate ns/missing not found"), "{why}");
    }

    #[tokio::test]
    async fn an_image_file_disk_becomes_its_ready_volume_in_the_pods_namespace() {
        let mut fake = with_baked(Fake {
            in_cluster: true,
            ..Fake::default()
        });
        fake.templates.insert(
            "vm".into(),
            "memory: 64Mi\ndisks:\n  - imageFile: clone-1\n    bootOrder: 1\n  - imageFile: golden\n".into(),
        );
        let image = |name: &str, phase: &str, read_only: bool| {
            serde_json::json!({
                "apiVersion": "virtkube.io/v1alpha1", "kind": "ImageFile",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"repository": "main", "readOnly": read_only},
                "status": {"phase": phase, "pool": "virtkube-main", "volume": format!("ns_{name}"), "format": "qcow2"},
            })
            .to_string()
        };
        fake.image_files
            .insert("clone-1".into(), image("clone-1", "Ready", false));
        fake.image_files.insert("golden".into(), image("golden", "Ready", true));
        fake.files
            .insert(config().annotations_file, "virtkube.io/template=\"vm\"\n".into());
        fake.files.insert(endpoint::DEFAULT_SOCKET.into(), String::new());
        // The golden image is read-only and the disk is not: refused, saying what to do.
        let why = start_failure(load_with(&fake, &config(), pod_env()).await);
        assert!(
            why.contains("disks[1].imageFile: ImageFile \"golden\" is readOnly"),
            "{why}"
        );
        fake.templates.insert(
            "vm".into(),
            "memory: 64Mi\ndisks:\n  - imageFile: clone-1\n    bootOrder: 1\n  - imageFile: golden\n    readOnly: true\n".into(),
        );
        let (template, _, _) = load_with(&fake, &config(), pod_env()).await.unwrap();
        assert_eq!(
            template.disks[0].source,
            DiskSource::Volume {
                pool: "virtkube-main".into(),
                volume: "ns_clone-1".into()
            }
        );
        assert_eq!(template.disks[0].format, virtkube_api::template::DiskFormat::Qcow2);
        // Not ready yet, or missing: the start fails naming the disk.
        fake.image_files
            .insert("clone-1".into(), image("clone-1", "Creating", false));
        let why = start_failure(load_with(&fake, &config(), pod_env()).await);
        assert!(
            why.contains("disks[0].imageFile: ImageFile \"clone-1\" is not ready (phase Creating)"),
            "{why}"
        );
        fake.image_files.clear();
        let why = start_failure(load_with(&fake, &config(), pod_env()).await);
        assert!(why.contains("ImageFile ns/clone-1 not found"), "{why}");
    }

    #[tokio::test]
    async fn outside_a_pod_a_named_template_is_an_error_with_or_without_a_baked_one() {
        let mut config = config();
        config.template_name = Some("other".into());
        let why = start_failure(load_with(&Fake::default(), &config, pod_env()).await);
        assert!(why.contains("is to be read from the Kubernetes API"), "{why}");
        let why = start_failure(load_with(&with_baked(Fake::default()), &config, pod_env()).await);
        assert!(why.contains("would run under a name that is not its own"), "{why}");
    }

    #[tokio::test]
    async fn a_missing_or_bad_template_file_is_a_start_failure_that_names_it() {
        let why = start_failure(load_with(&Fake::default(), &config(), pod_env()).await);
        assert!(
            why.contains("cannot read the template file /etc/virtkube/template.yaml"),
            "{why}"
        );
        let mut fake = Fake::default();
        fake.files.insert(config().template_file, "memory: lots".into());
        let why = start_failure(load_with(&fake, &config(), pod_env()).await);
        assert!(
            why.contains("/etc/virtkube/template.yaml") && why.contains("spec.memory"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn bad_annotations_and_identity_are_usage_errors_and_bad_overrides_start_failures() {
        let mut fake = with_baked(Fake::default());
        fake.files
            .insert(config().annotations_file, "not an annotation line".into());
        assert!(matches!(
            load_with(&fake, &config(), pod_env()).await,
            Err(Exit::Usage(_))
        ));
        let fake = with_baked(Fake::default());
        let bad_uid = env(&[("POD_NAME", "vm"), ("POD_NAMESPACE", "ns"), ("POD_UID", "nope")]);
        assert!(matches!(
            load_with(&fake, &config(), bad_uid).await,
            Err(Exit::Usage(_))
        ));
        let mut fake = with_baked(Fake::default());
        fake.files
            .insert(config().annotations_file, "virtkube.io/cpus=\"two\"\n".into());
        let why = start_failure(load_with(&fake, &config(), pod_env()).await);
        assert!(why.contains("virtkube.io/cpus"), "{why}");
    }

    #[tokio::test]
    async fn a_bare_pod_reads_its_identity_and_node_from_the_api_waiting_for_the_host_ip() {
        let pod = PodFacts {
            uid: Some(UID.into()),
            annotations: BTreeMap::from([("virtkube.io/memory".into(), "96Mi".into())]),
            host_ip: None,
        };
        let fake = with_baked(Fake {
            in_cluster: true,
            hostname: "bare-vm\n".into(),
            namespace_file: Some("team\n".into()),
            pods: RefCell::new(vec![
                Ok(pod.clone()),
                Ok(pod.clone()),
                Ok(PodFacts {
                    host_ip: Some("192.0.2.7".into()),
                    ..pod
                }),
            ]),
            ..Fake::default()
        });
        let (template, facts, endpoint) = load_with(&fake, &config(), HashMap::new()).await.unwrap();
        assert_eq!(facts.instance.domain_name, "team_bare-vm");
        assert_eq!(facts.instance.uuid.as_deref(), Some(UID));
        assert_eq!(template.memory_bytes, 96 << 20, "the pod's annotations apply");
        assert_eq!(
            endpoint.source,
            Source::NodeTcp {
                host_ip: "192.0.2.7".parse().unwrap_or_else(|e| panic!("{e}"))
            }
        );
        assert_eq!(*fake.pod_reads.borrow(), 3);
        assert_eq!(*fake.paused.borrow(), HOST_IP_RETRY * 2);
    }

    #[tokio::test]
    async fn the_host_ip_wait_is_bounded_and_a_failed_node_lookup_with_known_identity_is_not_fatal() {
        let fake = with_baked(Fake {
            in_cluster: true,
            hostname: "vm".into(),
            namespace_file: Some("ns".into()),
            pods: RefCell::new(vec![Ok(PodFacts::default())]),
            ..Fake::default()
        });
        let result = load_with(&fake, &config(), HashMap::new()).await;
        assert_eq!(
            *fake.paused.borrow(),
            HOST_IP_RETRY * HOST_IP_RETRIES,
            "waited 10 s, no more"
        );
        // Without a socket or a node the endpoint falls back to the default, whose error advises.
        assert!(
            result.is_ok() || matches!(result, Err(Exit::StartFailed(_))),
            "{result:?}"
        );

        let mut fake = with_baked(Fake {
            in_cluster: true,
            pods: RefCell::new(vec![Err("forbidden".into())]),
            ..Fake::default()
        });
        fake.files.insert(config().annotations_file, String::new());
        let (_, facts, _) = load_with(&fake, &config(), pod_env()).await.unwrap();
        assert_eq!(facts.instance.pod_name.as_deref(), Some("vm"));
        assert!(
            fake.logged
                .borrow()
                .iter()
                .any(|l| l.contains("cannot look up the node for the TCP fallback: forbidden")),
            "{:?}",
            fake.logged.borrow()
        );
    }

    #[tokio::test]
    async fn a_pod_the_api_cannot_find_is_fatal_when_the_identity_is_unknown() {
        let fake = with_baked(Fake {
            in_cluster: true,
            hostname: "vm".into(),
            namespace_file: Some("ns".into()),
            pods: RefCell::new(vec![Err("pods \"vm\" is forbidden".into())]),
            ..Fake::default()
        });
        let why = start_failure(load_with(&fake, &config(), HashMap::new()).await);
        assert!(why.contains("forbidden"), "{why}");
        let fake = with_baked(Fake {
            in_cluster: true,
            hostname: "vm".into(),
            ..Fake::default()
        });
        assert!(
            matches!(load_with(&fake, &config(), HashMap::new()).await, Err(Exit::Usage(why)) if why.contains("namespace"))
        );
    }

    #[tokio::test]
    async fn an_explicit_uri_or_host_ip_needs_no_node_lookup() {
        let mut fake = with_baked(Fake {
            in_cluster: true,
            ..Fake::default()
        });
        fake.files.insert(config().annotations_file, String::new());
        let mut env = pod_env();
        env.insert("HOST_IP".into(), "192.0.2.9".into());
        let (_, _, endpoint) = load_with(&fake, &config(), env).await.unwrap();
        assert_eq!(
            endpoint.source,
            Source::NodeTcp {
                host_ip: "192.0.2.9".parse().unwrap_or_else(|e| panic!("{e}"))
            }
        );
        assert_eq!(*fake.pod_reads.borrow(), 0);
        assert!(fake.logged.borrow().iter().any(|l| l.contains("over TCP")));
    }
}
