//! The lifecycle event channel against the real libvirtd (test driver): the
//! callback never waits on a full channel, it drops the event and raises the
//! flag that makes the daemon resync everything.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virtkube_nodeinfo::collect;

const URI: &str = "test+unix:///default";

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs libvirtd (test driver): scripts/test.sh runs it"]
fn a_full_channel_drops_events_and_asks_for_a_resync() {
    collect::start_event_loop().unwrap();
    let conn = Connect::open(Some(URI)).unwrap();
    // Room for one event, and nobody reading until the end.
    let (sender, mut events) = tokio::sync::mpsc::channel(1);
    let dropped = Arc::new(AtomicBool::new(false));
    let ids = collect::register_lifecycle_events(&conn, sender, Arc::clone(&dropped)).unwrap();

    let cycle = |name: &str| {
        let xml =
            format!("<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os></domain>");
        let dom = conn.create_domain_xml(&xml, 0).unwrap();
        dom.destroy().unwrap();
    };
    // Six events (started, stopped, three times) for a channel of one.
    let pid = std::process::id();
    for _ in 0..3 {
        cycle(&format!("virtkube-events-{pid}"));
    }
    wait_for("the dropped-event flag", || dropped.load(Ordering::Acquire));
    assert!(events.try_recv().is_ok(), "the first event is queued");

    // With room again, events flow: one for another domain arrives. Events
    // left over from the storm (or other users' of the test driver) may fill
    // the channel of one again first, so drain it and try a few times.
    let next = format!("virtkube-events-{pid}-next");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.contains(&next) {
        assert!(Instant::now() < deadline, "no event for {next}; got {got:?}");
        while events.try_recv().is_ok() {}
        cycle(&next);
        std::thread::sleep(Duration::from_millis(200));
        while let Ok(event) = events.try_recv() {
            got.push(event.name);
        }
    }

    for id in ids {
        // SAFETY: `conn` is open and `id` came from registering on it; libvirt
        // frees the callback's state (the sender) through its free callback.
        let rc = unsafe { virt::sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
        assert_eq!(rc, 0);
    }
}
