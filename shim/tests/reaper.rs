//! PID 1 duties with the real system calls: as a subreaper, orphaned
//! grandchildren are re-parented to us and reaped.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use virtkube_shim::pid1::{self, Linux};

fn is_zombie(pid: i32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    Some(state == 'Z')
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn orphaned_grandchildren_are_reaped() {
    // This test binary runs its tests in threads of one process: the subreaper
    // setting is process-wide, which is what we want here.
    assert!(!pid1::take_init_duty(&Linux).unwrap(), "a test process is not PID 1");
    let output = Command::new("sh")
        .arg("-c")
        .arg("sleep 0.3 & echo $!")
        .output()
        .unwrap();
    assert!(output.status.success());
    let orphan: i32 = String::from_utf8(output.stdout).unwrap().trim().parse().unwrap();
    // The shell has exited; its child is ours now.
    assert_eq!(
        parent_of(orphan),
        Some(std::process::id() as i32),
        "not re-parented to the subreaper"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_zombie(orphan) != Some(true) {
        assert!(Instant::now() < deadline, "the orphan never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reaped = pid1::reap_zombies(&Linux);
    assert!(
        reaped.iter().any(|(pid, status)| *pid == orphan && *status == 0),
        "{reaped:?}"
    );
    assert_eq!(is_zombie(orphan), None, "the zombie is still there");
    assert!(pid1::reap_zombies(&Linux).is_empty(), "nothing left to reap");
}
