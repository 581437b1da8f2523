//! Which nodes can run a VM, and which are best. Pure: a VM's
//! [`Requirements`] against a node's VirtNode, at a given time.

use virtkube_api::node::VirtNodeStatus;

use crate::requirements::Requirements;

/// A VirtNode whose `Ready` heartbeat is older than this counts as not
/// ready: its nodeinfo reports every 30 s, so three missed reports mean the
/// virthost is down or crash-looping (its last `Ready: True` stays behind).
pub const STALE_AFTER_SECS: i64 = 90;

/// The best score a node gets (the scheduler's `MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

/// Whether a node (its VirtNode, if it has one) can run a VM with `needs`
/// at `now` (seconds since the epoch); if not, why, in words that end up in
/// the pod's `FailedScheduling` event.
pub fn check(needs: &Requirements, node: Option<&VirtNodeStatus>, now: i64) -> Result<(), String> {
    let Some(node) = node else {
        return Err("no virthost: virtkube's virthost DaemonSet does not run on this node (no VirtNode)".into());
    };
    ready(node, now)?;
    if let (Some(wanted), Some(has)) = (&needs.arch, &node.arch)
        && wanted != has
    {
        return Err(format!("the VM is {wanted}; this node is {has}"));
    }
    if needs.kvm && node.kvm != Some(true) {
        return Err("the VM needs KVM (domainType kvm or a host-passthrough CPU); this node has none".into());
    }
    if let Some(model) = &needs.cpu_model
        && !node.cpu_models.iter().any(|m| m == model)
    {
        return Err(format!("CPU model {model} is not usable on this node"));
    }
    let host_features = node
        .host_cpu
        .as_ref()
        .map(|c| c.features.as_slice())
        .unwrap_or_default();
    let missing: Vec<&str> = needs
        .cpu_features
        .iter()
        .filter(|f| !host_features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!("this node's CPU lacks {}", missing.join(", ")));
    }
    let present: Vec<&str> = needs
        .forbidden_features
        .iter()
        .filter(|f| host_features.contains(f))
        .map(String::as_str)
        .collect();
    if !present.is_empty() {
        return Err(format!(
            "this node's CPU has {}, which the VM forbids",
            present.join(", ")
        ));
    }
    if let Some(machine) = &needs.machine
        && !node.machine_types.iter().any(|m| m == machine)
    {
        return Err(format!("machine type {machine} is not offered on this node"));
    }
    // The whole host's memory: the shim pins no guest to a NUMA cell.
    if let Some(bytes) = needs.memory_bytes
        && let Some(host) = node
            .memory
            .as_deref()
            .and_then(|m| virtkube_api::quantity::parse_bytes(m).ok())
        && host < bytes
    {
        return Err(format!(
            "the VM's {} MiB are more than this node's memory ({} MiB)",
            bytes >> 20,
            host >> 20
        ));
    }
    if let Some((size_kib, count)) = needs.hugepages {
        let most = node
            .numa
            .iter()
            .flat_map(|cell| cell.hugepages.iter())
            .filter(|pages| pages.size_kib == size_kib)
            // Free pages where nodeinfo reports them, else the cell's total.
            .map(|pages| pages.free.unwrap_or(pages.count))
            .max()
            .unwrap_or(0);
        if most < count {
            return Err(format!(
                "the VM needs {count} huge pages of {size_kib} KiB on one NUMA cell; the most here is {most}"
            ));
        }
    }
    for id in &needs.pci {
        let (vendor, device) = id.split_once(':').unwrap_or((id, ""));
        let present = node
            .pci_devices
            .iter()
            .any(|d| id_of(d.vendor.as_deref()) == Some(vendor) && id_of(d.product.as_deref()) == Some(device));
        if !present {
            return Err(format!("no PCI device {id} on this node"));
        }
    }
    Ok(())
}

/// `Ready` must be True and its heartbeat recent.
fn ready(node: &VirtNodeStatus, now: i64) -> Result<(), String> {
    let Some(ready) = node.conditions.iter().find(|c| c.kind == "Ready") else {
        return Err("the virthost has not reported yet (its VirtNode has no Ready condition)".into());
    };
    if ready.status != "True" {
        return Err(format!(
            "the virthost is not ready: {}: {}",
            ready.reason.as_deref().unwrap_or("NotReady"),
            ready.message.as_deref().unwrap_or("")
        ));
    }
    let heartbeat = ready.last_heartbeat_time.as_deref().and_then(parse_rfc3339);
    match heartbeat {
        // A heartbeat from the future: the node's clock is ahead, and its
        // age cannot be told.
        Some(at) if at - now > STALE_AFTER_SECS => Err(format!(
            "the virthost's heartbeat is {} s in the future: the node's clock and this one's differ",
            at - now
        )),
        Some(at) if now - at <= STALE_AFTER_SECS => Ok(()),
        Some(at) => Err(format!(
            "the virthost is not ready: its nodeinfo last reported {} s ago (down or crash-looping?)",
            now - at
        )),
        None => Err("the virthost is not ready: its VirtNode's Ready condition has no heartbeat".into()),
    }
}

/// `0x8086 Intel Corporation` → `8086`.
fn id_of(text: Option<&str>) -> Option<&str> {
    let first = text?.split_whitespace().next()?;
    Some(first.strip_prefix("0x").unwrap_or(first))
}

/// A node's score for a VM, from 0 to [`MAX_SCORE`]: spread VMs over nodes,
/// by the node's running domains per logical CPU (an idle node scores 10, one
/// with as many domains as CPUs 5).
pub fn score(node: Option<&VirtNodeStatus>) -> i64 {
    let Some(node) = node else { return 0 };
    let cpus = i64::from(node.cpus.unwrap_or(1).max(1));
    let domains = i64::from(node.domains.unwrap_or(0));
    (MAX_SCORE * cpus + (cpus + domains) / 2) / (cpus + domains)
}

/// `2026-11-22T10:00:00Z` → seconds since the epoch (UTC only, as nodeinfo writes).
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let s = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    if !(1..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    Some(virtkube_api::civil::days_from_civil(y, m as u32, day as u32) * 86_400 + h * 3600 + min * 60 + s)
}

#[cfg(test)]
mod tests {
    use virtkube_api::node::{Condition, HostCpu, HugePages, NumaCell, PciDevice};

    use super::*;

    const NOW: i64 = 1_795_000_000;

    fn heartbeat(secs_ago: i64) -> String {
        let at = NOW - secs_ago;
        let (days, rem) = (at / 86_400, at % 86_400);
        let (y, m, d) = virtkube_api::civil::civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }

    fn node() -> VirtNodeStatus {
        VirtNodeStatus {
            arch: Some("x86_64".into()),
            kvm: Some(false),
            cpus: Some(4),
            memory: Some("16Gi".into()),
            domains: Some(0),
            host_cpu: Some(HostCpu {
                model: Some("Skylake-Client-IBRS".into()),
                vendor: Some("Intel".into()),
                features: vec!["vmx".into(), "avx2".into()],
            }),
            machine_types: vec!["pc-i440fx-7.2".into(), "pc-q35-7.2".into()],
            cpu_models: vec!["qemu64".into(), "Skylake-Client".into()],
            numa: vec![NumaCell {
                id: 0,
                memory: Some("8Gi".into()),
                cpus: Some(4),
                hugepages: vec![HugePages {
                    size_kib: 2048,
                    count: 1024,
                    free: Some(256),
                }],
            }],
            pci_devices: vec![PciDevice {
                address: "0000:03:00.0".into(),
                vendor: Some("0x8086 Intel Corporation".into()),
                product: Some("0x1572 Ethernet Controller X710".into()),
                ..PciDevice::default()
            }],
            conditions: vec![Condition {
                kind: "Ready".into(),
                status: "True".into(),
                reason: Some("LibvirtReachable".into()),
                last_heartbeat_time: Some(heartbeat(10)),
                ..Condition::default()
            }],
            ..VirtNodeStatus::default()
        }
    }

    fn refused(needs: &Requirements, node: Option<&VirtNodeStatus>, expected: &str) {
        match check(needs, node, NOW) {
            Ok(()) => panic!("admitted {needs:?}"),
            Err(why) => assert!(why.contains(expected), "expected {expected:?}, got {why:?}"),
        }
    }

    #[test]
    fn a_node_that_has_everything_passes() {
        let needs = crate::requirements::parse_requires(
            "arch=x86_64, cpu-model=Skylake-Client, cpu-feature=vmx, machine=pc-q35-7.2, memory=4Gi, hugepages-2Mi=256, pci=8086:1572",
        )
        .unwrap();
        assert_eq!(check(&needs, Some(&node()), NOW), Ok(()));
        assert_eq!(check(&Requirements::default(), Some(&node()), NOW), Ok(()));
    }

    #[test]
    fn every_missing_thing_has_its_reason() {
        let needs = |text: &str| crate::requirements::parse_requires(text).unwrap();
        refused(&needs(""), None, "no virthost");
        refused(&needs("kvm"), Some(&node()), "needs KVM");
        refused(
            &needs("arch=aarch64"),
            Some(&node()),
            "the VM is aarch64; this node is x86_64",
        );
        refused(&needs("cpu-model=EPYC"), Some(&node()), "CPU model EPYC is not usable");
        refused(
            &needs("cpu-feature=avx512f, cpu-feature=vmx, cpu-feature=sgx"),
            Some(&node()),
            "lacks avx512f, sgx",
        );
        refused(
            &needs("machine=virt"),
            Some(&node()),
            "machine type virt is not offered",
        );
        refused(
            &needs("memory=32Gi"),
            Some(&node()),
            "more than this node's memory (16384 MiB)",
        );
        refused(&needs("hugepages-2Mi=512"), Some(&node()), "512 huge pages of 2048 KiB");
        refused(&needs("hugepages-1Gi=1"), Some(&node()), "the most here is 0");
        refused(&needs("pci=10de:1eb8"), Some(&node()), "no PCI device 10de:1eb8");
        let mut kvm = node();
        kvm.kvm = Some(true);
        assert_eq!(check(&needs("kvm"), Some(&kvm), NOW), Ok(()));
        let forbids = Requirements {
            forbidden_features: vec!["vmx".into()],
            ..Requirements::default()
        };
        refused(&forbids, Some(&node()), "has vmx, which the VM forbids");
        // 12 GiB fits a 16 GiB host whose one cell has 8 (nothing pins a guest to a cell).
        assert_eq!(check(&needs("memory=12Gi"), Some(&node()), NOW), Ok(()));
    }

    #[test]
    fn a_virthost_that_is_down_or_silent_is_not_ready() {
        let needs = Requirements::default();
        let mut down = node();
        down.conditions[0].status = "False".into();
        down.conditions[0].reason = Some("LibvirtUnreachable".into());
        down.conditions[0].message = Some("connection refused".into());
        refused(&needs, Some(&down), "not ready: LibvirtUnreachable: connection refused");
        let mut silent = node();
        silent.conditions[0].last_heartbeat_time = Some(heartbeat(STALE_AFTER_SECS + 30));
        refused(&needs, Some(&silent), "last reported 120 s ago");
        let mut fresh = node();
        fresh.conditions[0].last_heartbeat_time = Some(heartbeat(STALE_AFTER_SECS));
        assert_eq!(check(&needs, Some(&fresh), NOW), Ok(()));
        let mut unknown = node();
        unknown.conditions[0].last_heartbeat_time = Some("yesterday".into());
        refused(&needs, Some(&unknown), "no heartbeat");
        let mut never = node();
        never.conditions.clear();
        refused(&needs, Some(&never), "has not reported yet");
        let mut ahead = node();
        ahead.conditions[0].last_heartbeat_time = Some(heartbeat(-(STALE_AFTER_SECS + 60)));
        refused(&needs, Some(&ahead), "in the future");
    }

    #[test]
    fn idle_nodes_score_best() {
        let mut busy = node();
        assert_eq!(score(Some(&busy)), MAX_SCORE);
        busy.domains = Some(4);
        assert_eq!(score(Some(&busy)), 5);
        busy.domains = Some(36);
        assert_eq!(score(Some(&busy)), 1);
        assert_eq!(score(None), 0);
    }

    #[test]
    fn heartbeats_are_read_as_nodeinfo_writes_them() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-22T10:00:00Z"), Some(1_795_341_600));
        assert_eq!(parse_rfc3339("2026-11-22T10:00:00.5Z"), Some(1_795_341_600));
        for bad in [
            "2026-11-22 10:00:00",
            "2026-13-22T10:00:00Z",
            "2026-11-22T10:00:00+01:00",
            "999999999999999-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
