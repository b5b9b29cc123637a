//! Namespaces: a name and labels, which NetworkPolicy's namespaceSelector matches.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace as K8sNamespace;

/// The label the API server puts on every Namespace (since 1.21), so a policy can select a
/// namespace by name; added here too when an object lacks it (a directory written by hand).
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

pub fn namespace_from_k8s(ns: &K8sNamespace) -> Result<Namespace, String> {
    let name = ns
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("no metadata.name")?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAME_LABEL.into(), name.clone());
    Ok(Namespace { name, labels })
}
