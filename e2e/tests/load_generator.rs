//! The load generator (`eastwest_e2e::load`) and the test app's load-test controls
//! (`x-test-delay-ms-choices`, `x-test-seed`, `x-test-close-mid-response`,
//! `x-test-fail-every`), straight to the app and through a real Envoy with two workers.
//! Needs Envoy (EASTWEST_ENVOY or `cargo xtask test`) for the Envoy tests.

use std::path::Path;
use std::time::{Duration, Instant};

use eastwest_e2e::app::DelayChoices;
use eastwest_e2e::load::{self, LoadPlan, LoadReport};
use eastwest_e2e::{
    bootstrap, free_port, http_request, ClusterBuilder, Envoy, EnvoyOptions, ListenerBuilder, Node,
    TestApp,
};
use serde_json::json;

/// 90% fast, 8% in a slower band, 2% in a long tail: p50 2 ms, p95 32.5 ms, p99 300 ms.
const LONG_TAIL: &str = "2*90,20-40*8,200-400*2";

/// Every access log field a telemetry filter cares about for failures.
const FLAGS_LOG_FORMAT: &str = "%REQ(X-CASE)% %RESPONSE_CODE% flags=%RESPONSE_FLAGS% \
     long=%RESPONSE_FLAGS_LONG% details=%RESPONSE_CODE_DETAILS% \
     failure=%UPSTREAM_TRANSPORT_FAILURE_REASON% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT%";

/// The `q` quantile of `values` as hdrhistogram and the load report define it: the smallest
/// value with at least `q` of the values at or below it.
fn exact_quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The delays the app sleeps for requests 0..n when each sends `x-test-seed: <index>`.
fn seeded_delays(choices: &DelayChoices, n: u64) -> Vec<Duration> {
    let mut delays: Vec<Duration> = (0..n).map(|seed| choices.for_seed(seed)).collect();
    delays.sort();
    delays
}

fn seed_header(index: u64) -> Vec<(String, Vec<u8>)> {
    vec![("x-test-seed".into(), index.to_string().into_bytes())]
}

fn assert_accounted(report: &LoadReport) {
    assert_eq!(
        report.sent,
        report.completed + report.errors.total() + report.abandoned,
        "every request ends in exactly one bucket: {}",
        report.summary()
    );
}

/// Checks measured p50/p95/p99 against the exact quantiles of the delays the app slept.
///
/// The measured latency is the app's delay plus overhead, never less: a tokio sleep never
/// ends early and hdrhistogram reports the highest value equivalent to the recorded one
/// (>= it, within 0.1%). Above: tokio's timer rounds a sleep up to its next 1 ms tick, and
/// loopback, hyper and (through Envoy) the proxy add well under a millisecond on an idle
/// machine; the bound allows 10% + 5 ms for scheduling noise on a 2-CPU machine shared with
/// builds. A shifted quantile (a request counted twice, a lost tail) moves p95/p99 by far
/// more than that: at p99 the neighbouring ranks differ by ~2 ms, across the 98% boundary
/// by 160 ms.
fn assert_quantiles_match(report: &LoadReport, delays: &[Duration]) {
    for q in [0.5, 0.95, 0.99] {
        let expected = exact_quantile(delays, q);
        let measured = report.p(q);
        let upper = expected.mul_f64(1.10) + Duration::from_millis(5);
        assert!(
            measured >= expected && measured <= upper,
            "p{}: measured {measured:?}, the app slept {expected:?} (allowed up to {upper:?})\n{}",
            q * 100.0,
            report.summary()
        );
    }
}

fn plain_envoy(name: &str, app_port: u16, listener: ListenerBuilder) -> Envoy {
    let admin = free_port();
    let config = bootstrap(
        &Node::new("proxy-1", "proxy"),
        admin,
        vec![listener.build()],
        vec![ClusterBuilder::new("app", app_port).build()],
        &[],
    );
    let options = EnvoyOptions {
        concurrency: 2,
        ..EnvoyOptions::default()
    };
    Envoy::start(name, config, &options).unwrap()
}

/// Waits until the access log has `lines` lines (Envoy writes it when each stream ends).
fn access_log_lines(path: &Path, lines: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<String> = text.lines().map(str::to_owned).collect();
        if found.len() >= lines || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn app_draws_long_tail_delays_and_the_generator_measures_them() {
    let app = TestApp::start().unwrap();
    let choices = DelayChoices::parse(LONG_TAIL).unwrap();
    let plan = LoadPlan::new(format!("http://127.0.0.1:{}/work", app.port()), 2_000)
        .concurrency(8)
        .max_duration(Duration::from_secs(30))
        .header("x-test-delay-ms-choices", LONG_TAIL)
        .per_request_headers(seed_header);
    let report = load::run(&plan).unwrap();
    eprintln!("direct: {}", report.summary());
    assert_eq!(report.completed, 2_000, "{}", report.summary());
    assert_eq!(report.status_count(200), 2_000, "{}", report.summary());
    assert_eq!(report.latency.len(), 2_000);
    assert!(!report.stopped_by_deadline);
    assert_accounted(&report);
    // Keep-alive: one connection per worker.
    assert_eq!(report.connections, 8, "{}", report.summary());
    assert_eq!(app.requests_seen(), 2_000);

    let delays = seeded_delays(&choices, 2_000);
    // The seeded sample is close to the distribution itself (so a test may use either).
    for (q, theory_ms) in [(0.5, 2.0), (0.95, 32.5), (0.99, 300.0)] {
        let sample_ms = exact_quantile(&delays, q).as_secs_f64() * 1000.0;
        assert!(
            (sample_ms - theory_ms).abs() <= theory_ms * 0.1,
            "p{q}: seeded sample {sample_ms} ms vs distribution {theory_ms} ms"
        );
        let theory = choices.quantile(q).as_secs_f64() * 1000.0;
        assert!((theory - theory_ms).abs() < 0.01, "{theory}");
    }
    assert_quantiles_match(&report, &delays);

    // The same seed, the same delay: a request alone shows it.
    let slow_seed = (0..).find(|&seed| choices.for_seed(seed) >= Duration::from_millis(200));
    let slow_seed = slow_seed.unwrap();
    let started = Instant::now();
    let response = http_request(
        "GET",
        &format!("http://127.0.0.1:{}/", app.port()),
        &[
            ("x-test-delay-ms-choices", LONG_TAIL.as_bytes()),
            ("x-test-seed", slow_seed.to_string().as_bytes()),
        ],
        "",
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert!(started.elapsed() >= choices.for_seed(slow_seed));

    let bad = http_request(
        "GET",
        &format!("http://127.0.0.1:{}/", app.port()),
        &[("x-test-delay-ms-choices", b"5*x")],
        "",
    )
    .unwrap();
    assert_eq!(bad.status, 400);
    assert!(
        bad.text().contains("x-test-delay-ms-choices"),
        "{}",
        bad.text()
    );
}

#[test]
fn counts_through_envoy_match_envoys_own_counters() {
    let app = TestApp::start().unwrap();
    let listen = free_port();
    let envoy = plain_envoy(
        "load-plain",
        app.port(),
        ListenerBuilder::new("outbound", listen, "app"),
    );
    let choices = DelayChoices::parse(LONG_TAIL).unwrap();
    // The harness's readiness probe opened one connection already.
    let connections_before = envoy
        .counter("http.outbound.downstream_cx_total")
        .unwrap_or(0);
    for http2 in [false, true] {
        let requests = if http2 { 500 } else { 2_000 };
        let before = envoy
            .counter("cluster.app.upstream_rq_completed")
            .unwrap_or(0);
        let plan = LoadPlan::new(format!("http://127.0.0.1:{listen}/via-envoy"), requests)
            .concurrency(8)
            .http2(http2)
            .max_duration(Duration::from_secs(30))
            .header("x-test-delay-ms-choices", LONG_TAIL)
            .per_request_headers(seed_header);
        let report = load::run(&plan).unwrap();
        eprintln!("through envoy (http2 {http2}): {}", report.summary());
        assert_eq!(report.completed, requests, "{}", report.summary());
        assert_eq!(report.status_count(200), requests, "{}", report.summary());
        assert_accounted(&report);
        assert_eq!(report.connections, 8, "{}", report.summary());
        // Envoy counts a stream when it ends, which may be just after the client has the
        // last byte.
        let completed = envoy
            .wait_for_counter(
                "cluster.app.upstream_rq_completed",
                before + requests,
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(completed, before + requests);
        assert_quantiles_match(&report, &seeded_delays(&choices, requests));
    }
    let downstream = envoy
        .wait_for_counter(
            "http.outbound.downstream_rq_completed",
            2_500,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(downstream, 2_500);
    // Keep-alive end to end: 8 HTTP/1.1 plus 8 HTTP/2 downstream connections in all.
    assert_eq!(
        envoy.counter("http.outbound.downstream_cx_total").unwrap() - connections_before,
        16
    );
    assert_eq!(app.requests_seen(), 2_500);
}

#[test]
fn the_hard_time_limit_stops_a_long_plan() {
    let app = TestApp::start().unwrap();
    let url = format!("http://127.0.0.1:{}/slow", app.port());
    // 1,000 requests of 200 ms on two connections would take 100 s.
    let plan = LoadPlan::new(&url, 1_000)
        .concurrency(2)
        .max_duration(Duration::from_millis(500))
        .header("x-test-delay-ms", "200");
    let started = Instant::now();
    let report = load::run(&plan).unwrap();
    let took = started.elapsed();
    eprintln!("hard stop: {} (run took {took:?})", report.summary());
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    assert!(report.stopped_by_deadline);
    assert_accounted(&report);
    // Two rounds of 200 ms fit in 500 ms, the third is cut off on both workers.
    assert!((2..=6).contains(&report.completed), "{}", report.summary());
    assert_eq!(report.abandoned, 2, "{}", report.summary());
    assert_eq!(report.errors.total(), 0, "{}", report.summary());
    assert!(report.sent < 10, "{}", report.summary());

    // Per-request timeouts are errors, not abandoned requests.
    let plan = LoadPlan::new(&url, 4)
        .concurrency(2)
        .request_timeout(Duration::from_millis(50))
        .header("x-test-delay-ms", "200");
    let report = load::run(&plan).unwrap();
    assert_eq!(report.errors.timeout, 4, "{}", report.summary());
    assert!(!report.stopped_by_deadline);
    assert_accounted(&report);

    // Nobody listening: every request is a connect error, and the plan still ends.
    let closed = format!("http://127.0.0.1:{}/", free_port());
    let report = load::run(&LoadPlan::new(closed, 20).concurrency(4)).unwrap();
    assert_eq!(report.errors.connect, 20, "{}", report.summary());
    assert_eq!(report.completed, 0);
    assert_eq!(report.p(0.99), Duration::ZERO);
}

#[test]
fn close_mid_response_and_fail_every_through_envoy() {
    let app = TestApp::start().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let access_log = run_dir.path().join("access.log");
    let (listen, retry_listen, down_listen, h2_listen) =
        (free_port(), free_port(), free_port(), free_port());
    let envoy = {
        let admin = free_port();
        let config = bootstrap(
            &Node::new("proxy-1", "proxy"),
            admin,
            vec![
                ListenerBuilder::new("plain", listen, "app")
                    .route_field("timeout", json!("0.5s"))
                    // Envoy holds a downstream HTTP/1.1 connection it closes after a reset
                    // mid-response open for delayed_close_timeout (1 s by default) waiting
                    // for the client to close first; 0.1 s keeps the test short.
                    .hcm_field("delayed_close_timeout", json!("0.1s"))
                    .access_log(&access_log, FLAGS_LOG_FORMAT)
                    .build(),
                ListenerBuilder::new("to-h2", h2_listen, "app_h2")
                    .hcm_field("delayed_close_timeout", json!("0.1s"))
                    .access_log(&access_log, FLAGS_LOG_FORMAT)
                    .build(),
                ListenerBuilder::new("to-down", down_listen, "down")
                    .access_log(&access_log, FLAGS_LOG_FORMAT)
                    .build(),
                ListenerBuilder::new("retrying", retry_listen, "app")
                    .retry_policy(json!({
                        "retry_on": "5xx",
                        "num_retries": 1,
                        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
                    }))
                    .build(),
            ],
            vec![
                ClusterBuilder::new("app", app.port()).build(),
                ClusterBuilder::new("app_h2", app.port())
                    .http2(true)
                    .build(),
                ClusterBuilder::new("down", free_port()).build(),
            ],
            &[],
        );
        Envoy::start("load-failures", config, &EnvoyOptions::default()).unwrap()
    };
    let url = format!("http://127.0.0.1:{listen}/fail");

    // Cut off after the headers: Envoy has forwarded the 200 already, so the client sees the
    // downstream connection closed mid-body — a reset in the report, not a status.
    let report = load::run(
        &LoadPlan::new(&url, 10)
            .concurrency(2)
            .header("x-case", "close-mid-response")
            .header("x-test-close-mid-response", "1"),
    )
    .unwrap();
    eprintln!("close-mid-response: {}", report.summary());
    assert_eq!(report.errors.reset, 10, "{}", report.summary());
    assert_eq!(report.completed, 0, "{}", report.summary());
    assert_eq!(app.closed_mid_response(), 10);

    // Closed before any response: Envoy answers 503 itself.
    let report = load::run(
        &LoadPlan::new(&url, 10)
            .concurrency(2)
            .header("x-case", "reset")
            .header("x-test-reset", "1"),
    )
    .unwrap();
    eprintln!("reset: {}", report.summary());
    assert_eq!(report.status_count(503), 10, "{}", report.summary());

    // Every 4th request fails: exactly 25 of 100, counted by the app.
    let report = load::run(
        &LoadPlan::new(&url, 100)
            .concurrency(4)
            .header("x-case", "fail-every")
            .header("x-test-fail-every", "4"),
    )
    .unwrap();
    eprintln!("fail-every: {}", report.summary());
    assert_eq!(report.status_count(503), 25, "{}", report.summary());
    assert_eq!(report.status_count(200), 75, "{}", report.summary());
    assert_eq!(app.fail_every_failures(), 25);
    assert_eq!(app.fail_every_seen(), 100);

    // The same two failures over HTTP/2 to the app (a stream reset instead of a close).
    for (case, header) in [
        ("h2-close-mid-response", "x-test-close-mid-response"),
        ("h2-reset", "x-test-reset"),
    ] {
        let report = load::run(
            &LoadPlan::new(format!("http://127.0.0.1:{h2_listen}/"), 5)
                .header("x-case", case)
                .header(header, "1"),
        )
        .unwrap();
        eprintln!("{case}: {}", report.summary());
        if case == "h2-reset" {
            assert_eq!(report.status_count(503), 5, "{}", report.summary());
        } else {
            assert_eq!(report.errors.reset, 5, "{}", report.summary());
        }
    }

    // A callee that is down (nothing listens on the cluster's port).
    let report = load::run(
        &LoadPlan::new(format!("http://127.0.0.1:{down_listen}/"), 5).header("x-case", "down"),
    )
    .unwrap();
    eprintln!("down: {}", report.summary());
    assert_eq!(report.status_count(503), 5, "{}", report.summary());

    // Slower than the route timeout.
    let report = load::run(
        &LoadPlan::new(&url, 2)
            .header("x-case", "route-timeout")
            .header("x-test-delay-ms", "800"),
    )
    .unwrap();
    eprintln!("route timeout: {}", report.summary());
    assert_eq!(report.status_count(504), 2, "{}", report.summary());

    let lines = access_log_lines(&access_log, 137);
    eprintln!("access log:\n{}", lines.join("\n"));
    let flags_of = |case: &str| -> Vec<String> {
        let mut found: Vec<String> = lines
            .iter()
            .filter(|line| line.starts_with(&format!("{case} ")))
            .map(|line| line.split_once(' ').unwrap().1.to_owned())
            .collect();
        found.dedup();
        found
    };
    // What Envoy 1.40 reports for each failure mode of the app (the telemetry filter's
    // `failure` tag): one distinct log line per case.
    let expected = [
        ("close-mid-response", "200 flags=UPE long=UpstreamProtocolError details=upstream_reset_after_response_started{protocol_error}"),
        ("h2-close-mid-response", "200 flags=UR long=UpstreamRemoteReset details=upstream_reset_after_response_started{remote_reset}"),
        ("reset", "503 flags=UC long=UpstreamConnectionTermination details=upstream_reset_before_response_started{connection_termination}"),
        ("h2-reset", "503 flags=UR long=UpstreamRemoteReset details=upstream_reset_before_response_started{remote_reset}"),
        ("down", "503 flags=UF long=UpstreamConnectionFailure details=upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused} failure=delayed_connect_error:_Connection_refused"),
        ("route-timeout", "504 flags=UT long=UpstreamRequestTimeout details=response_timeout"),
    ];
    for (case, prefix) in expected {
        let found = flags_of(case);
        assert!(
            found.len() == 1 && found[0].starts_with(prefix),
            "{case}: expected one kind of line starting with {prefix:?}, got {found:?}"
        );
    }
    let fail_every: Vec<&String> = lines
        .iter()
        .filter(|line| line.starts_with("fail-every 503 "))
        .collect();
    assert_eq!(fail_every.len(), 25);
    assert!(fail_every
        .iter()
        .all(|line| line.contains(" flags=- ") && line.contains("details=via_upstream")));

    // With one retry on 5xx and one request at a time, each failure is retried as the very
    // next arrival, which never fails: A arrivals with A = 100 + A/4 gives 133, 33 retries.
    let before_retries = envoy.counter("cluster.app.upstream_rq_retry").unwrap_or(0);
    let app_failures_before = app.fail_every_failures();
    let seen_before = app.fail_every_seen();
    let report = load::run(
        &LoadPlan::new(format!("http://127.0.0.1:{retry_listen}/retry"), 100)
            .header("x-test-fail-every", "4"),
    )
    .unwrap();
    eprintln!("fail-every with retries: {}", report.summary());
    assert_eq!(report.status_count(200), 100, "{}", report.summary());
    let failures = app.fail_every_failures() - app_failures_before;
    let seen = app.fail_every_seen() - seen_before;
    assert_eq!(seen, 100 + failures);
    // 100 arrivals were already counted above, so this run's arrivals are 101..: still one
    // failure per 4 arrivals.
    assert_eq!(failures, 33, "seen {seen}");
    assert_eq!(
        envoy.counter("cluster.app.upstream_rq_retry").unwrap_or(0) - before_retries,
        failures
    );
}
