//! The repository manager: makes each ImageRepository a libvirt storage pool
//! on the claim the virthost pods mount, and each ImageFile a volume in it,
//! through libvirt's storage API only (so libvirt's formats and QEMU's
//! locking apply). Two kube-runtime Controllers, with finalizers so that no
//! pool or volume outlives its object. The decisions are
//! [`crate::storage::next_step`]; this is the I/O.
//!
//! Which virthost acts: every virthost defines the pool of a repository it
//! mounts, and reports itself in the repository's `status.nodes`; the first
//! of those nodes (by name) makes, imports, grows and deletes the volumes,
//! so two nodes never write one volume's metadata at once.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virtkube_api::image::{
    self, FINALIZER, ImageFile, ImageFileStatus, ImageFormat, ImageRepository, ImageRepositoryStatus, Preallocation,
};
use virtkube_api::node::Condition;
use virtkube_api::quantity::format_bytes;

use crate::storage::{self, Backing, Situation, Step, VolumeNow};

/// Where and how the manager runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node.
    pub node: String,
    /// The virthost's namespace (where repositories' claims are).
    pub namespace: String,
    /// The virthost DaemonSet, whose pods mount the claims.
    pub daemonset: String,
    /// The virthost container in it.
    pub container: String,
    /// How old (seconds) another node's VirtNode heartbeat may be before it
    /// no longer counts as mounting a repository ([`storage::heartbeat_limit`]).
    pub heartbeat_limit: i64,
}

struct Context {
    client: kube::Client,
    conn: Arc<Connect>,
    settings: Settings,
}

/// A failed reconcile: retried with a back-off.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused or failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// libvirt refused or failed.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// The import could not be read.
    #[error("import: {0}")]
    Import(String),
    /// A blocking libvirt call panicked.
    #[error("a libvirt call panicked")]
    Panicked,
}

/// The field manager of the manager's writes.
const MANAGER: &str = "virtkube-repositories";
/// The port an import pod serves its file on (`virtkube-shim serve-file`).
pub const IMPORT_PORT: u16 = virtkube_api::podnet::IMPORT_PORT;

/// Runs both controllers until dropped.
pub async fn run(client: kube::Client, settings: Settings, conn: Arc<Connect>) {
    let context = Arc::new(Context {
        client: client.clone(),
        conn,
        settings,
    });
    let repositories = Controller::new(Api::<ImageRepository>::all(client.clone()), watcher::Config::default())
        .run(reconcile_repository, retry, context.clone())
        .for_each(|result| {
            if let Err(e) = result {
                warn!("ImageRepository not reconciled: {e}");
            }
            std::future::ready(())
        });
    let files = Controller::new(Api::<ImageFile>::all(client.clone()), watcher::Config::default())
        .owns(Api::<Pod>::all(client), watcher::Config::default().labels(IMPORT_LABEL))
        .run(reconcile_file, retry, context)
        .for_each(|result| {
            if let Err(e) = result {
                warn!("ImageFile not reconciled: {e}");
            }
            std::future::ready(())
        });
    futures_util::future::join(repositories, files).await;
}

/// After a failed reconcile of either kind: again in 5 s.
fn retry<K>(_: Arc<K>, _: &Error, _: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn blocking<T: Send + 'static>(
    conn: &Arc<Connect>,
    call: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
) -> Result<T, Error> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || call(&conn))
        .await
        .map_err(|_| Error::Panicked)?
        .map_err(|e| Error::Libvirt(e.to_string()))
}

fn condition(ready: bool, reason: &str, message: &str) -> Vec<Condition> {
    vec![Condition {
        kind: "Ready".into(),
        status: if ready { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: None,
        last_heartbeat_time: None,
    }]
}

async fn add_finalizer<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut finalizers = object.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    // The resourceVersion makes the write fail, not overwrite, if another
    // writer changed the list meanwhile.
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": object.resource_version()}});
    api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

async fn remove_finalizer<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": object.resource_version()}});
    match api
        .patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// Repositories

/// Whether `path` is a mount point in this process's mount namespace.
fn is_mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|text| storage::is_mount_point(&text, path))
}

/// Makes the virthost DaemonSet mount the claim of every repository in
/// `mounts` (name → claim), and only those: one server-side apply with the
/// manager's own field manager, so the rest of the DaemonSet stays its
/// owner's. A change rolls the virthost pods; running VMs outlive that.
async fn apply_mounts(context: &Context, mounts: &BTreeMap<String, String>) -> Result<(), kube::Error> {
    let settings = &context.settings;
    let volumes: Vec<_> = mounts
        .iter()
        .map(|(repo, claim)| json!({"name": format!("repo-{repo}"), "persistentVolumeClaim": {"claimName": claim}}))
        .collect();
    let volume_mounts: Vec<_> = mounts
        .keys()
        .map(|repo| json!({"name": format!("repo-{repo}"), "mountPath": image::mount_path(repo)}))
        .collect();
    let patch = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": settings.daemonset, "namespace": settings.namespace},
        "spec": {"template": {"spec": {
            "containers": [{"name": settings.container, "volumeMounts": volume_mounts}],
            "volumes": volumes,
        }}},
    });
    let api: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(context.client.clone(), &settings.namespace);
    api.patch(
        &settings.daemonset,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
}

/// Why a claim cannot be mounted, or None when it is bound.
async fn claim_problem(context: &Context, claim: &str) -> Result<Option<(&'static str, String)>, kube::Error> {
    let namespace = &context.settings.namespace;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(context.client.clone(), namespace);
    Ok(match api.get_opt(claim).await? {
        None => Some((
            "ClaimMissing",
            format!("PersistentVolumeClaim {namespace}/{claim} does not exist: create it in the virthost's namespace"),
        )),
        Some(pvc) => {
            let phase = pvc.status.and_then(|s| s.phase).unwrap_or_default();
            (phase != "Bound").then(|| {
                (
                    "ClaimNotBound",
                    format!("PersistentVolumeClaim {namespace}/{claim} is {phase:?}, not Bound"),
                )
            })
        }
    })
}

/// The mounts the DaemonSet should have: every repository not being
/// deleted whose claim is bound.
async fn wanted_mounts(context: &Context) -> Result<BTreeMap<String, String>, kube::Error> {
    let repositories = Api::<ImageRepository>::all(context.client.clone())
        .list(&ListParams::default())
        .await?;
    let mut mounts = BTreeMap::new();
    for repo in repositories {
        if repo.metadata.deletion_timestamp.is_none()
            && image::check_repository_name(&repo.name_any()).is_ok()
            && claim_problem(context, &repo.spec.claim_name).await?.is_none()
        {
            mounts.insert(repo.name_any(), repo.spec.claim_name.clone());
        }
    }
    Ok(mounts)
}

async fn reconcile_repository(repo: Arc<ImageRepository>, context: Arc<Context>) -> Result<Action, Error> {
    let name = repo.name_any();
    let api: Api<ImageRepository> = Api::all(context.client.clone());
    let pool = image::pool_name(&name);
    let path = image::mount_path(&name);
    let node = context.settings.node.clone();
    if repo.metadata.deletion_timestamp.is_some() {
        if !repo.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let files: Vec<String> = Api::<ImageFile>::all(context.client.clone())
            .list(&ListParams::default())
            .await?
            .into_iter()
            .filter(|f| {
                f.spec.repository == name || f.status.as_ref().and_then(|s| s.pool.as_deref()) == Some(pool.as_str())
            })
            .map(|f| format!("{}/{}", f.namespace().unwrap_or_default(), f.name_any()))
            .collect();
        if !files.is_empty() {
            let message = format!(
                "deletion waits: ImageFiles are in it ({}); delete them first",
                files.join(", ")
            );
            write_repository_status(&api, &name, |s| {
                s.phase = Some("Deleting".into());
                s.conditions = condition(false, "HasImageFiles", &message);
            })
            .await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        let gone = pool.clone();
        blocking(&context.conn, move |conn| drop_pool(conn, &gone)).await?;
        apply_mounts(&context, &wanted_mounts(&context).await?).await?;
        remove_finalizer(&api, &repo).await?;
        info!(repository = %name, "pool undefined; the claim's files stay");
        return Ok(Action::await_change());
    }
    if let Err(why) = image::check_repository_name(&name) {
        write_repository_status(&api, &name, |s| {
            s.phase = Some("Failed".into());
            s.conditions = condition(false, "InvalidName", &why);
        })
        .await?;
        return Ok(Action::await_change());
    }
    if !repo.finalizers().iter().any(|f| f == FINALIZER) {
        add_finalizer(&api, repo.as_ref()).await?;
        return Ok(Action::requeue(Duration::ZERO));
    }
    apply_mounts(&context, &wanted_mounts(&context).await?).await?;
    let problem = claim_problem(&context, &repo.spec.claim_name).await?;
    // The other nodes that mount it, while their nodeinfo beats: a node gone
    // for good stops being listed (and managing the volumes).
    let virt_nodes = Api::<virtkube_api::VirtNode>::all(context.client.clone());
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut nodes = Vec::new();
    for other in api.get_status(&name).await?.status.unwrap_or_default().nodes {
        if other != node
            && virt_nodes
                .get_opt(&other)
                .await?
                .is_some_and(|n| storage::node_alive(&n, now, context.settings.heartbeat_limit))
        {
            nodes.push(other);
        }
    }
    let here = match problem {
        Some((reason, message)) => Err((reason, message)),
        None if !is_mounted(&path) => Err((
            "NotMounted",
            format!(
                "the virthost on node {node} does not mount the claim at {path} yet (its DaemonSet is rolling out)"
            ),
        )),
        None => {
            let (pool, path) = (pool.clone(), path.clone());
            match blocking(&context.conn, move |conn| ensure_pool(conn, &pool, &path)).await {
                Ok(info) => Ok(info),
                Err(e) => Err(("PoolFailed", format!("libvirt pool on node {node}: {e}"))),
            }
        }
    };
    let (info, reason, message) = match here {
        Ok(info) => {
            nodes.push(node.clone());
            nodes.sort();
            let message = format!("pool {pool} runs on {}", nodes.join(", "));
            (Some(info), "PoolRunning", message)
        }
        Err((reason, message)) => {
            warn!(repository = %name, reason, "{message}");
            (None, reason, message)
        }
    };
    let ready = !nodes.is_empty();
    let (pool_name, path) = (pool.clone(), path.clone());
    write_repository_status(&api, &name, move |s| {
        s.pool = Some(pool_name);
        s.path = Some(path);
        s.phase = Some(if ready { "Ready" } else { "Pending" }.into());
        s.nodes = nodes;
        match info {
            Some(info) => {
                s.capacity = Some(format_bytes(info.capacity));
                s.allocation = Some(format_bytes(info.allocation));
                s.available = Some(format_bytes(info.available));
            }
            None if !ready => {
                s.capacity = None;
                s.allocation = None;
                s.available = None;
            }
            None => {}
        }
        s.conditions = condition(ready && reason == "PoolRunning", reason, &message);
    })
    .await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn write_repository_status(
    api: &Api<ImageRepository>,
    name: &str,
    change: impl FnOnce(&mut ImageRepositoryStatus),
) -> Result<(), kube::Error> {
    const FIELDS: &[&str] = &[
        "phase",
        "pool",
        "path",
        "capacity",
        "allocation",
        "available",
        "nodes",
        "conditions",
    ];
    write_status(api, name, FIELDS, |r: ImageRepository| r.status, change).await
}

/// Reads an object's status, changes it, and writes it back when it
/// changed, as a merge patch that makes it exactly that: `fields` names
/// every field of the status, and those its serialization leaves out
/// (unset, empty lists) are written as null, so that they clear rather than
/// keep their old values.
async fn write_status<K, S>(
    api: &Api<K>,
    name: &str,
    fields: &[&str],
    status_of: impl FnOnce(K) -> Option<S>,
    change: impl FnOnce(&mut S),
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Default + Clone + PartialEq + serde::Serialize,
{
    let mut status = status_of(api.get_status(name).await?).unwrap_or_default();
    let before = status.clone();
    change(&mut status);
    if status == before {
        return Ok(());
    }
    let mut value = serde_json::to_value(&status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        for field in fields {
            map.entry((*field).to_owned()).or_insert(serde_json::Value::Null);
        }
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": value })),
    )
    .await
    .map(drop)
}

/// Defines, starts and refreshes the pool on `path`; its size.
fn ensure_pool(
    conn: &Connect,
    name: &str,
    path: &str,
) -> Result<virt::storage_pool::StoragePoolInfo, virt::error::Error> {
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => pool,
        Err(e) if e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStoragePool) => {
            info!(pool = name, path, "defining the storage pool");
            conn.define_storage_pool_xml(&storage::pool_xml(name, path), 0)?
        }
        Err(e) => return Err(e),
    };
    if !pool.is_active()? {
        pool.create(0)?;
    }
    pool.refresh(0)?;
    pool.info()
}

/// Stops and undefines the pool, leaving its files.
fn drop_pool(conn: &Connect, name: &str) -> Result<(), virt::error::Error> {
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => pool,
        Err(e) if e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStoragePool) => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if pool.is_active()? {
        pool.destroy()?;
    }
    pool.undefine()
}

// ---------------------------------------------------------------------------
// ImageFiles

/// The label of import pods.
const IMPORT_LABEL: &str = "virtkube.io/import";

/// The import pod of ImageFile `name`.
/// The import pod of ImageFile `name` (UID `uid`): `NAME-import`, or
/// `import-UID` where that would be too long (two long names sharing a
/// prefix must not share a pod).
fn import_pod_name(name: &str, uid: &str) -> String {
    if name.len() + "-import".len() <= 63 {
        format!("{name}-import")
    } else {
        format!("import-{uid}")
    }
}

/// The volume, if it exists.
fn volume_now(conn: &Connect, pool: &str, volume: &str) -> Result<Option<VolumeNow>, virt::error::Error> {
    let pool = conn.lookup_storage_pool_by_name(pool)?;
    let vol = match pool.lookup_storage_vol_by_name(volume) {
        Ok(vol) => vol,
        Err(e) if e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStorageVolume) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let info = vol.info()?;
    let path = vol.path()?;
    // A volume whose file is gone (removed by hand, or by another node on a
    // shared claim) is an entry left in the pool's list: the pool is read
    // again and the volume counts as absent.
    if !std::path::Path::new(&path).exists() {
        pool.refresh(0)?;
        return Ok(None);
    }
    Ok(Some(VolumeNow {
        capacity: info.capacity,
        allocation: info.allocation,
        path,
    }))
}

/// Running domains using pool volume `volume` or file `path` (their disks
/// or backing chains), and those writing it, as `namespace/pod`.
fn users_of(
    conn: &Connect,
    pool: &str,
    volume: &str,
    path: &str,
) -> Result<(Vec<String>, Vec<String>), virt::error::Error> {
    let (mut users, mut writers) = (Vec::new(), Vec::new());
    for domain in conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
        let Ok(xml) = domain.xml_desc(0) else {
            continue; // ended meanwhile
        };
        let Ok(uses) = storage::disk_use(&xml) else {
            continue;
        };
        let pod = storage::pod_of_domain(&domain.name()?);
        if uses.written_volumes.iter().any(|(p, v)| p == pool && v == volume)
            || uses.written_files.iter().any(|f| f == path)
        {
            writers.push(pod.clone());
        }
        if uses.volumes.iter().any(|(p, v)| p == pool && v == volume) || uses.files.iter().any(|f| f == path) {
            users.push(pod);
        }
    }
    users.sort();
    writers.sort();
    Ok((users, writers))
}

async fn write_file_status(
    api: &Api<ImageFile>,
    name: &str,
    change: impl FnOnce(&mut ImageFileStatus),
) -> Result<(), kube::Error> {
    const FIELDS: &[&str] = &[
        "phase",
        "pool",
        "volume",
        "format",
        "capacity",
        "allocation",
        "backingFile",
        "sha256",
        "usedBy",
        "conditions",
    ];
    write_status(api, name, FIELDS, |f: ImageFile| f.status, change).await
}

async fn reconcile_file(file: Arc<ImageFile>, context: Arc<Context>) -> Result<Action, Error> {
    let namespace = file.namespace().unwrap_or_default();
    let name = file.name_any();
    let api: Api<ImageFile> = Api::namespaced(context.client.clone(), &namespace);
    let volume_name = image::volume_name(&namespace, &name);
    let deleting = file.metadata.deletion_timestamp.is_some();
    let recorded = file.status.clone().unwrap_or_default();
    // Once a volume is begun, its pool is recorded, and that is where the
    // volume is, whatever spec.repository says later.
    let made_in = recorded
        .pool
        .as_deref()
        .and_then(|p| p.strip_prefix("virtkube-"))
        .map(str::to_owned);
    let repository = made_in.clone().unwrap_or_else(|| file.spec.repository.clone());
    let repo = Api::<ImageRepository>::all(context.client.clone())
        .get_opt(&repository)
        .await?;
    let repo_status = repo.as_ref().and_then(|r| r.status.clone()).unwrap_or_default();
    // One node manages a repository's volumes: the first that mounts it.
    if let Some(first) = repo_status.nodes.first()
        && *first != context.settings.node
    {
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let pool_name = image::pool_name(&repository);
    if let Some(made_in) = made_in.as_deref()
        && made_in != file.spec.repository
        && !deleting
    {
        let message = format!(
            "spec.repository cannot change: the volume is in repository {made_in}; set it back (a new ImageFile can clone or import into another repository)"
        );
        write_file_status(&api, &name, |s| {
            s.conditions = condition(false, "RepositoryChanged", &message);
        })
        .await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    if volume_name.len() > 255 && !deleting {
        write_file_status(&api, &name, |s| {
            s.phase = Some("Failed".into());
            s.conditions = condition(
                false,
                "InvalidName",
                &format!("the volume's file name {volume_name:?} would be longer than 255 bytes: use a shorter name"),
            );
        })
        .await?;
        return Ok(Action::await_change());
    }
    // A repository being deleted still serves the deletion of its ImageFiles
    // (it waits for them), but makes no new volume.
    let repo_deleting = repo.as_ref().is_some_and(|r| r.metadata.deletion_timestamp.is_some());
    let pool = match &repo {
        None => Err(format!(
            "ImageRepository {repository:?} does not exist: create it, or fix spec.repository"
        )),
        Some(_) if repo_deleting && !deleting => Err(format!("ImageRepository {repository:?} is being deleted")),
        Some(r)
            if repo_status.nodes.is_empty() || (repo_status.phase.as_deref() != Some("Ready") && !repo_deleting) =>
        {
            Err(format!(
                "ImageRepository {:?} is not ready: {}",
                repository,
                repo_status
                    .conditions
                    .first()
                    .and_then(|c| c.message.clone())
                    .unwrap_or_else(|| "no virthost mounts it yet".into())
            ))
            .map(|()| r)
        }
        Some(r) => Ok(r),
    }
    .map(|r| {
        (
            pool_name.clone(),
            r.spec.format.unwrap_or(ImageFormat::Qcow2),
            r.spec.preallocation.unwrap_or(Preallocation::Off),
        )
    });
    let ready_here = pool.is_ok();
    let (volume, users) = if ready_here {
        let (p, v) = (pool_name.clone(), volume_name.clone());
        let volume = blocking(&context.conn, move |conn| volume_now(conn, &p, &v)).await?;
        let users = match &volume {
            Some(now) => {
                let (p, v, path) = (pool_name.clone(), volume_name.clone(), now.path.clone());
                blocking(&context.conn, move |conn| users_of(conn, &p, &v, &path))
                    .await?
                    .0
            }
            None => vec![],
        };
        (volume, users)
    } else {
        (None, vec![])
    };
    let siblings = api.list(&ListParams::default()).await?;
    let clones: Vec<String> = siblings
        .iter()
        .filter(|f| {
            let made_from = f.status.as_ref().and_then(|s| s.backing_file.as_deref());
            (f.spec.backing_file.as_deref() == Some(name.as_str()) || made_from == Some(name.as_str()))
                && f.name_any() != name
        })
        .map(ResourceExt::name_any)
        .collect();
    let backing = match &file.spec.backing_file {
        None => Backing::None,
        Some(b) => match siblings.iter().find(|f| f.name_any() == *b) {
            None => Backing::NotReady(format!(
                "the backing ImageFile {b:?} does not exist in namespace {namespace}"
            )),
            Some(f) if f.status.as_ref().and_then(|s| s.pool.as_deref()) != Some(pool_name.as_str()) => {
                Backing::NotReady(format!(
                    "the backing ImageFile {b:?} has no volume in repository {repository:?}: a clone lives beside its backing file"
                ))
            }
            Some(f) if f.metadata.deletion_timestamp.is_some() => {
                Backing::NotReady(format!("the backing ImageFile {b:?} is being deleted"))
            }
            Some(f) => {
                let status = f.status.clone().unwrap_or_default();
                if status.phase.as_deref() != Some("Ready") || !ready_here {
                    Backing::NotReady(format!(
                        "the backing ImageFile {b:?} is not ready (phase {})",
                        status.phase.as_deref().unwrap_or("unset")
                    ))
                } else {
                    let (p, v) = (pool_name.clone(), image::volume_name(&namespace, b));
                    // The format recorded when the golden volume was made,
                    // never one worked out from its spec now.
                    let backing_format = status.format.as_deref().and_then(ImageFormat::parse);
                    match blocking(&context.conn, move |conn| volume_now(conn, &p, &v)).await? {
                        Some(now) => {
                            let (p, v, path) = (pool_name.clone(), image::volume_name(&namespace, b), now.path.clone());
                            let writers = blocking(&context.conn, move |conn| users_of(conn, &p, &v, &path))
                                .await?
                                .1;
                            if let Some(format) = backing_format.filter(|_| writers.is_empty()) {
                                Backing::Ready(now.path, format, now.capacity)
                            } else if backing_format.is_none() {
                                Backing::NotReady(format!("the backing ImageFile {b:?} has no recorded format"))
                            } else {
                                Backing::NotReady(format!(
                                    "the backing ImageFile {b:?} is being written by running VMs ({}): a clone is made while no VM writes its golden image",
                                    writers.join(", ")
                                ))
                            }
                        }
                        None => Backing::NotReady(format!("the backing ImageFile {b:?} has no volume")),
                    }
                }
            }
        },
    };
    let situation = Situation {
        volume_name: volume_name.clone(),
        owner: qemu_owner(),
        pool,
        volume: volume.clone(),
        backing,
        users: users.clone(),
        clones,
        begun: recorded.pool.is_some(),
    };
    let has_finalizer = file.finalizers().iter().any(|f| f == FINALIZER);
    let step = storage::next_step(&file, &situation, has_finalizer);
    let (pool, vol) = (pool_name.clone(), volume_name.clone());
    match step {
        Step::AddFinalizer => {
            add_finalizer(&api, file.as_ref()).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::Wait { phase, reason, message } => {
            write_file_status(&api, &name, |s| {
                s.phase = Some(phase.into());
                s.used_by = users;
                s.conditions = condition(false, reason, &message);
            })
            .await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Step::Fail { reason, message } => {
            warn!(%namespace, imagefile = %name, reason, "{message}");
            write_file_status(&api, &name, |s| {
                if volume.is_none() {
                    s.phase = Some("Failed".into());
                }
                s.conditions = condition(false, reason, &message);
            })
            .await?;
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Step::Create(plan) => {
            // Recorded before the volume exists: where it is, its format and
            // its backing file are decided now, once, whatever the spec says
            // later (a qcow2 header a guest writes into a raw volume must
            // never be read as one).
            let made_from = plan.backing.as_ref().and(file.spec.backing_file.clone());
            let (in_pool, as_volume, format) = (pool_name.clone(), volume_name.clone(), plan.format);
            write_file_status(&api, &name, |s| {
                s.phase = Some("Creating".into());
                s.pool = Some(in_pool);
                s.volume = Some(as_volume);
                s.format = Some(format.as_str().to_owned());
                s.backing_file = made_from;
                s.conditions = condition(false, "Creating", "the volume is being made");
            })
            .await?;
            let (xml, flags) = plan.xml();
            info!(%namespace, imagefile = %name, volume = %vol, "creating the volume");
            let made = blocking(&context.conn, move |conn| {
                let pool = conn.lookup_storage_pool_by_name(&pool)?;
                StorageVol::create_xml(&pool, &xml, flags).map(drop)
            })
            .await;
            if let Err(e) = made {
                write_file_status(&api, &name, |s| {
                    s.phase = Some("Failed".into());
                    s.conditions = condition(false, "CreateFailed", &e.to_string());
                })
                .await?;
                return Err(e);
            }
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::Import => import(&context, &api, &file, &pool_name, &name).await,
        Step::DiscardPartialImport => {
            info!(%namespace, imagefile = %name, "deleting a half-written import");
            blocking(&context.conn, move |conn| delete_volume(conn, &pool, &vol)).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::Resize(bytes) => {
            info!(%namespace, imagefile = %name, bytes, "growing the volume");
            let grown = blocking(&context.conn, move |conn| {
                let pool = conn.lookup_storage_pool_by_name(&pool)?;
                pool.lookup_storage_vol_by_name(&vol)?.resize(bytes, 0)
            })
            .await;
            if let Err(e) = &grown {
                write_file_status(&api, &name, |s| {
                    s.conditions = condition(false, "ResizeFailed", &e.to_string());
                })
                .await?;
            }
            grown.map(|()| Action::requeue(Duration::ZERO))
        }
        Step::DeleteVolume => {
            info!(%namespace, imagefile = %name, volume = %vol, "deleting the volume");
            write_file_status(&api, &name, |s| {
                s.phase = Some("Deleting".into());
                s.conditions = condition(false, "Deleting", "the volume is being deleted");
            })
            .await?;
            blocking(&context.conn, move |conn| delete_volume(conn, &pool, &vol)).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::RemoveFinalizer => {
            remove_finalizer(&api, file.as_ref()).await?;
            Ok(Action::await_change())
        }
        Step::Ready => {
            let Some(now) = volume else {
                return Ok(Action::await_change());
            };
            if recorded.format.as_deref().and_then(ImageFormat::parse).is_none() {
                // Never guessed: from the spec now, or from the file's bytes.
                write_file_status(&api, &name, |s| {
                    s.phase = Some("Failed".into());
                    s.conditions = condition(
                        false,
                        "FormatUnknown",
                        "the volume's format was not recorded when it was made; delete the ImageFile and make it again",
                    );
                })
                .await?;
                return Ok(Action::await_change());
            }
            write_file_status(&api, &name, |s| {
                s.phase = Some("Ready".into());
                s.capacity = Some(format_bytes(now.capacity));
                s.allocation = Some(format_bytes(now.allocation));
                s.used_by = users;
                s.conditions = condition(true, "VolumeReady", &format!("volume {} in pool {}", now.path, pool));
            })
            .await?;
            Ok(Action::requeue(Duration::from_secs(15)))
        }
    }
}

/// The user QEMU runs as in the virthost (libvirt's default), who must own
/// the volumes: libvirt's dynamic ownership is off there.
fn qemu_owner() -> Option<(u32, u32)> {
    storage::user_ids(&std::fs::read_to_string("/etc/passwd").ok()?, "libvirt-qemu")
}

fn delete_volume(conn: &Connect, pool: &str, volume: &str) -> Result<(), virt::error::Error> {
    let pool = conn.lookup_storage_pool_by_name(pool)?;
    match pool.lookup_storage_vol_by_name(volume) {
        Ok(vol) => vol.delete(0),
        Err(e) if e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStorageVolume) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One step of an import from a container image: start its pod, or stream
/// the file it serves into a new raw volume once it runs.
async fn import(
    context: &Context,
    api: &Api<ImageFile>,
    file: &ImageFile,
    pool: &str,
    name: &str,
) -> Result<Action, Error> {
    let namespace = file.namespace().unwrap_or_default();
    let namespace = namespace.as_str();
    let Some(source) = file.spec.source.as_ref().and_then(|s| s.container_image.clone()) else {
        return Ok(Action::await_change());
    };
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), namespace);
    let uid = file.uid().unwrap_or_default();
    let pod_name = import_pod_name(name, &uid);
    let pod = match pods.get_opt(&pod_name).await? {
        // Only the pod made for this ImageFile is read from: any other of
        // that name (a user's, with hostNetwork) could point elsewhere.
        Some(pod)
            if !pod
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true)) =>
        {
            let message = format!(
                "a pod {namespace}/{pod_name} exists that is not this ImageFile's import pod: delete or rename it"
            );
            write_file_status(api, name, |s| {
                s.phase = Some("Pending".into());
                s.conditions = condition(false, "ImportPodTaken", &message);
            })
            .await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Some(pod) => pod,
        None => {
            let owner = file.controller_owner_ref(&()).into_iter().collect::<Vec<_>>();
            // The user's image runs here: no token, no privilege, no root,
            // nothing of the node (and so admitted by the restricted Pod
            // Security level).
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod_name, "namespace": namespace, "labels": {IMPORT_LABEL: uid}, "ownerReferences": owner},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "import",
                        "image": source.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/virtkube-shim", "serve-file", source.path],
                        "ports": [{"name": "import", "containerPort": IMPORT_PORT}],
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                    }],
                },
            }))
            .map_err(|e| Error::Import(e.to_string()))?;
            if let Err(e) = pods.create(&PostParams::default(), &pod).await {
                // Refused (a Pod Security level, a quota): say so where the user looks.
                let message = format!("the import pod {namespace}/{pod_name} could not be made: {e}");
                write_file_status(api, name, |s| {
                    s.phase = Some("Pending".into());
                    s.conditions = condition(false, "ImportPodRefused", &message);
                })
                .await?;
                return Err(e.into());
            }
            write_file_status(api, name, |s| {
                s.phase = Some("Creating".into());
                s.conditions = condition(
                    false,
                    "Importing",
                    &format!("import pod {namespace}/{pod_name} starting"),
                );
            })
            .await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    };
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_default();
    if phase == "Failed" || phase == "Succeeded" {
        let said = status
            .container_statuses
            .iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
            .next()
            .unwrap_or_else(|| "no message".into());
        let message = format!(
            "import pod {namespace}/{pod_name} ended ({phase}): {}; fix the source, then delete the pod to import again",
            said.trim()
        );
        write_file_status(api, name, |s| {
            s.phase = Some("Failed".into());
            s.conditions = condition(false, "ImportFailed", &message);
        })
        .await?;
        return Ok(Action::await_change());
    }
    let Some(ip) = status.pod_ip.filter(|_| phase == "Running") else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let (pool, volume) = (pool.to_owned(), image::volume_name(namespace, name));
    // Recorded before the volume exists (as for any volume); the checksum
    // of an earlier, interrupted import is cleared.
    let (in_pool, as_volume) = (pool.clone(), volume.clone());
    write_file_status(api, name, |s| {
        s.pool = Some(in_pool);
        s.volume = Some(as_volume);
        s.format = Some(ImageFormat::Raw.as_str().to_owned());
        s.sha256 = None;
    })
    .await?;
    let address = format!("{ip}:{IMPORT_PORT}");
    let conn = context.conn.clone();
    let from = address.clone();
    let result = tokio::task::spawn_blocking(move || stream_in(&conn, &from, &pool, &volume))
        .await
        .map_err(|_| Error::Panicked)?;
    match result {
        Ok((bytes, sha256)) => {
            info!(%namespace, imagefile = %name, bytes, %sha256, "imported");
            write_file_status(api, name, |s| {
                s.phase = Some("Ready".into());
                s.sha256 = Some(sha256);
                s.conditions = condition(
                    true,
                    "Imported",
                    &format!("imported {bytes} bytes from {}", source.image),
                );
            })
            .await?;
            let _ = pods.delete(&pod_name, &DeleteParams::default().grace_period(0)).await;
            Ok(Action::requeue(Duration::ZERO))
        }
        Err(e) => {
            write_file_status(api, name, |s| {
                s.phase = Some("Creating".into());
                s.conditions = condition(false, "Importing", &format!("reading {address}: {e}; retrying"));
            })
            .await?;
            Err(Error::Import(e))
        }
    }
}

/// Reads the file an import pod serves at `address` into a new raw volume
/// of its exact size; its length and SHA-256. A failure leaves no volume.
fn stream_in(conn: &Connect, address: &str, pool: &str, volume: &str) -> Result<(u64, String), String> {
    let target: std::net::SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
    let socket = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut writer = socket.try_clone().map_err(|e| e.to_string())?;
    writer
        .write_all(b"GET / HTTP/1.0\r\nHost: import\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::with_capacity(1 << 20, socket);
    let mut head = String::new();
    {
        // The head is at most 8 KiB, however the pod sends it.
        let mut limited = (&mut reader).take(8192);
        loop {
            let mut line = String::new();
            if limited.read_line(&mut line).map_err(|e| e.to_string())? == 0 || !line.ends_with('\n') {
                return Err("the import pod's reply head is cut short or longer than 8 KiB".into());
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
    }
    let length = storage::import_length(&head)?;
    if length == 0 {
        return Err("the file to import is empty".into());
    }
    let plan = storage::VolumePlan {
        name: volume.to_owned(),
        capacity: length,
        format: ImageFormat::Raw,
        preallocation: Preallocation::Off,
        backing: None,
        owner: qemu_owner(),
    };
    let pool = conn.lookup_storage_pool_by_name(pool).map_err(|e| e.to_string())?;
    let vol = StorageVol::create_xml(&pool, &plan.xml().0, 0).map_err(|e| e.to_string())?;
    // A pod that sends slowly is dropped: at least 1 MiB/s, after a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60 + length / (1 << 20));
    let copied = upload(conn, &vol, &mut reader, length, deadline);
    if copied.is_err() {
        let _ = vol.delete(0);
    }
    copied.map(|sha| (length, sha))
}

fn upload(
    conn: &Connect,
    vol: &StorageVol,
    from: &mut impl Read,
    length: u64,
    deadline: std::time::Instant,
) -> Result<String, String> {
    let stream = virt::stream::Stream::new(conn, 0).map_err(|e| e.to_string())?;
    vol.upload(&stream, 0, length, 0).map_err(|e| e.to_string())?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = length;
    let mut buffer = vec![0u8; 1 << 20];
    while left > 0 {
        if std::time::Instant::now() > deadline {
            let _ = stream.abort();
            return Err(format!(
                "the import pod sent too slowly ({left} bytes left at the deadline)"
            ));
        }
        let want = usize::try_from(left.min(buffer.len() as u64)).unwrap_or(buffer.len());
        let n = match from.read(&mut buffer[..want]) {
            Ok(0) => {
                let _ = stream.abort();
                return Err(format!("the import pod's reply ended {left} bytes short"));
            }
            Ok(n) => n,
            Err(e) => {
                let _ = stream.abort();
                return Err(e.to_string());
            }
        };
        digest.update(&buffer[..n]);
        let mut sent = 0;
        while sent < n {
            match stream.send(&buffer[sent..n]) {
                Ok(k) if k > 0 => sent += k.unsigned_abs(),
                Ok(_) => {
                    let _ = stream.abort();
                    return Err("libvirt accepted no bytes of the upload".into());
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(e.to_string());
                }
            }
        }
        left -= n as u64;
    }
    stream.finish().map_err(|e| e.to_string())?;
    Ok(digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_pod_names_fit_and_never_collide() {
        let uid = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
        assert_eq!(import_pod_name("golden", uid), "golden-import");
        let long = "a".repeat(60) + "-b";
        let pod = import_pod_name(&long, uid);
        assert_eq!(pod, format!("import-{uid}"));
        assert!(pod.len() <= 63);
        assert_ne!(import_pod_name(&("a".repeat(60) + "-c"), "another-uid"), pod);
    }
}
