//! virtkube-nodeinfo: reads what the host can run and what its VMs do from
//! libvirt (the `virt` crate), and publishes VirtNode, Node labels and
//! VirtDomains by server-side apply. Pure parts: `facts` (XML parsing) and
//! `model` (what to publish); I/O: `collect` (libvirt) and `publish` (API).

pub mod collect;
pub mod facts;
pub mod images;
pub mod model;
pub mod publish;
pub mod runstate;
pub mod storage;
