//! Requests per second of one Envoy worker proxying to the test app, without and with each
//! Wasm filter given on the command line, measured with wrk.
//!
//! ```text
//! eastwest-bench [--filter NAME=PATH.wasm]... [--config NAME=JSON]... [--duration 10s]
//!                [--warmup 2s] [--rounds 3] [--connections 32] [--wrk-threads 2]
//!                [--direction outbound|inbound] [--concurrency 1] [--json-out PATH]
//! ```
//!
//! Every configuration gets its own Envoy (`--concurrency 1`, one listener, one cluster to
//! the test app, which runs inside this process). Rounds interleave the configurations
//! (alternating their order) so drifts of the machine hit all of them alike; each run is a
//! warm-up followed by the measured run. The table shows the median requests per second, the
//! median of the runs' p99 latency, and the ratio to the baseline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eastwest_e2e::process::spawn_tied_to_process;
use eastwest_e2e::{
    bootstrap, free_port, http_request, wasm_filter, ClusterBuilder, Envoy, EnvoyOptions,
    ListenerBuilder, Node, TrafficDirection,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: eastwest-bench [--filter NAME=PATH.wasm]... [--config NAME=JSON]...
       [--duration 10s] [--warmup 2s] [--rounds 3] [--connections 32] [--wrk-threads 2]
       [--direction outbound|inbound] [--concurrency 1] [--app-threads 1] [--json-out PATH]
       [--no-pin]";

/// The name of the floor configuration in the table: a module that does nothing
/// ([`eastwest_e2e::wat_modules::noop_module`]), which separates what a filter costs from what
/// Envoy's Wasm support costs.
const NOOP_NAME: &str = "wasm-noop";

/// wrk prints this line from its `done` hook; latencies are in microseconds.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  io.write(string.format("EASTWEST_WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

struct Args {
    filters: Vec<(String, PathBuf)>,
    configs: Vec<(String, Value)>,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    connections: u32,
    wrk_threads: u32,
    direction: TrafficDirection,
    concurrency: u32,
    app_threads: usize,
    json_out: Option<PathBuf>,
    /// Give the Envoys their own CPU, away from wrk and the test app.
    pin: bool,
}

struct Configuration {
    name: String,
    envoy: Envoy,
    url: String,
    runs: Vec<WrkResult>,
}

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Non-2xx/3xx responses plus socket errors.
    errors: u64,
}

fn main() {
    if let Err(error) = run() {
        eprintln!("eastwest-bench: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let wrk = find_in_path("wrk").context(
        "wrk not found; install it with `apt-get install wrk` (cargo xtask bench does this)",
    )?;
    eastwest_e2e::envoy_binary()?;

    let app_port = start_app(args.app_threads)?;
    let script_dir = tempfile::tempdir()?;
    let script = script_dir.path().join("report.lua");
    std::fs::write(&script, WRK_SCRIPT)?;

    let noop_path = script_dir.path().join("noop.wasm");
    std::fs::write(&noop_path, eastwest_e2e::wat_modules::noop_module()?)?;
    let mut configurations = vec![
        start_configuration("baseline", None, &args, app_port)?,
        start_configuration(
            NOOP_NAME,
            Some(wasm_filter(NOOP_NAME, &noop_path, json!({}))),
            &args,
            app_port,
        )?,
    ];
    for (name, path) in &args.filters {
        let config = args
            .configs
            .iter()
            .find(|(config_name, _)| config_name == name)
            .map_or_else(|| json!({}), |(_, config)| config.clone());
        let filter = wasm_filter(name, path, config);
        configurations.push(start_configuration(name, Some(filter), &args, app_port)?);
    }

    if args.pin {
        pin_cpus(&configurations);
    }
    eprintln!(
        "{} configurations x {} rounds, {:?} warm-up + {:?} measured each, wrk -t{} -c{}",
        configurations.len(),
        args.rounds,
        args.warmup,
        args.duration,
        args.wrk_threads,
        args.connections
    );
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..configurations.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let configuration = &mut configurations[index];
            if !args.warmup.is_zero() {
                run_wrk(&wrk, &script, &configuration.url, args.warmup, &args)?;
            }
            let result = run_wrk(&wrk, &script, &configuration.url, args.duration, &args)?;
            eprintln!(
                "round {}/{} {:<24} {:>10.0} rps  p99 {:>7.2} ms{}",
                round + 1,
                args.rounds,
                configuration.name,
                result.requests_per_second,
                result.p99_ms,
                if result.errors > 0 {
                    format!("  {} errors", result.errors)
                } else {
                    String::new()
                }
            );
            configuration.runs.push(result);
        }
    }

    print_table(&configurations);
    if let Some(path) = &args.json_out {
        write_json(path, &configurations, &args)?;
    }
    let failed: Vec<String> = configurations
        .iter()
        .filter(|c| c.runs.iter().any(|run| run.errors > 0))
        .map(|c| c.name.clone())
        .collect();
    // Stop the Envoys (by pid, in Drop) before reporting.
    drop(configurations);
    if !failed.is_empty() {
        bail!("some requests failed (non-2xx responses or socket errors) for: {failed:?}");
    }
    Ok(())
}

/// With at least two CPUs, puts every Envoy thread on the last CPU and this process (the test
/// app, and wrk, which inherits the affinity) on the others. Envoy's worker then never
/// competes with its own load generator, which otherwise makes runs differ by ±10%.
fn pin_cpus(configurations: &[Configuration]) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("one CPU: not pinning");
        return;
    }
    let envoy_cpu = cpus - 1;
    let mut pinned = 0;
    for configuration in configurations {
        pinned += set_affinity_of_all_threads(configuration.envoy.pid(), &[envoy_cpu]);
    }
    let others: Vec<usize> = (0..envoy_cpu).collect();
    set_affinity_of_all_threads(std::process::id(), &others);
    eprintln!("pinned {pinned} Envoy threads to CPU {envoy_cpu}; wrk and the test app to CPUs 0..{envoy_cpu}");
}

/// Sets the CPU affinity of every thread of `pid`; returns how many threads were pinned.
fn set_affinity_of_all_threads(pid: u32, cpus: &[usize]) -> usize {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&tid| {
            // SAFETY: `set` is a valid cpu_set_t of the size given.
            unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
            }
        })
        .count()
}

fn start_app(threads: usize) -> Result<u16> {
    let (bound, port) = mpsc::channel();
    std::thread::Builder::new()
        .name("test-app".into())
        .spawn(move || {
            let result = eastwest_e2e::app::run_forever(0, threads, |address| {
                let _ = bound.send(Ok(address.port()));
            });
            if let Err(error) = result {
                let _ = bound.send(Err(error));
            }
        })?;
    port.recv().context("the test app thread died")?
}

fn start_configuration(
    name: &str,
    filter: Option<Value>,
    args: &Args,
    app_port: u16,
) -> Result<Configuration> {
    let listen = free_port();
    let mut listener = ListenerBuilder::new("bench", listen, "app")
        .traffic_direction(args.direction)
        .stat_prefix("bench");
    if let Some(filter) = filter {
        listener = listener.http_filter(filter);
    }
    let config = bootstrap(
        &Node::istio_sidecar("bench-client", "bench", &[("app", "bench-client")]),
        free_port(),
        vec![listener.build()],
        vec![ClusterBuilder::new("app", app_port).build()],
        &[],
    );
    let options = EnvoyOptions {
        concurrency: args.concurrency,
        log_level: "warning".into(),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start(&format!("bench-{name}"), config, &options)
        .with_context(|| format!("configuration `{name}`"))?;
    let url = format!("http://127.0.0.1:{listen}/bench");
    // One request first: a filter that rejects everything would otherwise be "fast".
    let response = http_request("GET", &url, &[], "")?;
    if response.status != 200 {
        bail!(
            "configuration `{name}`: a test request got status {} ({}); Envoy log in {}",
            response.status,
            response.text(),
            envoy.run_dir().display()
        );
    }
    Ok(Configuration {
        name: name.to_owned(),
        envoy,
        url,
        runs: Vec::new(),
    })
}

fn run_wrk(
    wrk: &Path,
    script: &Path,
    url: &str,
    duration: Duration,
    args: &Args,
) -> Result<WrkResult> {
    let seconds = duration.as_secs().max(1);
    let mut command = Command::new(wrk);
    command
        .arg(format!("-t{}", args.wrk_threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_tied_to_process(command).context("cannot start wrk")?;
    let output = child.wait_with_output().context("wrk failed")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk exited with {}: {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk_report(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

fn parse_wrk_report(output: &str) -> Result<WrkResult> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("EASTWEST_WRK "))
        .context("no EASTWEST_WRK line")?;
    let field = |key: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}"))?
            .parse::<f64>()
            .with_context(|| format!("{key} is not a number"))
    };
    let duration_s = field("duration_us")? / 1e6;
    if duration_s <= 0.0 {
        bail!("zero duration");
    }
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|key| field(key))
        .sum::<Result<f64>>()?;
    Ok(WrkResult {
        requests_per_second: field("requests")? / duration_s,
        p50_ms: field("p50_us")? / 1000.0,
        p99_ms: field("p99_us")? / 1000.0,
        errors: errors as u64,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn summary(configuration: &Configuration) -> (f64, f64, f64) {
    let rps = median(
        configuration
            .runs
            .iter()
            .map(|r| r.requests_per_second)
            .collect(),
    );
    let p50 = median(configuration.runs.iter().map(|r| r.p50_ms).collect());
    let p99 = median(configuration.runs.iter().map(|r| r.p99_ms).collect());
    (rps, p50, p99)
}

/// The table: median requests per second and latencies, the throughput ratio to the baseline
/// (no filter) and to the no-op Wasm module, and the worker time each configuration adds per
/// request over the no-op module (a saturated single worker spends 1/rps per request).
fn print_table(configurations: &[Configuration]) {
    let baseline_rps = summary(&configurations[0]).0;
    let noop_rps = configurations
        .iter()
        .find(|c| c.name == NOOP_NAME)
        .map(|c| summary(c).0);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n{:<24} {:>11} {:>8} {:>8} {:>12} {:>13} {:>12}   rps per round",
        "configuration",
        "median rps",
        "p50 ms",
        "p99 ms",
        "vs baseline",
        "vs wasm-noop",
        "µs/req added"
    );
    for configuration in configurations {
        let (rps, p50, p99) = summary(configuration);
        let rounds: Vec<String> = configuration
            .runs
            .iter()
            .map(|run| format!("{:.0}", run.requests_per_second))
            .collect();
        let (versus_noop, added_us) = match noop_rps {
            Some(noop) if configuration.name != "baseline" && configuration.name != NOOP_NAME => (
                format!("{:.3}", rps / noop),
                format!("{:.1}", (1.0 / rps - 1.0 / noop) * 1e6),
            ),
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            out,
            "{:<24} {:>11.0} {:>8.2} {:>8.2} {:>12.3} {:>13} {:>12}   {}",
            configuration.name,
            rps,
            p50,
            p99,
            rps / baseline_rps,
            versus_noop,
            added_us,
            rounds.join(" ")
        );
    }
}

fn write_json(path: &Path, configurations: &[Configuration], args: &Args) -> Result<()> {
    let baseline_rps = summary(&configurations[0]).0;
    let results: Vec<Value> = configurations
        .iter()
        .map(|configuration| {
            let (rps, p50, p99) = summary(configuration);
            json!({
                "configuration": configuration.name,
                "median_rps": rps,
                "median_p50_ms": p50,
                "median_p99_ms": p99,
                "ratio_to_baseline": rps / baseline_rps,
                "runs": configuration.runs.iter().map(|run| json!({
                    "rps": run.requests_per_second,
                    "p50_ms": run.p50_ms,
                    "p99_ms": run.p99_ms,
                    "errors": run.errors,
                })).collect::<Vec<_>>(),
                "envoy_run_dir": configuration.envoy.run_dir().display().to_string(),
            })
        })
        .collect();
    let report = json!({
        "envoy_concurrency": args.concurrency,
        "wrk": {"threads": args.wrk_threads, "connections": args.connections,
                "duration_s": args.duration.as_secs().max(1)},
        "results": results,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 10s, 500ms, 1m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (use ms, s or m)"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        filters: Vec::new(),
        configs: Vec::new(),
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        rounds: 3,
        connections: 32,
        wrk_threads: 2,
        direction: TrafficDirection::Outbound,
        concurrency: 1,
        app_threads: 1,
        json_out: None,
        pin: true,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(flag) = raw.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (flag, None),
        };
        let mut value = || -> Result<String> {
            inline
                .clone()
                .or_else(|| raw.next())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--filter" => {
                let value = value()?;
                let (name, path) = value
                    .split_once('=')
                    .with_context(|| format!("--filter {value}: expected NAME=PATH.wasm"))?;
                let path = std::path::absolute(path)
                    .with_context(|| format!("--filter {value}: bad path"))?;
                if !path.is_file() {
                    bail!("--filter {name}: {} does not exist", path.display());
                }
                if name == "baseline" || args.filters.iter().any(|(other, _)| other == name) {
                    bail!("--filter {name}: duplicate or reserved name");
                }
                args.filters.push((name.to_owned(), path));
            }
            "--config" => {
                let value = value()?;
                let (name, config) = value
                    .split_once('=')
                    .with_context(|| format!("--config {value}: expected NAME=JSON"))?;
                let config: Value = serde_json::from_str(config)
                    .with_context(|| format!("--config {name}: not valid JSON"))?;
                args.configs.push((name.to_owned(), config));
            }
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--warmup" => args.warmup = parse_duration(&value()?)?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds: not a number")?,
            "--connections" => {
                args.connections = value()?.parse().context("--connections: not a number")?
            }
            "--wrk-threads" => {
                args.wrk_threads = value()?.parse().context("--wrk-threads: not a number")?
            }
            "--concurrency" => {
                args.concurrency = value()?.parse().context("--concurrency: not a number")?
            }
            "--app-threads" => {
                args.app_threads = value()?.parse().context("--app-threads: not a number")?
            }
            "--direction" => {
                args.direction = match value()?.as_str() {
                    "outbound" => TrafficDirection::Outbound,
                    "inbound" => TrafficDirection::Inbound,
                    other => bail!("--direction {other}: expected outbound or inbound"),
                }
            }
            "--json-out" => args.json_out = Some(PathBuf::from(value()?)),
            "--no-pin" => args.pin = false,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    for (name, _) in &args.configs {
        if !args.filters.iter().any(|(filter, _)| filter == name) {
            bail!("--config {name}: no --filter {name}=PATH given");
        }
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_wrk_report_line() {
        let output = "Running 1s test\nEASTWEST_WRK requests=20000 duration_us=2000000 connect=0 \
                      read=1 write=0 status=2 timeout=0 p50_us=450 p99_us=2500\n";
        let result = parse_wrk_report(output).unwrap();
        assert_eq!(result.requests_per_second, 10000.0);
        assert_eq!(result.p99_ms, 2.5);
        assert_eq!(result.errors, 3);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
