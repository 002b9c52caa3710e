//! The retry-storm experiment (docs/filters/retry-budget.md): a callee fails every request for
//! a while under a steady load, and the caller's retries multiply its traffic, without a
//! budget, with Envoy's `retry_budget`, and with eastwest's retry-budget in each mode. Prints
//! one row per run.
//!
//! ```text
//! eastwest-retry-storm [--rate 200] [--outage 4s]
//! ```
//!
//! Needs Envoy (EASTWEST_ENVOY) and dist/retry-budget.wasm; `cargo xtask retry-storm` provides
//! both.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eastwest_e2e::retry_storm::{self, Experiment};

const USAGE: &str =
    "usage: eastwest-retry-storm [--rate REQUESTS_PER_SECOND] [--outage SECONDS(s)]";

fn main() {
    if let Err(error) = run() {
        eprintln!("eastwest-retry-storm: {error:#}");
        std::process::exit(1);
    }
}

fn parse_seconds(text: &str) -> Result<Duration> {
    let number = text.strip_suffix('s').unwrap_or(text);
    let seconds: f64 = number
        .parse()
        .with_context(|| format!("not a duration in seconds: {text:?}"))?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 600.0) {
        bail!("{text:?} is outside 0..600 s");
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_args() -> Result<Option<Experiment>> {
    let mut experiment = Experiment::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--rate" => {
                let text = value()?;
                let rate: f64 = text
                    .parse()
                    .with_context(|| format!("--rate: not a number: {text:?}"))?;
                if !(rate.is_finite() && (1.0..=5_000.0).contains(&rate)) {
                    bail!("--rate {rate} is outside 1..=5000 requests per second");
                }
                experiment.rate = rate;
            }
            "--outage" => experiment.outage = parse_seconds(&value()?).context("--outage")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(experiment))
}

fn run() -> Result<()> {
    let Some(experiment) = parse_args()? else {
        return Ok(());
    };
    eastwest_e2e::envoy_binary()?;
    eastwest_e2e::dist_wasm("retry-budget")?;
    println!("retry storm: {}", experiment.describe());
    let began = Instant::now();
    let runs = experiment.run_all(|run| {
        eprintln!(
            "  {:<24} done: amplification {:.2}x, load: {}",
            run.budget.label(),
            run.amplification(),
            run.load_summary
        );
    })?;
    println!("\nDuring the outage ({:?}):\n", experiment.outage);
    print!("{}", retry_storm::table(&experiment, &runs));
    println!("\nEnvoy's counters during the outage (caller: downstream requests, attempts to the callee, retries, retry overflow; callee: downstream requests, requests to the app; caller connections per worker over the run):\n");
    print!("{}", retry_storm::envoy_table(&runs));
    println!("\n{}", retry_storm::describe_bound(&experiment));
    println!(
        "\namplification = app requests / originals during the outage; retries admitted = app \
         requests - originals, wanted = {} per original; denials = \
         eastwest_retry_budget_denied_total (eastwest modes) or upstream_rq_retry_overflow \
         (Envoy); recovery = time after the outage until the success ratio of every {:?} \
         window of responses is >= {}%.\nTook {:.0?}.",
        experiment.num_retries,
        experiment.recovery_window,
        experiment.recovery_success * 100.0,
        began.elapsed()
    );
    Ok(())
}
