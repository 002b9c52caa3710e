//! Decoding of the Envoy properties (attributes) the filters read, and resolution of a
//! workload's labels from Istio-style metadata (DESIGN.md §3).
//!
//! Envoy serializes properties in their native bit representation: integers as 8 little-endian
//! bytes, booleans as one byte, messages (such as `xds.node`) as serialized protobuf.

use prost::Message;
use prost_types::value::Kind;

use crate::labels::{Label, LabelKeys, Labels};

/// An `int64` property (for example `xds.listener_direction`).
pub fn decode_int64(bytes: &[u8]) -> Option<i64> {
    let word: [u8; 8] = bytes.try_into().ok()?;
    Some(i64::from_le_bytes(word))
}

/// A `bool` property (for example `connection.mtls`).
pub fn decode_bool(bytes: &[u8]) -> Option<bool> {
    match bytes {
        [0] => Some(false),
        [_] => Some(true),
        _ => None,
    }
}

/// Envoy's `envoy.config.core.v3.TrafficDirection`, as a listener reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    /// From the `listener_direction` value; `None` for UNSPECIFIED or anything unknown.
    pub fn from_traffic_direction(value: i64) -> Option<Direction> {
        match value {
            1 => Some(Direction::Inbound),
            2 => Some(Direction::Outbound),
            _ => None,
        }
    }
}

/// The fields of `envoy.config.core.v3.Node` that label resolution reads (others are skipped
/// by the decoder).
#[derive(Clone, PartialEq, Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<prost_types::Struct>,
    #[prost(message, optional, tag = "4")]
    pub locality: Option<Locality>,
}

/// `envoy.config.core.v3.Locality`.
#[derive(Clone, PartialEq, Message)]
pub struct Locality {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(string, tag = "2")]
    pub zone: String,
    #[prost(string, tag = "3")]
    pub sub_zone: String,
}

/// Labels resolved from metadata, and how many values were present but refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub labels: Labels,
    pub invalid_values: u32,
}

pub(crate) fn string_field<'a>(fields: &'a prost_types::Struct, name: &str) -> Option<&'a str> {
    match fields.fields.get(name)?.kind.as_ref()? {
        Kind::StringValue(value) if !value.is_empty() => Some(value),
        _ => None,
    }
}

fn struct_field<'a>(
    fields: &'a prost_types::Struct,
    name: &str,
) -> Option<&'a prost_types::Struct> {
    match fields.fields.get(name)?.kind.as_ref()? {
        Kind::StructValue(value) => Some(value),
        _ => None,
    }
}

/// Service name candidates in priority order, as Istio derives the canonical service.
const SERVICE_LABEL_KEYS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];

/// Resolves labels from Istio workload metadata (`NAMESPACE`, `WORKLOAD_NAME`, `LABELS`): the
/// shape of both an Istio sidecar's node metadata and the `x-envoy-peer-metadata` header.
pub fn labels_from_istio_metadata(metadata: &prost_types::Struct, keys: &LabelKeys) -> Resolved {
    let mut resolved = Resolved::default();
    let pod_labels = struct_field(metadata, "LABELS");
    let mut set = |label: Label, value: Option<&str>| {
        if let Some(value) = value {
            if resolved
                .labels
                .set_checked(label, value.as_bytes())
                .is_err()
            {
                resolved.invalid_values += 1;
            }
        }
    };
    let service = pod_labels
        .and_then(|labels| {
            SERVICE_LABEL_KEYS
                .iter()
                .find_map(|key| string_field(labels, key))
        })
        .or_else(|| string_field(metadata, "WORKLOAD_NAME"));
    set(Label::Service, service);
    set(Label::Namespace, string_field(metadata, "NAMESPACE"));
    for label in [Label::Environment, Label::Team, Label::Criticality] {
        let key = keys.key_for(label).unwrap_or_default();
        set(
            label,
            pod_labels.and_then(|labels| string_field(labels, key)),
        );
    }
    resolved
}

/// Resolves the labels of the node Envoy runs as, from its serialized `Node` message.
pub fn labels_from_node(node: &[u8], keys: &LabelKeys) -> Result<Resolved, prost::DecodeError> {
    let node = Node::decode(node)?;
    let mut resolved = match &node.metadata {
        Some(metadata) => labels_from_istio_metadata(metadata, keys),
        None => Resolved::default(),
    };
    if let Some(locality) = node.locality.as_ref().filter(|l| !l.region.is_empty()) {
        if resolved
            .labels
            .set_checked(Label::Region, locality.region.as_bytes())
            .is_err()
        {
            resolved.invalid_values += 1;
        }
    }
    Ok(resolved)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    pub(crate) fn string_value(value: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::StringValue(value.into())),
        }
    }

    pub(crate) fn istio_metadata(
        namespace: &str,
        workload: &str,
        labels: &[(&str, &str)],
    ) -> prost_types::Struct {
        let pod_labels = prost_types::Struct {
            fields: labels
                .iter()
                .map(|(k, v)| (k.to_string(), string_value(v)))
                .collect(),
        };
        let mut fields = BTreeMap::new();
        fields.insert("NAMESPACE".into(), string_value(namespace));
        fields.insert("WORKLOAD_NAME".into(), string_value(workload));
        fields.insert(
            "LABELS".into(),
            prost_types::Value {
                kind: Some(Kind::StructValue(pod_labels)),
            },
        );
        prost_types::Struct { fields }
    }

    #[test]
    fn scalar_properties_decode() {
        assert_eq!(decode_int64(&2i64.to_le_bytes()), Some(2));
        assert_eq!(decode_int64(b"short"), None);
        assert_eq!(decode_bool(&[1]), Some(true));
        assert_eq!(decode_bool(&[0]), Some(false));
        assert_eq!(decode_bool(&[]), None);
        assert_eq!(
            Direction::from_traffic_direction(1),
            Some(Direction::Inbound)
        );
        assert_eq!(
            Direction::from_traffic_direction(2),
            Some(Direction::Outbound)
        );
        assert_eq!(Direction::from_traffic_direction(0), None);
    }

    #[test]
    fn node_resolution_follows_the_istio_priority() {
        let node = Node {
            id: "sidecar~10.0.0.1~checkout-1.shop~shop.svc.cluster.local".into(),
            cluster: "checkout.shop".into(),
            metadata: Some(istio_metadata(
                "shop",
                "checkout-v1",
                &[
                    ("app", "checkout-app"),
                    ("app.kubernetes.io/name", "checkout"),
                    ("team", "payments"),
                    ("criticality", "high"),
                    ("environment", "prod"),
                ],
            )),
            locality: Some(Locality {
                region: "eu-west-1".into(),
                ..Default::default()
            }),
        };
        let resolved = labels_from_node(&node.encode_to_vec(), &LabelKeys::default()).unwrap();
        let labels = resolved.labels;
        assert_eq!(labels.get(Label::Service), Some("checkout"));
        assert_eq!(labels.get(Label::Namespace), Some("shop"));
        assert_eq!(labels.get(Label::Region), Some("eu-west-1"));
        assert_eq!(labels.get(Label::Team), Some("payments"));
        assert_eq!(labels.get(Label::Criticality), Some("high"));
        assert_eq!(labels.get(Label::Environment), Some("prod"));
        assert_eq!(resolved.invalid_values, 0);
    }

    #[test]
    fn workload_name_is_the_last_resort_and_custom_keys_apply() {
        let metadata = istio_metadata(
            "ns",
            "worker",
            &[("owner", "infra"), ("criticality", "bogus")],
        );
        let keys = LabelKeys {
            team: "owner".into(),
            ..Default::default()
        };
        let resolved = labels_from_istio_metadata(&metadata, &keys);
        assert_eq!(resolved.labels.get(Label::Service), Some("worker"));
        assert_eq!(resolved.labels.get(Label::Team), Some("infra"));
        assert_eq!(resolved.labels.get(Label::Criticality), None);
        assert_eq!(resolved.invalid_values, 1);
    }

    #[test]
    fn missing_or_garbage_node_metadata_is_not_fatal() {
        let empty = labels_from_node(&[], &LabelKeys::default()).unwrap();
        assert!(empty.labels.is_empty());
        assert!(labels_from_node(b"\xff\xff\xff\xff", &LabelKeys::default()).is_err());
    }
}
