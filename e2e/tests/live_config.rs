//! Live configuration changes of a sidecar running `dist/eastwest.wasm`, under steady load,
//! through Envoy's file-based dynamic listeners (`eastwest_e2e::live_config`):
//!
//! * a new valid configuration of each feature (label-enrich's labels, telemetry's
//!   dimensions, retry-budget's ratio) takes over within seconds, with no failed request and
//!   the metrics' counts carried over;
//! * the retry budgets carry over while the VM id stays (also across a new module version)
//!   and start afresh when it changes: Envoy keeps proxy-wasm shared data per VM id;
//! * an invalid configuration is rejected by Envoy (`listener_manager.lds.update_rejected`,
//!   the filter naming the field in Envoy's log), the old one keeps serving, no request fails;
//! * a new module version (another file, another sha256) takes over with no failed request.
//!
//! Envoy drains connections of a replaced listener configuration for `--drain-time-s`: they
//! keep the old filter configuration until they close. The sidecar here drains for 2 s, so
//! that the load's keep-alive connections move to the new configuration within the test
//! (docs/deploy/live-changes.md).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use eastwest_e2e::demo::fragments;
use eastwest_e2e::live_config::{
    module_version, time_until, BackgroundLoad, KeepAliveConnection, LiveEnvoy, PushOutcome,
};
use eastwest_e2e::{
    bootstrap, dist_wasm, free_port, http_request, wasm_filter, ClusterBuilder, EnvoyOptions,
    ListenerBuilder, LoadPlan, LoadReport, Node, TestApp, TrafficDirection,
};
use serde_json::{json, Value};

const CLUSTER: &str = "outbound|80||checkout.shop.svc.cluster.local";
const VM_ID: &str = "eastwest";
/// How long the sidecar drains connections of a replaced listener configuration.
const DRAIN_SECONDS: u32 = 45;
/// How soon a pushed configuration must show in behaviour.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

/// eastwest.wasm's configuration on the caller's outbound listener: `team` as this workload's
/// team (label-enrich's section), telemetry's `dimensions` if given, and `budget` as
/// retry-budget's section (client-headers mode).
fn eastwest_config(team: &str, dimensions: Option<&[&str]>, budget: Value) -> Value {
    let mut telemetry = json!({});
    if let Some(dimensions) = dimensions {
        telemetry["dimensions"] = json!(dimensions);
    }
    let mut retry_budget = budget;
    retry_budget["mode"] = json!("client-headers");
    json!({
        "direction": "outbound",
        "peer_trust": "any",
        "label_enrich": {"local": {"team": team}},
        "telemetry": telemetry,
        "retry_budget": retry_budget,
    })
}

/// eastwest.wasm from `module` in VM `vm_id` with `config`, as an HTTP filter entry.
fn eastwest_filter(module: &std::path::Path, vm_id: &str, config: Value) -> Value {
    let mut filter = wasm_filter("eastwest", module, config);
    filter["typed_config"]["config"]["vm_config"]["vm_id"] = json!(vm_id);
    filter
}

/// The outbound listener with eastwest.wasm from `module` in VM `vm_id` with `config`.
fn outbound(port: u16, module: &std::path::Path, vm_id: &str, config: Value) -> Value {
    outbound_with(port, eastwest_filter(module, vm_id, config))
}

/// The outbound listener: retries (2, on 5xx) with the attempt count in the response, and
/// `filter` before the router.
fn outbound_with(port: u16, filter: Value) -> Value {
    ListenerBuilder::new("outbound", port, CLUSTER)
        .traffic_direction(TrafficDirection::Outbound)
        .stat_prefix("outbound")
        .retry_policy(json!({
            "retry_on": "5xx",
            "num_retries": 2,
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
        }))
        .virtual_host_field("include_request_attempt_count", json!(true))
        .virtual_host_field("include_attempt_count_in_response", json!(true))
        .http_filter(filter)
        .build()
}

/// frontend's sidecar toward the app (as checkout), without listeners.
fn sidecar_bootstrap(app: &TestApp) -> Result<Value> {
    let tags = fragments::stats_tags()?;
    let tags: Vec<(&str, &str)> = tags.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
    Ok(bootstrap(
        &Node::shop_sidecar("frontend", "web", "high"),
        free_port(),
        Vec::new(),
        vec![ClusterBuilder::new(CLUSTER, app.port()).build()],
        &tags,
    ))
}

fn sidecar_options() -> EnvoyOptions {
    EnvoyOptions {
        extra_args: vec!["--drain-time-s".into(), DRAIN_SECONDS.to_string()],
        ..EnvoyOptions::default()
    }
}

/// frontend's sidecar with its listeners from a watched file, `first` the first.
fn start_sidecar(name: &str, app: &TestApp, first: Value) -> Result<LiveEnvoy> {
    LiveEnvoy::start(name, sidecar_bootstrap(app)?, &[first], &sidecar_options())
}

/// A steady open-loop load of `seconds` at 100 requests/s over 8 keep-alive connections.
fn steady_load(port: u16, seconds: u64) -> BackgroundLoad {
    let rate = 100.0;
    BackgroundLoad::start(
        LoadPlan::new(
            format!("http://127.0.0.1:{port}/work"),
            (rate * seconds as f64) as u64,
        )
        .rate(rate)
        .concurrency(8)
        .max_duration(Duration::from_secs(seconds + 10))
        .request_timeout(Duration::from_secs(5)),
    )
}

fn assert_no_failed_request(report: &LoadReport, what: &str) -> Result<()> {
    println!("{what}: {}", report.summary());
    for record in report.records.iter().filter(|r| !r.outcome.is_success()) {
        println!("failed: {record:?}");
    }
    ensure!(
        report.completed == report.planned
            && report.status_count(200) == report.planned
            && report.errors.total() == 0
            && report.abandoned == 0,
        "{what}: every request must succeed: {}",
        report.summary()
    );
    Ok(())
}

/// The `eastwest.team` member of the `baggage` the app received, from its echo.
fn team_in_echo(echo: &str) -> Option<String> {
    let echo: Value = serde_json::from_str(echo).ok()?;
    let baggage = echo["headers"]
        .as_array()?
        .iter()
        .find(|header| header[0] == "baggage")?[1]
        .as_str()?
        .to_owned();
    baggage
        .split(',')
        .find_map(|member| member.strip_prefix("eastwest.team="))
        .map(str::to_owned)
}

/// The team this sidecar stamps into `baggage`, as the app received it (a new connection).
fn stamped_team(port: u16) -> Option<String> {
    let response = http_request("GET", &format!("http://127.0.0.1:{port}/probe"), &[], "").ok()?;
    team_in_echo(&response.text())
}

/// How many attempts the router made for a request the app fails (503), from
/// `x-envoy-attempt-count` of the response.
fn attempts_for_failing_request(port: u16) -> Result<u32> {
    let response = http_request(
        "GET",
        &format!("http://127.0.0.1:{port}/fail"),
        &[("x-test-status", b"503")],
        "",
    )?;
    ensure!(response.status == 503, "status {}", response.status);
    response
        .header_str("x-envoy-attempt-count")
        .context("no x-envoy-attempt-count")?
        .parse()
        .context("x-envoy-attempt-count")
}

/// The `eastwest_*` counters of the sidecar's Prometheus exposition: line without value →
/// value.
fn eastwest_counters(envoy: &LiveEnvoy) -> Result<Vec<(String, f64)>> {
    Ok(envoy
        .envoy()
        .prometheus()?
        .lines()
        .filter(|line| line.starts_with("eastwest_") && line.contains("_total"))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// Every counter of `before` is still there with at least its value (nothing was reset).
fn assert_counts_carried_over(before: &[(String, f64)], after: &[(String, f64)]) -> Result<()> {
    for (series, value) in before {
        let now = after.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
        ensure!(
            now.is_some_and(|now| now >= *value),
            "{series} was {value} before the change and is {now:?} after it"
        );
    }
    Ok(())
}

const NO_RETRIES: &str = r#"{"ratio": 0, "min_retries_per_second": 0}"#;
const AMPLE: &str = r#"{"ratio": 0.5, "min_retries_per_second": 50}"#;

fn budget(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn each_feature_takes_a_new_configuration_under_load_without_a_failed_request() -> Result<()> {
    let app = TestApp::start()?;
    let module = dist_wasm("eastwest")?;
    let port = free_port();
    let listener = |team: &str, dimensions: Option<&[&str]>, budget_text: &str| {
        outbound(
            port,
            &module,
            VM_ID,
            eastwest_config(team, dimensions, budget(budget_text)),
        )
    };
    let envoy = start_sidecar("live-each-feature", &app, listener("web", None, NO_RETRIES))?;
    ensure!(stamped_team(port).as_deref() == Some("web"));
    ensure!(
        attempts_for_failing_request(port)? == 1,
        "no budget: no retry"
    );
    let mut kept = KeepAliveConnection::open(port)?;
    ensure!(team_in_echo(&kept.get("/kept")?.1).as_deref() == Some("web"));

    let load = steady_load(port, 14);
    std::thread::sleep(Duration::from_secs(2));

    // label-enrich: another team for this workload.
    let counts = eastwest_counters(&envoy)?;
    ensure!(envoy.push(&[listener("billing", None, NO_RETRIES)])? == PushOutcome::Accepted);
    let took = time_until("label-enrich stamping team billing", VISIBLE_WITHIN, || {
        stamped_team(port).as_deref() == Some("billing")
    })?;
    println!("label-enrich's new labels on new connections after {took:?}");
    // A connection accepted before the change keeps the filter chain it was accepted with
    // until Envoy drains it (--drain-time-s).
    let (status, echo) = kept.get("/kept")?;
    ensure!(
        status == 200 && team_in_echo(&echo).as_deref() == Some("web"),
        "an established connection moved to the new configuration: {status} {echo}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_counts_carried_over(&counts, &eastwest_counters(&envoy)?)?;

    // telemetry: fewer dimensions; new series (without source_team) count the requests.
    let dimensions: &[&str] = &[
        "reporter",
        "source_service",
        "destination_service",
        "response_code",
    ];
    let counts = eastwest_counters(&envoy)?;
    ensure!(
        envoy.push(&[listener("billing", Some(dimensions), NO_RETRIES)])? == PushOutcome::Accepted
    );
    let took = time_until(
        "telemetry's series without source_team",
        VISIBLE_WITHIN,
        || {
            stamped_team(port);
            eastwest_counters(&envoy).is_ok_and(|counters| {
                counters.iter().any(|(series, value)| {
                    series.starts_with("eastwest_requests_total{")
                        && !series.contains("source_team=")
                        && *value > 0.0
                })
            })
        },
    )?;
    println!("telemetry's new dimensions after {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_counts_carried_over(&counts, &eastwest_counters(&envoy)?)?;

    // retry-budget: a budget with room; failed requests are retried again.
    let counts = eastwest_counters(&envoy)?;
    ensure!(envoy.push(&[listener("billing", Some(dimensions), AMPLE)])? == PushOutcome::Accepted);
    let took = time_until("retry-budget admitting retries", VISIBLE_WITHIN, || {
        attempts_for_failing_request(port).is_ok_and(|attempts| attempts == 3)
    })?;
    println!("retry-budget's new ratio after {took:?}");
    assert_counts_carried_over(&counts, &eastwest_counters(&envoy)?)?;

    let report = load.finish()?;
    assert_no_failed_request(&report, "load during three configuration changes")?;
    let stats = envoy.envoy().stats()?;
    ensure!(
        stats.get("listener_manager.lds.update_success") == Some(&4),
        "{stats:?}"
    );
    Ok(())
}

#[test]
fn retry_budgets_carry_over_while_the_vm_id_stays_and_start_afresh_with_another() -> Result<()> {
    let app = TestApp::start()?;
    let module = dist_wasm("eastwest")?;
    let versions = tempfile::tempdir()?;
    let rebuilt = module_version(&module, versions.path(), "rebuilt")?;
    let port = free_port();
    // A reserve of 6 retries for a minute, no ratio: three failed requests spend it.
    let spendable = budget(r#"{"ratio": 0, "min_retries_per_second": 0.1, "ttl_seconds": 60}"#);
    let listener = |module: &std::path::Path, vm_id: &str, team: &str| {
        outbound(
            port,
            module,
            vm_id,
            eastwest_config(team, None, spendable.clone()),
        )
    };
    let envoy = start_sidecar("live-budget-carry", &app, listener(&module, VM_ID, "web"))?;
    let mut attempts = Vec::new();
    while attempts.last() != Some(&1) {
        ensure!(
            attempts.len() < 10,
            "the budget was never spent: {attempts:?}"
        );
        attempts.push(attempts_for_failing_request(port)?);
    }
    ensure!(
        attempts[0] == 3,
        "a fresh budget admits the retries: {attempts:?}"
    );
    let denied = |envoy: &LiveEnvoy| -> f64 {
        eastwest_counters(envoy)
            .unwrap_or_default()
            .iter()
            .filter(|(series, _)| series.starts_with("eastwest_retry_budget_denied_total"))
            .map(|(_, value)| value)
            .sum()
    };
    let denied_before = denied(&envoy);
    ensure!(denied_before >= 1.0);

    // Each push changes the team, so that a new connection shows when the new filter chain
    // serves; then a failed request shows whether the budget is still spent.
    let push = |listener: Value, team: &str| -> Result<u32> {
        ensure!(envoy.push(&[listener])? == PushOutcome::Accepted);
        time_until(&format!("team {team} stamped"), VISIBLE_WITHIN, || {
            stamped_team(port).as_deref() == Some(team)
        })?;
        attempts_for_failing_request(port)
    };
    let same_vm = push(listener(&module, VM_ID, "billing"), "billing")?;
    ensure!(
        same_vm == 1,
        "a new configuration in the same VM id: the spent budget carries over, yet the router made {same_vm} attempts"
    );
    ensure!(
        denied(&envoy) > denied_before,
        "the denials count on from where they were"
    );
    let new_module = push(listener(&rebuilt, VM_ID, "billing-2"), "billing-2")?;
    ensure!(
        new_module == 1,
        "a new module version in the same VM id: the spent budget carries over (Envoy keeps \
         shared data per VM id), yet the router made {new_module} attempts"
    );
    let new_vm_id = push(listener(&rebuilt, "eastwest-2", "billing-3"), "billing-3")?;
    ensure!(
        new_vm_id == 3,
        "another VM id: a fresh budget, yet the router made {new_vm_id} attempts"
    );
    Ok(())
}

#[test]
fn an_invalid_configuration_is_rejected_and_the_old_one_keeps_serving() -> Result<()> {
    let app = TestApp::start()?;
    let module = dist_wasm("eastwest")?;
    let port = free_port();
    let listener = |team: &str, budget_text: &str| {
        outbound(
            port,
            &module,
            VM_ID,
            eastwest_config(team, None, budget(budget_text)),
        )
    };
    let envoy = start_sidecar("live-invalid", &app, listener("web", AMPLE))?;
    let load = steady_load(port, 6);
    std::thread::sleep(Duration::from_secs(2));
    let rejected = |envoy: &LiveEnvoy| {
        envoy
            .envoy()
            .counter("listener_manager.lds.update_rejected")
            .unwrap_or(0)
    };
    ensure!(rejected(&envoy) == 0);
    ensure!(envoy.push(&[listener("billing", r#"{"ratio": -1}"#)])? == PushOutcome::Rejected);
    ensure!(rejected(&envoy) == 1);
    envoy.envoy().wait_for_log(
        "eastwest: invalid configuration: retry_budget.ratio: -1 is outside 0..=100",
        Duration::from_secs(5),
    )?;
    // The old configuration keeps serving, new connections included.
    ensure!(stamped_team(port).as_deref() == Some("web"));
    let report = load.finish()?;
    assert_no_failed_request(&report, "load during an invalid configuration push")?;
    // A valid configuration after the rejected one is taken.
    ensure!(envoy.push(&[listener("billing", AMPLE)])? == PushOutcome::Accepted);
    time_until("team billing after the valid push", VISIBLE_WITHIN, || {
        stamped_team(port).as_deref() == Some("billing")
    })?;
    Ok(())
}

#[test]
fn a_new_module_version_takes_over_under_load_without_a_failed_request() -> Result<()> {
    let app = TestApp::start()?;
    let module = dist_wasm("eastwest")?;
    let versions = tempfile::tempdir()?;
    let new_module = module_version(&module, versions.path(), "v2")?;
    let port = free_port();
    let listener = |module: &std::path::Path, team: &str| {
        outbound(
            port,
            module,
            VM_ID,
            eastwest_config(team, None, budget(AMPLE)),
        )
    };
    let envoy = start_sidecar("live-module", &app, listener(&module, "web"))?;
    let vms_created = |envoy: &LiveEnvoy| {
        envoy
            .envoy()
            .counter("wasm.envoy.wasm.runtime.v8.created")
            .unwrap_or(0)
    };
    let load = steady_load(port, 8);
    std::thread::sleep(Duration::from_secs(2));
    let created = vms_created(&envoy);
    ensure!(envoy.push(&[listener(&new_module, "web-v2")])? == PushOutcome::Accepted);
    let took = time_until("the new module serving", VISIBLE_WITHIN, || {
        stamped_team(port).as_deref() == Some("web-v2")
    })?;
    println!("the new module serves new connections after {took:?}");
    ensure!(
        vms_created(&envoy) > created,
        "Envoy created no VM for the new module version"
    );
    let report = load.finish()?;
    assert_no_failed_request(&report, "load during a module version change")?;
    Ok(())
}

#[test]
fn a_filter_configuration_discovered_through_ecds_reaches_established_connections() -> Result<()> {
    let app = TestApp::start()?;
    let module = dist_wasm("eastwest")?;
    let port = free_port();
    let filter = |team: &str, budget_text: &str| {
        eastwest_filter(
            &module,
            VM_ID,
            eastwest_config(team, None, budget(budget_text)),
        )
    };
    let envoy = LiveEnvoy::start_discovering(
        "live-ecds",
        sidecar_bootstrap(&app)?,
        &filter("web", NO_RETRIES),
        |discovered| outbound_with(port, discovered),
        &sidecar_options(),
    )?;
    let mut kept = KeepAliveConnection::open(port)?;
    ensure!(team_in_echo(&kept.get("/kept")?.1).as_deref() == Some("web"));
    let load = steady_load(port, 10);
    std::thread::sleep(Duration::from_secs(2));

    // A new configuration through ECDS: no listener change, no drain; the next request on an
    // established connection already runs it.
    ensure!(envoy.push_filter(&filter("billing", NO_RETRIES))? == PushOutcome::Accepted);
    let took = time_until(
        "team billing on the established connection",
        VISIBLE_WITHIN,
        || {
            kept.get("/kept")
                .is_ok_and(|(_, echo)| team_in_echo(&echo).as_deref() == Some("billing"))
        },
    )?;
    println!("ECDS: the new labels on an established connection after {took:?}");
    ensure!(envoy.push_filter(&filter("billing", AMPLE))? == PushOutcome::Accepted);
    time_until("retry-budget admitting retries", VISIBLE_WITHIN, || {
        attempts_for_failing_request(port).is_ok_and(|attempts| attempts == 3)
    })?;

    // An invalid one is refused; the last good one keeps serving.
    ensure!(envoy.push_filter(&filter("oops", r#"{"ratio": -1}"#))? == PushOutcome::Rejected);
    envoy.envoy().wait_for_log(
        "eastwest: invalid configuration: retry_budget.ratio: -1 is outside 0..=100",
        Duration::from_secs(5),
    )?;
    ensure!(team_in_echo(&kept.get("/kept")?.1).as_deref() == Some("billing"));
    ensure!(stamped_team(port).as_deref() == Some("billing"));

    let report = load.finish()?;
    assert_no_failed_request(
        &report,
        "load during filter configuration changes through ECDS",
    )?;
    let stats = envoy.envoy().stats()?;
    ensure!(
        stats.get("listener_manager.listener_modified") == Some(&0),
        "ECDS changed the listener: {stats:?}"
    );
    Ok(())
}
