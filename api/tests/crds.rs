//! The CRDs under deploy/ are generated from the types, structural, and every
//! field is documented (descriptions become `kubectl explain`).
//! `UPDATE_CRDS=1 cargo test -p virtkube-api --test crds` regenerates deploy/01-crds.yaml.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use serde_json::{Value, json};
use virtkube_api::crds;

#[test]
fn checked_in_crds_match_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/01-crds.yaml");
    let generated = crds::yaml().unwrap();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == generated,
        "deploy/01-crds.yaml is out of date: run `cargo run -p virtkube-api --bin virtkube-crds > deploy/01-crds.yaml`"
    );
}

/// Problems that make a schema non-structural (Kubernetes' rules, as far as
/// these generated schemas can break them), each with its JSON path.
fn structural_problems(schema: &Value, path: &str, in_junctor: bool, problems: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for forbidden in ["$ref", "definitions", "$defs", "$schema"] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: uses {forbidden}"));
        }
    }
    let escapes_type = obj.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if in_junctor {
        for forbidden in ["type", "description", "default", "nullable", "additionalProperties"] {
            if obj.contains_key(forbidden) {
                problems.push(format!("{path}: {forbidden} inside anyOf/oneOf/allOf/not"));
            }
        }
    } else if !escapes_type && obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
        problems.push(format!("{path}: has no type"));
    }
    if obj.get("type") == Some(&json!("array")) && !obj.contains_key("items") {
        problems.push(format!("{path}: array without items"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            structural_problems(sub, &format!("{path}.{name}"), in_junctor, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(items, &format!("{path}[]"), in_junctor, problems);
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_problems(additional, &format!("{path}{{}}"), in_junctor, problems);
    }
    for junctor in ["anyOf", "oneOf", "allOf"] {
        for (i, sub) in obj
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            structural_problems(sub, &format!("{path}.{junctor}[{i}]"), true, problems);
        }
    }
    if let Some(not) = obj.get("not") {
        structural_problems(not, &format!("{path}.not"), true, problems);
    }
}

fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let here = format!("{path}.{name}");
            if sub
                .get("description")
                .and_then(Value::as_str)
                .is_none_or(|d| d.trim().is_empty())
            {
                out.push(here.clone());
            }
            undocumented(sub, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
}

fn schemas() -> Vec<(String, Value)> {
    crds::all()
        .into_iter()
        .map(|crd| {
            let version = &crd.spec.versions[0];
            let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
            (crd.spec.names.kind.clone(), serde_json::to_value(schema).unwrap())
        })
        .collect()
}

#[test]
fn crd_schemas_are_structural() {
    for (kind, schema) in schemas() {
        let mut problems = Vec::new();
        structural_problems(&schema, kind.as_str(), false, &mut problems);
        assert!(problems.is_empty(), "{kind} is not structural: {problems:#?}");
    }
}

#[test]
fn the_structural_check_catches_non_structural_schemas() {
    let bad = json!({
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "string", "description": "x"}, {"type": "integer"}]},
            "b": {"description": "no type"},
            "c": {"$ref": "#/definitions/C"},
            "d": {"type": "array"}
        }
    });
    let mut problems = Vec::new();
    structural_problems(&bad, "Bad", false, &mut problems);
    for expected in [
        "Bad.a: has no type",
        "type inside anyOf",
        "Bad.b: has no type",
        "Bad.c: uses $ref",
        "Bad.d: array without items",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected} not found in {problems:#?}"
        );
    }
}

#[test]
fn every_field_is_documented() {
    for (kind, schema) in schemas() {
        let mut missing = Vec::new();
        undocumented(&schema, &kind, &mut missing);
        // metadata is Kubernetes' own ObjectMeta, documented by the API server.
        missing.retain(|p| !p.ends_with(".metadata"));
        assert!(missing.is_empty(), "{kind}: fields without a description: {missing:#?}");
    }
}

#[test]
fn printer_columns_and_short_names() {
    let expected: [(&str, &[&str], &[&str]); 5] = [
        ("VirtTemplate", &["Arch", "CPUs", "Memory", "Age"], &["vt"]),
        (
            "VirtNode",
            &["Arch", "KVM", "CPUs", "Memory", "Domains", "Age"],
            &["vn"],
        ),
        (
            "VirtDomain",
            &["Node", "State", "RunState", "vCPUs", "Memory", "Age"],
            &["vd"],
        ),
        (
            "ImageRepository",
            &["Claim", "Phase", "Capacity", "Available", "Pool", "Age"],
            &["irepo"],
        ),
        (
            "ImageFile",
            &["Repository", "Phase", "Format", "Capacity", "OnDisk", "Backing", "Age"],
            &["ifile"],
        ),
    ];
    for crd in crds::all() {
        let (_, columns, short) = expected.iter().find(|(k, _, _)| *k == crd.spec.names.kind).unwrap();
        let version = &crd.spec.versions[0];
        let names: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(&names, columns, "{}", crd.spec.names.kind);
        let short_names = crd.spec.names.short_names.clone().unwrap_or_default();
        assert_eq!(
            &short_names, short,
            "{}: exactly these short names",
            crd.spec.names.kind
        );
        // Names other projects' resources take: `kubectl get vm` must not be ambiguous
        // in a cluster that also runs KubeVirt or CDI.
        const TAKEN: &[&str] = &[
            "vm",
            "vms",
            "vmi",
            "vmis",
            "vmim",
            "vmims",
            "vmirs",
            "vmpool",
            "vmsnapshot",
            "vmrestore",
            "vmexport",
            "vmclone",
            "vmtemplate",
            "dv",
            "dvs",
            "vmipreset",
            "vmis",
        ];
        for name in &short_names {
            assert!(
                !TAKEN.contains(&name.as_str()),
                "{}: short name {name} is KubeVirt's",
                crd.spec.names.kind
            );
        }
        assert_eq!(crd.spec.group, "virtkube.io");
        assert_eq!(version.name, "v1alpha1");
    }
}
