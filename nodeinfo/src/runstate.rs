//! The run-state controller: carries out `spec.runState` of this node's
//! VirtDomains (pause and resume) through nodeinfo's own libvirt connection
//! — a VM pod gains no new power through the gate — and tells each on the
//! VM's pod as an event. A kube-runtime Controller over the VirtDomains
//! labelled with this node; the decision is [`model::run_step`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kube::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use tracing::{info, warn};
use virt::connect::Connect;
use virtkube_api::VirtDomain;

use crate::model::{self, NODE_LABEL, PodEvent, RunStep};
use crate::publish::Publisher;

/// The domains nodeinfo paused because their `spec.runState` asked, by
/// name: only these it resumes. Shared with the publisher, which reports
/// it in `status.pausedByRequest` (from where a restarted nodeinfo learns
/// it again).
pub type PausedByRequest = Arc<Mutex<BTreeSet<String>>>;

/// Whether `name` is paused by request.
pub fn is_paused_by_request(paused: &PausedByRequest, name: &str) -> bool {
    paused.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
}

struct Context {
    conn: Arc<Connect>,
    publisher: Publisher,
    paused: PausedByRequest,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Libvirt(String),
    #[error("a libvirt call panicked")]
    Panicked,
}

/// Runs until dropped: reconciles every VirtDomain of `node` as it changes.
pub async fn run(
    client: kube::Client,
    node: String,
    conn: Arc<Connect>,
    publisher: Publisher,
    paused: PausedByRequest,
) {
    let api: Api<VirtDomain> = Api::all(client);
    let config = watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"));
    let context = Arc::new(Context {
        conn,
        publisher,
        paused,
    });
    Controller::new(api, config)
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            if let Err(e) = result {
                warn!("run state not reconciled: {e}");
            }
            std::future::ready(())
        })
        .await;
}

async fn reconcile(vd: Arc<VirtDomain>, context: Arc<Context>) -> Result<Action, Error> {
    let name = vd.spec.domain_name.clone();
    let wanted = vd.spec.run_state.unwrap_or_default();
    let recorded = vd.status.as_ref().is_some_and(|s| s.paused_by_request);
    if recorded {
        // A nodeinfo before this one paused it.
        context
            .paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
    }
    let conn = context.conn.clone();
    let lookup = name.clone();
    let state = tokio::task::spawn_blocking(move || crate::collect::domain_state(&conn, &lookup))
        .await
        .map_err(|_| Error::Panicked)?
        .map_err(Error::Libvirt)?;
    let Some((state, reason)) = state else {
        return Ok(Action::await_change());
    };
    let (state, reason) = (model::state_name(state), model::reason_name(state, reason));
    let step = model::run_step(wanted, state, &reason, is_paused_by_request(&context.paused, &name));
    let run = match step {
        RunStep::Nothing => return Ok(Action::await_change()),
        RunStep::Suspend => false,
        RunStep::Resume => true,
    };
    let conn = context.conn.clone();
    let target = name.clone();
    tokio::task::spawn_blocking(move || crate::collect::set_running(&conn, &target, run))
        .await
        .map_err(|_| Error::Panicked)?
        .map_err(Error::Libvirt)?;
    {
        let mut paused = context.paused.lock().unwrap_or_else(|p| p.into_inner());
        if run {
            paused.remove(&name);
        } else {
            paused.insert(name.clone());
        }
    }
    let namespace = vd.metadata.namespace.clone().unwrap_or_default();
    let pod = vd
        .spec
        .pod
        .clone()
        .or_else(|| vd.metadata.name.clone())
        .unwrap_or_default();
    info!(%namespace, %pod, domain = %name, paused = !run, "run state carried out");
    let event = if run {
        PodEvent::normal(
            "VMResumed",
            "the VM's CPUs run again, as its VirtDomain's spec.runState asks".into(),
        )
    } else {
        PodEvent::normal(
            "VMPaused",
            "the VM's CPUs are paused, as its VirtDomain's spec.runState asks (Running resumes them)".into(),
        )
    };
    let uid = vd
        .metadata
        .owner_references
        .as_ref()
        .and_then(|owners| owners.iter().find(|o| o.kind == "Pod"))
        .map(|o| o.uid.clone());
    if let Err(e) = context.publisher.event_on_pod(&namespace, &pod, uid, &event).await {
        warn!(%namespace, %pod, "event not published: {e}");
    }
    // The lifecycle event that follows republishes the status.
    Ok(Action::await_change())
}

fn error_policy(_vd: Arc<VirtDomain>, error: &Error, _context: Arc<Context>) -> Action {
    warn!("run state: {error}; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}
