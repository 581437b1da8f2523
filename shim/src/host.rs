//! The node's facts the renderer needs, from libvirt's capabilities XML.

use crate::render::HostFacts;

/// Domain types the host offers for `arch` guests (hvm), from the
/// capabilities XML.
pub fn facts_from_capabilities(xml: &str, arch: &str) -> Result<HostFacts, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("libvirt's capabilities XML does not parse: {e}"))?;
    let mut domain_types = Vec::new();
    for guest in doc.descendants().filter(|n| n.has_tag_name("guest")) {
        let hvm = guest
            .children()
            .any(|c| c.has_tag_name("os_type") && c.text().map(str::trim) == Some("hvm"));
        if !hvm {
            continue;
        }
        for arch_node in guest
            .children()
            .filter(|c| c.has_tag_name("arch") && c.attribute("name") == Some(arch))
        {
            for domain in arch_node.children().filter(|c| c.has_tag_name("domain")) {
                if let Some(t) = domain.attribute("type")
                    && !domain_types.iter().any(|d| d == t)
                {
                    domain_types.push(t.to_owned());
                }
            }
        }
    }
    let test_driver = doc
        .descendants()
        .any(|n| n.has_tag_name("domain") && n.attribute("type") == Some("test"));
    if domain_types.is_empty() && test_driver {
        // libvirt's test driver lists only i686 guests but accepts any arch.
        domain_types.push("test".to_owned());
    }
    if domain_types.is_empty() {
        return Err(format!(
            "this node's libvirt offers no way to run {arch} guests (no <guest> with arch {arch} in its capabilities); run the VM on a node that can, or install QEMU for {arch} in the virthost"
        ));
    }
    Ok(HostFacts { domain_types })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: &str = r#"<capabilities>
  <host><cpu><arch>x86_64</arch></cpu></host>
  <guest><os_type>hvm</os_type>
    <arch name='i686'><domain type='qemu'/></arch>
  </guest>
  <guest><os_type>hvm</os_type>
    <arch name='x86_64'><wordsize>64</wordsize><machine>pc</machine><domain type='qemu'/><domain type='kvm'/></arch>
  </guest>
  <guest><os_type>xen</os_type><arch name='x86_64'><domain type='xen'/></arch></guest>
</capabilities>"#;

    #[test]
    fn reads_domain_types_of_the_arch() {
        assert_eq!(
            facts_from_capabilities(CAPS, "x86_64").unwrap().domain_types,
            ["qemu", "kvm"]
        );
        assert_eq!(facts_from_capabilities(CAPS, "i686").unwrap().domain_types, ["qemu"]);
    }

    #[test]
    fn the_test_driver_runs_any_arch() {
        let caps = "<capabilities><guest><os_type>hvm</os_type><arch name='i686'><domain type='test'/></arch></guest></capabilities>";
        assert_eq!(facts_from_capabilities(caps, "x86_64").unwrap().domain_types, ["test"]);
    }

    #[test]
    fn missing_arch_and_garbage_are_clear_errors() {
        let err = facts_from_capabilities(CAPS, "aarch64").unwrap_err();
        assert!(err.contains("no way to run aarch64 guests"), "{err}");
        let err = facts_from_capabilities("<capabilities", "x86_64").unwrap_err();
        assert!(err.contains("does not parse"), "{err}");
    }
}
