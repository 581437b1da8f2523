//! virtkube-shim's logic. Pure parts (rendering, configuration, instance
//! facts, the supervisor state machine, exit codes, PID 1 duties behind a
//! syscall trait) are separate from the I/O in `runtime`.

#[cfg(feature = "kube")]
pub mod cidata;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dhcp;
pub mod disks;
pub mod endpoint;
pub mod exit;
pub mod host;
pub mod instance;
pub mod pid1;
pub mod podnet;
pub mod render;
pub mod runtime;
pub mod serve_file;
pub mod sizing;
pub mod startup;
pub mod supervisor;
pub mod text;
pub mod vnc;
pub mod websocket;
