//! Prints virtkube's CRDs as YAML: `cargo run -p virtkube-api --bin virtkube-crds > deploy/01-crds.yaml`.

fn main() {
    match virtkube_api::crds::yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("virtkube-crds: cannot serialise the CRDs: {e}");
            std::process::exit(1);
        }
    }
}
