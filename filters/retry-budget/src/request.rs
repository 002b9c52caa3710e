//! What the filter reads from a request: whether it is a retry, and which destination's budget
//! it draws on. Pure functions over header and property bytes.

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
/// Longest destination or service name used as a budget key; longer ones are malformed.
const MAX_NAME_BYTES: usize = 253;

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

/// The destination a caller's budget is kept for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub service: String,
    /// Known when the cluster name says it (Istio); else `unknown`.
    pub namespace: String,
}

fn valid_name(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_BYTES
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'~'));
    ok.then_some(text)
}

/// The destination service of an upstream cluster: Istio names outbound clusters
/// `outbound|<port>|<subset>|<service>.<namespace>.svc.<domain>`; any other cluster name is
/// taken as the service itself. `None` when the name is not usable as a label.
pub fn destination_from_cluster(cluster: &[u8]) -> Option<Destination> {
    let name = valid_name(cluster).or_else(|| {
        // Istio's names contain `|`, which valid_name refuses on purpose for plain names.
        let text = std::str::from_utf8(cluster).ok()?;
        text.starts_with("outbound|").then_some(text)
    })?;
    if let Some(rest) = name.strip_prefix("outbound|") {
        let host = rest.rsplit('|').next()?;
        return destination_from_host(host.as_bytes());
    }
    Some(Destination {
        service: name.to_string(),
        namespace: eastwest_common::labels::UNKNOWN.to_string(),
    })
}

/// The destination service of a host name (`:authority` without the port, or the host of an
/// Istio cluster): `<service>.<namespace>.svc...` gives both, any other host is the service.
pub fn destination_from_host(authority: &[u8]) -> Option<Destination> {
    let host = valid_name(authority)?;
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let mut labels = host.split('.');
    let first = labels.next().filter(|label| !label.is_empty())?;
    let second = labels.next();
    let third = labels.next();
    let (service, namespace) = match (second, third) {
        (Some(namespace), Some("svc")) if !namespace.is_empty() => (first, namespace),
        _ => (host, eastwest_common::labels::UNKNOWN),
    };
    Some(Destination {
        service: service.to_string(),
        namespace: namespace.to_string(),
    })
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
    fn destinations_from_istio_and_plain_cluster_names() {
        assert_eq!(
            destination_from_cluster(b"outbound|8080||payments.shop.svc.cluster.local"),
            Some(Destination {
                service: "payments".into(),
                namespace: "shop".into()
            })
        );
        assert_eq!(
            destination_from_cluster(b"outbound|443|v2|api.example.com"),
            Some(Destination {
                service: "api.example.com".into(),
                namespace: "unknown".into()
            })
        );
        assert_eq!(
            destination_from_cluster(b"payments"),
            Some(Destination {
                service: "payments".into(),
                namespace: "unknown".into()
            })
        );
        assert_eq!(destination_from_cluster(b""), None);
        assert_eq!(destination_from_cluster(b"pay ments"), None);
        assert_eq!(destination_from_cluster(b"a|b"), None);
        assert_eq!(destination_from_cluster(b"\xffpay"), None);
        assert_eq!(destination_from_cluster(&[b'a'; 300]), None);
    }

    #[test]
    fn destinations_from_authorities() {
        assert_eq!(
            destination_from_host(b"checkout.shop.svc.cluster.local:8080"),
            Some(Destination {
                service: "checkout".into(),
                namespace: "shop".into()
            })
        );
        assert_eq!(
            destination_from_host(b"checkout:8080").map(|d| d.service),
            Some("checkout".into())
        );
        assert_eq!(destination_from_host(b":8080"), None);
        assert_eq!(destination_from_host(b"evil/../x"), None);
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
