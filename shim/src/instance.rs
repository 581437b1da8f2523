//! Who this VM is: the pod's identity and annotations (downward API) or, in
//! plain Docker, the container's hostname.

use std::collections::BTreeMap;

use crate::render::Instance;

/// Identity of the VM and the annotations that may override its template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// For the renderer.
    pub instance: Instance,
    /// The pod's annotations (empty outside Kubernetes).
    pub annotations: BTreeMap<String, String>,
}

/// Builds the instance facts. `env` looks up variables; `annotations` are
/// the pod's (from the downward API file or the API); `hostname` is the
/// container's hostname.
pub fn gather(
    env: impl Fn(&str) -> Option<String>,
    annotations: BTreeMap<String, String>,
    hostname: &str,
    template_name: Option<String>,
) -> Result<Facts, String> {
    let non_empty = |key: &str| env(key).filter(|v| !v.trim().is_empty());
    let pod_name = non_empty("POD_NAME");
    let namespace = non_empty("POD_NAMESPACE");
    let pod_uid = non_empty("POD_UID");
    let domain_name = match (&namespace, &pod_name) {
        (Some(ns), Some(pod)) => format!("{ns}_{pod}"),
        (None, Some(_)) => {
            return Err(
                "POD_NAME is set but POD_NAMESPACE is not; set both from the downward API (metadata.namespace)".into(),
            );
        }
        (Some(_), None) => {
            return Err(
                "POD_NAMESPACE is set but POD_NAME is not; set both from the downward API (metadata.name)".into(),
            );
        }
        (None, None) => {
            let host = hostname.trim();
            if host.is_empty() {
                return Err(
                    "no pod identity (POD_NAME, POD_NAMESPACE) and no hostname to name the domain after".into(),
                );
            }
            host.to_owned()
        }
    };
    // One form from here on: the canonical lowercase, dashed text libvirt and
    // the renderer use (Kubernetes' UIDs already are; a bare 32-digit form is
    // accepted and normalised, not refused later).
    let pod_uid = pod_uid
        .map(|uid| {
            libvirt_wire::protocol::canonical_uuid(uid.trim())
                .ok_or_else(|| format!("POD_UID={uid:?} is not a UUID; set it from the downward API (metadata.uid)"))
        })
        .transpose()?;
    let template_name = template_name.or_else(|| annotations.get(virtkube_api::annotations::TEMPLATE).cloned());
    Ok(Facts {
        instance: Instance {
            domain_name,
            uuid: pod_uid.clone(),
            namespace,
            pod_name,
            pod_uid,
            template_name,
        },
        annotations,
    })
}

/// Parses a downward API annotations file: one `key="value"` per line, the
/// value quoted as Go's strconv.Quote does.
pub fn parse_downward_annotations(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, quoted) = line
            .split_once('=')
            .ok_or_else(|| format!("annotations file line {}: {line:?} is not key=\"value\"", n + 1))?;
        let value = unquote(quoted)
            .ok_or_else(|| format!("annotations file line {}: {quoted:?} is not a quoted string", n + 1))?;
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escaped = chars.next()?;
        let mut hex = |n: usize| -> Option<u32> {
            let digits: String = (0..n).map(|_| chars.next()).collect::<Option<String>>()?;
            u32::from_str_radix(&digits, 16).ok()
        };
        out.push(match escaped {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'a' => '\u{7}',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'v' => '\u{b}',
            '\\' => '\\',
            '"' => '"',
            '\'' => '\'',
            'x' => char::from_u32(hex(2)?)?,
            'u' => char::from_u32(hex(4)?)?,
            'U' => char::from_u32(hex(8)?)?,
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn docker_mode_uses_the_hostname() {
        let facts = gather(env(&[]), BTreeMap::new(), "3f2a9c1d\n", None).unwrap();
        assert_eq!(facts.instance.domain_name, "3f2a9c1d");
        assert_eq!(facts.instance.uuid, None);
        assert!(facts.annotations.is_empty());
    }

    #[test]
    fn pod_mode_names_the_domain_namespace_pod_and_uses_the_uid() {
        let uid = "0b0e1d8a-1111-4222-8333-444455556666";
        let file = "kubernetes.io/config.seen=\"2026-11-22T10:00:00Z\"\nvirtkube.io/template=\"tiny\"\nvirtkube.io/cmdline=\"console=ttyS0 msg=\\\"hi\\\"\\n\"\n";
        let facts = gather(
            env(&[("POD_NAME", "vm-0"), ("POD_NAMESPACE", "prod"), ("POD_UID", uid)]),
            parse_downward_annotations(file).unwrap(),
            "vm-0",
            None,
        )
        .unwrap();
        assert_eq!(facts.instance.domain_name, "prod_vm-0");
        assert_eq!(facts.instance.uuid.as_deref(), Some(uid));
        assert_eq!(facts.instance.template_name.as_deref(), Some("tiny"));
        assert_eq!(facts.annotations["virtkube.io/cmdline"], "console=ttyS0 msg=\"hi\"\n");
    }

    #[test]
    fn inconsistent_or_bad_identity_is_a_clear_error() {
        assert!(
            gather(env(&[("POD_NAME", "a")]), BTreeMap::new(), "h", None)
                .unwrap_err()
                .contains("POD_NAMESPACE is not")
        );
        assert!(
            gather(env(&[("POD_NAMESPACE", "a")]), BTreeMap::new(), "h", None)
                .unwrap_err()
                .contains("POD_NAME is not")
        );
        let err = gather(
            env(&[("POD_NAME", "a"), ("POD_NAMESPACE", "b"), ("POD_UID", "nope")]),
            BTreeMap::new(),
            "h",
            None,
        )
        .unwrap_err();
        assert!(err.contains("POD_UID=\"nope\" is not a UUID"), "{err}");
        assert!(
            gather(env(&[]), BTreeMap::new(), " ", None)
                .unwrap_err()
                .contains("no hostname")
        );
        let err = parse_downward_annotations("garbage line").unwrap_err();
        assert!(err.contains("line 1") && err.contains("key=\"value\""), "{err}");
        let err = parse_downward_annotations("k=\"unterminated").unwrap_err();
        assert!(err.contains("not a quoted string"), "{err}");
    }

    #[test]
    fn go_escapes() {
        assert_eq!(unquote(r#""a\x41\u00e9\U0001F600\t""#).as_deref(), Some("aAé😀\t"));
        assert_eq!(unquote(r#""\q""#), None);
        assert_eq!(unquote(r#""\x4""#), None);
    }
}
