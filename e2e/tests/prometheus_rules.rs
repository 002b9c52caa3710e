//! The Prometheus rules and example configuration in `envoy-configs/prometheus` pass
//! `promtool check`, their unit tests pass `promtool test rules`, every rule has a unit test,
//! and the unit tests catch deliberately broken rules.
//!
//! promtool comes with the Debian package `prometheus`; `cargo xtask test` installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use eastwest_e2e::workspace_root;

const DIR: &str = "envoy-configs/prometheus";
const RULES: &str = "eastwest-rules.yaml";
const RULE_TESTS: &str = "eastwest-rules.test.yaml";
const CONFIG: &str = "prometheus.yml";

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool is not on PATH. It comes with the Debian package `prometheus`: install it \
             with `apt-get install -y prometheus` (as root; `cargo xtask test` does this itself) \
             and run the tests again."
        )
    })
}

/// Runs promtool with `args` in `dir`; its success and everything it printed.
fn run_promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn prometheus_dir() -> PathBuf {
    workspace_root().join(DIR)
}

fn read(name: &str) -> String {
    let path = prometheus_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn rules_pass_promtool_check() {
    let (ok, output) = run_promtool(&prometheus_dir(), &["check", "rules", RULES]);
    assert!(ok, "promtool check rules {DIR}/{RULES} failed:\n{output}");
}

#[test]
fn rule_unit_tests_pass() {
    let (ok, output) = run_promtool(&prometheus_dir(), &["test", "rules", RULE_TESTS]);
    assert!(
        ok,
        "promtool test rules {DIR}/{RULE_TESTS} failed:\n{output}"
    );
}

#[test]
fn example_config_is_valid_and_loads_the_rules() {
    let (ok, output) = run_promtool(&prometheus_dir(), &["check", "config", CONFIG]);
    assert!(ok, "promtool check config {DIR}/{CONFIG} failed:\n{output}");
    assert!(
        output.contains(RULES),
        "{CONFIG} should load {RULES}; promtool printed:\n{output}"
    );
}

/// The names after `record:` and `alert:` in the rules file.
fn rule_names(rules: &str) -> Vec<(&'static str, String)> {
    rules
        .lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            if let Some(name) = line.strip_prefix("record:") {
                Some(("record", name.trim().to_owned()))
            } else {
                line.strip_prefix("alert:")
                    .map(|name| ("alert", name.trim().to_owned()))
            }
        })
        .collect()
}

#[test]
fn every_rule_has_a_unit_test() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let names = rule_names(&rules);
    assert!(names.len() >= 20, "found only {names:?} in {RULES}");
    let untested: Vec<_> = names
        .iter()
        .filter(|(kind, name)| {
            let needle = match *kind {
                "record" => format!("- expr: {name}\n"),
                _ => format!("- alertname: {name}\n"),
            };
            !tests.contains(&needle)
        })
        .collect();
    assert!(
        untested.is_empty(),
        "rules without a test in {RULE_TESTS}: {untested:?}"
    );
}

/// `(test group, what is broken, text in the rules file, its broken replacement)`: each must
/// make the named test group of the unit tests fail.
const BROKEN_RULES: &[(&str, &str, &str, &str)] = &[
    (
        "pair latency quantiles",
        "P99 computed as P95",
        "histogram_quantile(0.99,",
        "histogram_quantile(0.95,",
    ),
    (
        "pair latency quantiles",
        "buckets not kept apart by `le`",
        "sum by (le, reporter",
        "sum by (reporter",
    ),
    (
        "pair request and error rates",
        "gRPC calls without grpc-status counted as errors",
        r#"grpc_status!~"0|""#,
        r#"grpc_status!="0""#,
    ),
    (
        "pair request and error rates",
        "no zero error rate for pairs without errors",
        "      or\n      0 * eastwest_pair:requests:rate5m\n",
        "\n",
    ),
    (
        "retry intensity per calling service",
        "retries counted on both reporters",
        r#"rate(eastwest_retry_attempts_total{reporter="source"}"#,
        "rate(eastwest_retry_attempts_total",
    ),
    (
        "high error ratio alert",
        "critical threshold as loose as the default one",
        ") > 0.01\n",
        ") > 0.05\n",
    ),
    (
        "high error ratio alert",
        "both reporters alert for the same pair",
        "or on (source_service, source_namespace, destination_service, destination_namespace)\n          eastwest_pair:request_errors",
        "or\n          eastwest_pair:request_errors",
    ),
    (
        "high P99 latency alert",
        "no minimum traffic for the P99 alert",
        "eastwest_pair:requests:rate5m >= 1\n",
        "eastwest_pair:requests:rate5m >= 0\n",
    ),
    (
        "unexpected dependency alert",
        "a dependency's first call missed",
        "eastwest_unexpected_dependency_total unless eastwest_unexpected_dependency_total offset 10m",
        "eastwest_unexpected_dependency_total offset 10m",
    ),
    (
        "unexpected dependency alert",
        "both reporters' counts added up",
        "max by (source_service, source_namespace, source_team, destination_service, destination_namespace, destination_team) (\n        sum by (reporter,",
        "sum by (source_service, source_namespace, source_team, destination_service, destination_namespace, destination_team) (\n        sum by (reporter,",
    ),
    (
        "retry budget denials",
        "retry budget alert after 5 instead of 10 minutes",
        "    for: 10m\n    labels:\n      severity: warning\n    annotations:\n      summary: 'Retry",
        "    for: 5m\n    labels:\n      severity: warning\n    annotations:\n      summary: 'Retry",
    ),
    (
        "cardinality overflow alert",
        "overflow window shorter than documented",
        "increase(eastwest_overflow_total[15m])",
        "increase(eastwest_overflow_total[5m])",
    ),
    (
        "region traffic deviation",
        "compared with a day instead of a week before",
        "[1h] offset 1w))",
        "[1h] offset 1d))",
    ),
];

/// The test file with only the test group named `group` (groups start with `- name: ` at the
/// start of a line, after the line `tests:`), or why there is no such group.
fn only_test_group(tests: &str, group: &str) -> Result<String, String> {
    let marker = "\ntests:\n";
    let start = tests
        .find(marker)
        .ok_or(format!("no `tests:` line in {RULE_TESTS}"))?
        + marker.len();
    let (header, body) = tests.split_at(start);
    let wanted = format!("- name: {group}\n");
    let chosen: Vec<&str> = body
        .split("\n- name: ")
        .map(|chunk| chunk.trim_start_matches("- name: "))
        .filter(|chunk| format!("- name: {chunk}").starts_with(&wanted))
        .collect();
    match chosen[..] {
        [one] => Ok(format!("{header}- name: {}\n", one.trim_end())),
        _ => Err(format!(
            "{} test groups named `{group}` in {RULE_TESTS}",
            chosen.len()
        )),
    }
}

#[test]
fn broken_rules_fail_the_unit_tests() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = BROKEN_RULES
            .iter()
            .map(|&(group, what, original, broken)| {
                let (rules, tests) = (&rules, &tests);
                scope.spawn(move || -> Option<String> {
                    if !rules.contains(original) {
                        return Some(format!("`{original}` ({what}) is not in {RULES}"));
                    }
                    let reduced = match only_test_group(tests, group) {
                        Ok(reduced) => reduced,
                        Err(why) => return Some(why),
                    };
                    // The intact rules pass the reduced test file, so the failure below is the
                    // breakage's, not the reduction's.
                    let intact = tempfile::tempdir().unwrap();
                    std::fs::write(intact.path().join(RULES), rules).unwrap();
                    std::fs::write(intact.path().join(RULE_TESTS), &reduced).unwrap();
                    let (ok, output) = run_promtool(intact.path(), &["test", "rules", RULE_TESTS]);
                    if !ok {
                        return Some(format!(
                            "test group `{group}` alone fails on the intact rules:\n{output}"
                        ));
                    }
                    // Only the first occurrence is broken.
                    let broken_dir = tempfile::tempdir().unwrap();
                    std::fs::write(
                        broken_dir.path().join(RULES),
                        rules.replacen(original, broken, 1),
                    )
                    .unwrap();
                    std::fs::write(broken_dir.path().join(RULE_TESTS), &reduced).unwrap();
                    let (ok, output) =
                        run_promtool(broken_dir.path(), &["test", "rules", RULE_TESTS]);
                    ok.then(|| {
                        format!(
                            "rules broken by `{what}` still pass test group `{group}`:\n{output}"
                        )
                    })
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|run| run.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
