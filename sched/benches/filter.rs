//! The extender's own cost, without a cluster: filter and prioritize calls
//! of 100 candidate nodes against 1000 VirtNodes (fixtures), for a VM pod
//! that needs KVM and a CPU feature, and for a plain pod (the fast path).
//! Prints p50/p99; asserts nothing.
//!
//! Run: `cargo bench -p virtkube-sched --bench filter`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virtkube_api::VirtTemplateSpec;
use virtkube_api::node::{Condition, HostCpu, NumaCell, VirtNodeStatus};
use virtkube_sched::extender::{self, Cluster, ExtenderArgs};

const NODES: usize = 1000;
const CANDIDATES: usize = 100;
const CALLS: usize = 2000;
const NOW: i64 = 1_795_341_600;

struct Fixture(BTreeMap<String, VirtNodeStatus>);

impl Cluster for Fixture {
    fn with_virt_node<R>(&self, name: &str, f: impl FnOnce(Option<&VirtNodeStatus>) -> R) -> R {
        f(self.0.get(name))
    }
    fn template(&self, _: &str, _: &str) -> Option<VirtTemplateSpec> {
        None
    }
    fn now(&self) -> i64 {
        NOW
    }
}

fn node(i: usize) -> VirtNodeStatus {
    VirtNodeStatus {
        arch: Some("x86_64".into()),
        kvm: Some(i.is_multiple_of(2)),
        cpus: Some(64),
        domains: Some((i % 40) as u32),
        host_cpu: Some(HostCpu {
            model: Some("Icelake-Server".into()),
            vendor: Some("Intel".into()),
            features: (0..60)
                .map(|f| format!("feature{f}"))
                .chain(["avx512f".to_owned()])
                .collect(),
        }),
        machine_types: (0..30).map(|m| format!("pc-q35-{m}.0")).collect(),
        cpu_models: (0..40).map(|m| format!("Model{m}")).collect(),
        numa: (0..2)
            .map(|id| NumaCell {
                id,
                memory: Some("256Gi".into()),
                cpus: Some(32),
                hugepages: Vec::new(),
            })
            .collect(),
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: "True".into(),
            last_heartbeat_time: Some("2026-11-22T09:59:40Z".into()),
            ..Condition::default()
        }],
        ..VirtNodeStatus::default()
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    (at(0.50), at(0.99))
}

fn main() {
    let cluster = Fixture((0..NODES).map(|i| (format!("node-{i}"), node(i))).collect());
    let vm = serde_json::json!({"virtkube.io/requires": "kvm, cpu-feature=avx512f, machine=pc-q35-7.0, memory=8Gi"});
    let plain = serde_json::json!({});
    println!(
        "{NODES} VirtNodes, {CANDIDATES} candidate nodes per call, {CALLS} calls each (parsing the call's JSON included)"
    );
    for (what, annotations) in [("VM pod", vm), ("plain pod", plain)] {
        for verb in ["filter", "prioritize"] {
            let mut samples = Vec::with_capacity(CALLS);
            let mut passed = 0;
            for n in 0..CALLS {
                let text = serde_json::to_vec(&serde_json::json!({
                    "Pod": {"metadata": {"name": "vm", "namespace": "team", "annotations": annotations}},
                    "NodeNames": (0..CANDIDATES).map(|i| format!("node-{}", (n + i * 7) % NODES)).collect::<Vec<_>>()
                }))
                .unwrap();
                let started = Instant::now();
                let args: ExtenderArgs = serde_json::from_slice(&text).unwrap();
                if verb == "filter" {
                    let result = extender::filter(&args, &cluster);
                    passed += result.node_names.as_ref().map_or(0, Vec::len);
                    std::hint::black_box(serde_json::to_vec(&result).unwrap());
                } else {
                    std::hint::black_box(serde_json::to_vec(&extender::prioritize(&args, &cluster)).unwrap());
                }
                samples.push(started.elapsed());
            }
            let (p50, p99) = percentiles(samples);
            let passed = if verb == "filter" {
                format!(", {} of {CANDIDATES} nodes pass", passed / CALLS)
            } else {
                String::new()
            };
            println!("{what:<9} {verb:<10} p50 {p50:>7.1} µs   p99 {p99:>7.1} µs{passed}");
        }
    }
}
