//! Envoy's response flags: the `response.flags` attribute is the legacy bitmask of
//! `StreamInfo::ResponseFlag`, one bit per flag in this order; the short names are the ones
//! `%RESPONSE_FLAGS%` prints in access logs.

/// Short names by bit position (bit 0 first).
const SHORT_NAMES: [&str; 29] = [
    "LH",    // FailedLocalHealthCheck
    "UH",    // NoHealthyUpstream
    "UT",    // UpstreamRequestTimeout
    "LR",    // LocalReset
    "UR",    // UpstreamRemoteReset
    "UF",    // UpstreamConnectionFailure
    "UC",    // UpstreamConnectionTermination
    "UO",    // UpstreamOverflow
    "NR",    // NoRouteFound
    "DI",    // DelayInjected
    "FI",    // FaultInjected
    "RL",    // RateLimited
    "UAEX",  // UnauthorizedExternalService
    "RLSE",  // RateLimitServiceError
    "DC",    // DownstreamConnectionTermination
    "URX",   // UpstreamRetryLimitExceeded
    "SI",    // StreamIdleTimeout
    "IH",    // InvalidEnvoyRequestHeaders
    "DPE",   // DownstreamProtocolError
    "UMSDR", // UpstreamMaxStreamDurationReached
    "RFCF",  // ResponseFromCacheFilter
    "NFCF",  // NoFilterConfigFound
    "DT",    // DurationTimeout
    "UPE",   // UpstreamProtocolError
    "NC",    // NoClusterFound
    "OM",    // OverloadManager
    "DF",    // DnsResolutionFailed
    "DO",    // DropOverLoad
    "DR",    // DownstreamRemoteReset
];

/// The flags that mean the upstream failed or the exchange with it broke: what
/// `eastwest_upstream_failures_total` counts (DESIGN.md §4).
const UPSTREAM_FAILURES: [&str; 12] = [
    "UH", "UT", "LR", "UR", "UF", "UC", "UO", "DC", "URX", "UMSDR", "UPE", "DR",
];

/// The short names of every flag set in `mask`, in bit order.
pub fn short_names(mask: u64) -> impl Iterator<Item = &'static str> {
    // Visits only the bits that are set (none on nearly every request).
    let mut rest = mask;
    std::iter::from_fn(move || loop {
        if rest == 0 {
            return None;
        }
        let bit = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        if let Some(name) = SHORT_NAMES.get(bit) {
            return Some(*name);
        }
    })
}

/// The bits of [`UPSTREAM_FAILURES`]: a request without them (nearly every one) is told apart
/// with one AND instead of a walk over every flag.
const UPSTREAM_FAILURE_BITS: u64 = 1 << 1
    | 1 << 2
    | 1 << 3
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 7
    | 1 << 14
    | 1 << 15
    | 1 << 19
    | 1 << 23
    | 1 << 28;

/// The upstream-failure flags set in `mask`.
pub fn upstream_failures(mask: u64) -> impl Iterator<Item = &'static str> {
    short_names(mask & UPSTREAM_FAILURE_BITS).filter(|name| UPSTREAM_FAILURES.contains(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn bits_map_to_envoy_short_names() {
        assert_eq!(short_names(0).count(), 0);
        assert_eq!(short_names(0x20).collect::<Vec<_>>(), vec!["UF"]);
        assert_eq!(
            short_names(0x10 | 0x8000).collect::<Vec<_>>(),
            vec!["UR", "URX"]
        );
        assert_eq!(short_names(1 << 23).collect::<Vec<_>>(), vec!["UPE"]);
        assert_eq!(short_names(u64::MAX).count(), SHORT_NAMES.len());
    }

    #[test]
    fn the_failure_bits_are_exactly_the_failure_names() {
        let from_names: Vec<&str> = short_names(u64::MAX)
            .filter(|name| UPSTREAM_FAILURES.contains(name))
            .collect();
        assert_eq!(
            short_names(UPSTREAM_FAILURE_BITS).collect::<Vec<_>>(),
            from_names
        );
        assert_eq!(from_names.len(), UPSTREAM_FAILURES.len());
    }

    #[test]
    fn only_upstream_failures_are_failures() {
        assert_eq!(
            upstream_failures(0x100 | 0x20).collect::<Vec<_>>(),
            vec!["UF"]
        );
        assert_eq!(
            upstream_failures(0x200 | 0x400).count(),
            0,
            "fault injection is not a failure"
        );
    }
}
