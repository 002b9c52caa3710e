//! The attempt headers retry-budget reads (`x-envoy-attempt-count`, `grpc-previous-rpc-attempts`).
#![no_main]

use eastwest_retry_budget::request::{attempt, Attempt};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (envoy, grpc) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    for (a, b) in [
        (Some(envoy), grpc),
        (Some(envoy), None),
        (None, Some(envoy)),
    ] {
        let (found, bad) = attempt(a, b);
        if let Attempt::Retry(previous) = found {
            assert!(previous >= 1);
        }
        // A malformed header is reported and never makes a retry out of nothing.
        if bad.is_some() && a.is_none_or(|v| v.is_empty()) && b.is_none() {
            assert_eq!(found, Attempt::First);
        }
    }
});
