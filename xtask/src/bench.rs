//! `cargo xtask bench`: what the filters cost one Envoy sidecar (`eastwest-bench`: CPU per
//! request, RSS, latency at a fixed rate, next to DESIGN.md §8's targets), with the harness's
//! instructions per request (`eastwest-harness bench --json`) in the same table.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::process::Cmd;
use crate::tools::ensure_tool;
use crate::workspace::Workspace;
use crate::{build, envoy};

pub const HELP: &str = "\
cargo xtask bench [-- <eastwest-bench options>]

What each filter costs one Envoy sidecar, the way an operator sees it. Builds the filters (as
`cargo xtask build`), provisions Envoy 1.40.0, installs wrk if it is missing, then runs
  cargo run --release -p eastwest-harness -- bench --modules dist --json target/bench/harness.json
(wasm instructions per request and per callback; if it fails the table says \"harness figures
unavailable\" and the benchmark goes on) and
  cargo run --release -p eastwest-e2e --bin eastwest-bench -- \\
      --dist dist --harness-json target/bench/harness.json <eastwest-bench options>
with EASTWEST_ENVOY set. One Envoy per configuration (concurrency 1, node metadata like an
Istio sidecar's), each pinned to the last CPU; the upstream is a second Envoy answering with
direct_response, on the other CPU with wrk: no filter, a no-op Wasm module, a Lua filter that
appends six labels to baggage, label-enrich, telemetry and retry-budget alone, the three chained
as the static sidecar runs them, and dist/eastwest.wasm with all three features (\"not built\"
while it is missing). Interleaved rounds, each configuration a wrk warm-up, a closed-loop wrk
run and an open-loop run at a fixed rate. Prints, side by side: CPU µs per request of the
Envoy process and what it adds over no filter (median of per-round differences, in µs and as a
share of Envoy's own), requests/s, errors, RSS and what it adds over no filter and over the
no-op module, p50/p99 latency at the open-loop rate and what they add, instructions per request
(per callback in a second table), then DESIGN.md §8's targets marked met or MISSED. Writes every
figure, the rounds' raw numbers, Envoy's version, the commit and the date to
target/bench/bench.json. About 7 minutes on two cores with the defaults; the first run also
compiles wasmtime in release (several minutes). Fails on failed requests or a configuration
that cannot be set up, not on a missed target.

Options after `--` (defaults):
  --rounds 3             interleaved rounds (order alternates)
  --duration 8s          closed-loop wrk run per configuration and round (CPU, req/s)
  --warmup 2s            wrk warm-up before it
  --rate 2000            open-loop requests per second for the latency figures
  --latency-duration 4s  open-loop run per configuration and round (0s: none)
  --connections 16       wrk connections    --wrk-threads 1
  --only NAME,...        only these configurations (no-filter and wasm-noop always run):
                         lua-baggage label-enrich telemetry retry-budget chain-3-modules
                         eastwest-all
  --json-out PATH        default target/bench/bench.json
  --no-pin               do not pin Envoys and the load generator to CPUs
  --nice N               e.g. -10: run the Envoys, wrk and the generator ahead of other work
                         on a busy machine (root or CAP_SYS_NICE); default: priorities as is
  --filter NAME=PATH.wasm [--config NAME=JSON]   an extra configuration
e.g. cargo xtask bench -- --rounds 5 --only eastwest-all,chain-3-modules
";

/// The arguments for `eastwest-bench`, or `None` when help was asked for.
pub fn parse_args(args: &[String]) -> Result<Option<Vec<String>>> {
    crate::process::passthrough_args("bench", "eastwest-bench", args, HELP)
}

pub fn bench(ws: &Workspace, bench_args: &[String]) -> Result<()> {
    build::build(ws)?;
    let envoy = envoy::provision(ws, "to benchmark the filters inside it")?;
    ensure_tool(
        "wrk",
        "wrk",
        "to generate the HTTP load for `cargo xtask bench`",
    )?;
    let harness_json = harness_figures(ws)?;
    envoy::e2e_release_binary(ws, "eastwest-bench", &envoy)
        .arg("--dist")
        .arg("dist")
        .arg("--harness-json")
        .arg(&harness_json)
        .args(bench_args)
        .run()
}

/// Runs `eastwest-harness bench --json`; returns where its JSON goes (relative to the workspace
/// root when inside it). A failure is reported and left to eastwest-bench, which then prints
/// "harness figures unavailable": the Envoy figures do not depend on the harness.
fn harness_figures(ws: &Workspace) -> Result<PathBuf> {
    let path = ws.target_dir().join("bench").join("harness.json");
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).context(format!("creating {}", dir.display()))?;
    // Never let an older run's figures stand in for this one's.
    if path.exists() {
        std::fs::remove_file(&path).context(format!("removing {}", path.display()))?;
    }
    let shown = path.strip_prefix(&ws.root).unwrap_or(&path).to_path_buf();
    let result = Cmd::cargo()
        .args(harness_bench_args(&shown))
        .env("EASTWEST_HARNESS_CACHE", crate::test::harness_cache(ws))
        .current_dir(&ws.root)
        .run();
    if let Err(error) = result {
        println!(
            "\n{error}\nGoing on without the harness's instructions per request (the table \
             will say \"harness figures unavailable\").\n"
        );
    }
    Ok(shown)
}

fn harness_bench_args(json: &Path) -> Vec<String> {
    [
        "run",
        "--release",
        "-p",
        "eastwest-harness",
        "--",
        "bench",
        "--modules",
        "dist",
        "--json",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .chain(std::iter::once(json.display().to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Vec<String>>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_after_the_separator_go_to_the_bench_binary() {
        assert_eq!(parse(&[]).unwrap(), Some(vec![]));
        assert_eq!(
            parse(&["--", "--duration", "10s"]).unwrap(),
            Some(vec!["--duration".to_string(), "10s".to_string()])
        );
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--duration", "10s"]).is_err());
    }

    #[test]
    fn the_harness_writes_its_json_where_the_bench_reads_it() {
        assert_eq!(
            harness_bench_args(Path::new("target/bench/harness.json")).join(" "),
            "run --release -p eastwest-harness -- bench --modules dist --json \
             target/bench/harness.json"
        );
    }
}
