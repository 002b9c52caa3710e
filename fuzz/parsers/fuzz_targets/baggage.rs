//! W3C baggage: reading the label claims, and rebuilding the header around this workload's
//! labels. Every other member must come out byte for byte, in order; the claims read back
//! from their own encoding must be the same labels.
#![no_main]

use eastwest_common::baggage::{members, read_claims, replace_label_members};
use eastwest_common::Label;
use libfuzzer_sys::fuzz_target;

const OWN: &str = "service.name=checkout,k8s.namespace.name=shop";

fuzz_target!(|data: &[u8]| {
    // Up to four header values, separated by newlines.
    let headers: Vec<&[u8]> = data.split(|b| *b == b'\n').take(4).collect();
    let claims = read_claims(&headers, 8192);
    if !claims.oversized {
        let encoded = claims.labels.to_baggage_members();
        let again = read_claims(&[encoded.as_bytes()], 65536);
        assert_eq!(again.labels, claims.labels, "{encoded:?}");
        assert_eq!(again.malformed_members, 0, "{encoded:?}");
    }
    let others = |headers: &[&[u8]]| -> Vec<Vec<u8>> {
        headers
            .iter()
            .flat_map(|header| members(header))
            .filter(|member| Label::from_baggage_key(member.key).is_none())
            .map(|member| member.raw.to_vec())
            .collect()
    };
    for own in ["", OWN] {
        let rebuilt = replace_label_members(&headers, own);
        let rebuilt = rebuilt.as_deref().unwrap_or_default();
        let labels: Vec<Vec<u8>> = members(rebuilt)
            .filter(|member| Label::from_baggage_key(member.key).is_some())
            .map(|member| member.raw.to_vec())
            .collect();
        let expected: Vec<Vec<u8>> = members(own.as_bytes()).map(|m| m.raw.to_vec()).collect();
        assert_eq!(
            labels, expected,
            "only this workload's label members remain"
        );
        assert_eq!(
            others(&[rebuilt]),
            others(&headers),
            "other members kept byte for byte"
        );
    }
});
