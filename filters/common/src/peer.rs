//! Istio's `x-envoy-peer-metadata` header: base64 of a serialized `google.protobuf.Struct`
//! holding the peer's workload metadata (the same shape as a sidecar's node metadata).

use base64::Engine;
use prost::Message;

use crate::labels::LabelKeys;
use crate::properties::{labels_from_istio_metadata, string_field, Resolved};

/// Istio's header carrying the calling workload's metadata.
pub const ISTIO_PEER_METADATA_HEADER: &str = "x-envoy-peer-metadata";

/// Larger headers are not decoded (Istio's are a few hundred bytes).
pub const MAX_PEER_METADATA_BYTES: usize = 8192;

/// Why a peer-metadata header was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMetadataError {
    TooLarge,
    NotBase64,
    NotProtobuf,
}

/// What a peer-metadata header claims: the labels it resolves to, and the identity it states
/// as raw strings (checked against the certificate before any of its labels is used).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    pub resolved: Resolved,
    /// `NAMESPACE`, as given (even when it is not a valid label value).
    pub namespace: Option<String>,
    /// `SERVICE_ACCOUNT`, as given.
    pub service_account: Option<String>,
}

/// Decodes the header into labels.
pub fn labels_from_peer_metadata(
    header: &[u8],
    keys: &LabelKeys,
) -> Result<Resolved, PeerMetadataError> {
    peer_metadata(header, keys).map(|metadata| metadata.resolved)
}

/// Decodes the header into labels and the identity it states.
pub fn peer_metadata(header: &[u8], keys: &LabelKeys) -> Result<PeerMetadata, PeerMetadataError> {
    if header.len() > MAX_PEER_METADATA_BYTES {
        return Err(PeerMetadataError::TooLarge);
    }
    let trimmed = header.trim_ascii();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|_| PeerMetadataError::NotBase64)?;
    let metadata = prost_types::Struct::decode(bytes.as_slice())
        .map_err(|_| PeerMetadataError::NotProtobuf)?;
    Ok(PeerMetadata {
        resolved: labels_from_istio_metadata(&metadata, keys),
        namespace: string_field(&metadata, "NAMESPACE").map(str::to_string),
        service_account: string_field(&metadata, "SERVICE_ACCOUNT").map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;
    use crate::properties::tests::istio_metadata;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn decodes_istio_peer_metadata() {
        let metadata = istio_metadata(
            "shop",
            "frontend-v2",
            &[("app", "frontend"), ("team", "web")],
        );
        let header = base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec());
        let resolved = labels_from_peer_metadata(header.as_bytes(), &LabelKeys::default()).unwrap();
        assert_eq!(resolved.labels.get(Label::Service), Some("frontend"));
        assert_eq!(resolved.labels.get(Label::Namespace), Some("shop"));
        assert_eq!(resolved.labels.get(Label::Team), Some("web"));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let keys = LabelKeys::default();
        assert_eq!(
            labels_from_peer_metadata(b"!!!not base64!!!", &keys),
            Err(PeerMetadataError::NotBase64)
        );
        let not_proto = base64::engine::general_purpose::STANDARD.encode(b"\xff\xff\xff\xff\xff");
        assert_eq!(
            labels_from_peer_metadata(not_proto.as_bytes(), &keys),
            Err(PeerMetadataError::NotProtobuf)
        );
        assert_eq!(
            labels_from_peer_metadata(&vec![b'A'; 9000], &keys),
            Err(PeerMetadataError::TooLarge)
        );
        assert_eq!(
            labels_from_peer_metadata(b"\xff\xfe", &keys),
            Err(PeerMetadataError::NotBase64)
        );
    }
}
