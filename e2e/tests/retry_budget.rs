//! retry-budget in real Envoy, one test per mode: a retry the budget denies is not retried by
//! the router (client, client-headers), a request the callee's sidecar sheds is not retried by
//! the calling Envoy (server), gRPC callers are told not to retry, and invalid configuration
//! is refused with the field path.
//!
//! The budgets here are zero (`ratio` 0, no reserve) or ample (the defaults), so that each
//! test's outcome is exact; the retry-storm experiment (tests/retry_storm.rs) measures the
//! budget's arithmetic under load.
//!
//! Each test runs against dist/retry-budget.wasm and against dist/eastwest.wasm with only the
//! `retry_budget` section (in the same filter slot: an HTTP filter or an upstream filter).

use std::time::Duration;

use anyhow::Result;
use eastwest_e2e::{
    bootstrap, feature_filter, for_each_module, free_port, http2_request, http_request,
    ClusterBuilder, Envoy, EnvoyOptions, Feature, ListenerBuilder, ModuleUnderTest, Node, TestApp,
    TrafficDirection,
};
use serde_json::{json, Value};

const FEATURE: Feature = Feature::RetryBudget;

const NO_BUDGET: &str = r#"{"ratio": 0, "min_retries_per_second": 0}"#;

fn budget_config(mode: &str, budget: &str) -> Value {
    let mut config: Value = serde_json::from_str(budget).unwrap();
    config["mode"] = json!(mode);
    config["peer_trust"] = json!("any");
    config
}

fn node(service: &str) -> Node {
    Node::istio_sidecar(&format!("{service}-v1"), "shop", &[("app", service)])
}

fn retry_policy() -> Value {
    json!({
        "retry_on": "5xx,reset,connect-failure",
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
    })
}

fn budget_tags() -> Vec<(&'static str, String)> {
    [
        "destination_service",
        "destination_namespace",
        "source_service",
        "mode",
        "reason",
    ]
    .into_iter()
    .map(|tag| (tag, eastwest_common::metric_name::stats_tag_regex(tag)))
    .collect()
}

fn tags_ref<'a>(tags: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    tags.iter()
        .map(|(tag, regex)| (*tag, regex.as_str()))
        .collect()
}

/// A caller's sidecar: outbound listener with a 2-retry policy and attempt counts, toward
/// `upstream_port`; retry-budget as an HTTP filter (`listener_filter`) or as an upstream
/// filter of the cluster (`upstream_filter`).
fn caller(
    module: ModuleUnderTest,
    name: &str,
    upstream_port: u16,
    listener_filter: Option<Value>,
    upstream_filter: Option<Value>,
) -> Result<(Envoy, u16)> {
    let port = free_port();
    let mut listener = ListenerBuilder::new("outbound", port, "checkout")
        .traffic_direction(TrafficDirection::Outbound)
        .retry_policy(retry_policy())
        .virtual_host_field("include_request_attempt_count", json!(true));
    if let Some(filter) = listener_filter {
        listener = listener.http_filter(filter);
    }
    let mut cluster = ClusterBuilder::new("checkout", upstream_port);
    if let Some(filter) = upstream_filter {
        cluster = cluster.upstream_http_filter(filter);
    }
    let tags = budget_tags();
    let envoy = Envoy::start(
        &module.tag(name),
        bootstrap(
            &node("frontend"),
            free_port(),
            vec![listener.build()],
            vec![cluster.build()],
            &tags_ref(&tags),
        ),
        &EnvoyOptions::default(),
    )?;
    Ok((envoy, port))
}

/// A callee's sidecar: inbound listener with retry-budget in `server` mode, toward the app.
fn callee(
    module: ModuleUnderTest,
    name: &str,
    app_port: u16,
    config: Value,
) -> Result<(Envoy, u16)> {
    let port = free_port();
    let tags = budget_tags();
    let envoy = Envoy::start(
        &module.tag(name),
        bootstrap(
            &node("checkout"),
            free_port(),
            vec![ListenerBuilder::new("inbound", port, "app")
                .traffic_direction(TrafficDirection::Inbound)
                .http_filter(feature_filter(module, FEATURE, config)?)
                .build()],
            vec![ClusterBuilder::new("app", app_port).http2(true).build()],
            &tags_ref(&tags),
        ),
        &EnvoyOptions::default(),
    )?;
    Ok((envoy, port))
}

fn failing_request(port: u16) -> Result<eastwest_e2e::Response> {
    http_request(
        "GET",
        &format!("http://127.0.0.1:{port}/pay"),
        &[("x-test-status", b"503")],
        "",
    )
}

/// The value of a Prometheus sample whose line contains every one of `parts`.
fn sample(prometheus: &str, metric: &str, parts: &[&str]) -> Option<f64> {
    prometheus
        .lines()
        .filter(|line| line.starts_with(metric) && parts.iter().all(|part| line.contains(part)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

fn client_mode_denies_a_retry_and_the_router_does_not_retry_it(
    module: ModuleUnderTest,
) -> Result<()> {
    let app = TestApp::start()?;
    let filter = feature_filter(module, FEATURE, budget_config("client", NO_BUDGET))?;
    let (caller, port) = caller(module, "rb-client-denied", app.port(), None, Some(filter))?;

    let response = failing_request(port)?;
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header_str("x-eastwest-retry-budget").as_deref(),
        Some("exhausted"),
        "{:?}",
        response.headers
    );
    // The first attempt reached the app; the retry was refused in the upstream filter, and the
    // router did not try a third time.
    assert_eq!(app.requests_seen(), 1);
    assert_eq!(
        caller.counter("cluster.checkout.upstream_rq_retry"),
        Some(1),
        "one retry attempted (and refused by the budget)"
    );
    let prometheus = caller.prometheus()?;
    assert_eq!(
        sample(
            &prometheus,
            "eastwest_retry_budget_denied_total",
            &["destination_service=\"checkout\"", "mode=\"client\""]
        ),
        Some(1.0),
        "{prometheus}"
    );

    // A first attempt is never refused, whatever the budget says.
    let ok = http_request("GET", &format!("http://127.0.0.1:{port}/pay"), &[], "")?;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-eastwest-retry-budget"), None);
    Ok(())
}

for_each_module!(client_mode_denies_a_retry_and_the_router_does_not_retry_it);

fn client_mode_admits_retries_within_the_budget(module: ModuleUnderTest) -> Result<()> {
    let app = TestApp::start()?;
    let filter = feature_filter(module, FEATURE, budget_config("client", "{}"))?;
    let (caller, port) = caller(module, "rb-client-admitted", app.port(), None, Some(filter))?;
    let response = failing_request(port)?;
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-eastwest-retry-budget"), None);
    // The defaults' reserve (10 retries/s over 10 s) pays for both retries.
    assert_eq!(app.requests_seen(), 3);
    let prometheus = caller.prometheus()?;
    assert_eq!(
        sample(
            &prometheus,
            "eastwest_retry_budget_admitted_total",
            &["destination_service=\"checkout\"", "mode=\"client\""]
        ),
        Some(2.0),
        "{prometheus}"
    );
    Ok(())
}

for_each_module!(client_mode_admits_retries_within_the_budget);

fn client_headers_mode_switches_the_routers_retries_off(module: ModuleUnderTest) -> Result<()> {
    let app = TestApp::start()?;
    let filter = feature_filter(module, FEATURE, budget_config("client-headers", NO_BUDGET))?;
    let (caller, port) = caller(module, "rb-headers-denied", app.port(), Some(filter), None)?;
    let response = failing_request(port)?;
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header_str("x-eastwest-retry-budget").as_deref(),
        Some("exhausted")
    );
    assert_eq!(app.requests_seen(), 1, "the router must not have retried");
    assert_eq!(
        caller.counter("cluster.checkout.upstream_rq_retry"),
        Some(0)
    );
    let prometheus = caller.prometheus()?;
    assert_eq!(
        sample(
            &prometheus,
            "eastwest_retry_budget_denied_total",
            &[
                "destination_service=\"checkout\"",
                "mode=\"client-headers\""
            ]
        ),
        Some(1.0),
        "{prometheus}"
    );
    // A successful request through a spent budget carries no mark.
    let ok = http_request("GET", &format!("http://127.0.0.1:{port}/pay"), &[], "")?;
    assert_eq!(
        (ok.status, ok.header("x-eastwest-retry-budget")),
        (200, None)
    );
    Ok(())
}

for_each_module!(client_headers_mode_switches_the_routers_retries_off);

fn client_headers_mode_charges_the_retries_the_router_made(module: ModuleUnderTest) -> Result<()> {
    let app = TestApp::start()?;
    // Reserve 2 retries per window: the first failing request spends both.
    let filter = feature_filter(
        module,
        FEATURE,
        budget_config(
            "client-headers",
            r#"{"ratio": 0, "min_retries_per_second": 0.2, "ttl_seconds": 10}"#,
        ),
    )?;
    let (caller, port) = caller(module, "rb-headers-charged", app.port(), Some(filter), None)?;
    let first = failing_request(port)?;
    assert_eq!(first.header("x-eastwest-retry-budget"), None);
    assert_eq!(app.requests_seen(), 3);
    let second = failing_request(port)?;
    assert_eq!(
        second.header_str("x-eastwest-retry-budget").as_deref(),
        Some("exhausted")
    );
    assert_eq!(
        app.requests_seen(),
        4,
        "the second request went out without retries"
    );
    let prometheus = caller.prometheus()?;
    assert_eq!(
        sample(
            &prometheus,
            "eastwest_retry_budget_admitted_total",
            &["mode=\"client-headers\""]
        ),
        Some(2.0),
        "{prometheus}"
    );
    Ok(())
}

for_each_module!(client_headers_mode_charges_the_retries_the_router_made);

fn server_mode_sheds_retries_and_the_calling_envoy_does_not_retry_them(
    module: ModuleUnderTest,
) -> Result<()> {
    let app = TestApp::start()?;
    let (callee, callee_port) = callee(
        module,
        "rb-server-callee",
        app.port(),
        budget_config("server", NO_BUDGET),
    )?;
    let (caller, port) = caller(module, "rb-server-caller", callee_port, None, None)?;
    let response = http_request(
        "GET",
        &format!("http://127.0.0.1:{port}/pay"),
        &[
            ("x-test-status", b"503"),
            ("baggage", b"service.name=frontend,k8s.namespace.name=shop"),
        ],
        "",
    )?;
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header_str("x-eastwest-retry-budget").as_deref(),
        Some("exhausted")
    );
    // Attempt 1 reached the app; attempt 2 was shed by the callee's sidecar, and the caller's
    // router did not make attempt 3.
    assert_eq!(app.requests_seen(), 1);
    assert_eq!(
        caller.counter("cluster.checkout.upstream_rq_retry"),
        Some(1)
    );
    assert_eq!(
        caller.counter("cluster.checkout.upstream_rq_total"),
        Some(2)
    );
    let prometheus = callee.prometheus()?;
    assert_eq!(
        sample(
            &prometheus,
            "eastwest_retry_budget_denied_total",
            &[
                "destination_service=\"checkout\"",
                "source_service=\"frontend\"",
                "mode=\"server\""
            ]
        ),
        Some(1.0),
        "{prometheus}"
    );
    Ok(())
}

for_each_module!(server_mode_sheds_retries_and_the_calling_envoy_does_not_retry_them);

fn server_mode_tells_grpc_clients_not_to_retry(module: ModuleUnderTest) -> Result<()> {
    let app = TestApp::start()?;
    let (_callee, port) = callee(
        module,
        "rb-server-grpc",
        app.port(),
        budget_config("server", NO_BUDGET),
    )?;
    let url = format!("http://127.0.0.1:{port}/shop.Payments/Pay");
    let grpc = |previous: &'static [u8]| {
        http2_request(
            "POST",
            &url,
            &[
                ("content-type", b"application/grpc"),
                ("te", b"trailers"),
                ("x-test-grpc-status", b"0"),
                ("grpc-previous-rpc-attempts", previous),
            ],
            b"\0\0\0\0\0",
        )
    };
    // A first attempt goes through.
    let first = grpc(b"0")?;
    assert_eq!(first.header_str("grpc-status"), None);
    assert_eq!(app.requests_seen(), 1);
    // A retry (gRPC counts the attempts before it) is shed: UNAVAILABLE, and a negative
    // pushback, which tells a gRPC client's retry policy to stop.
    let retry = grpc(b"1")?;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header_str("grpc-status").as_deref(), Some("14"));
    assert_eq!(
        retry.header_str("grpc-retry-pushback-ms").as_deref(),
        Some("-1")
    );
    assert_eq!(
        retry.header_str("x-eastwest-retry-budget").as_deref(),
        Some("exhausted")
    );
    assert_eq!(app.requests_seen(), 1);
    Ok(())
}

for_each_module!(server_mode_tells_grpc_clients_not_to_retry);

fn invalid_configuration_is_refused_with_the_field_path(module: ModuleUnderTest) -> Result<()> {
    let app = TestApp::start()?;
    let config = json!({"mode": "client", "destinations": {"payments": {"ratio": -1}}});
    let log = Envoy::start_expecting_failure(
        &module.tag("rb-invalid"),
        bootstrap(
            &node("frontend"),
            free_port(),
            vec![ListenerBuilder::new("outbound", free_port(), "checkout")
                .http_filter(feature_filter(module, FEATURE, config)?)
                .build()],
            vec![ClusterBuilder::new("checkout", app.port()).build()],
            &[],
        ),
        &EnvoyOptions {
            startup_timeout: Duration::from_secs(30),
            ..EnvoyOptions::default()
        },
    )?;
    let wanted = module.config_error(
        FEATURE,
        "destinations.payments.ratio: -1 is outside 0..=100",
    );
    assert!(log.contains(&wanted), "{wanted:?} in {log}");
    Ok(())
}

for_each_module!(invalid_configuration_is_refused_with_the_field_path);
