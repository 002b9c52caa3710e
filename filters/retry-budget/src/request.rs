//! What the filter reads from a request: whether it is a retry, and the names of its answers.
//! Pure functions over header bytes. The destination comes from `eastwest_common::cluster`.

/// Envoy's attempt counter (1 for the first attempt), sent upstream when the route or virtual
/// host sets `include_request_attempt_count`; Istio sets it on its outbound routes.
pub const ENVOY_ATTEMPT_COUNT: &str = "x-envoy-attempt-count";
/// gRPC's retry header: how many attempts preceded this one (absent or 0 on the first).
pub const GRPC_PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";
/// Envoy's router does not retry a response carrying this header (unless the retry policy
/// asks for `envoy-ratelimited`), and it passes the header on to the next hop.
pub const ENVOY_RATELIMITED: &str = "x-envoy-ratelimited";
/// Caps the router's retries for one request.
pub const ENVOY_MAX_RETRIES: &str = "x-envoy-max-retries";
/// Tells gRPC clients when (negative: never) to retry (gRFC A6 server pushback).
pub const GRPC_RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";
/// Marks every response whose retry the budget denied.
pub const BUDGET_HEADER: &str = "x-eastwest-retry-budget";
pub const BUDGET_EXHAUSTED: &str = "exhausted";
/// The status of a refused retry: the destination is unavailable and the budget will not pay
/// for another try.
pub const DENIED_STATUS: u32 = 503;
/// gRPC UNAVAILABLE, for gRPC requests shed by the budget.
pub const DENIED_GRPC_STATUS: i32 = 14;
pub const DENIED_BODY: &str = "retry budget exhausted\n";

/// Whether a request is a first attempt or a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    First,
    /// A retry; the number of attempts that came before it.
    Retry(u32),
}

/// A header value that should have been a count and was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadAttemptHeader;

fn parse_count(value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Anything beyond u32 is absurd but still "many": saturate rather than refuse.
    Some(
        text.parse::<u64>()
            .map_or(u32::MAX, |n| n.min(u64::from(u32::MAX)) as u32),
    )
}

/// Reads the attempt headers Envoy (`x-envoy-attempt-count`, 1-based) and gRPC clients
/// (`grpc-previous-rpc-attempts`, 0-based) send. A malformed value counts as a first attempt
/// (the filter never blocks a request because of a bad header) and is reported.
pub fn attempt(
    envoy_attempt_count: Option<&[u8]>,
    grpc_previous_attempts: Option<&[u8]>,
) -> (Attempt, Option<BadAttemptHeader>) {
    let mut bad = None;
    let mut previous = 0u32;
    if let Some(value) = envoy_attempt_count {
        match parse_count(value) {
            Some(count) => previous = previous.max(count.saturating_sub(1)),
            None => bad = Some(BadAttemptHeader),
        }
    }
    if let Some(value) = grpc_previous_attempts {
        match parse_count(value) {
            Some(count) => previous = previous.max(count),
            None => bad = Some(BadAttemptHeader),
        }
    }
    let attempt = if previous == 0 {
        Attempt::First
    } else {
        Attempt::Retry(previous)
    };
    (attempt, bad)
}

/// The shared-data key of a budget: one per mode and destination (or calling service).
pub fn budget_key(mode: &str, subject: &str) -> String {
    format!("eastwest.retry_budget.v1/{mode}/{subject}")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn attempts_from_envoy_and_grpc_headers() {
        assert_eq!(attempt(None, None), (Attempt::First, None));
        assert_eq!(attempt(Some(b"1"), None), (Attempt::First, None));
        assert_eq!(attempt(Some(b"3"), None), (Attempt::Retry(2), None));
        assert_eq!(attempt(None, Some(b"0")), (Attempt::First, None));
        assert_eq!(attempt(None, Some(b"2")), (Attempt::Retry(2), None));
        // An Envoy between two gRPC retries counts its own attempts: the larger wins.
        assert_eq!(attempt(Some(b"2"), Some(b"1")), (Attempt::Retry(1), None));
        assert_eq!(attempt(Some(b" 2 "), None), (Attempt::Retry(1), None));
        assert_eq!(
            attempt(Some(b"99999999999999999999"), None),
            (Attempt::Retry(u32::MAX - 1), None)
        );
    }

    #[test]
    fn a_bad_attempt_header_is_a_first_attempt_and_reported() {
        for bad in [&b"two"[..], b"-1", b"", b"\xff\xfe", b"1.5"] {
            assert_eq!(
                attempt(Some(bad), None),
                (Attempt::First, Some(BadAttemptHeader)),
                "{bad:?}"
            );
        }
        // A good header alongside a bad one still counts.
        assert_eq!(
            attempt(Some(b"3"), Some(b"x")),
            (Attempt::Retry(2), Some(BadAttemptHeader))
        );
    }

    #[test]
    fn keys_separate_modes_and_subjects() {
        assert_eq!(
            budget_key("client", "payments"),
            "eastwest.retry_budget.v1/client/payments"
        );
        assert_ne!(budget_key("server", "a"), budget_key("client", "a"));
    }
}
