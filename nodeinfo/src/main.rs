//! virtkube-nodeinfo: publishes VirtNode, Node labels and VirtDomains. Arrives with its own issue.

fn main() {
    eprintln!("virtkube-nodeinfo: not implemented yet (see the nodeinfo issue)");
    std::process::exit(2);
}
