//! Envoy attributes as a value tree, encoded the way Envoy's `getProperty` serialises CEL values:
//! strings and bytes raw, integers as 8-byte little-endian, booleans as one byte, doubles as
//! 8-byte IEEE, maps and lists in the pairs encoding, messages (such as `xds.node`) as serialized
//! protobuf with sub-path lookup into their fields.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::Value as Json;

use crate::abi::Status;

/// One attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Bytes(Vec<u8>),
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    /// A CEL null: Envoy cannot serialise it.
    Null,
    Map(Vec<(String, Value)>),
    List(Vec<Value>),
    /// A protobuf message: its serialized form and its fields (unset fields read as defaults).
    Message {
        bytes: Vec<u8>,
        fields: BTreeMap<String, Value>,
    },
}

impl Value {
    /// Serialises as Envoy's `serializeValue` does.
    pub fn serialize(&self) -> Result<Vec<u8>, Status> {
        Ok(match self {
            Value::Str(text) => text.as_bytes().to_vec(),
            Value::Bytes(bytes) => bytes.clone(),
            Value::Int(value) => value.to_le_bytes().to_vec(),
            Value::UInt(value) => value.to_le_bytes().to_vec(),
            Value::Double(value) => value.to_le_bytes().to_vec(),
            Value::Bool(value) => vec![u8::from(*value)],
            Value::Null => return Err(Status::SerializationFailure),
            Value::Message { bytes, .. } => bytes.clone(),
            Value::Map(entries) => {
                let mut owned = Vec::with_capacity(entries.len());
                for (key, value) in entries {
                    owned.push((key.as_bytes().to_vec(), value.serialize()?));
                }
                encode_owned_pairs(&owned)
            }
            Value::List(items) => {
                let mut owned = Vec::with_capacity(items.len());
                for item in items {
                    owned.push((item.serialize()?, Vec::new()));
                }
                encode_owned_pairs(&owned)
            }
        })
    }

    /// One step of a property path.
    fn child(&self, part: &str) -> Result<Value, Status> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(key, _)| key == part)
                .map(|(_, value)| value.clone())
                .ok_or(Status::NotFound),
            Value::Message { fields, .. } => fields.get(part).cloned().ok_or(Status::NotFound),
            Value::List(items) => {
                let index: usize = part.parse().map_err(|_| Status::NotFound)?;
                items.get(index).cloned().ok_or(Status::NotFound)
            }
            _ => Err(Status::NotFound),
        }
    }

    /// A value from JSON as tests write attributes: strings, integers (int64), unsigned
    /// integers above `i64::MAX`, floats, booleans, objects as maps, arrays as lists.
    /// `{"$bytes": "<base64>"}` is a bytes value; `xds.node` is converted by [`Value::node`].
    pub fn from_json(json: &Json) -> Value {
        match json {
            Json::Null => Value::Null,
            Json::Bool(value) => Value::Bool(*value),
            Json::Number(number) => {
                if let Some(value) = number.as_i64() {
                    Value::Int(value)
                } else if let Some(value) = number.as_u64() {
                    Value::UInt(value)
                } else {
                    Value::Double(number.as_f64().unwrap_or(0.0))
                }
            }
            Json::String(text) => Value::Str(text.clone()),
            Json::Array(items) => Value::List(items.iter().map(Value::from_json).collect()),
            Json::Object(map) => {
                if map.len() == 1 {
                    if let Some(Json::String(encoded)) = map.get("$bytes") {
                        if let Some(bytes) = decode_base64(encoded) {
                            return Value::Bytes(bytes);
                        }
                    }
                }
                Value::Map(
                    map.iter()
                        .map(|(key, value)| (key.clone(), Value::from_json(value)))
                        .collect(),
                )
            }
        }
    }

    /// `envoy.config.core.v3.Node` from JSON with the fields `id`, `cluster`, `metadata`
    /// (a `google.protobuf.Struct`), `locality` (`region`, `zone`, `sub_zone`) and
    /// `user_agent_name`: serialized as the protobuf message, fields readable by sub-path.
    pub fn node(json: &Json) -> Value {
        let text = |key: &str| -> String {
            json.get(key)
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let metadata = json.get("metadata").cloned().unwrap_or(Json::Null);
        let metadata_struct = match &metadata {
            Json::Object(map) => Some(json_struct(map)),
            _ => None,
        };
        let locality_json = json.get("locality").cloned().unwrap_or(Json::Null);
        let locality = Locality {
            region: locality_json
                .get("region")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            zone: locality_json
                .get("zone")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            sub_zone: locality_json
                .get("sub_zone")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        let has_locality = locality_json.is_object();
        let node = Node {
            id: text("id"),
            cluster: text("cluster"),
            metadata: metadata_struct.clone(),
            locality: has_locality.then(|| locality.clone()),
            user_agent_name: text("user_agent_name"),
        };
        let mut locality_fields = BTreeMap::new();
        locality_fields.insert("region".into(), Value::Str(locality.region.clone()));
        locality_fields.insert("zone".into(), Value::Str(locality.zone.clone()));
        locality_fields.insert("sub_zone".into(), Value::Str(locality.sub_zone.clone()));
        let mut fields = BTreeMap::new();
        fields.insert("id".into(), Value::Str(node.id.clone()));
        fields.insert("cluster".into(), Value::Str(node.cluster.clone()));
        fields.insert(
            "user_agent_name".into(),
            Value::Str(node.user_agent_name.clone()),
        );
        // CEL reads a Struct field as a map.
        fields.insert(
            "metadata".into(),
            match &metadata {
                Json::Object(_) => struct_value(&metadata),
                _ => Value::Map(Vec::new()),
            },
        );
        fields.insert(
            "locality".into(),
            Value::Message {
                bytes: locality.encode_to_vec(),
                fields: locality_fields,
            },
        );
        Value::Message {
            bytes: node.encode_to_vec(),
            fields,
        }
    }
}

/// A `google.protobuf.Value` as CEL sees it: numbers are doubles.
fn struct_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(value) => Value::Bool(*value),
        Json::Number(number) => Value::Double(number.as_f64().unwrap_or(0.0)),
        Json::String(text) => Value::Str(text.clone()),
        Json::Array(items) => Value::List(items.iter().map(struct_value).collect()),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(key, value)| (key.clone(), struct_value(value)))
                .collect(),
        ),
    }
}

fn json_struct(map: &serde_json::Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(key, value)| (key.clone(), json_proto_value(value)))
            .collect(),
    }
}

fn json_proto_value(json: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(value) => Kind::BoolValue(*value),
        Json::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(0.0)),
        Json::String(text) => Kind::StringValue(text.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_proto_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(json_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[derive(Clone, PartialEq, prost::Message)]
struct Locality {
    #[prost(string, tag = "1")]
    region: String,
    #[prost(string, tag = "2")]
    zone: String,
    #[prost(string, tag = "3")]
    sub_zone: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Node {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    cluster: String,
    #[prost(message, optional, tag = "3")]
    metadata: Option<prost_types::Struct>,
    #[prost(message, optional, tag = "4")]
    locality: Option<Locality>,
    #[prost(string, tag = "6")]
    user_agent_name: String,
}

/// Converts the attribute tree a test gives: `xds.node` (and any object carrying
/// `"@type": "envoy.config.core.v3.Node"`) becomes the Node message.
pub fn attributes_from_json(json: &Json) -> Value {
    convert(json, &mut Vec::new())
}

fn convert(json: &Json, path: &mut Vec<String>) -> Value {
    if let Json::Object(map) = json {
        let is_node = (path.len() == 2 && path[0] == "xds" && path[1] == "node")
            || map
                .get("@type")
                .and_then(Json::as_str)
                .is_some_and(|kind| kind.ends_with("envoy.config.core.v3.Node"));
        if is_node {
            return Value::node(json);
        }
        if map.len() == 1 && map.contains_key("$bytes") {
            return Value::from_json(json);
        }
        let mut entries = Vec::new();
        for (key, value) in map {
            path.push(key.clone());
            entries.push((key.clone(), convert(value, path)));
            path.pop();
        }
        return Value::Map(entries);
    }
    Value::from_json(json)
}

/// Overlays `top` over `base` (maps merge recursively, anything else replaces).
pub fn merge(base: &Value, top: &Value) -> Value {
    match (base, top) {
        (Value::Map(base_entries), Value::Map(top_entries)) => {
            let mut entries = base_entries.clone();
            for (key, value) in top_entries {
                if let Some(slot) = entries.iter_mut().find(|(existing, _)| existing == key) {
                    slot.1 = merge(&slot.1, value);
                } else {
                    entries.push((key.clone(), value.clone()));
                }
            }
            Value::Map(entries)
        }
        _ => top.clone(),
    }
}

/// Splits a proxy-wasm property path (segments separated by NUL) as Envoy does.
pub fn split_path(path: &[u8]) -> Vec<String> {
    path.split(|byte| *byte == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// Looks a path up: the first segment in the attribute tree, else in filter state
/// (`wasm.<segment>`, as `proxy_set_property` stores it).
pub fn lookup(
    root: &Value,
    filter_state: &BTreeMap<String, Vec<u8>>,
    path: &[u8],
) -> Result<Vec<u8>, Status> {
    let parts = split_path(path);
    let Some(first) = parts.first() else {
        return Err(Status::NotFound);
    };
    let mut value = match root.child(first) {
        Ok(value) => value,
        Err(_) => {
            let state = filter_state
                .get(&format!("wasm.{first}"))
                .ok_or(Status::NotFound)?;
            if parts.len() > 1 {
                return Err(Status::NotFound);
            }
            return Ok(state.clone());
        }
    };
    for part in &parts[1..] {
        value = value.child(part)?;
    }
    value.serialize()
}

fn encode_owned_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let borrowed: Vec<(&[u8], &[u8])> = pairs
        .iter()
        .map(|(key, value)| (key.as_slice(), value.as_slice()))
        .collect();
    eastwest_common::header_pairs::encode(&borrowed)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text.bytes().filter(|byte| *byte != b'=') {
        let index = ALPHABET.iter().position(|candidate| *candidate == byte)? as u32;
        buffer = (buffer << 6) | index;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_like_envoy() {
        let tree = attributes_from_json(&json!({
            "xds": {"listener_direction": 1, "node": {"id": "n1", "metadata": {"LABELS": {"app": "cart"}, "NAMESPACE": "shop"}, "locality": {"region": "eu"}}},
            "connection": {"mtls": true, "uri_san_peer_certificate": "spiffe://a/ns/b/sa/c"},
            "raw": {"$bytes": "AAE="}
        }));
        let state = BTreeMap::new();
        let get = |path: &str| lookup(&tree, &state, path.replace('.', "\0").as_bytes());
        assert_eq!(get("xds.listener_direction").unwrap(), 1i64.to_le_bytes());
        assert_eq!(get("connection.mtls").unwrap(), vec![1]);
        assert_eq!(get("xds.node.metadata.LABELS.app").unwrap(), b"cart");
        assert_eq!(get("xds.node.locality.region").unwrap(), b"eu");
        assert_eq!(get("xds.node.locality.zone").unwrap(), b"");
        assert_eq!(get("raw").unwrap(), vec![0, 1]);
        assert_eq!(get("node"), Err(Status::NotFound));
        assert_eq!(get("xds.node.nope"), Err(Status::NotFound));
        let node = get("xds.node").unwrap();
        let decoded = Node::decode(node.as_slice()).unwrap();
        assert_eq!(decoded.id, "n1");
        assert_eq!(decoded.locality.unwrap().region, "eu");
        let labels = get("xds.node.metadata.LABELS").unwrap();
        let pairs = eastwest_common::header_pairs::decode(&labels).unwrap();
        assert_eq!(pairs, vec![(&b"app"[..], &b"cart"[..])]);
    }
}
