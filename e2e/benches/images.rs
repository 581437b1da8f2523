//! Image repositories on a real cluster (`KUBECONFIG`; k8s-local in CI's
//! set-up): prints numbers, asserts only that each step happened.
//!
//! 1. A golden image of `SIZE_MIB` (default 1024) MiB imported from a file in
//!    a container image: `kubectl apply` → the ImageFile Ready.
//! 2. `CLONES` (default 10) copy-on-write clones of it, one after another:
//!    apply → Ready (p50, max).
//! 3. A VM on each clone, all created at once → every guest's first disk
//!    line in its log.
//! 4. The guest reading its whole disk (`dd` of `/dev/vda`, MB/s), `RUNS`
//!    (default 3) times each, interleaved: a clone (qcow2 over the raw golden
//!    image), the golden image itself read-only (a raw volume), and the same
//!    file passed from the VM container as a descriptor (`containerFile`).
//!
//! Times are polled with kubectl every 50 ms (a kubectl start each), so they
//! are accurate to about 0.2 s.
//!
//! Run: `KUBECONFIG=… cargo bench -p virtkube-e2e --bench images`.
#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::time::{Duration, Instant};

use virtkube_e2e::cluster::{
    RunNamespace, apply, deploy_virtkube, eventually, image_file_manifest, import_from, kubectl, object_field, ok,
    repository_claim, templated_vm_pod, tiny_template_with_disk, wait_for_virthost,
};
use virtkube_e2e::{max_secs, p50_secs};

const TIMEOUT: Duration = Duration::from_secs(600);

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Polls `done` every 50 ms; the time it took.
fn time_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Runs a VM that reads its disk and powers off; the guest's rate in MB/s.
fn read_rate(ns: &str, name: &str, image: &str, template: &str, bytes: u64) -> f64 {
    apply(&templated_vm_pod(ns, name, image, template));
    let mut ms = None;
    time_until(&format!("{name} to read its disk"), || {
        let logs = kubectl(&["-n", ns, "logs", name]).1;
        ms = logs
            .lines()
            .find_map(|l| l.strip_prefix("virtkube-tiny: read vda in "))
            .and_then(|rest| rest.strip_suffix(" ms"))
            .and_then(|ms| ms.trim().parse::<u64>().ok());
        ms.is_some()
    });
    ok(&["-n", ns, "delete", "pod", name, "--wait=true", "--timeout=60s"]);
    bytes as f64 / 1e6 / (ms.unwrap().max(1) as f64 / 1000.0)
}

fn main() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("this benchmark needs a cluster: set KUBECONFIG (scripts/test.sh brings up k8s-local)");
        std::process::exit(2);
    }
    let (mib, clones, runs) = (count("SIZE_MIB", 1024), count("CLONES", 10), count("RUNS", 3));
    deploy_virtkube();
    let namespace = RunNamespace::create("virtkube-bench-images");
    let ns = namespace.name().to_owned();
    apply(
        &virtkube_e2e::cluster::repo_file("deploy/examples/vm-rolebinding.yaml")
            .replace("namespace: default", &format!("namespace: {ns}")),
    );

    // The golden image's source: a container image carrying a raw disk.
    let id = std::process::id();
    let build = std::env::temp_dir().join(format!("virtkube-bench-images-{id}"));
    std::fs::create_dir_all(&build).unwrap();
    let mut disk = b"virtkube-disk:BENCH\n".to_vec();
    disk.resize(mib * 1024 * 1024, 0xa5);
    std::fs::write(build.join("root.raw"), &disk).unwrap();
    std::fs::set_permissions(
        build.join("root.raw"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    drop(disk);
    std::fs::write(
        build.join("Dockerfile"),
        "FROM virtkube/tiny:latest\nCOPY root.raw /disk/root.raw\n",
    )
    .unwrap();
    let tag = format!("virtkube/bench-images:{id}");
    virtkube_e2e::disk_image::build_context(&build, &tag);

    // The repository: a hostPath volume of the node.
    let repo = format!("bench-{id}");
    let dir = format!("/var/lib/virtkube-bench-repo-{id}");
    std::fs::create_dir_all(&dir).unwrap();
    apply(
        &(repository_claim(&repo, &dir, "8Gi")
            + &format!(
                "---\napiVersion: virtkube.io/v1alpha1\nkind: ImageRepository\nmetadata: {{name: {repo}}}\nspec: {{claimName: {repo}}}\n"
            )),
    );
    eventually("the repository to be Ready", &ns, TIMEOUT, || {
        object_field(None, "imagerepository", &repo, "{.status.phase}") == "Ready"
    });
    wait_for_virthost("the virthost that mounts the repository");
    let image_file = |name: &str, spec: &str| image_file_manifest(&ns, &repo, name, spec);

    apply(&image_file("golden", &import_from(&tag)));
    let import = time_until("the golden image's import", || {
        object_field(Some(&ns), "imagefile", "golden", "{.status.phase}") == "Ready"
    });
    println!(
        "golden image: {mib} MiB imported from a container image in {:.2} s",
        import.as_secs_f64()
    );

    let mut clone_times = Vec::new();
    for i in 0..clones {
        let name = format!("clone-{i}");
        apply(&image_file(&name, "  backingFile: golden\n"));
        clone_times.push(time_until(&name, || {
            object_field(Some(&ns), "imagefile", &name, "{.status.phase}") == "Ready"
        }));
    }
    println!(
        "{clones} copy-on-write clones of it, one after another, apply → Ready: p50 {:.2} s, max {:.2} s; on disk: {}",
        p50_secs(&clone_times),
        max_secs(&clone_times),
        object_field(Some(&ns), "imagefile", "clone-0", "{.status.allocation}")
    );

    for i in 0..clones {
        apply(&tiny_template_with_disk(
            &ns,
            &format!("vm-{i}"),
            &format!("{{imageFile: clone-{i}}}"),
            "",
        ));
    }
    let started = Instant::now();
    for i in 0..clones {
        apply(&templated_vm_pod(
            &ns,
            &format!("vm-{i}"),
            "virtkube/shim:latest",
            &format!("vm-{i}"),
        ));
    }
    time_until("every VM's disk line", || {
        (0..clones).all(|i| {
            kubectl(&["-n", &ns, "logs", &format!("vm-{i}")])
                .1
                .contains("vda says: virtkube-disk:BENCH")
        })
    });
    println!(
        "{clones} VMs, one on each clone, created at once → every guest's first disk line: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for i in 0..clones {
        ok(&["-n", &ns, "delete", "pod", &format!("vm-{i}"), "--wait=false"]);
    }
    time_until("the clone VMs to go", || {
        kubectl(&["-n", &ns, "get", "pods", "-o", "name"]).1.trim().is_empty()
    });

    let read = "virtkube.ddread virtkube.poweroff";
    apply(&tiny_template_with_disk(
        &ns,
        "read-clone",
        "{imageFile: clone-0}",
        read,
    ));
    apply(&tiny_template_with_disk(
        &ns,
        "read-golden",
        "{imageFile: golden, readOnly: true}",
        read,
    ));
    apply(&tiny_template_with_disk(
        &ns,
        "read-fd",
        "{containerFile: /disk/root.raw, readOnly: true}",
        read,
    ));
    let bytes = (mib * 1024 * 1024) as u64;
    let (mut clone_rates, mut golden_rates, mut fd_rates) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        clone_rates.push(read_rate(
            &ns,
            &format!("read-clone-{run}"),
            "virtkube/shim:latest",
            "read-clone",
            bytes,
        ));
        golden_rates.push(read_rate(
            &ns,
            &format!("read-golden-{run}"),
            "virtkube/shim:latest",
            "read-golden",
            bytes,
        ));
        fd_rates.push(read_rate(&ns, &format!("read-fd-{run}"), &tag, "read-fd", bytes));
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    println!("the guest reading its whole {mib} MiB disk (dd), p50 of {runs}:");
    println!(
        "  ImageFile clone (qcow2 over the raw golden image): {:>7.0} MB/s",
        median(&mut clone_rates)
    );
    println!(
        "  ImageFile golden image, read-only (raw volume):    {:>7.0} MB/s",
        median(&mut golden_rates)
    );
    println!(
        "  containerFile, read-only (descriptor from the pod): {:>6.0} MB/s",
        median(&mut fd_rates)
    );

    // Clean up: ImageFiles (the clones first), the repository, the claim.
    let mut names: Vec<String> = (0..clones).map(|i| format!("clone-{i}")).collect();
    names.push("golden".into());
    let mut args = vec!["-n", ns.as_str(), "delete", "imagefile", "--wait=false"];
    args.extend(names.iter().map(String::as_str));
    ok(&args);
    time_until("the ImageFiles to go", || {
        kubectl(&["-n", &ns, "get", "imagefiles", "-o", "name"])
            .1
            .trim()
            .is_empty()
    });
    ok(&["delete", "imagerepository", &repo, "--wait=true", "--timeout=60s"]);
    let _ = kubectl(&["-n", "virtkube-system", "delete", "pvc", &repo, "--wait=false"]);
    let _ = kubectl(&["delete", "pv", &repo, "--wait=false"]);
    let _ = virtkube_e2e::run("/usr/bin/docker", &["rmi", "-f", &tag], None);
    let _ = std::fs::remove_dir_all(&build);
    let _ = std::fs::remove_dir_all(&dir);
    drop(namespace);
}
