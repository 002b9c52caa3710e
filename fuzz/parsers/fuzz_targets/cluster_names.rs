//! Destinations from Envoy cluster names (`outbound|8080||svc.ns.svc.cluster.local`) and from
//! `:authority` values: whatever the bytes, a name found is a valid label value.
#![no_main]

use eastwest_common::cluster::{destination_from_cluster, destination_from_host};
use eastwest_common::labels::{validate_value, Label, UNKNOWN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for destination in [destination_from_cluster(data), destination_from_host(data)]
        .into_iter()
        .flatten()
    {
        for (label, value) in [
            (Label::Service, &destination.service),
            (Label::Namespace, &destination.namespace),
        ] {
            assert!(!value.is_empty());
            if value != UNKNOWN {
                assert!(validate_value(label, value.as_bytes()).is_ok(), "{value:?}");
            }
        }
    }
});
