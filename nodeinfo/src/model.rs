//! Pure construction of what nodeinfo publishes: the VirtNode status, the Node
//! labels, and VirtDomain objects, from facts gathered from libvirt.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use virtkube_api::domain::QemuProcess;
use virtkube_api::labels as keys;
use virtkube_api::node::{Condition, PciDevice, VirtNodeStatus};
use virtkube_api::quantity::format_bytes;
use virtkube_api::{VirtDomain, VirtDomainSpec, VirtDomainStatus};

use crate::facts::{Capabilities, DomainCapabilities, Owner};

/// Label on each VirtDomain naming the node that published it, so a node's
/// nodeinfo finds (and deletes) only its own stale VirtDomains.
pub const NODE_LABEL: &str = "virtkube.io/node";

/// Everything read from libvirt about the host.
#[derive(Debug, Clone, Default)]
pub struct HostSnapshot {
    /// Capabilities.
    pub caps: Capabilities,
    /// Domain capabilities of the best virt type (kvm if offered, else qemu).
    pub domcaps: Option<DomainCapabilities>,
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in KiB.
    pub memory_kib: u64,
    /// libvirt version number (major·10⁶ + minor·10³ + micro).
    pub libvirt_version: u32,
    /// Hypervisor version number.
    pub hypervisor_version: u32,
    /// PCI devices.
    pub pci: Vec<PciDevice>,
    /// Running domains.
    pub domains: u32,
}

/// One domain as read from libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSnapshot {
    /// Domain name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// virtkube owner metadata.
    pub owner: Owner,
    /// State name (`Running`, …).
    pub state: String,
    /// Reason name.
    pub reason: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in KiB.
    pub memory_kib: u64,
    /// CPU time in ns.
    pub cpu_time_ns: u64,
    /// Its QEMU process, when the node's state shows it.
    pub qemu: Option<QemuProcess>,
    /// Reattachments the gate counted.
    pub reattachments: Option<u32>,
    /// How long its QEMU has run, in seconds.
    pub qemu_uptime_secs: Option<u64>,
    /// Processes the kernel killed for memory so far in QEMU's memory cgroup.
    pub oom_kills: Option<u64>,
    /// Its disks and where each one's data comes from.
    pub disks: Vec<virtkube_api::domain::DomainDisk>,
    /// Its network interfaces.
    pub interfaces: Vec<virtkube_api::domain::DomainInterface>,
    /// It carries nodeinfo's mark of a pause `spec.runState` asked for.
    pub paused_by_request: bool,
}

/// What nodeinfo remembers of a domain it published, to tell what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub uid: Option<String>,
    /// When nodeinfo first saw the domain (RFC 3339): the VirtDomain's start time.
    pub start: String,
    /// Its QEMU's PID.
    pub qemu_pid: Option<u32>,
    /// QEMU's memory cgroup, and the kills for memory counted there then.
    pub memory: Option<(String, Option<u64>)>,
    /// Reattachments the gate had counted.
    pub reattachments: u32,
}

impl Seen {
    /// What to remember of `d`, first seen at `start`.
    pub fn of(d: &DomainSnapshot, start: String) -> Seen {
        Seen {
            namespace: d.owner.namespace.clone(),
            pod: d.owner.pod.clone(),
            uid: d.owner.uid.clone(),
            start,
            qemu_pid: d.qemu.as_ref().map(|q| q.pid),
            memory: d
                .qemu
                .as_ref()
                .and_then(|q| q.cgroup.clone())
                .map(|cgroup| (cgroup, d.oom_kills)),
            reattachments: d.reattachments.unwrap_or(0),
        }
    }
}

/// An event for the VM's pod, shown by `kubectl describe pod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// A Warning rather than a Normal event.
    pub warning: bool,
    /// `PascalCase` reason.
    pub reason: &'static str,
    /// What happened, for a person.
    pub note: String,
}

impl PodEvent {
    /// A Normal event.
    pub fn normal(reason: &'static str, note: String) -> PodEvent {
        PodEvent {
            warning: false,
            reason,
            note,
        }
    }
}

fn normal(reason: &'static str, note: String) -> PodEvent {
    PodEvent::normal(reason, note)
}

/// An operation on a VM that libvirt reported, for its pod's story.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happened {
    /// The machine was reset: a reset, a reboot (libvirt reboots by a
    /// reset), or the guest rebooting itself.
    Reset,
    /// The guest shut down; `by_guest`: the guest powered off (QEMU's word,
    /// also for an ACPI request from the host: `virtkube-shim shutdown`, the
    /// pod's stop), else the host stopped QEMU; `None`: libvirt does not know.
    ShutDown { by_guest: Option<bool> },
    /// The CPUs stopped for a reason other than a request (an I/O error, a
    /// watchdog): a request's pause is told by the run-state controller.
    PausedBy(&'static str),
}

impl Happened {
    /// From a lifecycle event (`virDomainEventType`, its detail).
    pub fn of_lifecycle(event: i32, detail: i32) -> Option<Happened> {
        match (event, detail) {
            // SHUTDOWN: FINISHED, GUEST, HOST.
            (6, 0) => Some(Happened::ShutDown { by_guest: None }),
            (6, 1) => Some(Happened::ShutDown { by_guest: Some(true) }),
            (6, 2) => Some(Happened::ShutDown { by_guest: Some(false) }),
            // SUSPENDED (virDomainEventSuspendedDetailType): IOERROR,
            // WATCHDOG, API_ERROR.
            (3, 2) => Some(Happened::PausedBy("a disk I/O error")),
            (3, 3) => Some(Happened::PausedBy("the guest's watchdog")),
            (3, 6) => Some(Happened::PausedBy("an error in libvirt")),
            _ => None,
        }
    }

    /// The pod event that tells it.
    pub fn event(self) -> PodEvent {
        match self {
            Happened::Reset => normal(
                "VMReset",
                "the machine was reset (a reboot or reset requested with virtkube-shim, or the guest rebooting itself)".into(),
            ),
            Happened::ShutDown { by_guest } => normal(
                "VMShutDown",
                match by_guest {
                    // QEMU says "guest" for every power-off the guest performs,
                    // also one an ACPI request from the host asked for.
                    Some(true) => "the guest powered off (asked by ACPI, such as virtkube-shim shutdown or the pod's stop, or on its own)".into(),
                    Some(false) => "QEMU was told to stop by the host, not by the guest".into(),
                    None => "the guest shut down".into(),
                },
            ),
            Happened::PausedBy(why) => PodEvent {
                warning: true,
                reason: "VMPaused",
                note: format!("the VM's CPUs were paused by {why}"),
            },
        }
    }
}

/// What the run-state controller does to a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStep {
    /// It is as asked (or not nodeinfo's to change).
    Nothing,
    /// Pause its CPUs.
    Suspend,
    /// Let them run again.
    Resume,
}

/// The step that brings a domain in `state` (`reason`) to `wanted`.
/// Only a pause nodeinfo made is undone (`paused_by_request`): a domain
/// created paused is paused by the gate until it is set up, and one paused
/// by an I/O error is not resumed blindly.
pub fn run_step(wanted: virtkube_api::domain::RunState, state: &str, reason: &str, paused_by_request: bool) -> RunStep {
    use virtkube_api::domain::RunState;
    match (wanted, state) {
        (RunState::Paused, "Running" | "Blocked") => RunStep::Suspend,
        (RunState::Running, "Paused") if paused_by_request && reason == "User" => RunStep::Resume,
        _ => RunStep::Nothing,
    }
}

/// How much older than nodeinfo a QEMU must be to have outlived a virthost
/// restart rather than started with it.
pub const KEPT_RUNNING_SLACK_SECS: u64 = 10;

/// The events a look at domain `now` adds to its pod's story, given what was
/// remembered `before` (`None`: first look by this nodeinfo, which has run
/// `nodeinfo_uptime_secs`). `count_kills` reads the kills for memory in a
/// cgroup now, for an old QEMU that ended unseen.
pub fn events_on_sight(
    before: Option<&Seen>,
    now: &DomainSnapshot,
    nodeinfo_uptime_secs: u64,
    count_kills: impl FnOnce(&str) -> Option<u64>,
) -> Vec<PodEvent> {
    let pid = now
        .qemu
        .as_ref()
        .map_or_else(|| "unknown".to_owned(), |q| q.pid.to_string());
    let reattachments = now.reattachments.unwrap_or(0);
    let Some(before) = before else {
        let kept = now
            .qemu_uptime_secs
            .is_some_and(|up| up > nodeinfo_uptime_secs + KEPT_RUNNING_SLACK_SECS);
        if !kept {
            return vec![normal(
                "VMStarted",
                format!("domain {} started on this node (QEMU PID {pid})", now.name),
            )];
        }
        let up = now.qemu_uptime_secs.unwrap_or(0);
        let reattached = match reattachments {
            0 => String::new(),
            1 => "; its shim has reattached once".to_owned(),
            n => format!("; its shim has reattached {n} times"),
        };
        return vec![normal(
            "VMKeptRunning",
            format!("the virthost restarted and this VM kept running: same QEMU (PID {pid}), up {up} s{reattached}"),
        )];
    };
    let mut events = Vec::new();
    // The same name, another QEMU: the domain ended (its events were
    // missed) and its container made a new one.
    if let (Some(then), Some(now_pid)) = (before.qemu_pid, now.qemu.as_ref().map(|q| q.pid))
        && then != now_pid
    {
        let kills_now = before.memory.as_ref().and_then(|(cgroup, _)| count_kills(cgroup));
        events.extend(events_on_end(before, &now.name, kills_now));
        events.push(normal(
            "VMStarted",
            format!("domain {} started on this node (QEMU PID {now_pid})", now.name),
        ));
        return events;
    }
    if reattachments > before.reattachments {
        events.push(normal(
            "VMReattached",
            format!(
                "the VM container lost its connection to the virthost and found its running VM again (QEMU PID {pid}; reattachment {reattachments})"
            ),
        ));
    }
    events
}

/// The events for a domain that is gone: a kill for memory in QEMU's cgroup
/// since it was last seen (`oom_kills_now` counted there now) is a Warning.
pub fn events_on_end(before: &Seen, name: &str, oom_kills_now: Option<u64>) -> Vec<PodEvent> {
    let pid = before.qemu_pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    if let Some((cgroup, Some(then))) = &before.memory
        && oom_kills_now.is_some_and(|now| now > *then)
    {
        return vec![PodEvent {
            warning: true,
            reason: "OOMKilled",
            note: format!(
                "the kernel killed QEMU (PID {pid}) for memory in cgroup {cgroup}: the pod's memory limit must hold the guest's memory and QEMU's overhead (use runtimeClassName: virtkube, or raise the limit)"
            ),
        }];
    }
    vec![normal(
        "VMEnded",
        format!("domain {name} is gone from this node (QEMU PID {pid})"),
    )]
}

/// `9000000` → `9.0.0`.
pub fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// The VirtNode status. `now` is the heartbeat time (RFC 3339).
pub fn node_status(host: &HostSnapshot, now: &str) -> VirtNodeStatus {
    let kvm = host.caps.domain_types.iter().any(|t| t == "kvm");
    let mut cpu = host.caps.cpu.clone();
    if let Some(model) = host.domcaps.as_ref().and_then(|d| d.host_model.clone()) {
        cpu.model = Some(model);
    }
    VirtNodeStatus {
        arch: host.caps.arch.clone(),
        kvm: Some(kvm),
        cpus: Some(host.cpus),
        memory: host.memory_kib.checked_mul(1024).map(format_bytes),
        domains: Some(host.domains),
        // libvirt reports 0 when it does not know: unknown, not "0.0.0".
        libvirt_version: (host.libvirt_version != 0).then(|| version_string(host.libvirt_version)),
        hypervisor_version: (host.hypervisor_version != 0).then(|| version_string(host.hypervisor_version)),
        host_cpu: Some(cpu),
        machine_types: host.caps.machine_types.clone(),
        cpu_models: host
            .domcaps
            .as_ref()
            .map(|d| d.usable_models.clone())
            .unwrap_or_default(),
        numa: host.caps.numa.clone(),
        pci_devices: host.pci.clone(),
        conditions: vec![ready(true, "LibvirtReachable", "nodeinfo reads libvirtd", now, None)],
    }
}

/// The `Ready` condition: whether libvirtd answers nodeinfo. Its transition
/// time is carried over from `previous` while the status stays the same.
pub fn ready(answers: bool, reason: &str, message: &str, now: &str, previous: Option<&Condition>) -> Condition {
    let status = if answers { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone().or_else(|| Some(now.to_owned())),
        _ => Some(now.to_owned()),
    };
    Condition {
        kind: "Ready".into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.to_owned()),
        last_transition_time,
    }
}

/// `status` with its `Ready` condition replaced, the transition time kept
/// when the condition's status did not change.
pub fn with_ready(
    mut status: VirtNodeStatus,
    answers: bool,
    reason: &str,
    message: &str,
    now: &str,
    previous: Option<&VirtNodeStatus>,
) -> VirtNodeStatus {
    let before = previous.and_then(|p| p.conditions.iter().find(|c| c.kind == "Ready"));
    status.conditions.retain(|c| c.kind != "Ready");
    status.conditions.push(ready(answers, reason, message, now, before));
    status
}

/// A label name part from a libvirt name: characters a label may not hold
/// become `-`, leading and trailing non-alphanumerics are dropped, and the
/// result is cut to 63 characters. `None` when nothing is left.
pub fn label_name(raw: &str) -> Option<String> {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut cut: String = trimmed.chars().take(63).collect();
    while cut.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        cut.pop();
    }
    (!cut.is_empty()).then_some(cut)
}

/// The scheduling labels of the Node.
pub fn node_labels(status: &VirtNodeStatus) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(keys::VIRTHOST.to_owned(), "true".to_owned());
    labels.insert(keys::KVM.to_owned(), status.kvm.unwrap_or(false).to_string());
    if let Some(arch) = status.arch.as_deref().and_then(label_name) {
        labels.insert(keys::ARCH.to_owned(), arch);
    }
    let groups: [(&str, Vec<&String>); 3] = [
        (keys::CPU_MODEL_DOMAIN, status.cpu_models.iter().collect()),
        (
            keys::CPU_FEATURE_DOMAIN,
            status.host_cpu.iter().flat_map(|c| c.features.iter()).collect(),
        ),
        (keys::MACHINE_TYPE_DOMAIN, status.machine_types.iter().collect()),
    ];
    for (domain, names) in groups {
        for name in names.into_iter().filter_map(|n| label_name(n)) {
            labels.insert(format!("{domain}/{name}"), "true".to_owned());
        }
    }
    labels
}

/// The VirtDomain object (for server-side apply), owned by its pod; `None`
/// without the pod's UID, which an owner reference needs.
pub fn virt_domain(node: &str, d: &DomainSnapshot, start_time: Option<&str>) -> Option<VirtDomain> {
    let uid = d.owner.uid.clone()?;
    Some(VirtDomain {
        metadata: ObjectMeta {
            name: Some(d.owner.pod.clone()),
            namespace: Some(d.owner.namespace.clone()),
            labels: Some(BTreeMap::from([(NODE_LABEL.to_owned(), node.to_owned())])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: d.owner.pod.clone(),
                uid,
                // Owned only for garbage collection: the pod keeps its own
                // controller, and deleting it never waits for the VirtDomain.
                block_owner_deletion: Some(false),
                controller: Some(false),
            }]),
            ..ObjectMeta::default()
        },
        spec: VirtDomainSpec {
            node: node.to_owned(),
            domain_name: d.name.clone(),
            uuid: Some(d.uuid.clone()),
            pod: Some(d.owner.pod.clone()),
            template: d.owner.template.clone(),
            // The user's: never applied by nodeinfo.
            run_state: None,
        },
        status: Some(VirtDomainStatus {
            state: Some(d.state.clone()),
            reason: Some(d.reason.clone()),
            vcpus: Some(d.vcpus),
            memory: d.memory_kib.checked_mul(1024).map(format_bytes),
            cpu_time_ns: Some(d.cpu_time_ns),
            start_time: start_time.map(str::to_owned),
            qemu: d.qemu.clone(),
            reattachments: d.reattachments,
            disks: d.disks.clone(),
            interfaces: d.interfaces.clone(),
            paused_by_request: d.paused_by_request && d.state == "Paused",
        }),
    })
}

/// libvirt's state number as a name.
pub fn state_name(state: u32) -> &'static str {
    match state {
        1 => "Running",
        2 => "Blocked",
        3 => "Paused",
        4 => "ShuttingDown",
        5 => "Shutoff",
        6 => "Crashed",
        7 => "PMSuspended",
        _ => "NoState",
    }
}

/// A reason number of a state as a name (the common ones).
pub fn reason_name(state: u32, reason: i32) -> String {
    let name = match (state, reason) {
        (1, 1) => "Booted",
        (1, 2) => "Migrated",
        (1, 3) => "Restored",
        (1, 5) => "Unpaused",
        // virDomainPausedReason.
        (3, 1) => "User",
        (3, 2) => "Migration",
        (3, 5) => "IOError",
        (3, 6) => "Watchdog",
        (3, 8) => "ShuttingDown",
        (3, 11) => "StartingUp",
        (3, 14) => "APIError",
        (5, 1) => "Shutdown",
        (5, 2) => "Destroyed",
        (5, 3) => "Crashed",
        (_, 0) => "Unknown",
        _ => return format!("Reason{reason}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::facts;

    #[test]
    fn label_names_are_label_safe() {
        assert_eq!(
            label_name("Skylake-Client-IBRS").as_deref(),
            Some("Skylake-Client-IBRS")
        );
        assert_eq!(label_name("sse4.2").as_deref(), Some("sse4.2"));
        assert_eq!(label_name("pc-i440fx-7.2").as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(label_name("Opteron_G5").as_deref(), Some("Opteron_G5"));
        assert_eq!(label_name("a+b/c d").as_deref(), Some("a-b-c-d"));
        assert_eq!(label_name("-x-").as_deref(), Some("x"));
        assert_eq!(label_name("+++"), None);
        let long = "a".repeat(70) + "-b";
        assert_eq!(label_name(&long).unwrap().len(), 63);
        assert_eq!(
            label_name(&("a".repeat(62) + "-b")).as_deref(),
            Some("a".repeat(62).as_str())
        );
    }

    fn host() -> HostSnapshot {
        HostSnapshot {
            caps: facts::parse_capabilities(include_str!("../tests/fixtures/qemu-capabilities.xml")).unwrap(),
            domcaps: Some(
                facts::parse_domain_capabilities(include_str!("../tests/fixtures/qemu-domcapabilities.xml")).unwrap(),
            ),
            cpus: 2,
            memory_kib: 24 << 20,
            libvirt_version: 9_000_000,
            hypervisor_version: 7_002_022,
            pci: vec![],
            domains: 3,
        }
    }

    #[test]
    fn node_status_from_the_fixtures() {
        let s = node_status(&host(), "2026-11-22T10:00:00Z");
        assert_eq!(
            (s.arch.as_deref(), s.kvm, s.cpus, s.memory.as_deref(), s.domains),
            (Some("x86_64"), Some(false), Some(2), Some("24Gi"), Some(3))
        );
        assert_eq!(s.libvirt_version.as_deref(), Some("9.0.0"));
        assert_eq!(s.hypervisor_version.as_deref(), Some("7.2.22"));
        assert!(s.cpu_models.iter().any(|m| m == "qemu64"));
        assert_eq!(
            s.conditions[0].last_heartbeat_time.as_deref(),
            Some("2026-11-22T10:00:00Z")
        );
    }

    #[test]
    fn labels_from_the_fixtures() {
        let labels = node_labels(&node_status(&host(), "t"));
        assert_eq!(labels["virtkube.io/kvm"], "false");
        assert_eq!(labels["virtkube.io/arch"], "x86_64");
        assert_eq!(
            labels.get("cpu-model.virtkube.io/qemu64").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            labels.get("machine-type.virtkube.io/q35").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            labels.get("cpu-feature.virtkube.io/sse4.2").map(String::as_str),
            Some("true")
        );
        for key in labels.keys() {
            let (prefix, name) = key.split_once('/').unwrap();
            assert!(prefix.len() <= 253 && name.len() <= 63, "{key}");
        }
    }

    fn snapshot() -> DomainSnapshot {
        DomainSnapshot {
            name: "ns_vm".into(),
            uuid: "u".into(),
            owner: Owner {
                namespace: "ns".into(),
                pod: "vm".into(),
                uid: Some("pod-uid".into()),
                template: Some("tiny".into()),
            },
            state: "Running".into(),
            reason: "Booted".into(),
            vcpus: 1,
            memory_kib: 131072,
            cpu_time_ns: 5,
            qemu: Some(QemuProcess {
                pid: 42,
                cgroup: Some("/kubepods/besteffort/podpod-uid/c".into()),
            }),
            reattachments: Some(2),
            qemu_uptime_secs: Some(600),
            oom_kills: Some(0),
            disks: vec![virtkube_api::domain::DomainDisk {
                target: "vda".into(),
                source: "containerFile".into(),
                path: Some("/disk/root.raw".into()),
                writes: "privateCopy".into(),
            }],
            interfaces: vec![virtkube_api::domain::DomainInterface {
                network: "pod".into(),
                mac: "52:54:00:aa:bb:cc".into(),
                binding: Some("masquerade".into()),
                guest_address: Some("10.0.2.2/24".into()),
            }],
            paused_by_request: false,
        }
    }

    #[test]
    fn a_pods_story_started_kept_running_reattached_ended() {
        let d = snapshot();
        // QEMU younger than this nodeinfo: it started now.
        let young = DomainSnapshot {
            qemu_uptime_secs: Some(3),
            reattachments: Some(0),
            ..d.clone()
        };
        let started = events_on_sight(None, &young, 5, |_| None);
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].reason, "VMStarted");
        assert!(started[0].note.contains("QEMU PID 42"), "{:?}", started[0]);
        // QEMU much older than nodeinfo: it outlived the virthost's restart.
        let kept = events_on_sight(None, &d, 5, |_| None);
        assert_eq!(kept[0].reason, "VMKeptRunning");
        assert!(kept[0].note.contains("same QEMU (PID 42), up 600 s"), "{:?}", kept[0]);
        assert!(kept[0].note.contains("reattached 2 times"), "{:?}", kept[0]);
        // Later looks: only a new reattachment is news.
        let seen = Seen::of(&d, "t".into());
        assert_eq!(events_on_sight(Some(&seen), &d, 500, |_| None), []);
        let again = DomainSnapshot {
            reattachments: Some(3),
            ..d.clone()
        };
        let reattached = events_on_sight(Some(&seen), &again, 500, |_| None);
        assert_eq!(reattached.len(), 1);
        assert_eq!(reattached[0].reason, "VMReattached");
        assert!(reattached[0].note.contains("reattachment 3"), "{:?}", reattached[0]);
        assert!(!reattached[0].warning);
        // The end: plain, or killed for memory in the cgroup last seen.
        let ended = events_on_end(&seen, "ns_vm", Some(0));
        assert_eq!((ended[0].reason, ended[0].warning), ("VMEnded", false));
        let killed = events_on_end(&seen, "ns_vm", Some(1));
        assert_eq!((killed[0].reason, killed[0].warning), ("OOMKilled", true));
        assert!(
            killed[0].note.contains("/kubepods/besteffort/podpod-uid/c"),
            "{:?}",
            killed[0]
        );
        // Another QEMU under the same name: the old one ended, a new one started.
        let replaced = DomainSnapshot {
            qemu: Some(QemuProcess { pid: 43, cgroup: None }),
            ..d.clone()
        };
        let reasons = |kills: Option<u64>| -> Vec<&str> {
            events_on_sight(Some(&seen), &replaced, 500, |_| kills)
                .iter()
                .map(|e| e.reason)
                .collect()
        };
        assert_eq!(reasons(Some(0)), ["VMEnded", "VMStarted"]);
        // …killed for memory in its cgroup, as counted now.
        assert_eq!(reasons(Some(1)), ["OOMKilled", "VMStarted"]);
        // No count then or now: no claim of a kill.
        let unknown = Seen { memory: None, ..seen };
        assert_eq!(events_on_end(&unknown, "ns_vm", Some(9))[0].reason, "VMEnded");
    }

    #[test]
    fn virt_domains_need_an_owner_pod_uid() {
        let mut d = snapshot();
        let v = virt_domain("node-1", &d, Some("2026-11-22T10:00:00Z")).unwrap();
        let owner = &v.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "pod-uid"));
        assert_eq!(v.metadata.labels.as_ref().unwrap()[NODE_LABEL], "node-1");
        assert_eq!(v.status.as_ref().unwrap().memory.as_deref(), Some("128Mi"));
        assert_eq!(v.status.as_ref().unwrap().reattachments, Some(2));
        assert_eq!(v.status.as_ref().unwrap().qemu.as_ref().map(|q| q.pid), Some(42));
        assert_eq!(v.spec.template.as_deref(), Some("tiny"));
        // The object as sent: apiVersion and kind (server-side apply needs
        // them), and every field with the values it had as hand-built JSON.
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!({
                "apiVersion": "virtkube.io/v1alpha1",
                "kind": "VirtDomain",
                "metadata": {
                    "name": "vm",
                    "namespace": "ns",
                    "labels": {"virtkube.io/node": "node-1"},
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Pod", "name": "vm", "uid": "pod-uid",
                        "blockOwnerDeletion": false, "controller": false
                    }]
                },
                "spec": {"node": "node-1", "domainName": "ns_vm", "uuid": "u", "pod": "vm", "template": "tiny"},
                "status": {
                    "state": "Running", "reason": "Booted", "vcpus": 1, "memory": "128Mi",
                    "cpuTimeNs": 5, "startTime": "2026-11-22T10:00:00Z",
                    "qemu": {"pid": 42, "cgroup": "/kubepods/besteffort/podpod-uid/c"},
                    "reattachments": 2,
                    "disks": [{"target": "vda", "source": "containerFile", "path": "/disk/root.raw", "writes": "privateCopy"}],
                    "interfaces": [{"network": "pod", "mac": "52:54:00:aa:bb:cc", "binding": "masquerade", "guestAddress": "10.0.2.2/24"}]
                }
            })
        );
        // Unknown values are left out (the hand-built JSON sent them as null).
        d.owner.template = None;
        d.memory_kib = u64::MAX;
        let v = serde_json::to_value(virt_domain("node-1", &d, None).unwrap()).unwrap();
        assert!(v["spec"].get("template").is_none(), "{v}");
        assert!(v["status"].get("memory").is_none(), "{v}");
        assert!(v["status"].get("startTime").is_none(), "{v}");
        d.owner.uid = None;
        assert!(virt_domain("node-1", &d, None).is_none());
    }

    #[test]
    fn ready_says_whether_libvirtd_answers_and_when_that_changed() {
        let up = node_status(&host(), "t1");
        let up_again = with_ready(
            node_status(&host(), "t2"),
            true,
            "LibvirtReachable",
            "ok",
            "t2",
            Some(&up),
        );
        let ready = |s: &VirtNodeStatus| s.conditions.iter().find(|c| c.kind == "Ready").cloned().unwrap();
        assert_eq!(
            ready(&up_again).last_transition_time.as_deref(),
            Some("t1"),
            "unchanged: transition kept"
        );
        assert_eq!(ready(&up_again).last_heartbeat_time.as_deref(), Some("t2"));
        let down = with_ready(
            up_again.clone(),
            false,
            "LibvirtUnreachable",
            "connection refused",
            "t3",
            Some(&up_again),
        );
        assert_eq!(ready(&down).status, "False");
        assert_eq!(ready(&down).reason.as_deref(), Some("LibvirtUnreachable"));
        assert_eq!(ready(&down).last_transition_time.as_deref(), Some("t3"));
        assert_eq!(down.conditions.len(), 1);
    }

    #[test]
    fn unknown_versions_are_absent_not_zero() {
        let mut h = host();
        h.hypervisor_version = 0;
        assert_eq!(node_status(&h, "t").hypervisor_version, None);
        h.memory_kib = u64::MAX;
        assert_eq!(
            node_status(&h, "t").memory,
            None,
            "KiB × 1024 overflowed: absent, not wrapped"
        );
    }

    #[test]
    fn state_reasons_are_libvirts_numbers() {
        // virDomainPausedReason: USER 1, MIGRATION 2, IOERROR 5, STARTING_UP 11.
        assert_eq!(reason_name(3, 1), "User");
        assert_eq!(reason_name(3, 2), "Migration");
        assert_eq!(reason_name(3, 5), "IOError");
        assert_eq!(reason_name(3, 11), "StartingUp");
        // virDomainRunningReason BOOTED 1, UNPAUSED 5; virDomainShutoffReason SHUTDOWN 1.
        assert_eq!(reason_name(1, 1), "Booted");
        assert_eq!(reason_name(1, 5), "Unpaused");
        assert_eq!(reason_name(5, 1), "Shutdown");
        assert_eq!(reason_name(3, 99), "Reason99");
    }

    #[test]
    fn run_state_pauses_a_running_vm_and_resumes_only_its_own_pause() {
        use virtkube_api::domain::RunState::{Paused, Running};
        assert_eq!(run_step(Paused, "Running", "Booted", false), RunStep::Suspend);
        assert_eq!(run_step(Paused, "Blocked", "Unknown", false), RunStep::Suspend);
        assert_eq!(run_step(Paused, "Paused", "User", true), RunStep::Nothing);
        assert_eq!(run_step(Running, "Paused", "User", true), RunStep::Resume);
        // Paused by the gate while it starts, or by an I/O error: not ours.
        assert_eq!(run_step(Running, "Paused", "User", false), RunStep::Nothing);
        assert_eq!(run_step(Running, "Paused", "IOError", true), RunStep::Nothing);
        assert_eq!(run_step(Running, "Running", "Booted", false), RunStep::Nothing);
        assert_eq!(run_step(Paused, "Shutoff", "Shutdown", false), RunStep::Nothing);
    }

    #[test]
    fn a_paused_domain_says_whether_a_request_paused_it() {
        let mut d = snapshot();
        d.state = "Paused".into();
        let status = |d: &DomainSnapshot| virt_domain("node-1", d, None).unwrap().status.unwrap();
        d.paused_by_request = true;
        assert!(status(&d).paused_by_request);
        d.paused_by_request = false;
        assert!(!status(&d).paused_by_request);
        d.state = "Running".into();
        d.paused_by_request = true;
        assert!(!status(&d).paused_by_request);
        // nodeinfo never applies the user's field.
        let json = serde_json::to_value(virt_domain("node-1", &d, None).unwrap()).unwrap();
        assert!(json["spec"].get("runState").is_none(), "{json}");
    }

    #[test]
    fn operations_libvirt_reports_become_pod_events() {
        assert_eq!(
            Happened::of_lifecycle(6, 2),
            Some(Happened::ShutDown { by_guest: Some(false) })
        );
        assert_eq!(
            Happened::of_lifecycle(6, 1),
            Some(Happened::ShutDown { by_guest: Some(true) })
        );
        // libvirt's numbers (libvirt-domain.h): SUSPENDED_IOERROR is 2, WATCHDOG 3.
        assert_eq!(
            Happened::of_lifecycle(3, 2).map(|h| h.event()),
            Some(PodEvent {
                warning: true,
                reason: "VMPaused",
                note: "the VM's CPUs were paused by a disk I/O error".into()
            })
        );
        assert_eq!(
            Happened::of_lifecycle(3, 3),
            Some(Happened::PausedBy("the guest's watchdog"))
        );
        // A pause by request (detail 0) is told by the run-state controller;
        // a migration's (1), start, stop, resume are told elsewhere or not at all.
        for (event, detail) in [(3, 0), (3, 1), (4, 0), (2, 0), (5, 0), (5, 1)] {
            assert_eq!(Happened::of_lifecycle(event, detail), None, "{event}/{detail}");
        }
        let reset = Happened::Reset.event();
        assert_eq!((reset.reason, reset.warning), ("VMReset", false));
        assert!(
            Happened::ShutDown { by_guest: Some(true) }
                .event()
                .note
                .contains("virtkube-shim shutdown")
        );
    }
}
