//! PID 1 duties: become a subreaper when not PID 1, and reap every zombie.
//! The system calls sit behind a small trait (as in youki) so the logic is
//! tested without being PID 1.

use std::io;

/// The system calls PID 1 duties need.
pub trait Syscall {
    /// This process's pid.
    fn getpid(&self) -> i32;
    /// `prctl(PR_SET_CHILD_SUBREAPER, 1)`: orphans below us are re-parented to us.
    fn set_child_subreaper(&self) -> io::Result<()>;
    /// `waitpid(-1, WNOHANG)`: one exited child as (pid, raw status), `None`
    /// when children remain but none has exited, `Err(ECHILD)` when none remain.
    fn wait_any_nohang(&self) -> io::Result<Option<(i32, i32)>>;
}

/// The real system calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linux;

impl Syscall for Linux {
    fn getpid(&self) -> i32 {
        std::process::id() as i32
    }

    fn set_child_subreaper(&self) -> io::Result<()> {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches
        // no memory of ours; the remaining arguments are ignored by the kernel.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn wait_any_nohang(&self) -> io::Result<Option<(i32, i32)>> {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => Ok(None),
            p if p > 0 => Ok(Some((p, status))),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

/// Takes on init's duty: as PID 1 nothing is needed; otherwise become a
/// subreaper so orphans are still ours to reap. Returns whether we are PID 1.
pub fn take_init_duty(sys: &impl Syscall) -> io::Result<bool> {
    if sys.getpid() == 1 {
        Ok(true)
    } else {
        sys.set_child_subreaper().map(|()| false)
    }
}

/// Reaps every exited child (waitpid(-1) until none is left to reap) and
/// returns them as (pid, raw status).
pub fn reap_zombies(sys: &impl Syscall) -> Vec<(i32, i32)> {
    let mut reaped = Vec::new();
    loop {
        match sys.wait_any_nohang() {
            Ok(Some(child)) => reaped.push(child),
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => break, // ECHILD: no children at all.
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    type WaitResult = io::Result<Option<(i32, i32)>>;

    struct Fake {
        pid: i32,
        subreaper: RefCell<bool>,
        waits: RefCell<Vec<WaitResult>>,
    }

    impl Syscall for Fake {
        fn getpid(&self) -> i32 {
            self.pid
        }
        fn set_child_subreaper(&self) -> io::Result<()> {
            *self.subreaper.borrow_mut() = true;
            Ok(())
        }
        fn wait_any_nohang(&self) -> io::Result<Option<(i32, i32)>> {
            self.waits.borrow_mut().remove(0)
        }
    }

    fn fake(pid: i32, waits: Vec<WaitResult>) -> Fake {
        Fake {
            pid,
            subreaper: RefCell::new(false),
            waits: RefCell::new(waits),
        }
    }

    #[test]
    fn pid_one_needs_no_subreaper_others_become_one() {
        let init = fake(1, vec![]);
        assert!(take_init_duty(&init).unwrap());
        assert!(!*init.subreaper.borrow());
        let other = fake(4242, vec![]);
        assert!(!take_init_duty(&other).unwrap());
        assert!(*other.subreaper.borrow());
    }

    #[test]
    fn reaps_until_no_child_has_exited() {
        let sys = fake(
            1,
            vec![
                Ok(Some((10, 0))),
                Err(io::Error::from_raw_os_error(libc::EINTR)),
                Ok(Some((11, 9))),
                Ok(None),
            ],
        );
        assert_eq!(reap_zombies(&sys), [(10, 0), (11, 9)]);
        let sys = fake(
            1,
            vec![Ok(Some((12, 0))), Err(io::Error::from_raw_os_error(libc::ECHILD))],
        );
        assert_eq!(reap_zombies(&sys), [(12, 0)]);
    }
}
