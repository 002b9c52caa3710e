//! `cargo xtask bench`: load-tests every filter inside real Envoy with `eastwest-bench`, then
//! prints the harness's figures (`eastwest-harness bench`).

use crate::error::Result;
use crate::process::Cmd;
use crate::tools::ensure_tool;
use crate::workspace::Workspace;
use crate::{build, envoy};

pub const HELP: &str = "\
cargo xtask bench [-- <eastwest-bench options>]

Builds the filters (as `cargo xtask build`), provisions Envoy 1.40.0, installs wrk if it is
missing, then runs
  cargo run --release -p eastwest-e2e --bin eastwest-bench -- \\
      --filter <name>=dist/<name>.wasm ... <eastwest-bench options>
with EASTWEST_ENVOY set. Everything after `--` goes to eastwest-bench, e.g.
  cargo xtask bench -- --duration 30s
Then runs
  cargo run --release -p eastwest-harness -- bench --modules dist
which prints requests per second through a no-op filter on one core in the harness, and the
wasm instructions per request of each filter in dist/, outbound and inbound. The first run
compiles wasmtime in release (several minutes on two cores).
";

/// The arguments for `eastwest-bench`, or `None` when help was asked for.
pub fn parse_args(args: &[String]) -> Result<Option<Vec<String>>> {
    crate::process::passthrough_args("bench", "eastwest-bench", args, HELP)
}

pub fn bench(ws: &Workspace, bench_args: &[String]) -> Result<()> {
    let modules = build::build(ws)?;
    let envoy = envoy::provision(ws, "to benchmark the filters inside it")?;
    ensure_tool(
        "wrk",
        "wrk",
        "to generate the HTTP load for `cargo xtask bench`",
    )?;
    let mut cargo = envoy::e2e_release_binary(ws, "eastwest-bench", &envoy);
    for module in &modules {
        let relative = module.path.strip_prefix(&ws.root).unwrap_or(&module.path);
        cargo = cargo
            .arg("--filter")
            .arg(format!("{}={}", module.filter_name, relative.display()));
    }
    cargo.args(bench_args).run()?;

    println!("\nThe same filters in the harness (exact instructions per request):");
    Cmd::cargo()
        .args([
            "run",
            "--release",
            "-p",
            "eastwest-harness",
            "--",
            "bench",
            "--modules",
            "dist",
        ])
        .env("EASTWEST_HARNESS_CACHE", crate::test::harness_cache(ws))
        .current_dir(&ws.root)
        .run()
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
}
