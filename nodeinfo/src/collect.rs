//! Reading libvirt through the `virt` crate (libvirt.so; dynamic linking is
//! fine in the virthost image), and lifecycle events from libvirt's default
//! event loop running in its own thread.
//!
//! Every call here blocks until libvirtd answers: async callers run them on
//! tokio's blocking pool.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::facts::{self, DomainCapabilities};
use crate::model::{self, DomainSnapshot, HostSnapshot};

/// A libvirt error as text.
pub type Error = String;

fn err(what: &str) -> impl Fn(virt::error::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Reads the host's facts.
static FREE_PAGES_WARNED: AtomicBool = AtomicBool::new(false);
static BASELINE_WARNED: AtomicBool = AtomicBool::new(false);

/// A host fact libvirt cannot give is the same at every resync: said once
/// at warn, then at debug.
fn warn_once(warned: &AtomicBool, message: String) {
    if warned.swap(true, Ordering::Relaxed) {
        debug!("{message}");
    } else {
        warn!("{message} (said once; later at debug level)");
    }
}

pub fn host(conn: &Connect) -> Result<HostSnapshot, Error> {
    let capabilities = conn.capabilities().map_err(err("capabilities"))?;
    let mut caps = facts::parse_capabilities(&capabilities).map_err(|e| e.to_string())?;
    // Capabilities list only the features beyond the CPU's model; libvirt's
    // baseline expands the model, so a feature inside it counts too.
    if let Some(cpu) = facts::host_cpu_xml(&capabilities) {
        match conn
            .baseline_cpu(&[&cpu], sys::VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES)
            .map_err(|e| e.to_string())
            .and_then(|xml| facts::parse_expanded_features(&xml).map_err(|e| e.to_string()))
        {
            Ok(features) if !features.is_empty() => caps.cpu.features = features,
            Ok(_) => {}
            Err(e) => warn_once(
                &BASELINE_WARNED,
                format!("the host CPU's features not expanded (only those beyond its model are listed): {e}"),
            ),
        }
    }
    // Free huge pages per cell (what a scheduler can still give a VM); a
    // failure leaves them unknown, and is logged.
    for cell in &mut caps.numa {
        for pages in &mut cell.hugepages {
            let Ok(size) = u32::try_from(pages.size_kib) else {
                continue;
            };
            match conn.free_pages(&[size], cell.id, 1, 0) {
                Ok(free) => pages.free = free.first().copied(),
                Err(e) => warn_once(
                    &FREE_PAGES_WARNED,
                    format!("free huge pages not read (cell {}, {size} KiB): {e}", cell.id),
                ),
            }
        }
    }
    for skipped in &caps.skipped {
        warn!("capabilities: skipped {skipped}");
    }
    let virt_type = if caps.domain_types.iter().any(|t| t == "kvm") {
        "kvm"
    } else {
        "qemu"
    };
    let domcaps = if caps.domain_types.iter().any(|t| t == virt_type) {
        match conn.domain_capabilities(None, caps.arch.as_deref(), None, Some(virt_type), 0) {
            Ok(xml) => facts::parse_domain_capabilities(&xml)
                .map_err(|e| warn!("domain capabilities for {virt_type} not parsed: {e}"))
                .ok(),
            Err(e) => {
                warn!("domain capabilities for {virt_type}: {e}");
                None
            }
        }
    } else {
        None::<DomainCapabilities>
    };
    let info = conn.node_info().map_err(err("node info"))?;
    let domains = conn.num_of_domains().map_err(err("number of domains"))?;
    Ok(HostSnapshot {
        caps,
        domcaps,
        cpus: info.cpus,
        memory_kib: info.memory,
        libvirt_version: conn.lib_version().map_err(err("libvirt version"))?,
        hypervisor_version: conn.hyp_version().unwrap_or(0),
        pci: pci_devices(conn),
        domains,
    })
}

fn pci_devices(conn: &Connect) -> Vec<virtkube_api::node::PciDevice> {
    let devices = match conn.list_all_node_devices(sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV) {
        Ok(devices) => devices,
        Err(e) => {
            warn!("PCI devices not listed: {e}");
            return Vec::new();
        }
    };
    devices
        .iter()
        .filter_map(|d| d.xml_desc(0).ok())
        .filter_map(|xml| match facts::parse_pci_device(&xml) {
            Ok(dev) => dev,
            Err(e) => {
                warn!("skipped a PCI device: {e}");
                None
            }
        })
        .collect()
}

/// Reads one domain; `None` when virtkube does not own it.
pub fn domain(dom: &Domain) -> Result<Option<DomainSnapshot>, Error> {
    let xml = dom.xml_desc(0).map_err(err("domain XML"))?;
    let Some(owner) = facts::parse_owner(&xml).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let (state, reason) = raw_state(dom)?;
    let info = dom.info().map_err(err("domain info"))?;
    let name = dom.name().map_err(err("domain name"))?;
    let qemu = qemu_process(&name);
    Ok(Some(DomainSnapshot {
        qemu_uptime_secs: qemu.as_ref().and_then(|q| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", q.pid)).ok()?;
            facts::process_uptime_secs(&stat, &std::fs::read_to_string("/proc/uptime").ok()?)
        }),
        oom_kills: qemu.as_ref().and_then(|q| oom_kills_in(q.cgroup.as_deref()?)),
        qemu,
        reattachments: facts::parse_reattachments(&xml),
        paused_by_request: facts::parse_paused_by_request(&xml),
        interfaces: facts::parse_interfaces(&xml).unwrap_or_else(|e| {
            warn!(
                "domain {}: its interfaces are not listed: {e}",
                dom.name().unwrap_or_default()
            );
            Vec::new()
        }),
        disks: facts::parse_disks(&xml).unwrap_or_else(|e| {
            warn!(
                "domain {}: its disks are not listed: {e}",
                dom.name().unwrap_or_default()
            );
            Vec::new()
        }),
        name,
        uuid: dom.uuid_string().map_err(err("domain uuid"))?,
        owner,
        state: model::state_name(state).to_owned(),
        reason: model::reason_name(state, reason),
        vcpus: info.nr_virt_cpu,
        memory_kib: info.memory,
        cpu_time_ns: info.cpu_time,
    }))
}

/// Where libvirtd's QEMU driver writes `<domain>.pid` (libvirtd's own run
/// directory: nodeinfo runs beside it in the virthost).
const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";

/// Domain `name`'s QEMU: its PID from libvirtd's PID file, and its cgroup
/// (with the host's PID namespace, /proc shows it).
fn qemu_process(name: &str) -> Option<virtkube_api::domain::QemuProcess> {
    let pid: u32 = std::fs::read_to_string(format!("{QEMU_RUN_DIR}/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| facts::memory_cgroup(&text));
    Some(virtkube_api::domain::QemuProcess { pid, cgroup })
}

/// Kills for memory so far in memory cgroup `cgroup` (a path in the v1
/// memory hierarchy or the v2 one, as `/proc/<pid>/cgroup` names it), read
/// from the host's cgroupfs that the virthost mounts.
pub fn oom_kills_in(cgroup: &str) -> Option<u64> {
    let relative = cgroup.trim_start_matches('/');
    if relative.split('/').any(|c| c == "..") {
        return None;
    }
    [
        format!("/sys/fs/cgroup/memory/{relative}/memory.oom_control"),
        format!("/sys/fs/cgroup/{relative}/memory.events"),
    ]
    .iter()
    .find_map(|file| std::fs::read_to_string(file).ok())
    .as_deref()
    .and_then(facts::oom_kills)
}

/// The domain's state and reason as libvirt's numbers (the `virt` crate's
/// nested enums add nothing here).
fn raw_state(dom: &Domain) -> Result<(u32, i32), Error> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: `dom` wraps a valid domain pointer for the duration of the call,
    // and both out-parameters point to live c_ints.
    let rc = unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(format!("domain state: {}", virt::error::Error::last_error()));
    }
    Ok((u32::try_from(state).unwrap_or(0), reason))
}

/// Reads every running virtkube domain.
/// The running domains, and the names of those that could not be read
/// although they still exist (a transient libvirt error): their VirtDomains
/// must be kept, not deleted as if the domain were gone.
pub fn domains(conn: &Connect) -> Result<(Vec<DomainSnapshot>, Vec<String>), Error> {
    let all = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(err("list domains"))?;
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    for dom in &all {
        match domain(dom) {
            Ok(Some(d)) => out.push(d),
            Ok(None) => {}
            // Vanished between the listing and the read: nothing to keep.
            Err(_) if is_gone(dom) => {}
            Err(e) => {
                let name = dom.name().ok();
                warn!(
                    domain = name.as_deref(),
                    "a domain could not be read (kept as published): {e}"
                );
                unreadable.extend(name);
            }
        }
    }
    Ok((out, unreadable))
}

/// Reads the domain an event named. `Ok(None)` when libvirt says it is gone
/// (or it is not virtkube's); an error when it exists but could not be read,
/// so that its VirtDomain is kept rather than deleted.
pub fn domain_by_name(conn: &Connect, name: &str) -> Result<Option<DomainSnapshot>, Error> {
    let dom = match conn.lookup_domain_by_name(name) {
        Ok(dom) => dom,
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => return Err(format!("lookup: {e}")),
    };
    match domain(&dom) {
        Ok(Some(snapshot)) if !is_gone(&dom) => Ok(Some(snapshot)),
        Ok(_) => Ok(None),
        Err(_) if is_gone(&dom) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether libvirt says the domain is gone (undefined or no longer running),
/// as opposed to failing to answer.
pub fn is_gone(dom: &Domain) -> bool {
    match dom.is_active() {
        Ok(active) => !active,
        Err(e) => is_no_domain(&e),
    }
}

/// libvirt's "no such domain".
pub fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoDomain)
}

static EVENT_LOOP: Once = Once::new();

/// Starts libvirt's default event loop in its own thread (once per process).
/// Must run before the connection that registers callbacks is opened.
pub fn start_event_loop() -> Result<(), Error> {
    let mut result = Ok(());
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            result = Err(format!("cannot register libvirt's event loop: {e}"));
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        warn!("libvirt event loop: {e}; running it again");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|e| result = Err(format!("cannot start the event thread: {e}")));
    });
    result
}

/// Pauses (`run` false) or resumes domain `name`'s CPUs, marking a pause
/// as requested ([`facts::RUN_STATE_XMLNS`]): the mark is set before the
/// pause (so no look at the paused domain misses it) and removed after a
/// resume.
pub fn set_running(conn: &Connect, name: &str, run: bool) -> Result<(), Error> {
    const ELEMENT: i32 = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
    const LIVE: u32 = sys::VIR_DOMAIN_AFFECT_LIVE;
    let dom = conn.lookup_domain_by_name(name).map_err(|e| format!("lookup: {e}"))?;
    let mark = |on: bool| {
        let xml = on.then_some(facts::PAUSED_BY_REQUEST);
        dom.set_metadata(ELEMENT, xml, Some("vkrs"), Some(facts::RUN_STATE_XMLNS), LIVE)
            .map_err(|e| format!("marking {name}: {e}"))
    };
    if run {
        dom.resume().map_err(|e| format!("resuming {name}: {e}"))?;
        mark(false)
    } else {
        mark(true)?;
        if let Err(e) = dom.suspend() {
            let _ = mark(false);
            return Err(format!("pausing {name}: {e}"));
        }
        Ok(())
    }
}

/// An event of one domain: its name, and what happened when that is an
/// operation its pod's story tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// The domain's name.
    pub name: String,
    /// What happened, when it is worth a pod event.
    pub happened: Option<crate::model::Happened>,
}

/// Room in the lifecycle event channel: an event storm (a host starting
/// hundreds of VMs) beyond this is handled by one full resync instead.
pub const EVENT_CAPACITY: usize = 1024;

/// What an event callback owns: where it sends each event, and the flag it
/// raises when the channel was full and an event was dropped (the daemon
/// then resyncs everything, as it cannot know which domain changed).
#[derive(Debug)]
struct EventSink {
    sender: Sender<DomainEvent>,
    dropped: Arc<AtomicBool>,
}

impl EventSink {
    /// Sends an event of `dom`. Never waits: this is libvirt's event
    /// thread, which also serves the connection's keepalive.
    ///
    /// # Safety
    /// `dom` is the valid domain libvirt passed to the running callback.
    unsafe fn send(&self, dom: sys::virDomainPtr, happened: Option<crate::model::Happened>) {
        // SAFETY: libvirt passes a valid domain for the duration of the
        // callback; the returned name is owned by the domain object.
        let name = unsafe { sys::virDomainGetName(dom) };
        if name.is_null() {
            return;
        }
        // SAFETY: a non-null name is a NUL-terminated C string (see above).
        let name = unsafe { CStr::from_ptr(name as *const c_char) }
            .to_string_lossy()
            .into_owned();
        match self.sender.try_send(DomainEvent { name, happened }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.store(true, Ordering::Release),
            // The daemon left this connection: nobody wants its events.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the Box<EventSink> leaked in `register`; libvirt
    // keeps it alive until `free_sink` runs, after the last callback.
    let sink = unsafe { &*(opaque as *const EventSink) };
    // SAFETY: `dom` is the domain of this callback.
    unsafe { sink.send(dom, crate::model::Happened::of_lifecycle(event, detail)) };
    0
}

unsafe extern "C" fn on_reboot(_conn: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: as in `on_lifecycle`.
    let sink = unsafe { &*(opaque as *const EventSink) };
    // SAFETY: `dom` is the domain of this callback.
    unsafe { sink.send(dom, Some(crate::model::Happened::Reset)) };
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Box::into_raw in `register` and libvirt
    // calls this free callback exactly once.
    drop(unsafe { Box::from_raw(opaque as *mut EventSink) });
}

/// Registers for the lifecycle and reboot events of every domain; each
/// event sends the domain's name (and what happened) on `sender` without
/// waiting. When the channel is full the event is dropped and `dropped` is
/// set. Returns the callback ids.
pub fn register_lifecycle_events(
    conn: &Connect,
    sender: Sender<DomainEvent>,
    dropped: Arc<AtomicBool>,
) -> Result<[i32; 2], Error> {
    // The callbacks have more arguments than the generic type libvirt
    // declares; libvirt calls each with the signature of its event id.
    // SAFETY: both are `unsafe extern "C" fn` pointers of the same ABI; libvirt
    // documents casting via VIR_DOMAIN_EVENT_CALLBACK for exactly this use.
    let lifecycle: sys::virConnectDomainEventGenericCallback = Some(unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(on_lifecycle)
    });
    let reboot: sys::virConnectDomainEventGenericCallback = Some(on_reboot);
    let lifecycle_id = register(
        conn,
        sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
        lifecycle,
        EventSink {
            sender: sender.clone(),
            dropped: dropped.clone(),
        },
    )?;
    let reboot_id = register(
        conn,
        sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int,
        reboot,
        EventSink { sender, dropped },
    )?;
    Ok([lifecycle_id, reboot_id])
}

fn register(
    conn: &Connect,
    event_id: c_int,
    callback: sys::virConnectDomainEventGenericCallback,
    sink: EventSink,
) -> Result<i32, Error> {
    let opaque = Box::into_raw(Box::new(sink)) as *mut c_void;
    // SAFETY: `conn` is an open connection; a null domain means "all domains";
    // `opaque` (a Box<EventSink>) stays valid until libvirt calls `free_sink`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            event_id,
            callback,
            opaque,
            Some(free_sink),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership.
        unsafe { free_sink(opaque) };
        return Err(format!(
            "cannot register for domain events ({event_id}): {}",
            virt::error::Error::last_error()
        ));
    }
    Ok(id)
}
