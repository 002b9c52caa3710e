//! `cargo xtask soak`: the demo mesh under steady load for a long time, with periodic outages
//! and the retry storms they start (`eastwest-soak`, `eastwest_e2e::soak`). `cargo xtask test`
//! runs a two-minute soak as one of its steps.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{bail, Error, Result};
use crate::process::Cmd;
use crate::workspace::Workspace;
use crate::{build, envoy};

pub const HELP: &str = "\
cargo xtask soak [--duration 1h] [--rate 40] [--outage-every 5m] [--outage 10s] [--workers 2]
                 [--sample-every 10s] [--out-dir DIR]

Starts the demo mesh on 127.0.0.1 (frontend -> checkout -> payments and inventory, each behind
an Envoy sidecar with --concurrency 2 running dist/eastwest.wasm: label-enrich, telemetry and
retry-budget, mTLS between the sidecars) and sends it a steady open-loop load. In the middle
of every period (--outage-every) payments answers every request 503 for --outage: its callers'
retries start a storm that their retry budgets must hold. Every 10 s it samples each sidecar:
Envoy's RSS (/proc/<pid>/status), Envoy's allocator and Wasm VM gauges, the eastwest_* series,
the retry budgets' shared-data keys (one per budget, counted as the label sets of
eastwest_retry_budget_admitted_total), budget decisions and the router's attempts, and prints
a progress line.

It passes when no request failed outside an outage (and 3 s after it), each sidecar's RSS
grew by less than 2% after the first 10% of the run (the slope per hour is printed too), the
series and keys did not grow after the first outage, and each caller's retry amplification
during each outage stayed within the bound its budget allows (docs/filters/retry-budget.md).
Prints a summary and writes report.html (RSS, rate, errors, budget decisions, series and
amplification over time; self-contained), soak.json and summary.txt into --out-dir (default
target/soak). Exits non-zero if the run failed. `cargo xtask test` runs it for 2 minutes.

First it builds the filters (as `cargo xtask build`), provisions Envoy 1.40.0 (EASTWEST_ENVOY
overrides it) and runs
  cargo build -p eastwest-e2e --bin eastwest-soak --bin eastwest-demo-service
";

/// The flags `eastwest-soak` takes (it checks the values); all take a value.
const FLAGS: [&str; 8] = [
    "--duration",
    "--rate",
    "--outage-every",
    "--outage",
    "--workers",
    "--sample-every",
    "--out-dir",
    "--service-binary",
];

/// The arguments for `eastwest-soak`, or `None` when help was asked for. Unknown flags are
/// refused before the build.
pub fn parse_args(args: &[String]) -> Result<Option<Vec<String>>> {
    let args: &[String] = match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    };
    let mut expect_value = false;
    for arg in args {
        if expect_value {
            expect_value = false;
            continue;
        }
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if !FLAGS.contains(&flag) {
            bail!("`cargo xtask soak` has no option {arg:?}\n\n{HELP}");
        }
        expect_value = !arg.contains('=');
    }
    if expect_value {
        bail!(
            "`{}` needs a value\n\n{HELP}",
            args.last().map_or("", String::as_str)
        );
    }
    Ok(Some(args.to_vec()))
}

/// Builds the filters, Envoy and the soak's binaries; returns (eastwest-soak, Envoy).
fn prepare(ws: &Workspace) -> Result<(PathBuf, PathBuf)> {
    build::build(ws)?;
    let envoy = envoy::provision(ws, "to run the soak")?;
    Cmd::cargo()
        .args([
            "build",
            "-p",
            "eastwest-e2e",
            "--bin",
            "eastwest-soak",
            "--bin",
            "eastwest-demo-service",
        ])
        .current_dir(&ws.root)
        .run()?;
    Ok((ws.target_dir().join("debug").join("eastwest-soak"), envoy))
}

/// `cargo xtask soak`: becomes `eastwest-soak`, so that Ctrl-C reaches it and it stops its
/// mesh in order; returns only on errors.
pub fn soak(ws: &Workspace, soak_args: &[String]) -> Result<()> {
    let (binary, envoy) = prepare(ws)?;
    show(ws, &binary, &envoy, soak_args);
    let error = Command::new(&binary)
        .args(soak_args)
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .exec();
    Err(Error::msg(format!(
        "could not run {}: {error}",
        binary.display()
    )))
}

/// The two-minute soak of `cargo xtask test` (the filters are already built).
pub fn short_soak(ws: &Workspace) -> Result<()> {
    let envoy = envoy::provision(ws, "to run the soak")?;
    Cmd::cargo()
        .args([
            "build",
            "-p",
            "eastwest-e2e",
            "--bin",
            "eastwest-soak",
            "--bin",
            "eastwest-demo-service",
        ])
        .current_dir(&ws.root)
        .run()?;
    let binary = ws.target_dir().join("debug").join("eastwest-soak");
    let out_dir = ws.root.join("target").join("soak-test");
    let args = [
        "--duration".to_owned(),
        "2m".to_owned(),
        "--out-dir".to_owned(),
        out_dir.display().to_string(),
    ];
    show(ws, &binary, &envoy, &args);
    Cmd::new(&binary)
        .args(args)
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .current_dir(&ws.root)
        .run()
}

/// A two-minute soak running in the background, its output going to a log file.
pub struct BackgroundSoak {
    child: std::process::Child,
    log: PathBuf,
}

/// Starts the two-minute soak of `cargo xtask test` in the background (the filters are already
/// built): `cargo xtask test` runs it beside the behaviour tests on the oldest Envoy, as it
/// mostly waits.
pub fn start_short_soak(ws: &Workspace) -> Result<BackgroundSoak> {
    let envoy = envoy::provision(ws, "to run the soak")?;
    Cmd::cargo()
        .args([
            "build",
            "-p",
            "eastwest-e2e",
            "--bin",
            "eastwest-soak",
            "--bin",
            "eastwest-demo-service",
        ])
        .current_dir(&ws.root)
        .run()?;
    let binary = ws.target_dir().join("debug").join("eastwest-soak");
    let out_dir = ws.root.join("target").join("soak-test");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| Error::msg(format!("cannot create {}: {e}", out_dir.display())))?;
    let log = out_dir.join("soak.log");
    let file = |what: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::msg(format!("cannot open {} for {what}: {e}", log.display())))
    };
    let _ = std::fs::remove_file(&log);
    let args = [
        "--duration".to_owned(),
        "2m".to_owned(),
        "--out-dir".to_owned(),
        out_dir.display().to_string(),
    ];
    show(ws, &binary, &envoy, &args);
    println!("(in the background; its output goes to {})", log.display());
    let child = Command::new(&binary)
        .args(args)
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .current_dir(&ws.root)
        .stdout(file("stdout")?)
        .stderr(file("stderr")?)
        .spawn()
        .map_err(|e| Error::msg(format!("could not run {}: {e}", binary.display())))?;
    Ok(BackgroundSoak { child, log })
}

impl BackgroundSoak {
    /// Waits for the soak, prints its summary (the log from the summary on) and says whether
    /// it passed.
    pub fn finish(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::msg(format!("waiting for the soak: {e}")))?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let summary = log.find("\nSoak: ").map_or(log.as_str(), |at| &log[at..]);
        println!("\n--> soak ({}){summary}", self.log.display());
        if !status.success() {
            bail!(
                "the soak failed ({status}); its whole output: {}",
                self.log.display()
            );
        }
        Ok(())
    }
}

fn show(ws: &Workspace, binary: &Path, envoy: &Path, args: &[String]) {
    let shown = Cmd::new(binary.strip_prefix(&ws.root).unwrap_or(binary))
        .env(envoy::ENVOY_ENV_VAR, envoy)
        .args(args)
        .shown();
    println!("$ {shown}\n");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Vec<String>>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn known_flags_pass_through_and_typos_are_refused_before_building() {
        assert_eq!(parse(&[]).unwrap(), Some(vec![]));
        assert_eq!(
            parse(&["--duration", "1h", "--rate=30"]).unwrap(),
            Some(vec![
                "--duration".to_string(),
                "1h".to_string(),
                "--rate=30".to_string()
            ])
        );
        assert_eq!(parse(&["--", "--outage", "5s"]).unwrap().unwrap().len(), 2);
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--durations", "1h"]).is_err());
        assert!(parse(&["--duration"]).is_err());
    }
}
