//! virtkube-sched: a Kubernetes scheduler extender that places VM pods on
//! nodes whose virthost can run them (docs/scheduling.md). Pure parts:
//! [`requirements`] (what a pod needs), [`filter`] (what a node has, and
//! its score) and [`extender`] (the scheduler's protocol); the daemon in
//! `main.rs` serves them over HTTP from reflectors of the cluster.

pub mod extender;
pub mod filter;
pub mod requirements;
