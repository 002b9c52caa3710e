//! The retry-storm experiment in real Envoy (`eastwest_e2e::retry_storm`; the same runs as
//! `cargo xtask retry-storm`): a steady 200 requests/s through a caller sidecar (2 retries on
//! 5xx) and a callee sidecar to an app that fails every request for 4 s, five runs one after
//! another. Without a budget the outage triples the app's traffic; with eastwest's budget in
//! any mode the extra attempts stay within what its configuration allows (the bound derived in
//! `retry_storm::Bound`), and success returns as soon as the app recovers in every run.
//!
//! Needs Envoy (EASTWEST_ENVOY or `cargo xtask test`) and dist/retry-budget.wasm (`cargo xtask
//! build`). About 45 s.

use std::time::{Duration, Instant};

use eastwest_e2e::retry_storm::{self, Bound, Budget, Experiment, Run};

/// `a` and `b` agree within 5% (and a few requests at the outage's edges).
fn close(a: u64, b: u64) -> bool {
    a.abs_diff(b) as f64 <= 5.0 + 0.05 * a.max(b) as f64
}

fn find(runs: &[Run], budget: Budget) -> &Run {
    runs.iter()
        .find(|run| run.budget == budget)
        .expect("every budget runs")
}

#[test]
fn the_stats_tags_match_the_filters_metric_names() {
    for tag in ["destination_service", "source_service", "mode"] {
        assert_eq!(
            retry_storm::stats_tag_regex(tag),
            eastwest_common::metric_name::stats_tag_regex(tag)
        );
    }
}

#[test]
fn retry_budgets_bound_the_storm_and_success_returns_after_the_outage() {
    let experiment = Experiment::default();
    let bound = Bound::new(&experiment);
    let began = Instant::now();
    let runs = experiment
        .run_all(|run| {
            eprintln!(
                "{}: amplification {:.3}, max lag {:?}, {}",
                run.budget.label(),
                run.amplification(),
                run.max_lag,
                run.load_summary
            )
        })
        .unwrap();
    let took = began.elapsed();
    let table = format!(
        "{}\n{}\n{}\n{}\ntook {took:?}\nrun directories: {:?}",
        experiment.describe(),
        retry_storm::table(&experiment, &runs),
        retry_storm::envoy_table(&runs),
        retry_storm::describe_bound(&experiment),
        runs.iter().map(|run| &run.run_dirs).collect::<Vec<_>>()
    );
    eprintln!("{table}");

    let expected_originals = experiment.rate * experiment.outage.as_secs_f64();
    for run in &runs {
        let name = run.budget.label();
        // The load was the same steady open loop in every run, and the measurements agree
        // with Envoy's own counters.
        assert!(
            (run.originals as f64 - expected_originals).abs() <= 0.03 * expected_originals,
            "{name}: {} originals during the outage, expected about {expected_originals}\n{table}",
            run.originals
        );
        assert!(
            close(run.envoy.caller_requests, run.originals),
            "{name}: the caller's sidecar counted {} requests, the load generator {}\n{table}",
            run.envoy.caller_requests,
            run.originals
        );
        assert!(
            close(run.envoy.callee_to_app, run.app_requests),
            "{name}: the callee's sidecar sent {} requests to the app, which saw {}\n{table}",
            run.envoy.callee_to_app,
            run.app_requests
        );
        assert!(
            run.failed_originals as f64 >= 0.95 * run.originals as f64,
            "{name}: the outage failed only {} of {} originals\n{table}",
            run.failed_originals,
            run.originals
        );
        // Success returns once the app does, whatever limited the retries.
        let recovery = run
            .recovery
            .unwrap_or_else(|| panic!("{name}: success never returned\n{table}"));
        assert!(
            recovery <= Duration::from_secs(1),
            "{name}: success returned only {recovery:?} after the outage\n{table}"
        );
        assert!(
            run.success_after_recovery >= experiment.recovery_success,
            "{name}: {:.3} success after recovery\n{table}",
            run.success_after_recovery
        );
    }

    // Without a budget every failed original is retried twice: about 3 attempts each.
    let none = find(&runs, Budget::None);
    assert!(
        none.amplification() >= 2.7,
        "no budget: amplification {:.3}\n{table}",
        none.amplification()
    );
    assert_eq!(none.envoy.caller_retry_overflow, 0, "{table}");

    // eastwest keeps the storm within the configured budget in every mode, denies visibly, and
    // still lets the budget's share of retries through.
    for budget in [Budget::Client, Budget::ClientHeaders, Budget::Server] {
        let run = find(&runs, budget);
        let allowed = bound.allowed(budget).unwrap();
        let name = budget.label();
        assert!(
            run.amplification() <= allowed,
            "{name}: amplification {:.3} above the budget's {allowed:.3}\n{table}",
            run.amplification()
        );
        assert!(
            run.amplification() >= 1.0 + experiment.ratio / 4.0,
            "{name}: amplification {:.3}: the budget let (almost) no retry through\n{table}",
            run.amplification()
        );
        assert!(
            run.denials() > 0,
            "{name}: no denial counted in eastwest_retry_budget_denied_total\n{table}"
        );
        assert!(
            run.amplification() < none.amplification() - 1.0,
            "{name}: not far below no budget\n{table}"
        );
    }
    // In server mode the caller's router retries and the callee's sidecar sheds what the
    // budget does not pay for: more attempts reach the callee's sidecar than its app.
    let server = find(&runs, Budget::Server);
    assert!(
        server.envoy.callee_requests >= server.envoy.callee_to_app + server.denials() / 2,
        "{table}"
    );
    // Envoy's own retry budget is reported, not asserted: it limits concurrent retries, not
    // retries per original request.
    eprintln!(
        "envoy retry_budget: amplification {:.3}, {} overflows",
        find(&runs, Budget::EnvoyNative).amplification(),
        find(&runs, Budget::EnvoyNative).denials()
    );
    assert!(took < Duration::from_secs(120), "took {took:?}");
}
