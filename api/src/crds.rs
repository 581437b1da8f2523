//! The CustomResourceDefinitions, as `kubectl apply`-able YAML.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{ImageFile, ImageRepository, VirtDomain, VirtNode, VirtTemplate};

/// Every virtkube CRD.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        VirtTemplate::crd(),
        VirtNode::crd(),
        VirtDomain::crd(),
        ImageRepository::crd(),
        ImageFile::crd(),
    ]
}

/// The CRDs as one multi-document YAML file (what `deploy/01-crds.yaml` holds).
pub fn yaml() -> Result<String, serde_saphyr::ser_error::Error> {
    let mut out = String::from(
        "# Generated from the types in api/ by `cargo run -p virtkube-api --bin virtkube-crds`; do not edit.\n",
    );
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
