//! The same libvirt calls through libvirt-wire and through libvirt.so (the
//! `virt` crate), side by side in one run, on libvirtd's test driver:
//! DOMAIN_GET_STATE, and CREATE_XML + DESTROY.
//!
//!     cargo bench -p libvirt-wire --bench vs_libvirt
//!
//! Needs the libvirtd of scripts/libvirtd-up.sh. Prints mean, p50 and p99 per
//! call and the ratio wire / libvirt.so (goal ≤ 1.0).

use std::time::{Duration, Instant};

use libvirt_wire::{Client, Options};

const URI: &str = "test+unix:///default";
const STATE_CALLS: usize = 5000;
const CREATE_CALLS: usize = 500;

fn xml(name: &str) -> String {
    format!("<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>")
}

struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let total: Duration = samples.iter().sum();
    Stats {
        mean: total / samples.len() as u32,
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(what: &str, wire: &Stats, native: &Stats) {
    println!(
        "{what:<22} wire mean {:>7.1} µs p50 {:>7.1} p99 {:>7.1} | libvirt.so mean {:>7.1} µs p50 {:>7.1} p99 {:>7.1} | ratio (mean) {:.2}×",
        us(wire.mean),
        us(wire.p50),
        us(wire.p99),
        us(native.mean),
        us(native.p50),
        us(native.p99),
        wire.mean.as_secs_f64() / native.mean.as_secs_f64()
    );
}

fn bench_wire() -> Result<(Stats, Stats), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = Client::connect(URI, Options::default()).await?;
        let domain = client.create_xml(&xml("bench-wire-state"), 0).await?;
        for _ in 0..200 {
            client.get_state(&domain).await?;
        }
        let mut state = Vec::with_capacity(STATE_CALLS);
        for _ in 0..STATE_CALLS {
            let start = Instant::now();
            client.get_state(&domain).await?;
            state.push(start.elapsed());
        }
        client.destroy(&domain, 0).await?;
        let mut create = Vec::with_capacity(CREATE_CALLS);
        for i in 0..CREATE_CALLS {
            let name = format!("bench-wire-{i}");
            let start = Instant::now();
            let d = client.create_xml(&xml(&name), 0).await?;
            client.destroy(&d, 0).await?;
            create.push(start.elapsed());
        }
        Ok((stats(state), stats(create)))
    })
}

fn bench_native() -> Result<(Stats, Stats), virt::error::Error> {
    let conn = virt::connect::Connect::open(Some(URI))?;
    let domain = conn.create_domain_xml(&xml("bench-native-state"), 0)?;
    for _ in 0..200 {
        domain.state()?;
    }
    let mut state = Vec::with_capacity(STATE_CALLS);
    for _ in 0..STATE_CALLS {
        let start = Instant::now();
        domain.state()?;
        state.push(start.elapsed());
    }
    domain.destroy()?;
    let mut create = Vec::with_capacity(CREATE_CALLS);
    for i in 0..CREATE_CALLS {
        let name = format!("bench-native-{i}");
        let start = Instant::now();
        let d = conn.create_domain_xml(&xml(&name), 0)?;
        d.destroy()?;
        create.push(start.elapsed());
    }
    drop(conn);
    Ok((stats(state), stats(create)))
}

fn main() {
    // Keep one connection open so test:///default's state persists across both runs.
    let keeper = virt::connect::Connect::open(Some(URI));
    if let Err(e) = &keeper {
        eprintln!("cannot open {URI}: {e} (start libvirtd with scripts/libvirtd-up.sh)");
        std::process::exit(1);
    }
    println!("libvirt-wire vs libvirt.so on {URI}: {STATE_CALLS} GET_STATE, {CREATE_CALLS} CREATE_XML+DESTROY each");
    let (native_state, native_create) = bench_native().unwrap_or_else(|e| panic!("libvirt.so: {e}"));
    let (wire_state, wire_create) = bench_wire().unwrap_or_else(|e| panic!("libvirt-wire: {e}"));
    report("DOMAIN_GET_STATE", &wire_state, &native_state);
    report("CREATE_XML+DESTROY", &wire_create, &native_create);
}
