//! `eastwest-harness run FILTER.wasm --scenario SCENARIO.yaml [--config CONFIG.json]
//! [--workers N] [--root-id ID] [--prometheus]`
//! `eastwest-harness bench [--modules DIR] [--requests N]``

use std::process::ExitCode;

use eastwest_harness::scenario::{self, Overrides};

const USAGE: &str = "usage: eastwest-harness run FILTER.wasm --scenario SCENARIO.yaml \
[--config CONFIG.json] [--workers N] [--root-id ID] [--prometheus]
       eastwest-harness bench [--modules DIR] [--requests N]
         requests per second through a no-op filter on one core, and requests per second and
         wasm instructions per request of every DIR/*.wasm (default dist/), outbound and inbound";

/// Requests timed through the no-op filter by default (a quarter of that through each module).
const DEFAULT_BENCH_REQUESTS: usize = 20_000;

/// Exit codes: 0 success, 1 a guest trap, 2 usage or bad scenario, 3 bad module or start failure.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("eastwest-harness: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, (u8, String)> {
    let usage = |message: &str| (2u8, format!("{message}\n{USAGE}"));
    let mut iter = args.iter();
    match iter.next().map(String::as_str) {
        Some("run") => {}
        Some("bench") => return bench(&args[1..]),
        Some("-h" | "--help") | None => return Err(usage("")),
        Some(other) => return Err(usage(&format!("unknown command {other:?}"))),
    }
    let (mut wasm, mut scenario_path, mut overrides, mut prometheus) =
        (None, None, Overrides::default(), false);
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--scenario" => scenario_path = Some(value("--scenario")?),
            "--config" => {
                let path = value("--config")?;
                let text =
                    std::fs::read(&path).map_err(|e| (2, format!("cannot read {path}: {e}")))?;
                overrides.config = Some(text);
            }
            "--workers" => {
                let text = value("--workers")?;
                overrides.workers = Some(
                    text.parse()
                        .map_err(|_| usage(&format!("--workers: not a number: {text}")))?,
                );
            }
            "--root-id" => overrides.root_id = Some(value("--root-id")?),
            "--prometheus" => prometheus = true,
            other if !other.starts_with("--") && wasm.is_none() => wasm = Some(other.to_string()),
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    let wasm_path = wasm.ok_or_else(|| usage("missing FILTER.wasm"))?;
    let scenario_path = scenario_path.ok_or_else(|| usage("missing --scenario"))?;
    let bytes =
        std::fs::read(&wasm_path).map_err(|e| (3, format!("cannot read {wasm_path}: {e}")))?;
    let text = std::fs::read_to_string(&scenario_path)
        .map_err(|e| (2, format!("cannot read {scenario_path}: {e}")))?;
    let scenario = scenario::parse(&text).map_err(|e| (2, format!("{scenario_path}: {e}")))?;
    let (harness, output) = scenario::run(&bytes, &scenario, overrides).map_err(|e| {
        let code = if e.0.starts_with("bad scenario") {
            2
        } else {
            3
        };
        (code, e.0)
    })?;
    if prometheus {
        let tags: Vec<(String, String)> = scenario
            .stats_tags
            .iter()
            .map(|t| (t.tag_name.clone(), t.regex.clone()))
            .collect();
        print!("{}", harness.prometheus(&tags).map_err(|e| (2, e.0))?);
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&output).map_err(|e| (3, e.to_string()))?
        );
    }
    if let Some(trap) = output.traps.first() {
        return Err((
            1,
            format!(
                "the filter trapped in {} on worker {}: {}",
                trap.callback, trap.worker, trap.message
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn bench(args: &[String]) -> Result<ExitCode, (u8, String)> {
    let usage = |message: &str| (2u8, format!("{message}\n{USAGE}"));
    let (mut modules, mut requests) = ("dist".to_string(), DEFAULT_BENCH_REQUESTS);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--modules" => modules = value("--modules")?,
            "--requests" => {
                let text = value("--requests")?;
                requests =
                    text.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        usage(&format!("--requests: not a positive number: {text}"))
                    })?;
            }
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "eastwest-harness: a debug build: requests/s are far below a release build's \
             (instructions/request are the same)"
        );
    }
    let figures = eastwest_harness::bench::run(std::path::Path::new(&modules), requests)
        .map_err(|e| (3, e.0))?;
    println!("eastwest-harness: one worker on one core, {requests} requests through the no-op filter, {} through each module in {modules}/", (requests / 4).max(1));
    print!("{}", eastwest_harness::bench::table(&figures));
    Ok(ExitCode::SUCCESS)
}
