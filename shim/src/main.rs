//! virtkube-shim: the VM's PID 1. The runtime (connect, create, console, stop)
//! arrives with the shim issue; today the binary only renders.

fn main() {
    eprintln!("virtkube-shim: the runtime is not implemented yet (see the shim issue)");
    std::process::exit(2);
}
