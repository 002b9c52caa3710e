//! The retry-storm experiment in real Envoy (`eastwest_e2e::retry_storm`; the same runs as
//! `cargo xtask retry-storm`): a steady 200 requests/s through a caller sidecar (2 retries on
//! 5xx) and a callee sidecar to an app that fails every request for 4 s, five runs one after
//! another. Without a budget the outage triples the app's traffic; with eastwest's budget in
//! any mode the extra attempts stay within what its configuration allows (the bound derived in
//! `retry_storm::Bound`), and success returns as soon as the app recovers in every run.
//!
//! The three eastwest modes run a second time with the budget in dist/eastwest.wasm (only its
//! `retry_budget` section), held to the same bounds.
//!
//! Needs Envoy (EASTWEST_ENVOY or `cargo xtask test`) and dist/retry-budget.wasm and
//! dist/eastwest.wasm (`cargo xtask build`). About 70 s.

use std::time::{Duration, Instant};

use eastwest_e2e::retry_storm::{self, Bound, Budget, Experiment, Run};
use eastwest_e2e::ModuleUnderTest;

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

/// Runs `budgets` with `experiment`, printing progress, and the table describing them.
fn run(experiment: &Experiment, budgets: &[Budget]) -> (Vec<Run>, String) {
    let began = Instant::now();
    let runs: Vec<Run> = budgets
        .iter()
        .map(|&budget| {
            let run = experiment
                .run(budget)
                .unwrap_or_else(|e| panic!("retry-storm run `{}`: {e:#}", budget.label()));
            eprintln!(
                "{} ({:?} module): amplification {:.3}, max lag {:?}, {}",
                run.budget.label(),
                experiment.module,
                run.amplification(),
                run.max_lag,
                run.load_summary
            );
            run
        })
        .collect();
    let took = began.elapsed();
    let table = format!(
        "eastwest's budget in the {:?} module\n{}\n{}\n{}\n{}\ntook {took:?}\nrun directories: {:?}",
        experiment.module,
        experiment.describe(),
        retry_storm::table(experiment, &runs),
        retry_storm::envoy_table(&runs),
        retry_storm::describe_bound(experiment),
        runs.iter().map(|run| &run.run_dirs).collect::<Vec<_>>()
    );
    eprintln!("{table}");
    assert!(took < Duration::from_secs(120), "took {took:?}");
    (runs, table)
}

/// What every run must show: the same steady load, Envoy's counters agreeing, and success
/// returning once the app does.
fn assert_sound(experiment: &Experiment, run: &Run, table: &str) {
    let expected_originals = experiment.rate * experiment.outage.as_secs_f64();
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

/// eastwest keeps the storm within the configured budget in every mode, denies visibly, and
/// still lets the budget's share of retries through; `none` is the run without a budget.
fn assert_bounded(experiment: &Experiment, runs: &[Run], none: &Run, table: &str) {
    let bound = Bound::new(experiment);
    for budget in [Budget::Client, Budget::ClientHeaders, Budget::Server] {
        let run = find(runs, budget);
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
    let server = find(runs, Budget::Server);
    assert!(
        server.envoy.callee_requests >= server.envoy.callee_to_app + server.denials() / 2,
        "{table}"
    );
}

/// Every budget with dist/retry-budget.wasm, then eastwest's three modes again with
/// dist/eastwest.wasm (only its `retry_budget` section), held to the same bounds and compared
/// with the same run without a budget. One run after another: the bounds are timing-sensitive.
#[test]
fn retry_budgets_bound_the_storm_and_success_returns_after_the_outage() {
    let experiment = Experiment::default();
    let (runs, table) = run(&experiment, &Budget::ALL);
    for run in &runs {
        assert_sound(&experiment, run, &table);
    }

    // Without a budget every failed original is retried twice: about 3 attempts each.
    let none = find(&runs, Budget::None);
    assert!(
        none.amplification() >= 2.7,
        "no budget: amplification {:.3}\n{table}",
        none.amplification()
    );
    assert_eq!(none.envoy.caller_retry_overflow, 0, "{table}");
    assert_bounded(&experiment, &runs, none, &table);
    // Envoy's own retry budget is reported, not asserted: it limits concurrent retries, not
    // retries per original request.
    eprintln!(
        "envoy retry_budget: amplification {:.3}, {} overflows",
        find(&runs, Budget::EnvoyNative).amplification(),
        find(&runs, Budget::EnvoyNative).denials()
    );

    let sidecar = Experiment {
        module: ModuleUnderTest::Sidecar,
        ..Experiment::default()
    };
    let (sidecar_runs, sidecar_table) = run(
        &sidecar,
        &[Budget::Client, Budget::ClientHeaders, Budget::Server],
    );
    for run in &sidecar_runs {
        assert_sound(&sidecar, run, &sidecar_table);
    }
    assert_bounded(&sidecar, &sidecar_runs, none, &sidecar_table);
}
