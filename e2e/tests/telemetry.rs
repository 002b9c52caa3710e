//! telemetry in real Envoy: two sidecars on loopback (the caller's outbound listener → the
//! callee's inbound listener → the test application), each running label-enrich then
//! telemetry, two Envoy workers each. Each test runs with telemetry in dist/telemetry.wasm and
//! in dist/eastwest.wasm with only the `telemetry` section (label-enrich is its own module in
//! both).

use std::time::{Duration, Instant};

use anyhow::Result;
use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_e2e::{
    bootstrap, dist_wasm, feature_filter, for_each_module, free_port, http2_request, http_request,
    wasm_filter, ClusterBuilder, Envoy, EnvoyOptions, Feature, ListenerBuilder, ModuleUnderTest,
    Node, TestApp, TrafficDirection,
};
use serde_json::{json, Value};

const FEATURE: Feature = Feature::Telemetry;

/// Every mesh holds this for its lifetime: shared by default, exclusively for the tests whose
/// assertions depend on latency (quantiles from the scrape against the load generator's ground
/// truth, which includes the client's own scheduling delays), so that no other mesh's Envoys
/// share the 2-CPU box with them. Without it p95 came out 11% off under such contention.
static MESHES: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum MeshLock {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl MeshLock {
    fn take(latency_sensitive: bool) -> MeshLock {
        use std::sync::PoisonError;
        if latency_sensitive {
            MeshLock::Alone(MESHES.write().unwrap_or_else(PoisonError::into_inner))
        } else {
            MeshLock::Shared(MESHES.read().unwrap_or_else(PoisonError::into_inner))
        }
    }
}

fn stats_tags() -> Vec<(String, String)> {
    ALL_TAGS
        .iter()
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
    // Envoy exports histograms at each stats flush (5 s by default); 1 s keeps tests short.
    config["stats_flush_interval"] = json!("1s");
    config
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
    /// Last: released once the Envoys and the app are gone.
    _lock: MeshLock,
}

#[derive(Default)]
struct MeshOptions {
    /// The caller's route retry policy.
    retry_policy: Option<Value>,
    /// Point the caller at a port where nothing listens (a callee that is down).
    callee_down: bool,
    /// HTTP/2 (h2c) from the caller to the callee and from the callee to the app, as gRPC
    /// needs (trailers); otherwise both hops are HTTP/1.1.
    http2_upstreams: bool,
    /// The test measures latency: no other mesh runs while this one lives.
    latency_sensitive: bool,
}

impl Mesh {
    fn start(module: ModuleUnderTest, name: &str, telemetry_config: Value) -> Result<Mesh> {
        Mesh::start_with(module, name, telemetry_config, MeshOptions::default())
    }

    /// The mesh with telemetry in `module`.
    fn start_with(
        module: ModuleUnderTest,
        name: &str,
        telemetry_config: Value,
        mesh: MeshOptions,
    ) -> Result<Mesh> {
        let lock = MeshLock::take(mesh.latency_sensitive);
        let name = &module.tag(name);
        let label_enrich = dist_wasm("label-enrich")?;
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
        let callee_config = with_buckets(bootstrap(
            &Node::shop_sidecar("checkout", "payments", "critical"),
            free_port(),
            vec![ListenerBuilder::new("inbound", callee_port, "app")
                .traffic_direction(TrafficDirection::Inbound)
                .http_filter(wasm_filter("label-enrich", &label_enrich, trust.clone()))
                .http_filter(feature_filter(module, FEATURE, telemetry_config.clone())?)
                .access_log(&callee_flags_log, "%RESPONSE_FLAGS%")
                .build()],
            vec![ClusterBuilder::new("app", app.port())
                .http2(mesh.http2_upstreams)
                .build()],
            &tags,
        ));
        let caller_config = with_buckets(bootstrap(
            &Node::shop_sidecar("frontend", "web", "high"),
            free_port(),
            vec![{
                let mut outbound = ListenerBuilder::new("outbound", caller_port, "callee")
                    .traffic_direction(TrafficDirection::Outbound)
                    .http_filter(wasm_filter("label-enrich", &label_enrich, trust))
                    .http_filter(feature_filter(module, FEATURE, telemetry_config)?)
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
            .http2(mesh.http2_upstreams)
            .build()],
            &tags,
        ));
        let mut envoys = Envoy::start_many(vec![
            (format!("{name}-callee"), callee_config, options.clone()),
            (format!("{name}-caller"), caller_config, options),
        ])?;
        let (caller, callee) = (envoys.pop().unwrap(), envoys.pop().unwrap());
        Ok(Mesh {
            _app: app,
            caller,
            callee,
            caller_port,
            callee_port,
            caller_flags_log,
            callee_flags_log,
            _lock: lock,
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

    /// A gRPC call through the caller's sidecar: POST, h2c, `content-type: application/grpc`,
    /// one empty length-prefixed message; `headers` steer the app.
    fn grpc_call(&self, headers: &[(&str, &[u8])]) -> eastwest_e2e::Response {
        let mut all: Vec<(&str, &[u8])> =
            vec![("content-type", b"application/grpc"), ("te", b"trailers")];
        all.extend_from_slice(headers);
        http2_request(
            "POST",
            &format!("http://127.0.0.1:{}/shop.Checkout/Pay", self.caller_port),
            &all,
            [0u8, 0, 0, 0, 0],
        )
        .expect("gRPC request")
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

fn request_counts_per_pair_and_code_are_exact_on_both_reporters(module: ModuleUnderTest) {
    let mesh = Mesh::start(module, "tm-counts", json!({})).unwrap();
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

for_each_module!(request_counts_per_pair_and_code_are_exact_on_both_reporters);

fn unexpected_dependency_is_counted_and_logged_once_per_vm(module: ModuleUnderTest) {
    let config = json!({"expected_dependencies": [
        {"source": "frontend", "destination": "inventory"},
        {"source": "*", "destination": "payments"},
    ]});
    let mesh = Mesh::start(module, "tm-unexpected", config).unwrap();
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

for_each_module!(unexpected_dependency_is_counted_and_logged_once_per_vm);

fn expected_dependencies_are_not_counted(module: ModuleUnderTest) {
    let config =
        json!({"expected_dependencies": [{"source": "frontend", "destination": "checkout"}]});
    let mesh = Mesh::start(module, "tm-expected", config).unwrap();
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

for_each_module!(expected_dependencies_are_not_counted);

fn forged_service_names_stop_at_max_series_plus_overflow(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        module,
        "tm-cardinality",
        json!({"max_series": 20, "dimensions": ["reporter", "source_service", "destination_service", "response_code"]}),
    )
    .unwrap();
    // Straight to the callee's sidecar, as an attacker would: ten thousand requests, each
    // claiming a new service name.
    const FORGED: u64 = 10_000;
    let plan = eastwest_e2e::LoadPlan::new(
        format!("http://127.0.0.1:{}/orders", mesh.callee_port),
        FORGED,
    )
    .concurrency(8)
    .max_duration(Duration::from_secs(120))
    .per_request_headers(|index| {
        vec![(
            "baggage".to_string(),
            format!("service.name=forged-{index}").into_bytes(),
        )]
    });
    let report = eastwest_e2e::load::run(&plan).unwrap();
    assert_eq!(report.status_count(200), FORGED, "{}", report.summary());
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
    assert!(overflowed >= FORGED - 2 * 20, "overflowed {overflowed}");
    let total: u64 = sample(
        &mesh.callee,
        "eastwest_requests_total",
        &[("reporter", "destination")],
    );
    assert_eq!(total, FORGED, "no request is lost to the cap");
}

for_each_module!(forged_service_names_stop_at_max_series_plus_overflow);

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

fn a_callee_that_is_down_counts_as_connection_failures(module: ModuleUnderTest) {
    let mesh = Mesh::start_with(
        module,
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
                // The callee never answered: the cluster the caller routed to names it.
                ("destination_service", "callee"),
                ("failure", "UF")
            ]
        ),
        5
    );
}

for_each_module!(a_callee_that_is_down_counts_as_connection_failures);

fn an_application_resetting_mid_response_counts_under_envoys_own_flags(module: ModuleUnderTest) {
    let mesh = Mesh::start(module, "tm-reset", json!({})).unwrap();
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

for_each_module!(an_application_resetting_mid_response_counts_under_envoys_own_flags);

fn retries_match_envoys_own_retry_counter(module: ModuleUnderTest) {
    let mesh = Mesh::start_with(
        module,
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

for_each_module!(retries_match_envoys_own_retry_counter);

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

fn p95_and_p99_from_the_scraped_histograms_are_within_10_percent_of_the_truth(
    module: ModuleUnderTest,
) {
    let mesh = Mesh::start_with(
        module,
        "tm-quantiles",
        json!({}),
        MeshOptions {
            latency_sensitive: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
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

for_each_module!(p95_and_p99_from_the_scraped_histograms_are_within_10_percent_of_the_truth);

/// The labels of the frontend → checkout pair plus `extra`.
fn pair_labels<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut labels = vec![
        ("source_service", "frontend"),
        ("destination_service", "checkout"),
    ];
    labels.extend_from_slice(extra);
    labels
}

/// Every `eastwest_requests_total` sample line, for failure messages.
fn requests_lines(envoy: &Envoy) -> String {
    envoy
        .prometheus()
        .unwrap()
        .lines()
        .filter(|line| line.starts_with("eastwest_requests_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn grpc_status_from_trailers_and_trailers_only_headers_is_exact_on_both_reporters(
    module: ModuleUnderTest,
) {
    let mesh = Mesh::start_with(
        module,
        "tm-grpc",
        json!({}),
        MeshOptions {
            http2_upstreams: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    // grpc-status in the trailers (after one message), then trailers-only (in the headers).
    for (count, status, trailers_only) in [(5, "0", false), (4, "14", false), (3, "7", true)] {
        for _ in 0..count {
            let mut headers: Vec<(&str, &[u8])> = vec![("x-test-grpc-status", status.as_bytes())];
            if trailers_only {
                headers.push(("x-test-grpc-trailers-only", b"1"));
            }
            let response = mesh.grpc_call(&headers);
            assert_eq!(response.status, 200);
            assert_eq!(
                response.header_str("content-type").as_deref(),
                Some("application/grpc")
            );
            if trailers_only {
                assert_eq!(response.header_str("grpc-status").as_deref(), Some(status));
                assert!(response.body.is_empty() && response.trailers.is_empty());
            } else {
                assert_eq!(response.trailer_str("grpc-status").as_deref(), Some(status));
                assert_eq!(response.header_str("grpc-status"), None);
                assert_eq!(response.body[0], 0, "a length-prefixed message");
            }
        }
    }
    for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
        for (status, expected) in [("0", 5), ("14", 4), ("7", 3)] {
            let labels = pair_labels(&[
                ("reporter", reporter),
                ("request_protocol", "grpc"),
                ("grpc_status", status),
                ("response_code", "200"),
            ]);
            let value = wait_for_sample(envoy, "eastwest_requests_total", &labels, expected);
            assert_eq!(
                value,
                expected,
                "{reporter} grpc_status {status}:\n{}",
                requests_lines(envoy)
            );
        }
        let all_grpc = sample(
            envoy,
            "eastwest_requests_total",
            &[("reporter", reporter), ("request_protocol", "grpc")],
        );
        assert_eq!(all_grpc, 12, "{reporter}:\n{}", requests_lines(envoy));
        assert_eq!(
            sample(
                envoy,
                "eastwest_requests_total",
                &[("reporter", reporter), ("request_protocol", "http")]
            ),
            0
        );
        assert_eq!(
            wait_for_sample(
                envoy,
                "eastwest_request_duration_milliseconds_count",
                &[("reporter", reporter), ("request_protocol", "grpc")],
                12
            ),
            12,
            "{reporter}: one duration sample per gRPC call"
        );
    }
}

for_each_module!(grpc_status_from_trailers_and_trailers_only_headers_is_exact_on_both_reporters);

/// Envoy 1.40's `response.grpc_status` is never empty once there is a response code: without
/// `grpc-status` in the trailers or the headers it is inferred from the HTTP status
/// (`Grpc::Utility::httpToGrpcStatus`: 200 → 2 UNKNOWN, 503 → 14 UNAVAILABLE), so the
/// filter's `unknown` does not show up for these.
fn grpc_without_a_status_gets_the_status_envoy_infers_from_the_http_code(module: ModuleUnderTest) {
    let mesh = Mesh::start_with(
        module,
        "tm-grpc-nostatus",
        json!({}),
        MeshOptions {
            http2_upstreams: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    // The app answers JSON without any grpc-status: 3 with 200, 2 with 503.
    for _ in 0..3 {
        let response = mesh.grpc_call(&[]);
        assert_eq!(response.status, 200);
        assert_eq!(response.header_str("grpc-status"), None);
        assert!(response.trailers.is_empty());
    }
    for _ in 0..2 {
        assert_eq!(mesh.grpc_call(&[("x-test-status", b"503")]).status, 503);
    }
    for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
        for (code, status, expected) in [("200", "2", 3), ("503", "14", 2)] {
            let labels = pair_labels(&[
                ("reporter", reporter),
                ("request_protocol", "grpc"),
                ("response_code", code),
                ("grpc_status", status),
            ]);
            let value = wait_for_sample(envoy, "eastwest_requests_total", &labels, expected);
            assert_eq!(value, expected, "{reporter}:\n{}", requests_lines(envoy));
        }
        assert_eq!(
            sample(envoy, "eastwest_requests_total", &[("reporter", reporter)]),
            5,
            "{reporter}:\n{}",
            requests_lines(envoy)
        );
    }
}

for_each_module!(grpc_without_a_status_gets_the_status_envoy_infers_from_the_http_code);

fn http2_and_http1_requests_count_as_http_without_grpc_status_on_both_reporters(
    module: ModuleUnderTest,
) {
    let mesh = Mesh::start_with(
        module,
        "tm-h2",
        json!({}),
        MeshOptions {
            http2_upstreams: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}/orders", mesh.caller_port);
    let counted = |expected: u64| {
        for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
            let labels = pair_labels(&[
                ("reporter", reporter),
                ("request_protocol", "http"),
                ("grpc_status", "none"),
            ]);
            let value = wait_for_sample(envoy, "eastwest_requests_total", &labels, expected);
            assert_eq!(value, expected, "{reporter}:\n{}", requests_lines(envoy));
            assert_eq!(
                sample(envoy, "eastwest_requests_total", &[("reporter", reporter)]),
                expected,
                "{reporter}: nothing else:\n{}",
                requests_lines(envoy)
            );
        }
    };
    // h2c from the client (HTTP/2 on every hop), a JSON content-type on some.
    for index in 0..7 {
        let headers: &[(&str, &[u8])] = if index % 2 == 0 {
            &[("content-type", b"application/json")]
        } else {
            &[]
        };
        let response = http2_request("POST", &url, headers, "{}").unwrap();
        assert_eq!(response.status, 200);
    }
    counted(7);
    // HTTP/1.1 from the client.
    for _ in 0..5 {
        assert_eq!(http_request("GET", &url, &[], "").unwrap().status, 200);
    }
    counted(12);
}

for_each_module!(http2_and_http1_requests_count_as_http_without_grpc_status_on_both_reporters);

/// Envoy's exposition reduced to eastwest's metric families (Envoy's own counters break
/// Prometheus naming conventions that `promtool check metrics` lints).
fn eastwest_exposition(envoy: &Envoy) -> String {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    let mut out = String::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            keep = family.starts_with("eastwest_");
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn a_real_prometheus_scrapes_both_sidecars_and_the_recording_rules_agree(module: ModuleUnderTest) {
    use eastwest_e2e::prometheus::{promtool, Prometheus};
    use std::io::Write;

    let mesh = Mesh::start_with(
        module,
        "tm-prometheus",
        json!({}),
        MeshOptions {
            latency_sensitive: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    let rules = eastwest_e2e::workspace_root().join("envoy-configs/prometheus/eastwest-rules.yaml");
    let prometheus = Prometheus::start(
        &module.tag("tm-prometheus"),
        &[mesh.caller.admin_port(), mesh.callee.admin_port()],
        Some(&rules),
    )
    .unwrap();
    // Phase 1 creates the series; rates then count only phase 2.
    for status in ["200", "503"] {
        assert!(mesh.call(mesh.caller_port, &[("x-test-status", status.as_bytes())]) > 0);
    }
    let series = "eastwest_requests_total{reporter=\"destination\"}";
    prometheus
        .wait_for(series, Duration::from_secs(20), |results| {
            results.len() >= 2
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // Phase 2: a long-tail latency distribution, one request in four failing.
    let plan = eastwest_e2e::LoadPlan::new(
        format!("http://127.0.0.1:{}/orders", mesh.caller_port),
        1200,
    )
    .concurrency(8)
    .max_duration(Duration::from_secs(60))
    .header("x-test-delay-ms-choices", "2*90,20-40*8,200-400*2")
    .header("x-test-fail-every", "4");
    let report = eastwest_e2e::load::run(&plan).unwrap();
    assert_eq!(report.status_count(503), 300, "{}", report.summary());

    // The exposition of both sidecars passes promtool's checks.
    for envoy in [&mesh.caller, &mesh.callee] {
        let exposition = eastwest_exposition(envoy);
        assert!(
            exposition.contains("eastwest_requests_total{"),
            "{exposition}"
        );
        let mut check = std::process::Command::new(promtool().unwrap())
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(exposition.as_bytes())
            .unwrap();
        let output = check.wait_with_output().unwrap();
        let findings = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // Exit 1 is a parse error. Exit 3 is lint findings; two are expected and accepted:
        // Envoy writes no HELP lines, and the duration histogram is in milliseconds, the unit
        // DESIGN.md §4 fixes (as Istio's istio_request_duration_milliseconds).
        let unexpected: Vec<&str> = findings
            .lines()
            .filter(|line| {
                !line.ends_with(" no help text")
                    && !line.ends_with(r#"use base unit "seconds" instead of "milliseconds""#)
                    && !line.trim().is_empty()
            })
            .collect();
        assert!(
            matches!(output.status.code(), Some(0 | 3)) && unexpected.is_empty(),
            "promtool check metrics ({:?}): {findings}",
            output.status.code()
        );
    }

    // Recording rules, once Prometheus has scraped the end of phase 2 and evaluated them.
    let selector =
        "{reporter=\"source\",source_service=\"frontend\",destination_service=\"checkout\"}";
    let expected_requests = prometheus
        .query(&format!("sum(eastwest_requests_total{selector})"))
        .unwrap();
    assert!(!expected_requests.is_empty(), "{}", prometheus.log());
    let ratio = prometheus
        .wait_for(
            &format!("eastwest_pair:request_errors:ratio_rate5m{selector}"),
            Duration::from_secs(20),
            |results| {
                results
                    .first()
                    .is_some_and(|(_, v)| (v - 0.25).abs() < 0.01)
            },
        )
        .unwrap();
    assert_eq!(ratio.len(), 1, "{ratio:?}");
    assert!(
        (ratio[0].1 - 0.25).abs() < 0.01,
        "error ratio {ratio:?}, expected 0.25"
    );
    // Envoy exports histograms at each stats flush: wait until Prometheus has scraped every
    // request's duration (a partial export lacks the slowest requests), then for the rules.
    let count = format!("sum(eastwest_request_duration_milliseconds_count{selector})");
    let scraped = prometheus
        .wait_for(&count, Duration::from_secs(20), |results| {
            results.first().is_some_and(|(_, v)| *v >= 1202.0)
        })
        .unwrap();
    assert_eq!(scraped.first().map(|r| r.1), Some(1202.0), "{scraped:?}");
    std::thread::sleep(Duration::from_millis(2500));
    for (rule, q) in [("p95_5m", 0.95), ("p99_5m", 0.99)] {
        let truth = report.p(q).as_secs_f64() * 1000.0;
        let results = prometheus
            .query(&format!(
                "eastwest_pair:request_duration_milliseconds:{rule}{selector}"
            ))
            .unwrap();
        assert_eq!(results.len(), 1, "{rule}: {results:?}");
        let value = results[0].1;
        let error = (value - truth).abs() / truth;
        println!(
            "{rule}: rule {value:.2} ms, ground truth {truth:.2} ms, error {:.1}%",
            error * 100.0
        );
        assert!(error <= 0.10, "{rule}: {value:.2} ms vs {truth:.2} ms");
    }
}

for_each_module!(a_real_prometheus_scrapes_both_sidecars_and_the_recording_rules_agree);

/// A gRPC call the app resets: Envoy answers it itself as gRPC does, trailers-only with HTTP
/// 200 and `grpc-status: 14` (UNAVAILABLE), so both reporters count `response_code="200"`,
/// `grpc_status="14"`: for gRPC, failures show in `grpc_status`, not in `response_code`.
fn a_reset_grpc_call_counts_as_200_with_envoys_local_grpc_status_14(module: ModuleUnderTest) {
    let mesh = Mesh::start_with(
        module,
        "tm-grpc-reset",
        json!({}),
        MeshOptions {
            http2_upstreams: true,
            ..MeshOptions::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        let response = mesh.grpc_call(&[("x-test-reset", b"1")]);
        assert_eq!(response.status, 200);
        assert_eq!(response.header_str("grpc-status").as_deref(), Some("14"));
    }
    for (envoy, reporter) in [(&mesh.caller, "source"), (&mesh.callee, "destination")] {
        let labels = pair_labels(&[
            ("reporter", reporter),
            ("request_protocol", "grpc"),
            ("response_code", "200"),
            ("grpc_status", "14"),
        ]);
        let value = wait_for_sample(envoy, "eastwest_requests_total", &labels, 3);
        assert_eq!(value, 3, "{reporter}:\n{}", requests_lines(envoy));
        assert_eq!(
            sample(envoy, "eastwest_requests_total", &[("reporter", reporter)]),
            3,
            "{reporter}:\n{}",
            requests_lines(envoy)
        );
    }
}

for_each_module!(a_reset_grpc_call_counts_as_200_with_envoys_local_grpc_status_14);
