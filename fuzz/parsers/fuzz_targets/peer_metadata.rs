//! Istio's `x-envoy-peer-metadata`: base64 of a protobuf Struct. Both the header as sent and
//! the input taken as the Struct's bytes (so the protobuf decoder is reached).
#![no_main]

use base64::Engine;
use eastwest_common::labels::LabelKeys;
use eastwest_common::peer::peer_metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = LabelKeys::default();
    let _ = peer_metadata(data, &keys);
    let header = base64::engine::general_purpose::STANDARD.encode(data);
    if let Ok(metadata) = peer_metadata(header.as_bytes(), &keys) {
        // Every label kept is valid: it re-encodes and reads back the same.
        let encoded = metadata.resolved.labels.to_baggage_members();
        let again = eastwest_common::baggage::read_claims(&[encoded.as_bytes()], 65536);
        assert_eq!(again.labels, metadata.resolved.labels);
    }
});
