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
cargo xtask test [--skip-e2e | --only-e2e]

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

Options:
  --skip-e2e   steps 1 to 6: no Envoy needed
  --only-e2e   the wasm build and the end-to-end tests that load it

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

pub fn parse_args(args: &[String]) -> Result<Option<Selection>> {
    let mut selection = Selection::Everything;
    for arg in args {
        let wanted = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--skip-e2e" => Selection::SkipE2e,
            "--only-e2e" => Selection::OnlyE2e,
            other => bail!("`cargo xtask test` has no option {other:?}\n\n{HELP}"),
        };
        if selection != Selection::Everything && selection != wanted {
            bail!("--skip-e2e and --only-e2e exclude each other");
        }
        selection = wanted;
    }
    Ok(Some(selection))
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
const SOAK: Step = Step {
    name: "soak",
    what: "cargo xtask soak --duration 2m: the demo mesh under load with outages",
    run: soak,
};

pub fn test(ws: &Workspace, selection: Selection) -> Result<()> {
    let steps: &[Step] = match selection {
        Selection::Everything => &[
            FORMAT,
            LINT,
            WASM_BUILD,
            UNIT_TESTS,
            WASM_UNIT_TESTS,
            FUZZ,
            E2E_TESTS,
            SOAK,
        ],
        Selection::SkipE2e => &[FORMAT, LINT, WASM_BUILD, UNIT_TESTS, WASM_UNIT_TESTS, FUZZ],
        Selection::OnlyE2e => &[WASM_BUILD, E2E_TESTS, SOAK],
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

fn soak(ws: &Workspace) -> Result<Outcome> {
    crate::soak::short_soak(ws)?;
    Ok(Outcome::Passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Selection>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
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
