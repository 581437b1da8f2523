//! The report of `virtkube-gate-probe`, the gate's hostile client: one line
//! per attempt, `ATTEMPT<TAB>ALLOWED` or `ATTEMPT<TAB>REFUSED<TAB>reason`
//! (or `ERROR`), up to a line `ready`. Tests run the probe in a pod's cgroup,
//! a Docker container and real pods, and judge its report here.

/// What the probe may do: its own domain, nothing else.
pub const ALLOWED: [&str; 4] = [
    "create own domain",
    "own domain's state",
    "own domain's events",
    "own domain's console",
];

/// A domain XML (the shim's golden tiny one) without its pod interface and
/// that interface's metadata record: what the probe creates, whose callers
/// share the node's network namespace (where the gate refuses to plumb a
/// pod tap) or rename the domain (whose tap name then differs). `None` when
/// it has no pod interface to take out.
pub fn without_pod_interface(domain_xml: &str) -> Option<String> {
    let mut kept = Vec::new();
    let mut in_nic = false;
    for line in domain_xml.lines() {
        in_nic |= line.trim_start().starts_with("<interface ");
        if !in_nic && !line.contains("<virtkube:interface ") {
            kept.push(line);
        }
        in_nic &= !line.contains("</interface>");
    }
    (kept.len() < domain_xml.lines().count()).then(|| kept.join("\n") + "\n")
}

/// Judges the report's lines: every attempt but [`ALLOWED`] must be refused
/// with the gate's reason, and every allowed one must have happened. Returns
/// how many attempts were refused, or names the first that was not as it
/// should be (with the whole report).
pub fn judge(lines: &[String]) -> Result<usize, String> {
    let report = lines.join("\n");
    let mut refusals = 0;
    for line in lines {
        let mut fields = line.splitn(3, '\t');
        let (attempt, verdict, reason) = (
            fields.next().unwrap_or(""),
            fields.next().unwrap_or(""),
            fields.next().unwrap_or(""),
        );
        if ALLOWED.contains(&attempt) {
            if verdict != "ALLOWED" {
                return Err(format!("{attempt} should be allowed:\n{report}"));
            }
        } else if verdict != "REFUSED" {
            return Err(format!("{attempt} was not refused by the gate:\n{report}"));
        } else if !reason.starts_with("access denied by virtkube-gate: ") || reason.len() <= 40 {
            return Err(format!("{attempt}: refused without a reason: {reason:?}\n{report}"));
        } else {
            refusals += 1;
        }
    }
    match ALLOWED
        .iter()
        .find(|allowed| !lines.iter().any(|l| l.starts_with(&format!("{allowed}\t"))))
    {
        Some(missing) => Err(format!("the probe never got to {missing:?}:\n{report}")),
        None => Ok(refusals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const OWN: &str = "create own domain\tALLOWED\nown domain's state\tALLOWED\nown domain's events\tALLOWED\nown domain's console\tALLOWED\n";

    #[test]
    fn the_pod_interface_and_its_record_are_taken_out() {
        let xml = "<domain>\n  <metadata>\n    <virtkube:interface type=\"pod\"/>\n  </metadata>\n  <devices>\n    <interface type=\"ethernet\">\n      <target dev=\"vk1\"/>\n    </interface>\n    <serial type=\"pty\"/>\n  </devices>\n</domain>";
        let kept = without_pod_interface(xml).unwrap();
        assert!(!kept.contains("interface"), "{kept}");
        assert!(
            kept.contains("<serial type=\"pty\"/>") && kept.contains("</domain>"),
            "{kept}"
        );
        assert_eq!(without_pod_interface(&kept), None);
    }

    #[test]
    fn a_report_with_every_attempt_refused_passes() {
        let report = format!(
            "list all domains\tREFUSED\taccess denied by virtkube-gate: procedure 273 is not allowed here\n{OWN}"
        );
        assert_eq!(judge(&lines(&report)), Ok(1));
    }

    #[test]
    fn anything_that_got_through_or_went_unexplained_fails() {
        for (report, needle) in [
            (format!("list all domains\tALLOWED\n{OWN}"), "was not refused"),
            (
                format!("list all domains\tERROR\tlibvirt error 1\n{OWN}"),
                "was not refused",
            ),
            (format!("list all domains\tREFUSED\tno\n{OWN}"), "without a reason"),
            (
                "create own domain\tREFUSED\taccess denied by virtkube-gate: something long enough to count".to_owned(),
                "should be allowed",
            ),
            ("create own domain\tALLOWED\n".to_owned(), "never got to"),
        ] {
            let e = judge(&lines(&report)).unwrap_err();
            assert!(e.contains(needle), "{report:?}: {e}");
        }
    }
}
