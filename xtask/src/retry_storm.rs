//! `cargo xtask retry-storm`: the retry-storm experiment (docs/filters/retry-budget.md) in real
//! Envoy, with `eastwest-retry-storm`.

use crate::error::Result;
use crate::workspace::Workspace;
use crate::{build, envoy};

pub const HELP: &str = "\
cargo xtask retry-storm [-- <eastwest-retry-storm options>]

Builds the filters (as `cargo xtask build`), provisions Envoy 1.40.0 (as `cargo xtask bench`),
then runs
  cargo run --release -p eastwest-e2e --bin eastwest-retry-storm -- <options>
with EASTWEST_ENVOY set. A steady 200 requests/s go through a caller sidecar (2 retries on
5xx) and a callee sidecar to a test app that fails every request for 4 s; five runs one after
another: no budget, Envoy's retry_budget, eastwest's retry-budget in client, client-headers
and server mode. Prints one row per run (originals and app requests during the outage,
amplification, retries admitted out of wanted, budget denials, recovery time), Envoy's own
counters, and the bound the budget's configuration allows. About a minute.
Options after `--`: --rate <requests per second> (default 200), --outage <seconds> (default 4s).
";

/// The arguments for `eastwest-retry-storm`, or `None` when help was asked for.
pub fn parse_args(args: &[String]) -> Result<Option<Vec<String>>> {
    crate::process::passthrough_args("retry-storm", "eastwest-retry-storm", args, HELP)
}

pub fn retry_storm(ws: &Workspace, storm_args: &[String]) -> Result<()> {
    build::build(ws)?;
    let envoy = envoy::provision(ws, "to run the retry-storm experiment")?;
    envoy::e2e_release_binary(ws, "eastwest-retry-storm", &envoy)
        .args(storm_args)
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Vec<String>>> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_after_the_separator_go_to_the_experiment() {
        assert_eq!(parse(&[]).unwrap(), Some(vec![]));
        assert_eq!(
            parse(&["--", "--rate", "100"]).unwrap(),
            Some(vec!["--rate".to_string(), "100".to_string()])
        );
        assert_eq!(parse(&["-h"]).unwrap(), None);
        assert!(parse(&["--rate", "100"]).is_err());
    }
}
