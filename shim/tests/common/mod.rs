//! Helpers shared by the shim's integration tests.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::{Path, PathBuf};

use virtkube_api::resolve::{self, ResolvedTemplate};
use virtkube_shim::render::{HostFacts, Instance, render};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example templates under deploy/examples, as (name, path).
pub fn example_templates() -> Vec<(String, PathBuf)> {
    let dir = repo_root().join("deploy/examples");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| {
            // Only VirtTemplates are rendered; other examples (Deployments…) are not.
            std::fs::read_to_string(p).unwrap().contains("kind: VirtTemplate")
        })
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no example templates in {}", dir.display());
    out
}

pub fn load(path: &Path) -> ResolvedTemplate {
    let text = std::fs::read_to_string(path).unwrap();
    resolve::parse_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixed instance every golden file is rendered for.
pub fn golden_instance(template: &ResolvedTemplate, name: &str) -> Instance {
    Instance {
        domain_name: format!("virtkube-golden_{name}-0"),
        uuid: Some("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b".into()),
        namespace: Some("virtkube-golden".into()),
        pod_name: Some(format!("{name}-0")),
        pod_uid: Some("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b".into()),
        template_name: template.name.clone(),
    }
}

pub fn render_golden(name: &str, path: &Path, host: &HostFacts) -> String {
    let template = load(path);
    render(&template, &golden_instance(&template, name), host).unwrap()
}
