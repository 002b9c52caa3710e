//! telemetry's fast integration tests in the harness (no Envoy), with the per-stream
//! attributes Envoy would give it at the end of the stream: each runs against
//! dist/telemetry.wasm and against dist/eastwest.wasm with only the `telemetry` section.

#[path = "../../e2e/src/module_under_test.rs"]
mod module_under_test;

use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_harness::{Harness, Message, Options};
use module_under_test::{Feature, ModuleUnderTest};
use serde_json::{json, Value};

const FEATURE: Feature = Feature::Telemetry;

fn node(workload: &str, team: &str, direction: i64) -> Value {
    json!({"xds": {
        "listener_direction": direction,
        "node": {
            "id": format!("sidecar~127.0.0.1~{workload}-0.shop~shop.svc.cluster.local"),
            "metadata": {
                "NAMESPACE": "shop",
                "LABELS": {"app": workload, "team": team, "criticality": "high", "environment": "prod"},
            },
            "locality": {"region": "eu-west-1"},
        },
    }})
}

fn harness(module: ModuleUnderTest, config: Value, properties: Value) -> Harness {
    Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, config),
            properties,
            workers: 1,
            ..Options::default()
        },
    )
    .unwrap()
}

/// The attributes Envoy has at the end of a request.
fn outcome(code: i64, flags: i64, duration_ms: i64, attempts: i64) -> Value {
    json!({
        "response": {"code": code, "flags": flags},
        "request": {"duration": duration_ms * 1_000_000},
        "upstream": {"request_attempt_count": attempts},
    })
}

fn prometheus(h: &Harness) -> String {
    let tags: Vec<(String, String)> = ALL_TAGS
        .iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect();
    h.prometheus(&tags).unwrap()
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

fn the_caller_reports_the_outcome_failures_and_retries_of_each_request(module: ModuleUnderTest) {
    let config = json!({"peer_trust": "any", "dimensions": ["reporter", "source_service", "source_team", "destination_service", "destination_team", "response_code"]});
    let mut h = harness(module, config, node("frontend", "web", 2));
    let upstream = Message::status(503).header(
        "x-eastwest-peer",
        "service.name=checkout,eastwest.team=payments",
    );
    // UR|URX: reset by the upstream, then the retry limit; three attempts.
    let id = h.run(
        0,
        Some(&outcome(503, 0x10 | 0x8000, 12, 3)),
        Message::get("/"),
        Some((upstream, 0)),
    );
    let ok = h.run(0, Some(&outcome(200, 0, 3, 1)), Message::get("/"), None);
    assert!(h.traps.is_empty(), "{:?}", h.traps);
    let text = prometheus(&h);
    let pair = [
        ("reporter", "source"),
        ("source_service", "frontend"),
        ("source_team", "web"),
        ("destination_service", "checkout"),
        ("destination_team", "payments"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = pair.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    assert_eq!(
        sample(
            &text,
            "eastwest_requests_total",
            &with(&[("response_code", "503")])
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "eastwest_upstream_failures_total",
            &with(&[("failure", "UR")])
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "eastwest_upstream_failures_total",
            &with(&[("failure", "URX")])
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        // By calling service: the destination's team is not a retry tag.
        sample(&text, "eastwest_retry_attempts_total", &pair[..4]),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "eastwest_request_duration_milliseconds_sum",
            &with(&[("response_code", "503")])
        ),
        Some(12),
        "{text}"
    );
    // The second request had no peer header: the destination is unknown, not guessed.
    assert_eq!(
        sample(
            &text,
            "eastwest_requests_total",
            &[("destination_service", "unknown"), ("response_code", "200")]
        ),
        Some(1),
        "{text}"
    );
    println!(
        "instructions per request: failed {} / ok {}",
        h.result(id).instructions,
        h.result(ok).instructions
    );
}

for_each_module!(the_caller_reports_the_outcome_failures_and_retries_of_each_request);

fn the_callee_reports_the_trusted_caller(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({"peer_trust": "any"}),
        node("checkout", "payments", 1),
    );
    let request = Message::get("/").header(
        "baggage",
        "service.name=frontend,eastwest.team=web,userid=1",
    );
    h.run(0, Some(&outcome(200, 0, 5, 1)), request, None);
    let text = prometheus(&h);
    assert_eq!(
        sample(
            &text,
            "eastwest_requests_total",
            &[
                ("reporter", "destination"),
                ("source_service", "frontend"),
                ("source_team", "web"),
                ("destination_service", "checkout"),
                ("destination_team", "payments")
            ]
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "eastwest_retry_attempts_total", &[]),
        None,
        "retries are the caller's to report"
    );
}

for_each_module!(the_callee_reports_the_trusted_caller);

fn forged_names_beyond_max_series_fold_into_overflow(module: ModuleUnderTest) {
    let config = json!({"peer_trust": "any", "max_series": 10, "dimensions": ["reporter", "source_service"]});
    let mut h = harness(module, config, node("checkout", "payments", 1));
    for index in 0..500 {
        let request = Message::get("/").header("baggage", &format!("service.name=forged-{index}"));
        h.run(0, Some(&outcome(200, 0, 1, 1)), request, None);
    }
    let text = prometheus(&h);
    let series = text
        .lines()
        .filter(|line| line.starts_with("eastwest_requests_total{"))
        .count();
    assert!(series <= 10, "{series} request series");
    let overflowed = sample(
        &text,
        "eastwest_requests_total",
        &[("source_service", "overflow")],
    )
    .unwrap_or(0);
    assert_eq!(
        overflowed,
        500 - 5,
        "10 series = 5 pairs of requests+duration; the rest overflow"
    );
    assert_eq!(
        sample(
            &text,
            "eastwest_overflow_total",
            &[("metric", "eastwest_requests_total")]
        ),
        Some(495)
    );
}

for_each_module!(forged_names_beyond_max_series_fold_into_overflow);

fn invalid_configuration_is_refused_with_the_field_named(module: ModuleUnderTest) {
    let result = Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, json!({"max_series": 0})),
            ..Options::default()
        },
    );
    let error = result
        .err()
        .expect("the configuration is refused")
        .to_string();
    let wanted = module.config_error(FEATURE, "max_series: ");
    assert!(error.contains(&wanted), "{wanted:?} in {error}");
}

for_each_module!(invalid_configuration_is_refused_with_the_field_named);

fn overflow_series_carry_the_reporter_of_their_direction(module: ModuleUnderTest) {
    // One plugin instance for both directions (no `direction`: the listener's is used).
    let config = json!({"peer_trust": "any", "max_series": 2,
                        "dimensions": ["reporter", "source_service", "destination_service"]});
    let mut h = harness(module, config, node("checkout", "payments", 0));
    let in_direction = |direction: i64| {
        let mut properties = outcome(200, 0, 1, 1);
        properties["xds"] = json!({"listener_direction": direction});
        properties
    };
    // Outbound: the first callee fills the cap (requests and duration), the others overflow.
    for callee in ["orders", "stock", "pricing"] {
        let upstream =
            Message::status(200).header("x-eastwest-peer", &format!("service.name={callee}"));
        h.run(
            0,
            Some(&in_direction(2)),
            Message::get("/"),
            Some((upstream, 0)),
        );
    }
    // Inbound: every caller overflows.
    for index in 0..4 {
        let request = Message::get("/").header("baggage", &format!("service.name=caller-{index}"));
        h.run(0, Some(&in_direction(1)), request, None);
    }
    let text = prometheus(&h);
    let overflowed = |reporter: &str| {
        sample(
            &text,
            "eastwest_requests_total",
            &[("reporter", reporter), ("source_service", "overflow")],
        )
    };
    assert_eq!(overflowed("source"), Some(2), "{text}");
    assert_eq!(overflowed("destination"), Some(4), "{text}");
}

for_each_module!(overflow_series_carry_the_reporter_of_their_direction);
