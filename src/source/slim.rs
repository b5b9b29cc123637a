//! What the `kube` source keeps of the objects it watches: Pods and Namespaces cut down to the
//! fields the model reads before they enter a reflector store.
//!
//! Every pod of the cluster is watched (remote pods are NetworkPolicy peers), and a pod as the
//! API serves it is mostly fields rsdn never reads: managedFields, annotations, env, volumes,
//! probes, container statuses. Cutting those from a k8s-openapi `Pod` is not enough: its
//! structs are large even when empty (a `Container` is 2 KiB of `None`s), so pods are read into
//! `SlimPod`, a projection that holds only the kept fields and whose deserializer skips the
//! others without building them. Namespaces are few and their struct small: they stay
//! `Namespace`s, trimmed by `slim_namespace` (kube-rs `WatchStreamExt::modify`).
//! `tests/pod_store_memory.rs` measures what this saves.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Deserializer, Serialize};

/// A Pod as the `kube` source stores it: name, namespace, labels, resourceVersion and uid;
/// nodeName, hostNetwork, the containers' names and ports; phase and addresses. Whatever else
/// the API server sends (and whatever later API versions add) is skipped while parsing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct SlimPod {
    #[serde(default, deserialize_with = "kept_metadata")]
    pub metadata: ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SlimPodSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SlimPodStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<SlimContainer>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct SlimContainer {
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct SlimPodStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

impl SlimPod {
    /// The k8s-openapi Pod with just these fields, for the model builder (built only when the
    /// pod's resourceVersion changed, and dropped right after).
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PodSpec {
                node_name: s.node_name.clone(),
                host_network: s.host_network,
                containers: s
                    .containers
                    .iter()
                    .map(|c| Container {
                        name: c.name.clone(),
                        ports: c.ports.clone(),
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s.pod_ips.clone(),
                ..PodStatus::default()
            }),
        }
    }
}

/// core/v1 pods, as kube-rs's typed `Api` needs to know them.
impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields a store keeps: the name and namespace (its key), labels (what
/// selectors match), resourceVersion (the model's cache key) and uid.
fn kept_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kept {
        name: Option<String>,
        namespace: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        resource_version: Option<String>,
        uid: Option<String>,
    }
    let k = Option::<Kept>::deserialize(d)?;
    Ok(k.map(|k| ObjectMeta {
        name: k.name,
        namespace: k.namespace,
        labels: k.labels,
        resource_version: k.resource_version,
        uid: k.uid,
        ..ObjectMeta::default()
    })
    .unwrap_or_default())
}

/// A Namespace cut down to its name, labels, resourceVersion and uid.
pub fn slim_namespace(ns: &mut Namespace) {
    let m = std::mem::take(&mut ns.metadata);
    ns.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        resource_version: m.resource_version,
        uid: m.uid,
        ..ObjectMeta::default()
    };
    ns.spec = None;
    ns.status = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterModel, ModelBuilder, ModelScope};
    use serde_json::{json, Value};

    /// A pod as the API server serves it: managedFields, annotations, owner, env, probes,
    /// volumes, tolerations, conditions and container statuses.
    const FULL_POD: &str = include_str!("testdata/pod.json");

    fn scope() -> ModelScope {
        ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "worker-1".into(),
            programmed: Default::default(),
        }
    }

    fn model_of(pods: &[Pod], namespaces: &[Namespace]) -> ClusterModel {
        let mut b = ModelBuilder::default();
        pods.iter().for_each(|p| b.add_pod(p));
        namespaces.iter().for_each(|n| b.add_namespace(n));
        b.finish(&scope())
    }

    #[test]
    fn a_slim_pod_keeps_only_what_the_model_reads() {
        let slim: SlimPod = serde_json::from_str(FULL_POD).unwrap();
        let kept = json!({
            "metadata": {
                "name": "checkout-7d9c8b6f4d-x2k9q",
                "namespace": "shop",
                "labels": {
                    "app.kubernetes.io/name": "checkout",
                    "app.kubernetes.io/part-of": "shop",
                    "pod-template-hash": "7d9c8b6f4d",
                    "tier": "backend"
                },
                "resourceVersion": "48213377",
                "uid": "5d0c2f8e-7a41-4b9e-8d2c-6e1f0a3b4c5d"
            },
            "spec": {
                "nodeName": "worker-17",
                "containers": [
                    {"name": "checkout", "ports": [
                        {"containerPort": 8080, "name": "http", "protocol": "TCP"},
                        {"containerPort": 9102, "name": "metrics", "protocol": "TCP"}
                    ]},
                    {"name": "envoy", "ports": [
                        {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}
                    ]}
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.128.6.23",
                "podIPs": [{"ip": "10.128.6.23"}]
            }
        });
        assert_eq!(serde_json::to_value(&slim).unwrap(), kept);
        // The Pod the model builder gets holds the same and nothing more.
        let mut as_pod = kept.clone();
        as_pod["apiVersion"] = json!("v1");
        as_pod["kind"] = json!("Pod");
        assert_eq!(serde_json::to_value(slim.to_pod()).unwrap(), as_pod);
        // The model reads the same pod from either.
        let full: Pod = serde_json::from_str(FULL_POD).unwrap();
        let m = model_of(&[slim.to_pod()], &[]);
        assert_eq!(m, model_of(&[full], &[]));
        let pod = &m.pods[&("shop".to_string(), "checkout-7d9c8b6f4d-x2k9q".to_string())];
        assert_eq!(pod.ports.len(), 3, "{pod:?}");
    }

    /// Whatever decides whether and how a pod is in the model survives slimming: for each
    /// variant, the model of the slim pod is the model of the full one.
    #[test]
    fn the_model_of_a_slim_pod_is_the_model_of_the_full_one() {
        type Variant = (&'static str, fn(&mut Value));
        let variants: [Variant; 9] = [
            ("as served", |_| {}),
            ("hostNetwork", |p| p["spec"]["hostNetwork"] = json!(true)),
            ("succeeded", |p| p["status"]["phase"] = json!("Succeeded")),
            ("failed", |p| p["status"]["phase"] = json!("Failed")),
            ("pending, no address yet", |p| {
                p["status"] = json!({"phase": "Pending"});
            }),
            ("podIP only, no podIPs", |p| {
                p["status"].as_object_mut().unwrap().remove("podIPs");
            }),
            ("dual-stack, IPv6 first", |p| {
                p["status"]["podIPs"] = json!([{"ip": "fd00::17"}, {"ip": "10.128.6.24"}]);
            }),
            ("no labels, no namespace", |p| {
                let m = p["metadata"].as_object_mut().unwrap();
                m.remove("labels");
                m.remove("namespace");
            }),
            ("no name (skipped)", |p| {
                p["metadata"].as_object_mut().unwrap().remove("name");
            }),
        ];
        for (what, change) in variants {
            let mut v: Value = serde_json::from_str(FULL_POD).unwrap();
            change(&mut v);
            let full: Pod = serde_json::from_value(v.clone()).unwrap();
            let slim: SlimPod = serde_json::from_value(v).unwrap();
            assert_eq!(
                model_of(&[slim.to_pod()], &[]),
                model_of(&[full], &[]),
                "{what}"
            );
        }
    }

    #[test]
    fn a_slim_namespace_keeps_its_name_and_labels() {
        let full: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "resourceVersion": "812", "uid": "u-1",
                "labels": {"kubernetes.io/metadata.name": "shop", "team": "payments"},
                "annotations": {"owner": "payments@example.com"},
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                    "apiVersion": "v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}}}]},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }))
        .unwrap();
        let mut slim = full.clone();
        slim_namespace(&mut slim);
        assert_eq!(
            serde_json::to_value(&slim).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "resourceVersion": "812", "uid": "u-1",
                    "labels": {"kubernetes.io/metadata.name": "shop", "team": "payments"}}})
        );
        assert_eq!(model_of(&[], &[slim]), model_of(&[], &[full]));
    }
}
