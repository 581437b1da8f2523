//! virtkube-gate: the virthost's door for VM containers. A VM container
//! mounts the gate's socket instead of libvirtd's; the gate learns who is
//! calling from the kernel and lets each caller create and control its own
//! domain only, through the calls the shim makes and with domain XML the
//! node's policy admits. See docs/gate.md.

pub mod config;
pub mod identity;
pub mod keeper;
pub mod placement;
pub mod podnet;
pub mod pods;
pub mod policy;
pub mod probe_report;
pub mod relay;
pub mod sizing;
pub mod volumes;
