//! libvirt-wire: a pure-Rust, tokio-based client of libvirt's remote RPC
//! protocol (XDR over a unix socket or TCP), for programs that cannot link
//! libvirt.so — virtkube's static shim.
//!
//! It implements exactly the calls virtkube needs (a small, explicit set a
//! future filtering gate can allow): the handshake, capabilities, creating a
//! transient domain, its state, shutdown and destroy, per-domain lifecycle
//! events, and the console stream.
//!
//! ```no_run
//! # async fn demo() -> libvirt_wire::Result<()> {
//! use libvirt_wire::{Client, Options, flags};
//! let client = Client::connect("qemu:///system", Options::default()).await?;
//! let domain = client.create_xml("<domain>…</domain>", flags::START_AUTODESTROY).await?;
//! let mut events = client.lifecycle_events(&domain).await?;
//! let mut console = client.open_console(&domain, None, flags::CONSOLE_FORCE).await?;
//! while let Some(output) = console.read().await? { /* guest output, or a gap */ }
//! # Ok(()) }
//! ```

pub mod api;
pub mod client;
pub mod disk_fd;
pub mod error;
pub mod fdpass;
pub mod protocol;
mod queue;
pub mod uri;
pub mod xdr;

pub use api::{
    Client, Console, ConsoleOutput, ConsoleReader, ConsoleWriter, DomainState, LifecycleEvent, LifecycleEvents,
    Screenshot, StoppedReason, flags,
};
pub use client::{Connection, Options};
pub use error::{Error, LibvirtError, Result};
pub use protocol::DomainRef;
