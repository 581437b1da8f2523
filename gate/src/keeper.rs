//! The owner of "a VM never outlives its container". Domains are created
//! without libvirt's AUTODESTROY, which ties a VM to one libvirtd connection
//! and so dies with every restart of libvirtd or the gate. Instead the gate
//! writes, into each domain's XML as it is created, the process that creates
//! it (the VM container's shim: PID and start time), watches that process,
//! and destroys the domain when it exits. The record lives as long as the
//! domain, in libvirt's state on the host. The gate sweeps libvirtd's domains
//! when it starts and every few seconds after: it keeps each recorded domain
//! whose owner lives and destroys each whose owner is gone, so no domain is
//! left unwatched, whatever broke between its creation and its hand-over.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libvirt_wire::api::{Client, flags};
use libvirt_wire::client::Options;
use libvirt_wire::protocol::{DomainRef, format_uuid};

/// The XML namespace of the gate's record in a domain's `<metadata>`.
pub const OWNER_NAMESPACE: &str = "https://virtkube.io/xmlns/gate-owner/1";
/// The prefix libvirt writes the record's element with.
const OWNER_PREFIX: &str = "virtkube-gate";
/// How often a destroy that could not reach libvirtd is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the gate sweeps libvirtd's domains for unwatched ones.
const SWEEP_PERIOD: Duration = Duration::from_secs(5);
/// libvirt's `VIR_ERR_NO_DOMAIN`.
const ERR_NO_DOMAIN: i32 = 42;
/// How long an abandoned definition is looked for before it counts as never
/// made (libvirtd may still be carrying out the define).
const DEFINE_IN_FLIGHT: Duration = Duration::from_secs(3);

/// libvirt's `VIR_ERR_OPERATION_INVALID` (e.g. "domain is not running").
const ERR_OPERATION_INVALID: i32 = 55;

/// The process a domain lives for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its PID (the host's).
    pub pid: i32,
    /// Its start time, clock ticks since boot: with the PID, it names one
    /// process for ever (a PID is reused, the pair is not).
    pub start_ticks: u64,
    /// Who it is, for the log and for operators (`pod …`, `container …`).
    pub caller: String,
    /// How many times it found the domain again after a lost connection.
    pub reattached: u32,
}

impl Owner {
    /// The record's element.
    pub fn to_xml(&self) -> String {
        format!(
            r#"<owner pid="{}" start="{}" caller="{}" reattached="{}"/>"#,
            self.pid,
            self.start_ticks,
            virtkube_api::xml_escape(&self.caller),
            self.reattached
        )
    }

    /// Reads a record written by [`Owner::to_xml`] (as libvirt returns it).
    pub fn from_xml(xml: &str) -> Result<Owner, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the owner record is not XML: {e}"))?;
        let owner = doc.root_element();
        if owner.tag_name().name() != "owner" {
            return Err(format!(
                "the owner record is <{}>, not <owner>",
                owner.tag_name().name()
            ));
        }
        let attribute = |name: &str| {
            owner
                .attribute(name)
                .ok_or_else(|| format!("the owner record has no {name} attribute"))
        };
        let number = |name: &str| -> Result<u64, String> {
            attribute(name)?
                .parse()
                .map_err(|_| format!("the owner record's {name} is not a whole number"))
        };
        let pid = i32::try_from(number("pid")?).map_err(|_| "the owner record's pid is out of range".to_owned())?;
        let reattached = match owner.attribute("reattached") {
            None => 0,
            Some(n) => n
                .parse()
                .map_err(|_| "the owner record's reattached is not a whole number".to_owned())?,
        };
        Ok(Owner {
            pid,
            start_ticks: number("start")?,
            caller: attribute("caller")?.to_owned(),
            reattached,
        })
    }

    /// The record as an element of the domain XML's `<metadata>`.
    fn to_metadata_xml(&self) -> String {
        self.to_xml()
            .replacen("<owner ", &format!(r#"<owner xmlns="{OWNER_NAMESPACE}" "#), 1)
    }

    /// Whether `other` names the same process (PID and start time).
    fn same_process(&self, other: &Owner) -> bool {
        self.pid == other.pid && self.start_ticks == other.start_ticks
    }

    /// Whether the process whose `/proc/<pid>/stat` reads `stat` (`None`:
    /// no such process) is this owner.
    pub fn is(&self, stat: Option<&str>) -> bool {
        stat.and_then(crate::identity::start_ticks) == Some(self.start_ticks)
    }
}

/// Domain XML (already admitted by the policy, so well-formed) with `owner`'s
/// record added to its `<metadata>`: the domain exists with its owner from
/// the moment libvirtd creates it.
pub fn with_owner_record(xml: &str, owner: &Owner) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML does not parse: {e}"))?;
    let root = doc.root_element();
    let record = owner.to_metadata_xml();
    let metadata = root
        .children()
        .find(|n| n.is_element() && n.tag_name().name() == "metadata" && n.tag_name().namespace().is_none());
    let (at, insert) = match metadata {
        Some(m) if xml[m.range()].ends_with("</metadata>") => (m.range().end - "</metadata>".len(), record),
        Some(m) if xml[m.range()].ends_with("/>") => {
            let range = m.range();
            return Ok(format!(
                "{}<metadata>{record}</metadata>{}",
                &xml[..range.start],
                &xml[range.end..]
            ));
        }
        Some(_) => return Err("the domain's <metadata> does not end as expected".into()),
        None if xml[root.range()].ends_with("</domain>") => (
            root.range().end - "</domain>".len(),
            format!("<metadata>{record}</metadata>"),
        ),
        None => return Err("the domain XML does not end with </domain>".into()),
    };
    Ok(format!("{}{insert}{}", &xml[..at], &xml[at..]))
}

/// A domain the gate keeps alive for its owner.
#[derive(Debug)]
struct Kept {
    name: String,
    owner: Owner,
    /// The task waiting for the owner to exit.
    watcher: tokio::task::AbortHandle,
}

/// The gate's register of domains and their owners, and its own libvirtd
/// connection to destroy a domain whose owner is gone.
#[derive(Debug)]
pub struct Keeper {
    uri: String,
    proc_root: PathBuf,
    qemu_run_dir: PathBuf,
    control: tokio::sync::Mutex<Option<Client>>,
    kept: std::sync::Mutex<HashMap<[u8; 16], Kept>>,
    /// Whether the domains of the gate before have been taken over.
    reconciled: tokio::sync::watch::Sender<bool>,
}

impl Keeper {
    /// A keeper using libvirtd's socket `libvirtd` and processes under `proc_root`.
    /// `qemu_run_dir` is where libvirtd's QEMU driver writes `<domain>.pid`.
    pub fn new(libvirtd: &Path, proc_root: PathBuf, qemu_run_dir: PathBuf) -> Keeper {
        Keeper {
            uri: format!("qemu+unix:///system?socket={}", libvirtd.display()),
            proc_root,
            qemu_run_dir,
            control: tokio::sync::Mutex::new(None),
            kept: std::sync::Mutex::new(HashMap::new()),
            reconciled: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Completes once [`Keeper::reconcile`] has run: before, the gate does
    /// not know which domain is whose.
    pub async fn reconciled(&self) {
        let mut done = self.reconciled.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }

    /// The gate's own connection to libvirtd, opened again after it broke.
    pub async fn control(&self) -> Result<Client, libvirt_wire::Error> {
        let mut control = self.control.lock().await;
        if let Some(client) = control.as_ref()
            && !client.connection().is_closed()
        {
            return Ok(client.clone());
        }
        let client = Client::connect(&self.uri, Options::default()).await?;
        *control = Some(client.clone());
        Ok(client)
    }

    /// The owner recorded for domain `uuid`, if the gate keeps it.
    pub fn owner_of(&self, uuid: &[u8; 16]) -> Option<Owner> {
        self.lock().get(uuid).map(|kept| kept.owner.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Kept>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the new `domain` (its XML carries `owner`'s record) until the
    /// owner exits. On error the caller must destroy the domain.
    pub fn adopt(self: &Arc<Self>, domain: &DomainRef, owner: Owner) -> Result<(), String> {
        let pidfd = open_owner(&self.proc_root, &owner)
            .ok_or_else(|| format!("its creator (PID {}) exited before the gate could watch it", owner.pid))?;
        self.keep(domain.uuid, domain.name.clone(), owner, pidfd);
        Ok(())
    }

    /// Watches `owner` for domain `uuid` (once: a second call for the same
    /// owner changes nothing).
    fn keep(self: &Arc<Self>, uuid: [u8; 16], name: String, owner: Owner, pidfd: OwnedFd) {
        let mut kept = self.lock();
        if kept.get(&uuid).is_some_and(|k| k.owner.same_process(&owner)) {
            return;
        }
        tracing::info!(domain = %name, owner = %owner.caller, pid = owner.pid, "keeping the domain while its owner lives");
        let keeper = self.clone();
        let watched = owner.clone();
        let watcher = tokio::spawn(async move {
            exited(pidfd).await;
            keeper.end(uuid, Some(&watched), "its container's shim exited").await;
        })
        .abort_handle();
        if let Some(old) = kept.insert(uuid, Kept { name, owner, watcher }) {
            old.watcher.abort();
        }
    }

    /// Counts one more reattachment of domain `uuid` by its owner, in the
    /// record (which nodeinfo publishes). Best effort: a failure is logged.
    pub async fn note_reattached(&self, domain: &DomainRef) {
        let owner = {
            let mut kept = self.lock();
            let Some(entry) = kept.get_mut(&domain.uuid) else {
                return;
            };
            entry.owner.reattached += 1;
            entry.owner.clone()
        };
        let recorded = async {
            self.control()
                .await?
                .set_metadata(domain, Some(&owner.to_xml()), OWNER_PREFIX, OWNER_NAMESPACE)
                .await
        };
        match recorded.await {
            Ok(()) => {
                tracing::info!(domain = %domain.name, reattached = owner.reattached, "the owner found its domain again")
            }
            Err(e) => tracing::warn!(domain = %domain.name, error = %e, "cannot record the reattachment"),
        }
    }

    /// Destroys domain `uuid` of `owner` (`None`: whoever's), trying again
    /// every second while libvirtd cannot be reached (it may be
    /// restarting), and forgets it. A domain the gate now keeps for another
    /// owner (the same UUID created again) is left alone.
    pub async fn end(&self, uuid: [u8; 16], owner: Option<&Owner>, why: &str) {
        let is_owner = |kept: &Kept| owner.is_none_or(|o| kept.owner.same_process(o));
        if self.lock().get(&uuid).is_some_and(|kept| !is_owner(kept)) {
            return;
        }
        let known = self.lock().get(&uuid).map(|kept| kept.name.clone());
        let name = known.clone().unwrap_or_else(|| format_uuid(&uuid));
        tracing::info!(domain = %name, %why, "destroying the domain");
        // QEMU is killed at once, not after libvirtd's gentler destroy, which
        // waits for each QEMU in turn and for this node's init to reap it:
        // a storm of dying containers would wait in line.
        if let Some(known) = &known {
            match kill_qemu(&self.proc_root, &self.qemu_run_dir, known) {
                Ok(pid) => tracing::debug!(domain = %name, pid, "QEMU killed"),
                Err(why) => tracing::debug!(domain = %name, %why, "QEMU not killed directly"),
            }
        }
        loop {
            let attempt = async {
                let control = self.control().await?;
                let domain = control.lookup_by_uuid(&uuid).await?;
                control.destroy(&domain, 0).await
            };
            match attempt.await {
                Ok(()) => {
                    tracing::info!(domain = %name, "destroyed");
                    break;
                }
                Err(libvirt_wire::Error::Libvirt(e)) if e.code == ERR_NO_DOMAIN || e.code == ERR_OPERATION_INVALID => {
                    tracing::info!(domain = %name, "gone");
                    break;
                }
                Err(e) => {
                    tracing::warn!(domain = %name, error = %e, "cannot destroy the domain yet; trying again");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        let mut kept = self.lock();
        if kept.get(&uuid).is_some_and(is_owner) {
            kept.remove(&uuid);
        }
    }

    /// Destroys domain `name` if `owner` created it, once it exists: its
    /// creation was abandoned (the connection ended before the reply), so
    /// no one will use it. Gives up after a minute without it.
    pub async fn end_abandoned(&self, name: &str, owner: &Owner) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            let found = async {
                let control = self.control().await?;
                let domain = control.lookup_by_name(name).await?;
                let record = control.metadata(&domain, OWNER_NAMESPACE).await?;
                Ok::<_, libvirt_wire::Error>((domain, record))
            };
            match found.await {
                Ok((domain, Some(record))) => {
                    if Owner::from_xml(&record).is_ok_and(|o| o.same_process(owner)) {
                        self.end(domain.uuid, None, "its creation was abandoned by its caller")
                            .await;
                    }
                    return;
                }
                Ok((_, None)) => return,
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }

    /// Forgets the definition of domain `name`, defined through the gate for
    /// `owner` and abandoned (its connection ended before or while it
    /// started, or its hand-over failed): undefined whatever its state — a
    /// running one becomes transient, as every gate domain is, and is then
    /// the keeper's or [`Keeper::end_abandoned`]'s. A domain whose record
    /// names another owner is left alone. Retried while libvirtd is away,
    /// for a minute.
    pub async fn forget_definition(&self, name: &str, owner: &Owner) {
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            let forgotten = async {
                let control = self.control().await?;
                let domain = control.lookup_by_name(name).await?;
                let record = control.metadata_of(&domain, OWNER_NAMESPACE, 0).await?;
                if !record.is_some_and(|r| Owner::from_xml(&r).is_ok_and(|o| o.same_process(owner))) {
                    return Ok(false);
                }
                control.undefine(&domain, 0).await.map(|()| true)
            };
            match forgotten.await {
                Ok(true) => {
                    tracing::info!(domain = %name, "undefined a domain whose definition was abandoned");
                    return;
                }
                Ok(false) => return,
                // Not there yet: a define the connection asked for may
                // still be on its way through libvirtd.
                Err(e) if e.libvirt().is_some_and(|e| e.is_no_domain()) && started.elapsed() < DEFINE_IN_FLIGHT => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Gone, or transient already.
                Err(e)
                    if e.libvirt()
                        .is_some_and(|e| e.is_no_domain() || e.code == ERR_OPERATION_INVALID) =>
                {
                    return;
                }
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }

    /// Sweeps libvirtd's domains for ever: first when the gate starts (then
    /// [`Keeper::reconciled`] completes), then every few seconds.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.sweep().await {
                Ok((kept, ended)) => {
                    if !*self.reconciled.borrow() {
                        tracing::info!(kept, ended, "took over the running domains");
                        self.reconciled.send_replace(true);
                    } else if kept + ended > 0 {
                        tracing::info!(kept, ended, "swept up unwatched domains");
                    }
                    tokio::time::sleep(SWEEP_PERIOD).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list libvirtd's domains yet");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One sweep: keeps each running domain with the gate's record whose
    /// owner lives, destroys (in the background) each whose owner is gone,
    /// and forgets kept domains that have ended. A domain whose record
    /// cannot be read now is tried again next time; one without the gate's
    /// record (created around the gate) is left alone. Returns how many
    /// domains it began to keep and to end.
    pub async fn sweep(self: &Arc<Self>) -> Result<(usize, usize), libvirt_wire::Error> {
        let known: Vec<[u8; 16]> = self.lock().keys().copied().collect();
        let control = self.control().await?;
        let domains = control.list_all_domains(flags::LIST_DOMAINS_ACTIVE).await?;
        {
            let mut kept = self.lock();
            for uuid in known.iter().filter(|uuid| !domains.iter().any(|d| d.uuid == **uuid)) {
                if let Some(gone) = kept.remove(uuid) {
                    gone.watcher.abort();
                }
            }
        }
        let (mut kept, mut ended) = (0, 0);
        for domain in domains {
            if self.owner_of(&domain.uuid).is_some() {
                continue;
            }
            let owner = match control.metadata(&domain, OWNER_NAMESPACE).await {
                Ok(Some(xml)) => Owner::from_xml(&xml),
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(domain = %domain.name, error = %e, "cannot read the domain's owner now");
                    continue;
                }
            };
            let owner = match owner {
                Ok(owner) => owner,
                Err(why) => {
                    tracing::error!(domain = %domain.name, %why, "the gate's owner record is unreadable; left alone");
                    continue;
                }
            };
            match open_owner(&self.proc_root, &owner) {
                Some(pidfd) => {
                    self.keep(domain.uuid, domain.name.clone(), owner, pidfd);
                    kept += 1;
                }
                None => {
                    let why = format!("its owner ({}, PID {}) has exited", owner.caller, owner.pid);
                    let keeper = self.clone();
                    tokio::spawn(async move { keeper.end(domain.uuid, Some(&owner), &why).await });
                    ended += 1;
                }
            }
        }
        ended += self.sweep_definitions(&control).await?;
        Ok((kept, ended))
    }

    /// Undefines the definitions the gate made for owners that have exited
    /// and that never started (their connection's end would have undefined
    /// them, but the gate itself may have stopped meanwhile). Returns how
    /// many.
    async fn sweep_definitions(&self, control: &Client) -> Result<usize, libvirt_wire::Error> {
        let mut undefined = 0;
        for domain in control.list_all_domains(flags::LIST_DOMAINS_INACTIVE).await? {
            let record = match control.metadata_of(&domain, OWNER_NAMESPACE, 0).await {
                Ok(Some(xml)) => xml,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(domain = %domain.name, error = %e, "cannot read the definition's owner now");
                    continue;
                }
            };
            let Ok(owner) = Owner::from_xml(&record) else {
                continue;
            };
            if open_owner(&self.proc_root, &owner).is_some() {
                continue;
            }
            match control.undefine(&domain, 0).await {
                Ok(()) => {
                    tracing::info!(domain = %domain.name, pid = owner.pid, "undefined a definition whose owner has exited");
                    undefined += 1;
                }
                Err(e) => {
                    tracing::warn!(domain = %domain.name, error = %e, "an abandoned definition could not be undefined")
                }
            }
        }
        Ok(undefined)
    }
}

/// Domain `name`'s QEMU: the PID in libvirtd's PID file, checked to be a
/// process whose command line names that guest.
pub fn qemu_of(proc_root: &Path, run_dir: &Path, name: &str) -> Result<i32, String> {
    let pid_file = run_dir.join(format!("{name}.pid"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("cannot read QEMU's PID from {}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|_| format!("{} does not hold a PID", pid_file.display()))?;
    let cmdline = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).unwrap_or_default();
    let guest = format!("guest={name},");
    if !cmdline.split(|b| *b == 0).any(|arg| arg.starts_with(guest.as_bytes())) {
        return Err(format!(
            "process {pid} (from {}) is not domain {name}'s QEMU",
            pid_file.display()
        ));
    }
    Ok(pid)
}

/// SIGKILLs domain `name`'s QEMU through a pidfd taken before the check, so
/// the signal cannot reach a process that got its PID since.
fn kill_qemu(proc_root: &Path, run_dir: &Path, name: &str) -> Result<i32, String> {
    use std::os::fd::AsRawFd;
    let pid = qemu_of(proc_root, run_dir, name)?;
    let pidfd = pidfd_open(pid).ok_or_else(|| format!("QEMU (PID {pid}) has exited"))?;
    if qemu_of(proc_root, run_dir, name)? != pid {
        return Err("the PID file changed".into());
    }
    // SAFETY: pidfd_send_signal takes a live pidfd, a signal, no siginfo and
    // no flags; it touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(format!(
            "cannot signal QEMU (PID {pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(pid)
}

/// A pidfd for process `pid`, or `None` when there is none.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a PID and flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success the kernel gave us a new descriptor that we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd for `owner`'s process, or `None` when it has exited (or its PID
/// now names another process).
fn open_owner(proc_root: &Path, owner: &Owner) -> Option<OwnedFd> {
    let pidfd = pidfd_open(owner.pid)?;
    // Read after opening: if the start time still matches, the pidfd names
    // the owner, not a later process that got its PID.
    let stat = std::fs::read_to_string(proc_root.join(owner.pid.to_string()).join("stat")).ok();
    owner.is(stat.as_deref()).then_some(pidfd)
}

/// Completes when the process a pidfd names exits.
async fn exited(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same
    // descriptor until the AsyncFd is dropped.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(pidfd) => {
            let _ = pidfd.readable().await;
        }
        Err(e) => {
            // Never end a VM on a doubt: without the watch it waits for a restart of the gate.
            tracing::error!(error = %e, "cannot watch an owner's pidfd");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_record_reads_back_as_written() {
        let owner = Owner {
            pid: 4242,
            start_ticks: 987_654,
            caller: "pod 4b7d3e62-<&\">".into(),
            reattached: 3,
        };
        assert_eq!(Owner::from_xml(&owner.to_xml()), Ok(owner.clone()));
        // libvirt gives the element back with its namespace and prefix.
        let returned = format!(
            r#"<virtkube-gate:owner xmlns:virtkube-gate="{OWNER_NAMESPACE}" pid="4242" start="987654" caller="pod 4b7d3e62-&lt;&amp;&quot;&gt;" reattached="3"/>"#
        );
        assert_eq!(Owner::from_xml(&returned), Ok(owner.clone()));
        // A record without the count (an earlier gate's) has none yet.
        let older = r#"<owner pid="4242" start="987654" caller="x"/>"#;
        assert_eq!(Owner::from_xml(older).map(|o| o.reattached), Ok(0));
    }

    #[test]
    fn the_record_goes_into_the_domain_s_metadata() {
        let owner = Owner {
            pid: 9,
            start_ticks: 99,
            caller: "pod u".into(),
            reattached: 0,
        };
        let read_back = |xml: &str| {
            let doc = roxmltree::Document::parse(xml).unwrap();
            let node = doc
                .descendants()
                .find(|n| n.tag_name().namespace() == Some(OWNER_NAMESPACE))
                .unwrap();
            assert_eq!(node.parent_element().unwrap().tag_name().name(), "metadata");
            Owner::from_xml(&xml[node.range()]).unwrap()
        };
        for xml in [
            "<domain type='qemu'><name>a</name><metadata><v:instance xmlns:v='urn:v'/></metadata></domain>",
            "<domain type='qemu'><name>a</name><metadata/></domain>",
            "<domain type='qemu'><name>a</name></domain>",
        ] {
            let with = with_owner_record(xml, &owner).unwrap();
            assert_eq!(read_back(&with), owner, "{with}");
            assert_eq!(with.matches("<metadata").count(), 1, "{with}");
        }
        assert!(with_owner_record("<domain", &owner).is_err());
    }

    #[test]
    fn a_broken_record_says_what_is_wrong() {
        let cases = [
            ("<owner", "is not XML"),
            ("<other/>", "is <other>, not <owner>"),
            (r#"<owner start="1" caller="x"/>"#, "has no pid attribute"),
            (r#"<owner pid="-3" start="1" caller="x"/>"#, "pid is not a whole number"),
            (
                r#"<owner pid="99999999999" start="1" caller="x"/>"#,
                "pid is out of range",
            ),
            (
                r#"<owner pid="1" start="soon" caller="x"/>"#,
                "start is not a whole number",
            ),
            (r#"<owner pid="1" start="1"/>"#, "has no caller attribute"),
            (
                r#"<owner pid="1" start="1" caller="x" reattached="many"/>"#,
                "reattached is not a whole number",
            ),
        ];
        for (xml, expected) in cases {
            let error = Owner::from_xml(xml).unwrap_err();
            assert!(error.contains(expected), "{xml}: {error}");
        }
    }

    #[test]
    fn only_the_same_start_time_is_the_owner() {
        let owner = Owner {
            pid: 7,
            start_ticks: 1234,
            caller: "container c".into(),
            reattached: 0,
        };
        let stat =
            |start: u64| format!("7 (virtkube shim) S 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 1");
        assert!(owner.is(Some(&stat(1234))));
        assert!(!owner.is(Some(&stat(1235))), "a reused PID is not the owner");
        assert!(!owner.is(None), "an exited process is not the owner");
        assert!(!owner.is(Some("garbage")));
    }

    #[test]
    fn this_process_can_be_watched_and_an_impostor_cannot() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let me = Owner {
            pid: std::process::id() as i32,
            start_ticks: crate::identity::start_ticks(&stat).unwrap(),
            caller: "test".into(),
            reattached: 0,
        };
        assert!(open_owner(Path::new("/proc"), &me).is_some());
        let impostor = Owner {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(open_owner(Path::new("/proc"), &impostor).is_none());
    }
}
