//! telemetry in real Envoy: two sidecars on loopback (the caller's outbound listener → the
//! callee's inbound listener → the test application), each running label-enrich then
//! telemetry, two Envoy workers each.

use std::time::{Duration, Instant};

use anyhow::Result;
use eastwest_common::metric_name::stats_tag_regex;
use eastwest_e2e::{
    bootstrap, dist_wasm, free_port, http_request, wasm_filter, ClusterBuilder, Envoy,
    EnvoyOptions, ListenerBuilder, Node, TestApp, TrafficDirection,
};
use serde_json::{json, Value};

/// Every tag the filters put in metric names (envoy-configs/fragments/stats-tags.yaml).
const TAGS: [&str; 18] = [
    "reporter",
    "source_service",
    "source_namespace",
    "source_team",
    "source_region",
    "destination_service",
    "destination_namespace",
    "destination_team",
    "destination_region",
    "environment",
    "criticality",
    "response_code",
    "request_protocol",
    "grpc_status",
    "failure",
    "metric",
    "reason",
    "peer",
];

fn stats_tags() -> Vec<(String, String)> {
    TAGS.iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect()
}

/// The shipped `histogram_bucket_settings` (envoy-configs/fragments/histogram-buckets.yaml),
/// read from the fragment so that the test checks what users paste.
fn histogram_bucket_settings() -> Value {
    let fragment = std::fs::read_to_string(
        eastwest_e2e::workspace_root().join("envoy-configs/fragments/histogram-buckets.yaml"),
    )
    .unwrap();
    let buckets_line = fragment
        .lines()
        .find_map(|line| line.trim().strip_prefix("buckets: "))
        .expect("a buckets line");
    let buckets: Vec<f64> = serde_json::from_str(buckets_line).expect("buckets as a list");
    let regex = fragment
        .lines()
        .find_map(|line| line.split("regex: '").nth(1)?.split('\'').next())
        .expect("a regex");
    json!([{"match": {"safe_regex": {"regex": regex}}, "buckets": buckets}])
}

fn with_buckets(mut config: Value) -> Value {
    config["stats_config"]["histogram_bucket_settings"] = histogram_bucket_settings();
    config
}

fn sidecar_node(workload: &str, team: &str, criticality: &str) -> Node {
    Node::new(
        &format!("sidecar~127.0.0.1~{workload}-0.shop~shop.svc.cluster.local"),
        &format!("{workload}.shop"),
    )
    .with_metadata(json!({
        "NAME": format!("{workload}-0"),
        "NAMESPACE": "shop",
        "WORKLOAD_NAME": format!("{workload}-v1"),
        "LABELS": {"app": workload, "team": team, "criticality": criticality, "environment": "prod"},
    }))
    .with_locality(Some("eu-west-1"), None)
}

/// caller sidecar (label-enrich + telemetry, outbound) → callee sidecar (inbound) → app.
struct Mesh {
    _app: TestApp,
    caller: Envoy,
    callee: Envoy,
    caller_port: u16,
    callee_port: u16,
    /// Envoy's own `%RESPONSE_FLAGS%` per request, one line each.
    caller_flags_log: std::path::PathBuf,
    callee_flags_log: std::path::PathBuf,
}

#[derive(Default)]
struct MeshOptions {
    /// The caller's route retry policy.
    retry_policy: Option<Value>,
    /// Point the caller at a port where nothing listens (a callee that is down).
    callee_down: bool,
}

impl Mesh {
    fn start(name: &str, telemetry_config: Value) -> Result<Mesh> {
        Mesh::start_with(name, telemetry_config, MeshOptions::default())
    }

    fn start_with(name: &str, telemetry_config: Value, mesh: MeshOptions) -> Result<Mesh> {
        let label_enrich = dist_wasm("label-enrich")?;
        let telemetry = dist_wasm("telemetry")?;
        let app = TestApp::start()?;
        let tags = stats_tags();
        let tags: Vec<(&str, &str)> = tags.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
        let (caller_port, callee_port) = (free_port(), free_port());
        let options = EnvoyOptions::default();
        let log_dir = eastwest_e2e::workspace_root()
            .join("target/e2e-runs")
            .join(format!("{name}-flags-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir)?;
        let (caller_flags_log, callee_flags_log) = (
            log_dir.join("caller-flags.log"),
            log_dir.join("callee-flags.log"),
        );
        let _ = std::fs::remove_file(&caller_flags_log);
        let _ = std::fs::remove_file(&callee_flags_log);
        let trust = json!({"peer_trust": "any"});
        let callee = Envoy::start(
            &format!("{name}-callee"),
            with_buckets(bootstrap(
                &sidecar_node("checkout", "payments", "critical"),
                free_port(),
                vec![ListenerBuilder::new("inbound", callee_port, "app")
                    .traffic_direction(TrafficDirection::Inbound)
                    .http_filter(wasm_filter("label-enrich", &label_enrich, trust.clone()))
                    .http_filter(wasm_filter(
                        "telemetry",
                        &telemetry,
                        telemetry_config.clone(),
                    ))
                    .access_log(&callee_flags_log, "%RESPONSE_FLAGS%")
                    .build()],
                vec![ClusterBuilder::new("app", app.port()).build()],
                &tags,
            )),
            &options,
        )?;
        let caller = Envoy::start(
            &format!("{name}-caller"),
            with_buckets(bootstrap(
                &sidecar_node("frontend", "web", "high"),
                free_port(),
                vec![{
                    let mut outbound = ListenerBuilder::new("outbound", caller_port, "callee")
                        .traffic_direction(TrafficDirection::Outbound)
                        .http_filter(wasm_filter("label-enrich", &label_enrich, trust))
                        .http_filter(wasm_filter("telemetry", &telemetry, telemetry_config))
                        .access_log(&caller_flags_log, "%RESPONSE_FLAGS%");
                    if let Some(policy) = mesh.retry_policy {
                        outbound = outbound.retry_policy(policy);
                    }
                    outbound.build()
                }],
                vec![ClusterBuilder::new(
                    "callee",
                    if mesh.callee_down {
                        free_port()
                    } else {
                        callee_port
                    },
                )
                .build()],
                &tags,
            )),
            &options,
        )?;
        Ok(Mesh {
            _app: app,
            caller,
            callee,
            caller_port,
            callee_port,
            caller_flags_log,
            callee_flags_log,
        })
    }

    /// Envoy's `%RESPONSE_FLAGS%` for every request so far (`-` when none), waiting for `count`
    /// lines to be flushed.
    fn response_flags(log: &std::path::Path, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn call(&self, port: u16, headers: &[(&str, &[u8])]) -> u16 {
        http_request(
            "GET",
            &format!("http://127.0.0.1:{port}/orders"),
            headers,
            "",
        )
        .expect("request")
        .status
    }
}

/// The value of the Prometheus sample `name{labels...}` whose labels include all of `labels`
/// (summed over the samples that match), waiting up to 10 s for it to reach `expected`.
fn wait_for_sample(envoy: &Envoy, name: &str, labels: &[(&str, &str)], expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = sample(envoy, name, labels);
        if value >= expected || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sample(envoy: &Envoy, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn series_count(envoy: &Envoy, name: &str) -> usize {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .count()
}

#[test]
fn request_counts_per_pair_and_code_are_exact_on_both_reporters() {
    let mesh = Mesh::start("tm-counts", json!({})).unwrap();
    for index in 0..30 {
        let status: u16 = if index % 3 == 0 { 503 } else { 200 };
        let header = status.to_string();
        assert_eq!(
            mesh.call(mesh.caller_port, &[("x-test-status", header.as_bytes())]),
            status
        );
    }
    let pair = [
        ("source_service", "frontend"),
        ("source_team", "web"),
        ("destination_service", "checkout"),
        ("destination_team", "payments"),
        ("criticality", "critical"),
        ("source_region", "eu-west-1"),
        ("request_protocol", "http"),
    ];
    for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
        for (code, expected) in [("200", 20), ("503", 10)] {
            let mut labels = pair.to_vec();
            labels.push(("reporter", reporter));
            labels.push(("response_code", code));
            let value = wait_for_sample(envoy, "eastwest_requests_total", &labels, expected);
            assert_eq!(
                value,
                expected,
                "{reporter} {code}:\n{}",
                envoy.prometheus().unwrap()
            );
        }
        let mut labels = pair.to_vec();
        labels.push(("reporter", reporter));
        let count = wait_for_sample(
            envoy,
            "eastwest_request_duration_milliseconds_count",
            &labels,
            30,
        );
        assert_eq!(count, 30, "{reporter}: one duration sample per request");
    }
}

#[test]
fn unexpected_dependency_is_counted_and_logged_once_per_vm() {
    let config = json!({"expected_dependencies": [
        {"source": "frontend", "destination": "inventory"},
        {"source": "*", "destination": "payments"},
    ]});
    let mesh = Mesh::start("tm-unexpected", config).unwrap();
    for _ in 0..12 {
        assert_eq!(mesh.call(mesh.caller_port, &[]), 200);
    }
    let labels = [
        ("reporter", "source"),
        ("source_service", "frontend"),
        ("destination_service", "checkout"),
        ("source_team", "web"),
        ("destination_team", "payments"),
    ];
    assert_eq!(
        wait_for_sample(
            &mesh.caller,
            "eastwest_unexpected_dependency_total",
            &labels,
            12
        ),
        12
    );
    mesh.caller
        .wait_for_log("unexpected dependency: frontend", Duration::from_secs(10))
        .unwrap();
    let warnings = mesh
        .caller
        .log()
        .matches("unexpected dependency: frontend (namespace shop, team web) called checkout (namespace shop, team payments)")
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "one warning per pair per VM (2 workers), got {warnings}"
    );
}

#[test]
fn expected_dependencies_are_not_counted() {
    let config =
        json!({"expected_dependencies": [{"source": "frontend", "destination": "checkout"}]});
    let mesh = Mesh::start("tm-expected", config).unwrap();
    for _ in 0..5 {
        assert_eq!(mesh.call(mesh.caller_port, &[]), 200);
    }
    wait_for_sample(
        &mesh.caller,
        "eastwest_requests_total",
        &[("reporter", "source")],
        5,
    );
    assert_eq!(
        sample(&mesh.caller, "eastwest_unexpected_dependency_total", &[]),
        0
    );
    assert!(!mesh.caller.log().contains("unexpected dependency"));
}

#[test]
fn forged_service_names_stop_at_max_series_plus_overflow() {
    let mesh = Mesh::start(
        "tm-cardinality",
        json!({"max_series": 20, "dimensions": ["reporter", "source_service", "destination_service", "response_code"]}),
    )
    .unwrap();
    // Straight to the callee's sidecar, as an attacker would, each with a new service name.
    for index in 0..300 {
        let baggage = format!("service.name=forged-{index}");
        assert_eq!(
            mesh.call(mesh.callee_port, &[("baggage", baggage.as_bytes())]),
            200
        );
    }
    wait_for_sample(&mesh.callee, "eastwest_overflow_total", &[], 1);
    let requests = series_count(&mesh.callee, "eastwest_requests_total");
    // Two workers: each VM caps its own series; the overflow series is shared by name.
    assert!(
        requests <= 2 * 20 + 1,
        "{requests} series:\n{}",
        mesh.callee.prometheus().unwrap()
    );
    let overflowed = sample(
        &mesh.callee,
        "eastwest_requests_total",
        &[("source_service", "overflow")],
    );
    assert!(overflowed >= 300 - 2 * 20, "overflowed {overflowed}");
    let total: u64 = sample(
        &mesh.callee,
        "eastwest_requests_total",
        &[("reporter", "destination")],
    );
    assert_eq!(total, 300, "no request is lost to the cap");
}

/// The upstream-failure flags as telemetry counts them, from Envoy's own `%RESPONSE_FLAGS%`
/// (comma-separated short names): the mapping is checked against Envoy, not the docs.
fn failure_counts_from_envoy(lines: &[String]) -> std::collections::BTreeMap<String, u64> {
    const FAILURES: [&str; 12] = [
        "UH", "UT", "LR", "UR", "UF", "UC", "UO", "DC", "URX", "UMSDR", "UPE", "DR",
    ];
    let mut counts = std::collections::BTreeMap::new();
    for line in lines {
        for flag in line.split(',') {
            if FAILURES.contains(&flag) {
                *counts.entry(flag.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn failure_counts_from_metrics(
    envoy: &Envoy,
    reporter: &str,
) -> std::collections::BTreeMap<String, u64> {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    let mut counts = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("eastwest_upstream_failures_total{"))
    {
        if !line.contains(&format!("reporter=\"{reporter}\"")) {
            continue;
        }
        let flag = line
            .split("failure=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_string();
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if value > 0 {
            *counts.entry(flag).or_insert(0) += value;
        }
    }
    counts
}

#[test]
fn a_callee_that_is_down_counts_as_connection_failures() {
    let mesh = Mesh::start_with(
        "tm-down",
        json!({}),
        MeshOptions {
            callee_down: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    for _ in 0..5 {
        assert_eq!(mesh.call(mesh.caller_port, &[]), 503);
    }
    let flags = Mesh::response_flags(&mesh.caller_flags_log, 5);
    let expected = failure_counts_from_envoy(&flags);
    assert_eq!(expected.get("UF"), Some(&5), "Envoy's flags: {flags:?}");
    wait_for_sample(
        &mesh.caller,
        "eastwest_upstream_failures_total",
        &[("failure", "UF")],
        5,
    );
    assert_eq!(
        failure_counts_from_metrics(&mesh.caller, "source"),
        expected
    );
    assert_eq!(
        sample(
            &mesh.caller,
            "eastwest_upstream_failures_total",
            &[
                ("reporter", "source"),
                ("source_service", "frontend"),
                ("failure", "UF")
            ]
        ),
        5
    );
}

#[test]
fn an_application_resetting_mid_response_counts_under_envoys_own_flags() {
    let mesh = Mesh::start("tm-reset", json!({})).unwrap();
    for _ in 0..4 {
        assert_eq!(mesh.call(mesh.caller_port, &[("x-test-reset", b"1")]), 503);
    }
    for (envoy, log, reporter) in [
        (&mesh.callee, &mesh.callee_flags_log, "destination"),
        (&mesh.caller, &mesh.caller_flags_log, "source"),
    ] {
        let flags = Mesh::response_flags(log, 4);
        let expected = failure_counts_from_envoy(&flags);
        if reporter == "destination" {
            assert!(
                !expected.is_empty(),
                "the callee's Envoy flags the reset: {flags:?}"
            );
        }
        let total: u64 = expected.values().sum();
        if total > 0 {
            wait_for_sample(
                envoy,
                "eastwest_upstream_failures_total",
                &[("reporter", reporter)],
                total,
            );
        }
        assert_eq!(
            failure_counts_from_metrics(envoy, reporter),
            expected,
            "{reporter}: Envoy's flags {flags:?}"
        );
    }
}

#[test]
fn retries_match_envoys_own_retry_counter() {
    let mesh = Mesh::start_with(
        "tm-retries",
        json!({}),
        MeshOptions {
            retry_policy: Some(json!({"retry_on": "5xx", "num_retries": 2, "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"}})),
            ..MeshOptions::default()
        },
    )
    .unwrap();
    for _ in 0..6 {
        assert_eq!(
            mesh.call(mesh.caller_port, &[("x-test-status", b"503")]),
            503
        );
    }
    let envoy_retries = mesh
        .caller
        .wait_for_counter(
            "cluster.callee.upstream_rq_retry",
            12,
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(envoy_retries, 12, "2 retries per request");
    let ours = wait_for_sample(
        &mesh.caller,
        "eastwest_retry_attempts_total",
        &[
            ("reporter", "source"),
            ("source_service", "frontend"),
            ("destination_service", "checkout"),
        ],
        envoy_retries,
    );
    assert_eq!(ours, envoy_retries);
    // The callee saw every attempt as a request of its own.
    assert_eq!(
        wait_for_sample(
            &mesh.callee,
            "eastwest_requests_total",
            &[("reporter", "destination"), ("response_code", "503")],
            18
        ),
        18
    );
}

/// PromQL's `histogram_quantile` over one histogram's cumulative buckets (`le` → count), as
/// Prometheus computes it: linear interpolation inside the bucket holding the rank.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let (lower_le, lower_count) = lower;
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count);
        }
        lower = (le, count);
    }
    f64::NAN
}

/// The cumulative buckets of the duration histogram series whose labels include `labels`.
fn duration_buckets(envoy: &Envoy, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with("eastwest_request_duration_milliseconds_bucket{"))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

#[test]
fn p95_and_p99_from_the_scraped_histograms_are_within_10_percent_of_the_truth() {
    let mesh = Mesh::start("tm-quantiles", json!({})).unwrap();
    // A long tail: 90% about 2 ms, 8% 20-40 ms, 2% 200-400 ms.
    let plan = eastwest_e2e::LoadPlan::new(
        format!("http://127.0.0.1:{}/orders", mesh.caller_port),
        2000,
    )
    .concurrency(8)
    .max_duration(Duration::from_secs(60))
    .header("x-test-delay-ms-choices", "2*90,20-40*8,200-400*2");
    let report = eastwest_e2e::load::run(&plan).unwrap();
    assert_eq!(report.status_count(200), 2000, "{}", report.summary());
    let labels = [
        ("source_service", "frontend"),
        ("destination_service", "checkout"),
        ("response_code", "200"),
    ];
    let mut errors = Vec::new();
    for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
        let mut labels = labels.to_vec();
        labels.push(("reporter", reporter));
        wait_for_sample(
            envoy,
            "eastwest_request_duration_milliseconds_count",
            &labels,
            2000,
        );
        let buckets = duration_buckets(envoy, &labels);
        assert_eq!(
            buckets.last().map(|b| b.1),
            Some(2000.0),
            "{reporter}: {buckets:?}"
        );
        for q in [0.95, 0.99] {
            let truth = report.p(q).as_secs_f64() * 1000.0;
            let scraped = histogram_quantile(q, &buckets);
            let error = (scraped - truth).abs() / truth;
            println!("{reporter} p{}: truth {truth:.2} ms, from the histogram {scraped:.2} ms, error {:.1}%", q * 100.0, error * 100.0);
            errors.push((reporter, q, truth, scraped, error));
        }
    }
    for (reporter, q, truth, scraped, error) in errors {
        assert!(
            error <= 0.10,
            "{reporter} p{}: {scraped:.2} ms vs {truth:.2} ms ({:.1}% off)",
            q * 100.0,
            error * 100.0
        );
    }
}
