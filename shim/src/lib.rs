//! virtkube-shim's pure logic, separate from its I/O so it is testable without
//! a daemon: rendering a resolved template into libvirt domain XML.

pub mod render;
