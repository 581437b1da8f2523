//! libvirt-wire: a pure-Rust client of libvirt's remote RPC protocol. Arrives with its own issue.
