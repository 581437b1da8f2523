//! The run-state controller: carries out `spec.runState` of this node's
//! VirtDomains (pause and resume) through nodeinfo's own libvirt connection
//! — a VM pod gains no new power through the gate — and tells each on the
//! VM's pod as an event. A kube-runtime Controller over the VirtDomains
//! labelled with this node; the decision is [`model::run_step`].
//!
//! Whoever may patch a VirtDomain may write all of its spec, so nothing in
//! it names what to act on: the domain is `<namespace>_<name>` of the
//! VirtDomain itself, and its owner record (written by the gate) must name
//! that namespace and pod. A pause nodeinfo made is marked on the domain
//! itself ([`crate::facts::RUN_STATE_XMLNS`]), so only that pause is undone,
//! whatever nodeinfo remembers or forgets.

use std::sync::Arc;
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

struct Context {
    conn: Arc<Connect>,
    publisher: Publisher,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Libvirt(String),
    #[error("a libvirt call panicked")]
    Panicked,
}

/// Runs until dropped: reconciles every VirtDomain of `node` as it changes.
pub async fn run(client: kube::Client, node: String, conn: Arc<Connect>, publisher: Publisher) {
    let api: Api<VirtDomain> = Api::all(client);
    let config = watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"));
    let context = Arc::new(Context { conn, publisher });
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

/// The domain a VirtDomain stands for: named after its own namespace and
/// name, never after anything in its spec.
pub fn domain_of(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

async fn reconcile(vd: Arc<VirtDomain>, context: Arc<Context>) -> Result<Action, Error> {
    let namespace = vd.metadata.namespace.clone().unwrap_or_default();
    let pod = vd.metadata.name.clone().unwrap_or_default();
    let name = domain_of(&namespace, &pod);
    let wanted = vd.spec.run_state.unwrap_or_default();
    let conn = context.conn.clone();
    let lookup = name.clone();
    let snapshot = tokio::task::spawn_blocking(move || crate::collect::domain_by_name(&conn, &lookup))
        .await
        .map_err(|_| Error::Panicked)?
        .map_err(Error::Libvirt)?;
    let Some(domain) = snapshot else {
        return Ok(Action::await_change());
    };
    if domain.owner.namespace != namespace || domain.owner.pod != pod {
        warn!(%namespace, %pod, domain = %name, "run state not carried out: the domain is not this VirtDomain's pod's");
        return Ok(Action::await_change());
    }
    let step = model::run_step(wanted, &domain.state, &domain.reason, domain.paused_by_request);
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
    if let Err(e) = context
        .publisher
        .event_on_pod(&namespace, &pod, domain.owner.uid.clone(), &event)
        .await
    {
        warn!(%namespace, %pod, "event not published: {e}");
    }
    // The lifecycle event that follows republishes the status.
    Ok(Action::await_change())
}

fn error_policy(_vd: Arc<VirtDomain>, error: &Error, _context: Arc<Context>) -> Action {
    warn!("run state: {error}; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_is_the_virtdomains_own_not_its_specs() {
        assert_eq!(domain_of("team-a", "vm-0"), "team-a_vm-0");
    }
}
