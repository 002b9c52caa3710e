//! `cargo xtask demo`: builds the filters, provisions Envoy, builds the demo binaries and
//! replaces itself with `eastwest-demo` (so that Ctrl-C reaches the demo, which stops its
//! mesh in order, rather than an xtask that would die first and leave it printing behind the
//! shell prompt).

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::error::{bail, Error, Result};
use crate::process::Cmd;
use crate::workspace::Workspace;
use crate::{build, envoy};

pub const HELP: &str = "\
cargo xtask demo [--duration 60s] [--rate 50] [--keep-running] [--out-dir DIR]

Starts a small east-west mesh on 127.0.0.1 and drives traffic through it: four services of a
shop (frontend -> checkout -> payments and inventory, and inventory -> payments, which is not
an expected dependency), each behind its own Envoy sidecar with label-enrich, telemetry and
retry-budget, ownership labels in the node metadata, and mTLS with SPIFFE identities between
the sidecars. From a third to two thirds of the run payments answers every request 503: the
callers' retries start a storm and the retry budget holds it. Prints progress every 5 s, then
a summary computed from the sidecars' metrics (service map with owning teams, requests, error
ratio, P95/P99 per pair, retries admitted and denied, unexpected dependencies), writes
target/demo/report.html (self-contained: service graph and latency charts), and stops every
process it started, also on Ctrl-C.

  --duration D     how long the traffic runs (60s by default; e.g. 20s, 2m)
  --rate N         requests per second to the frontend (default 50)
  --keep-running   leave the mesh up after the traffic and print the addresses to curl and
                   the Envoy admin endpoints to scrape; Ctrl-C stops it
  --out-dir DIR    where report.html, certs/ and logs/ go (default target/demo)

First it builds the filters (as `cargo xtask build`), provisions Envoy 1.40.0 (as for the
tests; EASTWEST_ENVOY overrides it) and runs
  cargo build -p eastwest-e2e --bin eastwest-demo --bin eastwest-demo-service
";

/// The flags `eastwest-demo` takes (it checks the values); those with a value.
const FLAGS: [(&str, bool); 5] = [
    ("--duration", true),
    ("--rate", true),
    ("--keep-running", false),
    ("--out-dir", true),
    ("--service-binary", true),
];

/// The arguments for `eastwest-demo`, or `None` when help was asked for. Unknown flags are
/// refused here, before the build, so that a typo does not cost a build.
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
        match FLAGS.iter().find(|(name, _)| *name == flag) {
            Some((_, takes_value)) => expect_value = *takes_value && !arg.contains('='),
            None => bail!("`cargo xtask demo` has no option {arg:?}\n\n{HELP}"),
        }
    }
    if expect_value {
        bail!(
            "`{}` needs a value\n\n{HELP}",
            args.last().map_or("", String::as_str)
        );
    }
    Ok(Some(args.to_vec()))
}

/// Builds what the demo needs, then becomes `eastwest-demo`; returns only on errors.
pub fn demo(ws: &Workspace, demo_args: &[String]) -> Result<()> {
    build::build(ws)?;
    let envoy = envoy::provision(ws, "to run the demo mesh")?;
    Cmd::cargo()
        .args([
            "build",
            "-p",
            "eastwest-e2e",
            "--bin",
            "eastwest-demo",
            "--bin",
            "eastwest-demo-service",
        ])
        .current_dir(&ws.root)
        .run()?;
    let binary = ws.target_dir().join("debug").join("eastwest-demo");
    let shown = Cmd::new(binary.strip_prefix(&ws.root).unwrap_or(&binary))
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .args(demo_args)
        .shown();
    println!("$ {shown}\n");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let error = Command::new(&binary)
        .args(demo_args)
        .env(envoy::ENVOY_ENV_VAR, &envoy)
        .exec();
    Err(Error::msg(format!(
        "could not run {}: {error}",
        binary.display()
    )))
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
            parse(&["--duration", "20s", "--keep-running"]).unwrap(),
            Some(vec![
                "--duration".to_string(),
                "20s".to_string(),
                "--keep-running".to_string()
            ])
        );
        assert_eq!(
            parse(&["--", "--rate=10"]).unwrap(),
            Some(vec!["--rate=10".to_string()])
        );
        assert_eq!(parse(&["--duration", "20s", "--help"]).unwrap(), None);
        assert!(parse(&["--durations", "20s"]).is_err());
        assert!(parse(&["--duration"]).is_err());
        // A value that looks like a flag is the value's business (eastwest-demo checks it).
        assert!(parse(&["--out-dir", "--keep-running"]).is_ok());
    }
}
