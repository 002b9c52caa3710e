//! The eastwest test application as a process, for the demo and benchmarks.
//!
//! `eastwest-test-app --port N [--threads N]` serves on 127.0.0.1:N (HTTP/1.1 and h2c) and
//! prints `listening on 127.0.0.1:N` once bound (`--port 0` picks a free port). See
//! `eastwest_e2e::app` for what it answers.

use std::io::Write;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: eastwest-test-app --port N [--threads N]";

fn main() -> Result<()> {
    let mut port: Option<u16> = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--port" => {
                port = Some(
                    value("--port")?
                        .parse()
                        .context("--port: not a port number")?,
                )
            }
            "--threads" => {
                threads = value("--threads")?
                    .parse()
                    .context("--threads: not a number")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let port = port.with_context(|| format!("--port is required\n{USAGE}"))?;
    eastwest_e2e::app::run_forever(port, threads, |address| {
        println!("listening on {address}");
        let _ = std::io::stdout().flush();
    })
}
