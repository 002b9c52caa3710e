//! The parts of `eastwest-bench` (src/bin/eastwest-bench.rs) that need no process: CPU time and
//! RSS from `/proc`, per-round figures and their medians, the harness's JSON report, the cost
//! targets of DESIGN.md §8, the printed tables and the JSON report. The binary starts the
//! Envoys and the load and fills a [`Report`]; everything here is unit-tested.
//!
//! How the figures are taken (the binary's doc has the set-up):
//! * CPU per request: `utime + stime` of the measured Envoy process (`/proc/PID/stat`: every
//!   thread, living or exited) over a closed-loop wrk run, divided by the requests wrk completed.
//! * Added CPU: per round, a configuration's CPU per request minus the same round's `no-filter`
//!   run (and, as a share, divided by it); the table shows the median over rounds. This
//!   machine's speed drifts between minutes, so only same-round differences mean anything.
//! * RSS: `VmRSS` of `/proc/PID/status` right after the closed-loop run; added over `no-filter`
//!   and over `wasm-noop`, per round, median.
//! * Latency: an open-loop run at a fixed rate ([`crate::load`]); p50 and p99 per run, added
//!   over the same round's `no-filter` run, median.
//! * Instructions: from `eastwest-harness bench --json` (exact, so not per round).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// Version of the JSON report's layout; bumped when a field changes meaning or goes away.
pub const REPORT_SCHEMA: &str = "eastwest-bench/2";

/// The configurations, by the names the table, `--only` and the JSON use.
pub const NO_FILTER: &str = "no-filter";
pub const WASM_NOOP: &str = "wasm-noop";
pub const LUA_BAGGAGE: &str = "lua-baggage";
pub const LABEL_ENRICH: &str = "label-enrich";
pub const TELEMETRY: &str = "telemetry";
pub const RETRY_BUDGET: &str = "retry-budget";
pub const CHAIN: &str = "chain-3-modules";
pub const EASTWEST: &str = "eastwest-all";

/// Every built-in configuration, in table order.
pub const CONFIGURATIONS: &[&str] = &[
    NO_FILTER,
    WASM_NOOP,
    LUA_BAGGAGE,
    LABEL_ENRICH,
    TELEMETRY,
    RETRY_BUDGET,
    CHAIN,
    EASTWEST,
];

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`: the CPU time of every
/// thread of the process, including threads that have exited.
pub fn cpu_ticks_from_stat(stat: &str) -> Result<u64> {
    // Field 2, the command, is in parentheses and may itself contain spaces and parentheses:
    // the fields after it start after the last ')'.
    let rest = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .context("no ')' after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15 (proc(5)).
    let field = |index: usize, name: &str| -> Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("no {name} field"))?
            .parse()
            .with_context(|| format!("{name} is not a number"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn rss_kib_from_status(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    let mut words = line.split_whitespace();
    let value: u64 = words
        .next()
        .context("VmRSS has no value")?
        .parse()
        .context("VmRSS is not a number")?;
    match words.next() {
        Some("kB") => Ok(value),
        other => bail!("VmRSS in unexpected unit {other:?}"),
    }
}

/// Busy clock ticks of CPU `cpu` (user, nice, system, irq, softirq, steal: everything but idle
/// and iowait) from the text of `/proc/stat`.
pub fn cpu_busy_ticks_from_proc_stat(stat: &str, cpu: usize) -> Result<u64> {
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} line"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| {
            field
                .parse()
                .with_context(|| format!("{label}: {field:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    if fields.len() < 8 {
        bail!("{label}: {} fields, expected at least 8", fields.len());
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    // in user.
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

/// Busy clock ticks of CPU `cpu` now (see [`cpu_busy_ticks_from_proc_stat`]).
pub fn read_cpu_busy_ticks(cpu: usize) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    cpu_busy_ticks_from_proc_stat(&text, cpu)
}

/// The 1-minute load average (`/proc/loadavg`), if readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU ticks (`utime + stime`) of process `pid` now.
pub fn read_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    cpu_ticks_from_stat(&text).with_context(|| format!("{path}: {text}"))
}

/// `VmRSS` of process `pid` now, in KiB.
pub fn read_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    rss_kib_from_status(&text).with_context(|| format!("{path}: no VmRSS in kB"))
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// The median of the finite values; `None` if there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    })
}

/// `f(value, reference)` for every round that has both, then the median over those rounds.
/// Rounds are matched by number, so a configuration is only ever compared with the reference
/// measured in the same round.
pub fn median_per_round(
    values: &[(usize, f64)],
    reference: &[(usize, f64)],
    f: impl Fn(f64, f64) -> f64,
) -> Option<f64> {
    let per_round: Vec<f64> = values
        .iter()
        .filter_map(|&(round, value)| {
            let &(_, base) = reference.iter().find(|(r, _)| *r == round)?;
            Some(f(value, base))
        })
        .collect();
    median(&per_round)
}

/// `value - reference`.
pub fn added(value: f64, reference: f64) -> f64 {
    value - reference
}

/// `(value - reference) / reference`: what a configuration adds as a share of the reference.
pub fn added_share(value: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        (value - reference) / reference
    } else {
        f64::NAN
    }
}

/// The open-loop run of one configuration in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenLoopRun {
    /// Requests per second asked for.
    pub rate: f64,
    pub sent: u64,
    pub completed: u64,
    /// Non-2xx responses, connection errors, timeouts and requests still in flight at the end.
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The latest a request started after its scheduled time (the generator falling behind).
    pub max_lag_us: f64,
    /// CPU seconds of the measured Envoy over the open-loop run.
    pub cpu_seconds: f64,
}

/// One configuration in one round: the closed-loop CPU run, the RSS after it, the open-loop
/// latency run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// 1-based.
    pub round: usize,
    /// 0-based place of this configuration in the round's order.
    pub position: usize,
    /// CPU seconds of the measured Envoy over the closed-loop run.
    pub cpu_seconds: f64,
    /// Requests wrk completed in the closed-loop run.
    pub requests: u64,
    /// Wall time of the closed-loop run as wrk measured it.
    pub duration_s: f64,
    /// Non-2xx responses and socket errors of the closed-loop run.
    pub errors: u64,
    /// wrk's closed-loop latencies (at saturation: queueing, not cost).
    pub wrk_p50_us: f64,
    pub wrk_p99_us: f64,
    /// VmRSS after the closed-loop run.
    pub rss_kib: u64,
    /// Share of the measured Envoy's CPU taken by anything else during the closed-loop run
    /// (other processes, e.g. builds; the idle Envoys of the other configurations): the run's
    /// noise. `None` when not pinned.
    pub other_load_share: Option<f64>,
    pub open_loop: Option<OpenLoopRun>,
}

impl Run {
    /// CPU microseconds per request.
    pub fn cpu_us_per_request(&self) -> f64 {
        if self.requests == 0 {
            return f64::NAN;
        }
        self.cpu_seconds * 1e6 / self.requests as f64
    }

    pub fn requests_per_second(&self) -> f64 {
        if self.duration_s <= 0.0 {
            return f64::NAN;
        }
        self.requests as f64 / self.duration_s
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// Errors of both runs.
    pub fn total_errors(&self) -> u64 {
        self.errors + self.open_loop.as_ref().map_or(0, |o| o.errors)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "position_in_round": self.position,
            "cpu_seconds": self.cpu_seconds,
            "requests": self.requests,
            "duration_s": self.duration_s,
            "cpu_us_per_request": self.cpu_us_per_request(),
            "requests_per_second": self.requests_per_second(),
            "errors": self.errors,
            "wrk_p50_us": self.wrk_p50_us,
            "wrk_p99_us": self.wrk_p99_us,
            "rss_kib": self.rss_kib,
            "other_load_share": self.other_load_share,
            "open_loop": self.open_loop.as_ref().map(|o| json!({
                "rate": o.rate,
                "sent": o.sent,
                "completed": o.completed,
                "errors": o.errors,
                "p50_us": o.p50_us,
                "p99_us": o.p99_us,
                "max_lag_us": o.max_lag_us,
                "cpu_seconds": o.cpu_seconds,
                "cpu_us_per_request": if o.completed > 0 {
                    o.cpu_seconds * 1e6 / o.completed as f64
                } else {
                    f64::NAN
                },
            })),
        })
    }
}

/// A configuration's figures over all rounds (medians; `None` where not measured).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub cpu_us_per_request: Option<f64>,
    /// Over `no-filter`, per round, median.
    pub cpu_added_us: Option<f64>,
    /// The same as a share of `no-filter`'s own CPU per request (0.1 = 10%).
    pub cpu_added_share: Option<f64>,
    pub requests_per_second: Option<f64>,
    /// Both runs, all rounds.
    pub errors: u64,
    pub rss_mib: Option<f64>,
    pub rss_added_over_no_filter_mib: Option<f64>,
    pub rss_added_over_wasm_noop_mib: Option<f64>,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub latency_p50_added_us: Option<f64>,
    pub latency_p99_added_us: Option<f64>,
}

type Series = Vec<(usize, f64)>;

fn series(runs: &[Run], f: impl Fn(&Run) -> Option<f64>) -> Series {
    runs.iter()
        .filter_map(|run| Some((run.round, f(run)?)))
        .collect()
}

fn values(series: &Series) -> Vec<f64> {
    series.iter().map(|&(_, v)| v).collect()
}

impl Summary {
    /// The figures of `runs`, compared round by round with the `no-filter` and `wasm-noop`
    /// runs when given.
    pub fn of(runs: &[Run], no_filter: Option<&[Run]>, wasm_noop: Option<&[Run]>) -> Summary {
        let cpu = series(runs, |r| Some(r.cpu_us_per_request()));
        let rss = series(runs, |r| Some(r.rss_mib()));
        let p50 = series(runs, |r| r.open_loop.as_ref().map(|o| o.p50_us));
        let p99 = series(runs, |r| r.open_loop.as_ref().map(|o| o.p99_us));
        let base = |runs: Option<&[Run]>, f: &dyn Fn(&Run) -> Option<f64>| {
            runs.map(|runs| series(runs, f)).unwrap_or_default()
        };
        let base_cpu = base(no_filter, &|r| Some(r.cpu_us_per_request()));
        let base_rss = base(no_filter, &|r| Some(r.rss_mib()));
        let base_p50 = base(no_filter, &|r| r.open_loop.as_ref().map(|o| o.p50_us));
        let base_p99 = base(no_filter, &|r| r.open_loop.as_ref().map(|o| o.p99_us));
        let noop_rss = base(wasm_noop, &|r| Some(r.rss_mib()));
        Summary {
            cpu_us_per_request: median(&values(&cpu)),
            cpu_added_us: median_per_round(&cpu, &base_cpu, added),
            cpu_added_share: median_per_round(&cpu, &base_cpu, added_share),
            requests_per_second: median(
                &runs
                    .iter()
                    .map(Run::requests_per_second)
                    .collect::<Vec<_>>(),
            ),
            errors: runs.iter().map(Run::total_errors).sum(),
            rss_mib: median(&values(&rss)),
            rss_added_over_no_filter_mib: median_per_round(&rss, &base_rss, added),
            rss_added_over_wasm_noop_mib: median_per_round(&rss, &noop_rss, added),
            latency_p50_us: median(&values(&p50)),
            latency_p99_us: median(&values(&p99)),
            latency_p50_added_us: median_per_round(&p50, &base_p50, added),
            latency_p99_added_us: median_per_round(&p99, &base_p99, added),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cpu_us_per_request": self.cpu_us_per_request,
            "cpu_added_us": self.cpu_added_us,
            "cpu_added_share": self.cpu_added_share,
            "requests_per_second": self.requests_per_second,
            "errors": self.errors,
            "rss_mib": self.rss_mib,
            "rss_added_over_no_filter_mib": self.rss_added_over_no_filter_mib,
            "rss_added_over_wasm_noop_mib": self.rss_added_over_wasm_noop_mib,
            "latency_p50_us": self.latency_p50_us,
            "latency_p99_us": self.latency_p99_us,
            "latency_p50_added_us": self.latency_p50_added_us,
            "latency_p99_added_us": self.latency_p99_added_us,
        })
    }
}

/// One module's row of `eastwest-harness bench --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HarnessModule {
    /// The module's file stem (`label-enrich`, `eastwest`).
    pub module: String,
    pub direction: String,
    pub instructions_per_request: Option<u64>,
    pub max_instructions_per_request: Option<u64>,
    /// Instructions per request by callback (`proxy_on_request_headers`, ...).
    pub callbacks: BTreeMap<String, u64>,
    pub requests_per_second: Option<f64>,
    pub error: Option<String>,
}

/// `eastwest-harness bench --json PATH`:
/// `{"harness_requests_per_second": f64, "modules": [{"module": "label-enrich", "direction":
/// "outbound", "instructions_per_request": u64, "max_instructions_per_request": u64,
/// "callbacks": {"proxy_on_request_headers": u64, ...}, "requests_per_second": f64,
/// "error": null}]}`. Unknown fields are ignored; a module with an `error` may lack figures.
#[derive(Debug, Clone, PartialEq)]
pub struct HarnessReport {
    pub harness_requests_per_second: Option<f64>,
    pub modules: Vec<HarnessModule>,
}

impl HarnessReport {
    pub fn parse(text: &str) -> Result<HarnessReport> {
        let value: Value = serde_json::from_str(text).context("not JSON")?;
        let top = value.as_object().context("not a JSON object")?;
        let modules = top
            .get("modules")
            .and_then(Value::as_array)
            .context("no \"modules\" array")?;
        let modules = modules
            .iter()
            .enumerate()
            .map(|(index, module)| {
                parse_harness_module(module).with_context(|| format!("modules[{index}]"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HarnessReport {
            harness_requests_per_second: optional_f64(top, "harness_requests_per_second")?,
            modules,
        })
    }

    pub fn module(&self, module: &str, direction: &str) -> Option<&HarnessModule> {
        self.modules
            .iter()
            .find(|m| m.module == module && m.direction == direction)
    }

    /// The instructions of `modules` (one module, or several run one after another on the
    /// same request, added up) in `direction`.
    pub fn instructions(&self, modules: &[&str], direction: &str) -> Result<Instructions, String> {
        let mut total = Instructions::default();
        for name in modules {
            let module = self
                .module(name, direction)
                .ok_or_else(|| format!("no {direction} figures for {name}.wasm"))?;
            if let Some(error) = &module.error {
                return Err(format!("{name}: {error}"));
            }
            total.per_request += module
                .instructions_per_request
                .ok_or_else(|| format!("{name}: no instructions_per_request"))?;
            total.max_per_request += module
                .max_instructions_per_request
                .or(module.instructions_per_request)
                .unwrap_or(0);
            for (callback, count) in &module.callbacks {
                *total.callbacks.entry(callback.clone()).or_default() += count;
            }
        }
        Ok(total)
    }
}

fn parse_harness_module(module: &Value) -> Result<HarnessModule> {
    let fields = module.as_object().context("not an object")?;
    let string = |key: &str| -> Result<String> {
        Ok(fields
            .get(key)
            .and_then(Value::as_str)
            .with_context(|| format!("no string \"{key}\""))?
            .to_owned())
    };
    let error = match fields.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(error)) => Some(error.clone()),
        Some(other) => Some(other.to_string()),
    };
    let mut callbacks = BTreeMap::new();
    match fields.get("callbacks") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (callback, count) in map {
                let count = count
                    .as_u64()
                    .with_context(|| format!("callbacks.{callback} is not a whole number"))?;
                callbacks.insert(callback.clone(), count);
            }
        }
        Some(_) => bail!("\"callbacks\" is not an object"),
    }
    Ok(HarnessModule {
        module: string("module")?,
        direction: string("direction")?,
        instructions_per_request: optional_u64(fields, "instructions_per_request")?,
        max_instructions_per_request: optional_u64(fields, "max_instructions_per_request")?,
        callbacks,
        requests_per_second: optional_f64(fields, "requests_per_second")?,
        error,
    })
}

fn optional_u64(fields: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            Ok(Some(value.as_u64().with_context(|| {
                format!("\"{key}\" is not a whole number")
            })?))
        }
    }
}

fn optional_f64(fields: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => Ok(Some(
            value
                .as_f64()
                .with_context(|| format!("\"{key}\" is not a number"))?,
        )),
    }
}

/// Wasm instructions of one typical request, from the harness.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Instructions {
    pub per_request: u64,
    /// The most one request took in the harness's run.
    pub max_per_request: u64,
    pub callbacks: BTreeMap<String, u64>,
}

/// A figure a target is set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    CpuAddedUs,
    CpuAddedShare,
    RssOverWasmNoopMib,
    Instructions,
    LatencyP50AddedUs,
    LatencyP99AddedUs,
}

impl Figure {
    pub fn id(self) -> &'static str {
        match self {
            Figure::CpuAddedUs => "cpu_added_us",
            Figure::CpuAddedShare => "cpu_added_share",
            Figure::RssOverWasmNoopMib => "rss_added_over_wasm_noop_mib",
            Figure::Instructions => "instructions_per_request",
            Figure::LatencyP50AddedUs => "latency_p50_added_us",
            Figure::LatencyP99AddedUs => "latency_p99_added_us",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Figure::CpuAddedUs => "CPU added per request",
            Figure::CpuAddedShare => "CPU added, share of Envoy's own",
            Figure::RssOverWasmNoopMib => "RSS over the no-op Wasm module",
            Figure::Instructions => "wasm instructions per request",
            Figure::LatencyP50AddedUs => "p50 latency added (open loop)",
            Figure::LatencyP99AddedUs => "p99 latency added (open loop)",
        }
    }

    /// `value` in this figure's unit, e.g. `+25.4 µs`, `+47.0%`, `18000`.
    pub fn format(self, value: f64) -> String {
        match self {
            Figure::CpuAddedUs => format!("{value:+.1} µs"),
            Figure::LatencyP50AddedUs | Figure::LatencyP99AddedUs => format!("{value:+.0} µs"),
            Figure::CpuAddedShare => format!("{:+.1}%", value * 100.0),
            Figure::RssOverWasmNoopMib => format!("{value:+.1} MiB"),
            Figure::Instructions => thousands(value.max(0.0).round() as u64),
        }
    }

    /// The limit as the target reads, e.g. `≤ 5 µs`, `≤ 10%`.
    pub fn format_limit(self, limit: f64) -> String {
        match self {
            Figure::CpuAddedUs | Figure::LatencyP50AddedUs | Figure::LatencyP99AddedUs => {
                format!("≤ {limit} µs")
            }
            Figure::CpuAddedShare => format!("≤ {}%", limit * 100.0),
            Figure::RssOverWasmNoopMib => format!("≤ {limit} MiB"),
            Figure::Instructions => format!("≤ {}", thousands(limit as u64)),
        }
    }
}

/// A cost target of DESIGN.md §8 for one configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub configuration: &'static str,
    pub figure: Figure,
    pub limit: f64,
    /// The target belongs to another configuration (`eastwest-all`); it is shown for this one
    /// (the chain of three modules) for comparison.
    pub comparison: bool,
}

const fn target(configuration: &'static str, figure: Figure, limit: f64) -> Target {
    Target {
        configuration,
        figure,
        limit,
        comparison: false,
    }
}

const fn comparison(figure: Figure, limit: f64) -> Target {
    Target {
        configuration: CHAIN,
        figure,
        limit,
        comparison: true,
    }
}

/// DESIGN.md §8: each feature alone ≤ 5 µs CPU added (≤ 10% of Envoy's own), ≤ 4 MB RSS over
/// the no-op Wasm module, ≤ 3,000 instructions; `eastwest.wasm` with all three ≤ 12 µs
/// (≤ 22%), ≤ 6 MB, ≤ 6,000 instructions, and at the open-loop rate ≤ 20 µs added at p50 and
/// ≤ 50 µs at p99. The chain of the three modules is held to the all-three targets for
/// comparison.
pub const TARGETS: &[Target] = &[
    target(LABEL_ENRICH, Figure::CpuAddedUs, 5.0),
    target(LABEL_ENRICH, Figure::CpuAddedShare, 0.10),
    target(LABEL_ENRICH, Figure::RssOverWasmNoopMib, 4.0),
    target(LABEL_ENRICH, Figure::Instructions, 3000.0),
    target(TELEMETRY, Figure::CpuAddedUs, 5.0),
    target(TELEMETRY, Figure::CpuAddedShare, 0.10),
    target(TELEMETRY, Figure::RssOverWasmNoopMib, 4.0),
    target(TELEMETRY, Figure::Instructions, 3000.0),
    target(RETRY_BUDGET, Figure::CpuAddedUs, 5.0),
    target(RETRY_BUDGET, Figure::CpuAddedShare, 0.10),
    target(RETRY_BUDGET, Figure::RssOverWasmNoopMib, 4.0),
    target(RETRY_BUDGET, Figure::Instructions, 3000.0),
    target(EASTWEST, Figure::CpuAddedUs, 12.0),
    target(EASTWEST, Figure::CpuAddedShare, 0.22),
    target(EASTWEST, Figure::RssOverWasmNoopMib, 6.0),
    target(EASTWEST, Figure::Instructions, 6000.0),
    target(EASTWEST, Figure::LatencyP50AddedUs, 20.0),
    target(EASTWEST, Figure::LatencyP99AddedUs, 50.0),
    comparison(Figure::CpuAddedUs, 12.0),
    comparison(Figure::CpuAddedShare, 0.22),
    comparison(Figure::RssOverWasmNoopMib, 6.0),
    comparison(Figure::Instructions, 6000.0),
    comparison(Figure::LatencyP50AddedUs, 20.0),
    comparison(Figure::LatencyP99AddedUs, 50.0),
];

/// Whether a figure meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Not measured (not built, excluded with `--only`, harness figures unavailable).
    Unknown,
    /// The figure is below minus the limit: a filter cannot save that much, so the runs' noise
    /// (usually other work on the machine) is larger than the target and the run cannot tell.
    Unclear,
}

impl Verdict {
    pub fn of(value: Option<f64>, limit: f64) -> Verdict {
        match value {
            Some(value) if value.is_finite() => {
                if value < -limit {
                    Verdict::Unclear
                } else if value <= limit {
                    Verdict::Met
                } else {
                    Verdict::Missed
                }
            }
            _ => Verdict::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::Unknown => "unknown",
            Verdict::Unclear => "unclear",
        }
    }
}

/// Whether a configuration was measured.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Measured,
    /// Its module is missing (e.g. dist/eastwest.wasm before it exists); the reason.
    NotBuilt(String),
    /// Left out with `--only`.
    Skipped,
    /// Envoy refused it, or a test request through it failed; the reason. The benchmark
    /// measures the others and then fails.
    Failed(String),
}

/// One configuration of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigurationResult {
    pub name: String,
    pub description: String,
    pub status: Status,
    /// The HTTP filters before the router, as given to Envoy.
    pub http_filters: Vec<Value>,
    pub envoy_run_dir: Option<String>,
    pub runs: Vec<Run>,
    /// Harness modules (file stems) whose outbound instructions make this configuration's
    /// figure, added up; empty when the harness has no figure for it.
    pub harness_modules: Vec<String>,
}

/// What `eastwest-bench` found out, and everything needed to compare it with another run.
#[derive(Debug, Clone)]
pub struct Report {
    /// UTC, RFC 3339.
    pub date: String,
    pub git_commit: Option<String>,
    /// Tracked files differ from the commit.
    pub git_dirty: Option<bool>,
    pub envoy_binary: String,
    pub envoy_version: Option<String>,
    pub envoy_version_output: Option<String>,
    /// CPUs, clock ticks, pinning, load averages.
    pub machine: Value,
    /// The options the run used.
    pub options: Value,
    /// The headers every request carries (besides Host).
    pub request_headers: Vec<(String, String)>,
    pub configurations: Vec<ConfigurationResult>,
    /// The harness's report, or why there is none.
    pub harness: Result<HarnessReport, String>,
    /// The harness's JSON as it was read.
    pub harness_raw: Option<Value>,
    /// The open-loop rate (requests per second).
    pub rate: f64,
    /// wrk connections of the closed loop.
    pub connections: u32,
}

/// One target's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetResult {
    pub target: Target,
    pub value: Option<f64>,
    pub verdict: Verdict,
    /// Why there is no value, when there is none.
    pub note: Option<String>,
}

impl Report {
    fn runs_of(&self, name: &str) -> Option<&[Run]> {
        self.configurations
            .iter()
            .find(|c| c.name == name && c.status == Status::Measured)
            .map(|c| c.runs.as_slice())
    }

    /// Each configuration's figures, in order.
    pub fn summaries(&self) -> Vec<Summary> {
        let no_filter = self.runs_of(NO_FILTER);
        let noop = self.runs_of(WASM_NOOP);
        self.configurations
            .iter()
            .map(|c| match c.status {
                Status::Measured => Summary::of(&c.runs, no_filter, noop),
                _ => Summary::default(),
            })
            .collect()
    }

    /// A configuration's instructions per request from the harness, or why there are none.
    pub fn instructions(
        &self,
        configuration: &ConfigurationResult,
    ) -> Result<Instructions, String> {
        if configuration.harness_modules.is_empty() {
            return Err("no harness figure".into());
        }
        let report = self
            .harness
            .as_ref()
            .map_err(|_| "harness figures unavailable".to_owned())?;
        let modules: Vec<&str> = configuration
            .harness_modules
            .iter()
            .map(String::as_str)
            .collect();
        report.instructions(&modules, "outbound")
    }

    /// Every target of [`TARGETS`] with this run's figure and verdict.
    pub fn target_results(&self) -> Vec<TargetResult> {
        let summaries = self.summaries();
        TARGETS
            .iter()
            .map(|target| {
                let Some(index) = self
                    .configurations
                    .iter()
                    .position(|c| c.name == target.configuration)
                else {
                    return TargetResult {
                        target: *target,
                        value: None,
                        verdict: Verdict::Unknown,
                        note: Some("not in this run".into()),
                    };
                };
                let configuration = &self.configurations[index];
                let summary = &summaries[index];
                let (value, note) = match (&configuration.status, target.figure) {
                    (Status::NotBuilt(_), _) => (None, Some("not built".to_owned())),
                    (Status::Skipped, _) => (None, Some("skipped (--only)".to_owned())),
                    (Status::Failed(_), _) => (None, Some("failed".to_owned())),
                    (Status::Measured, Figure::Instructions) => {
                        match self.instructions(configuration) {
                            Ok(instructions) => (Some(instructions.per_request as f64), None),
                            Err(reason) => (None, Some(reason)),
                        }
                    }
                    (Status::Measured, figure) => {
                        let value = match figure {
                            Figure::CpuAddedUs => summary.cpu_added_us,
                            Figure::CpuAddedShare => summary.cpu_added_share,
                            Figure::RssOverWasmNoopMib => summary.rss_added_over_wasm_noop_mib,
                            Figure::LatencyP50AddedUs => summary.latency_p50_added_us,
                            Figure::LatencyP99AddedUs => summary.latency_p99_added_us,
                            Figure::Instructions => None,
                        };
                        (value, value.is_none().then(|| "not measured".to_owned()))
                    }
                };
                TargetResult {
                    target: *target,
                    value,
                    verdict: Verdict::of(value, target.limit),
                    note,
                }
            })
            .collect()
    }

    /// The report as JSON (`--json-out`): every figure, the per-round raw numbers, the targets,
    /// the harness's figures, Envoy's version, the commit and the date.
    pub fn to_json(&self) -> Value {
        let summaries = self.summaries();
        let configurations: Vec<Value> = self
            .configurations
            .iter()
            .zip(&summaries)
            .map(|(c, summary)| {
                let (status, reason) = match &c.status {
                    Status::Measured => ("measured", None),
                    Status::NotBuilt(reason) => ("not built", Some(reason.clone())),
                    Status::Skipped => ("skipped", None),
                    Status::Failed(reason) => ("failed", Some(reason.clone())),
                };
                let instructions = match self.instructions(c) {
                    Ok(i) => json!({
                        "per_request": i.per_request,
                        "max_per_request": i.max_per_request,
                        "callbacks": i.callbacks,
                        "modules": c.harness_modules,
                    }),
                    Err(reason) => json!({"unavailable": reason, "modules": c.harness_modules}),
                };
                json!({
                    "name": c.name,
                    "description": c.description,
                    "status": status,
                    "status_reason": reason,
                    "http_filters": c.http_filters,
                    "envoy_run_dir": c.envoy_run_dir,
                    "summary": summary.to_json(),
                    "instructions": instructions,
                    "rounds": c.runs.iter().map(Run::to_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .target_results()
            .iter()
            .map(|result| {
                json!({
                    "configuration": result.target.configuration,
                    "figure": result.target.figure.id(),
                    "limit": result.target.limit,
                    "comparison": result.target.comparison,
                    "value": result.value,
                    "verdict": result.verdict.as_str(),
                    "note": result.note,
                })
            })
            .collect();
        json!({
            "schema": REPORT_SCHEMA,
            "date": self.date,
            "git": {"commit": self.git_commit, "dirty": self.git_dirty},
            "envoy": {
                "binary": self.envoy_binary,
                "version": self.envoy_version,
                "version_output": self.envoy_version_output,
            },
            "machine": self.machine,
            "options": self.options,
            "request_headers": self
                .request_headers
                .iter()
                .map(|(name, value)| json!([name, value]))
                .collect::<Vec<_>>(),
            "configurations": configurations,
            "targets": targets,
            "harness": match &self.harness {
                Ok(_) => json!({"available": true, "report": self.harness_raw}),
                Err(reason) => json!({"available": false, "reason": reason}),
            },
        })
    }

    /// The printed report: the main table (CPU, throughput, RSS, latency, instructions), the
    /// instructions per callback, the targets.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_main_table(&mut out);
        out.push('\n');
        self.render_instructions(&mut out);
        out.push('\n');
        self.render_targets(&mut out);
        out
    }

    fn render_main_table(&self, out: &mut String) {
        let summaries = self.summaries();
        let rounds = self
            .configurations
            .iter()
            .map(|c| c.runs.len())
            .max()
            .unwrap_or(0);
        let name_width = self
            .configurations
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("configuration".len())
            + 1;
        // Groups of (column header, width); cells are right-aligned.
        let groups: [(String, Vec<(&str, usize)>); 4] = [
            (
                format!("CPU per request, closed loop (wrk -c{})", self.connections),
                vec![
                    ("µs/req", 7),
                    ("added", 7),
                    ("added %", 8),
                    ("per round", 14),
                    ("req/s", 7),
                    ("err", 4),
                ],
            ),
            (
                "Envoy RSS, MiB".into(),
                vec![("RSS", 6), ("+none", 6), ("+no-op", 6)],
            ),
            (
                format!("open loop, {} req/s", self.rate),
                vec![("p50 µs", 6), ("p99 µs", 6), ("+p50", 5), ("+p99", 5)],
            ),
            ("harness".into(), vec![("instr/req", 9)]),
        ];
        let group_width =
            |columns: &[(&str, usize)]| columns.iter().map(|(_, w)| w + 1).sum::<usize>() + 1;
        let mut line = format!("{:<name_width$}", "");
        for (title, columns) in &groups {
            let width = group_width(columns);
            line.push_str(&format!("│{title:^width$}"));
        }
        push_line(out, line);
        let mut line = format!("{:<name_width$}", "configuration");
        for (_, columns) in &groups {
            line.push('│');
            for (header, width) in columns {
                line.push_str(&format!(" {header:>width$}"));
            }
            line.push(' ');
        }
        push_line(out, line);
        for (configuration, summary) in self.configurations.iter().zip(&summaries) {
            let name = &configuration.name;
            match &configuration.status {
                Status::NotBuilt(reason) => {
                    push_line(out, format!("{name:<name_width$}│ not built: {reason}"));
                    continue;
                }
                Status::Skipped => continue,
                Status::Failed(reason) => {
                    let first = reason.lines().next().unwrap_or_default();
                    push_line(out, format!("{name:<name_width$}│ FAILED: {first}"));
                    continue;
                }
                Status::Measured => {}
            }
            // A reference compared with itself adds nothing: shown as a dash.
            let no_filter = name == NO_FILTER;
            let over_none = |value: Option<f64>| if no_filter { None } else { value };
            let over_noop = |value: Option<f64>| {
                if no_filter || name == WASM_NOOP {
                    None
                } else {
                    value
                }
            };
            let per_round: Vec<String> = configuration
                .runs
                .iter()
                .map(|r| format!("{:.0}", r.cpu_us_per_request()))
                .collect();
            let instructions = match self.instructions(configuration) {
                Ok(i) => thousands(i.per_request),
                Err(_) if configuration.harness_modules.is_empty() => "–".into(),
                Err(_) => "n/a".into(),
            };
            let cells: [Vec<String>; 4] = [
                vec![
                    fixed(summary.cpu_us_per_request, 1),
                    signed(over_none(summary.cpu_added_us), 1, ""),
                    percent(over_none(summary.cpu_added_share)),
                    per_round.join("/"),
                    fixed(summary.requests_per_second, 0),
                    summary.errors.to_string(),
                ],
                vec![
                    fixed(summary.rss_mib, 1),
                    signed(over_none(summary.rss_added_over_no_filter_mib), 1, ""),
                    signed(over_noop(summary.rss_added_over_wasm_noop_mib), 1, ""),
                ],
                vec![
                    fixed(summary.latency_p50_us, 0),
                    fixed(summary.latency_p99_us, 0),
                    signed(over_none(summary.latency_p50_added_us), 0, ""),
                    signed(over_none(summary.latency_p99_added_us), 0, ""),
                ],
                vec![instructions],
            ];
            let mut line = format!("{name:<name_width$}");
            for ((_, columns), cells) in groups.iter().zip(&cells) {
                line.push('│');
                for ((_, width), cell) in columns.iter().zip(cells) {
                    line.push_str(&format!(" {cell:>width$}"));
                }
                line.push(' ');
            }
            push_line(out, line);
        }
        let skipped: Vec<&str> = self
            .configurations
            .iter()
            .filter(|c| c.status == Status::Skipped)
            .map(|c| c.name.as_str())
            .collect();
        if !skipped.is_empty() {
            push_line(out, format!("left out (--only): {}", skipped.join(", ")));
        }
        push_line(
            out,
            format!(
                "µs/req: CPU time of the measured Envoy process (all threads) per request, median \
                 of {rounds} rounds; per round: µs/req of each round; added, added %, +none, \
                 +p50, +p99: over the same round's no-filter run, median over rounds; +no-op: \
                 over the same round's wasm-noop run; req/s is bounded by the load generator too \
                 (secondary); err: failed requests of both runs; instr/req: wasm instructions of \
                 one typical outbound request in the harness (the chain: its three modules added \
                 up)."
            ),
        );
        push_wrapped(out, 100);
        let other: Vec<f64> = self
            .configurations
            .iter()
            .flat_map(|c| c.runs.iter().filter_map(|r| r.other_load_share))
            .collect();
        if let (Some(typical), Some(most)) =
            (median(&other), other.iter().copied().reduce(f64::max))
        {
            push_line(
                out,
                format!(
                    "Other work on the measured Envoy's CPU during the closed-loop runs: median \
                     {:.1}%, at most {:.1}% of the CPU{}",
                    typical * 100.0,
                    most * 100.0,
                    if most > 0.05 {
                        " (something else ran there, e.g. a build: the CPU and latency figures and \
                         their verdicts are unreliable; rerun on a quiet machine, or with --nice -10)"
                    } else {
                        ""
                    }
                ),
            );
        }
    }

    fn render_instructions(&self, out: &mut String) {
        push_line(
            out,
            "Wasm instructions per request in the harness, per callback (eastwest-harness bench, \
             outbound, one typical request):"
                .into(),
        );
        let report = match &self.harness {
            Ok(report) => report,
            Err(reason) => {
                push_line(out, format!("  harness figures unavailable: {reason}"));
                return;
            }
        };
        if let Some(rate) = report.harness_requests_per_second {
            push_line(
                out,
                format!(
                    "  (the harness runs {rate:.0} requests/s through a no-op filter on one core)"
                ),
            );
        }
        let rows: Vec<(&ConfigurationResult, Result<Instructions, String>)> = self
            .configurations
            .iter()
            .filter(|c| !c.harness_modules.is_empty())
            .map(|c| (c, self.instructions(c)))
            .collect();
        let mut callbacks: Vec<String> = rows
            .iter()
            .filter_map(|(_, i)| i.as_ref().ok())
            .flat_map(|i| i.callbacks.keys().cloned())
            .collect();
        callbacks.sort_by_key(|c| (callback_rank(c), c.clone()));
        callbacks.dedup();
        let width = rows
            .iter()
            .map(|(c, _)| c.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("configuration".len());
        let short: Vec<String> = callbacks
            .iter()
            .map(|c| c.strip_prefix("proxy_on_").unwrap_or(c).to_owned())
            .collect();
        let widths: Vec<usize> = short.iter().map(|s| s.len().max(7)).collect();
        let mut header = format!("  {:<width$}", "configuration");
        for (name, w) in short.iter().zip(&widths) {
            header.push_str(&format!(" {name:>w$}"));
        }
        header.push_str(&format!(" {:>9} {:>9} {:>9}", "total", "max", "target"));
        push_line(out, header);
        for (configuration, instructions) in &rows {
            let mut line = format!("  {:<width$}", configuration.name);
            match instructions {
                Ok(i) => {
                    for (callback, w) in callbacks.iter().zip(&widths) {
                        let count = i
                            .callbacks
                            .get(callback)
                            .map_or("–".into(), |c| thousands(*c));
                        line.push_str(&format!(" {count:>w$}"));
                    }
                    let target = TARGETS
                        .iter()
                        .find(|t| {
                            t.configuration == configuration.name
                                && t.figure == Figure::Instructions
                        })
                        .map_or("–".into(), |t| thousands(t.limit as u64));
                    line.push_str(&format!(
                        " {:>9} {:>9} {:>9}",
                        thousands(i.per_request),
                        thousands(i.max_per_request),
                        target
                    ));
                }
                Err(reason) => line.push_str(&format!(" unavailable: {reason}")),
            }
            push_line(out, line);
        }
    }

    fn render_targets(&self, out: &mut String) {
        push_line(
            out,
            "Targets (DESIGN.md §8; a missed target does not fail the benchmark):".into(),
        );
        let all = self.target_results();
        // Targets of configurations left out with --only are in the JSON, not on screen.
        let results: Vec<&TargetResult> = all
            .iter()
            .filter(|r| {
                !self
                    .configurations
                    .iter()
                    .any(|c| c.name == r.target.configuration && c.status == Status::Skipped)
            })
            .collect();
        let width = results
            .iter()
            .map(|r| r.target.configuration.len())
            .max()
            .unwrap_or(0);
        for result in &results {
            let result = *result;
            let value = result
                .value
                .map_or_else(|| "–".to_owned(), |v| result.target.figure.format(v));
            let mut remarks = Vec::new();
            if let (None, Some(note)) = (result.value, &result.note) {
                remarks.push(note.clone());
            }
            if result.verdict == Verdict::Unclear {
                remarks.push("below minus the target: noise larger than the target".to_owned());
            }
            if result.target.comparison {
                remarks.push("eastwest.wasm's target, for comparison".to_owned());
            }
            let remarks = if remarks.is_empty() {
                String::new()
            } else {
                format!("  ({})", remarks.join("; "))
            };
            push_line(
                out,
                format!(
                    "  {:<width$}  {:<32} {:>11}  {:<9} {:<7}{remarks}",
                    result.target.configuration,
                    result.target.figure.describe(),
                    value,
                    result.target.figure.format_limit(result.target.limit),
                    result.verdict.as_str(),
                ),
            );
        }
        let count = |verdict| results.iter().filter(|r| r.verdict == verdict).count();
        push_line(
            out,
            format!(
                "  {} met, {} missed, {} unclear, {} unknown",
                count(Verdict::Met),
                count(Verdict::Missed),
                count(Verdict::Unclear),
                count(Verdict::Unknown)
            ),
        );
    }
}

/// Where a callback goes among the columns: the order a request meets them.
fn callback_rank(callback: &str) -> usize {
    const ORDER: &[&str] = &[
        "proxy_on_context_create",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
    ];
    ORDER
        .iter()
        .position(|c| *c == callback)
        .unwrap_or(ORDER.len())
}

fn push_line(out: &mut String, line: String) {
    out.push_str(line.trim_end());
    out.push('\n');
}

/// Wraps the last line of `out` (a long footnote) at `width` characters.
fn push_wrapped(out: &mut String, width: usize) {
    let body = out.trim_end_matches('\n');
    let start = body.rfind('\n').map_or(0, |at| at + 1);
    let last = body[start..].to_owned();
    out.truncate(start);
    let mut line = String::new();
    for word in last.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            push_line(out, std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        push_line(out, line);
    }
}

fn fixed(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".into(),
    }
}

fn signed(value: Option<f64>, decimals: usize, unit: &str) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:+.decimals$}{unit}"),
        _ => "–".into(),
    }
}

fn percent(share: Option<f64>) -> String {
    signed(share.map(|s| s * 100.0), 1, "%")
}

/// `18342` as `18,342`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_timestamp(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The release from `envoy --version`, e.g. `1.40.0` from
/// `envoy  version: 6b9ed8e.../1.40.0/Clean/RELEASE/BoringSSL`.
pub fn parse_envoy_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (_, rest) = line.split_once("version: ")?;
        let build = rest.split_whitespace().next()?;
        let release = build.split('/').nth(1)?;
        release
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
            .then(|| release.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_parentheses_in_the_name() {
        let stat = "4242 (envoy (main) x) S 1 4242 4242 0 -1 4194560 120 0 3 0 \
                    1500 250 0 0 20 0 5 0 1000 123456 789 18446744073709551615";
        assert_eq!(cpu_ticks_from_stat(stat).unwrap(), 1750);
        assert!(cpu_ticks_from_stat("4242 (envoy) S 1").is_err());
        assert!(cpu_ticks_from_stat("no parenthesis").is_err());
    }

    #[test]
    fn cpu_ticks_of_this_process_grow() {
        let pid = std::process::id();
        let before = read_cpu_ticks(pid).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(read_cpu_ticks(pid).unwrap() > before);
        assert!(read_rss_kib(pid).unwrap() > 0);
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn busy_ticks_of_one_cpu_leave_out_idle_and_iowait() {
        let stat = "cpu  900 10 300 5000 50 5 7 0 0 0\n\
                    cpu0 400 5 100 2600 20 2 3 0 0 0\n\
                    cpu1 500 5 200 2400 30 3 4 1 0 0\n\
                    intr 12345\n";
        assert_eq!(cpu_busy_ticks_from_proc_stat(stat, 1).unwrap(), 713);
        assert_eq!(cpu_busy_ticks_from_proc_stat(stat, 0).unwrap(), 510);
        assert!(cpu_busy_ticks_from_proc_stat(stat, 2).is_err());
        assert!(cpu_busy_ticks_from_proc_stat("cpu0 1 2 3\n", 0).is_err());
        assert!(read_cpu_busy_ticks(0).is_ok());
    }

    #[test]
    fn rss_comes_from_vmrss() {
        let status = "Name:\tenvoy\nVmPeak:\t 200000 kB\nVmRSS:\t   66560 kB\nThreads:\t12\n";
        assert_eq!(rss_kib_from_status(status).unwrap(), 66_560);
        assert!(rss_kib_from_status("Name:\tx\n").is_err());
        assert!(rss_kib_from_status("VmRSS:\t12 MB\n").is_err());
    }

    #[test]
    fn medians_skip_what_is_not_a_number() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn per_round_figures_compare_only_within_a_round() {
        // The machine is 30% slower in round 2: the per-round differences stay the same.
        let filter = [(1, 60.0), (2, 78.0), (3, 61.0)];
        let none = [(1, 50.0), (2, 65.0), (3, 50.0)];
        assert_eq!(median_per_round(&filter, &none, added), Some(11.0));
        let share = median_per_round(&filter, &none, added_share).unwrap();
        assert!((share - 0.2).abs() < 1e-9, "{share}");
        // A round without a reference is left out, not compared with another round.
        assert_eq!(
            median_per_round(&[(1, 60.0), (4, 1000.0)], &none, added),
            Some(10.0)
        );
        assert_eq!(median_per_round(&filter, &[], added), None);
        assert!(added_share(1.0, 0.0).is_nan());
    }

    fn run(round: usize, cpu_us: f64, rss_mib: f64, p50: f64, p99: f64) -> Run {
        Run {
            round,
            position: 0,
            cpu_seconds: cpu_us * 100_000.0 / 1e6,
            requests: 100_000,
            duration_s: 8.0,
            errors: 0,
            wrk_p50_us: 900.0,
            wrk_p99_us: 2_000.0,
            rss_kib: (rss_mib * 1024.0) as u64,
            other_load_share: Some(0.01),
            open_loop: Some(OpenLoopRun {
                rate: 2000.0,
                sent: 8000,
                completed: 8000,
                errors: 0,
                p50_us: p50,
                p99_us: p99,
                max_lag_us: 100.0,
                cpu_seconds: 0.8,
            }),
        }
    }

    #[test]
    fn summaries_are_medians_of_per_round_differences() {
        let none = vec![
            run(1, 50.0, 65.0, 200.0, 400.0),
            run(2, 65.0, 65.0, 260.0, 520.0),
            run(3, 52.0, 65.0, 210.0, 410.0),
        ];
        let noop = vec![
            run(1, 52.0, 80.0, 205.0, 405.0),
            run(2, 67.0, 80.0, 265.0, 530.0),
            run(3, 53.0, 80.0, 212.0, 415.0),
        ];
        let filter = vec![
            run(1, 75.0, 92.0, 230.0, 450.0),
            run(2, 91.0, 92.0, 290.0, 600.0),
            run(3, 80.0, 94.0, 240.0, 470.0),
        ];
        let summary = Summary::of(&filter, Some(&none), Some(&noop));
        assert_eq!(summary.cpu_us_per_request, Some(80.0));
        assert!((summary.cpu_added_us.unwrap() - 26.0).abs() < 1e-9);
        // Shares 0.5, 0.4, 0.538: median 0.5.
        assert!((summary.cpu_added_share.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(summary.requests_per_second, Some(12_500.0));
        assert!((summary.rss_added_over_no_filter_mib.unwrap() - 27.0).abs() < 0.01);
        assert!((summary.rss_added_over_wasm_noop_mib.unwrap() - 12.0).abs() < 0.01);
        assert_eq!(summary.latency_p50_added_us, Some(30.0));
        assert_eq!(summary.latency_p99_added_us, Some(60.0));
        assert_eq!(summary.errors, 0);
        // The reference against itself adds nothing; without references nothing is added.
        let own = Summary::of(&none, Some(&none), None);
        assert_eq!(own.cpu_added_us, Some(0.0));
        assert_eq!(own.rss_added_over_wasm_noop_mib, None);
    }

    const HARNESS_FIXTURE: &str = r#"{
        "harness_requests_per_second": 812345.6,
        "modules": [
            {"module": "label-enrich", "direction": "outbound", "instructions_per_request": 1800,
             "max_instructions_per_request": 2100,
             "callbacks": {"proxy_on_request_headers": 1200, "proxy_on_response_headers": 500,
                           "proxy_on_log": 100},
             "requests_per_second": 90000.0, "error": null},
            {"module": "label-enrich", "direction": "inbound", "instructions_per_request": 1700,
             "max_instructions_per_request": 1700, "callbacks": {}, "requests_per_second": 1.0,
             "error": null},
            {"module": "telemetry", "direction": "outbound", "instructions_per_request": 2500,
             "max_instructions_per_request": 2500,
             "callbacks": {"proxy_on_log": 2400, "proxy_on_request_headers": 100},
             "requests_per_second": 80000.0, "error": null, "a_new_field": true},
            {"module": "retry-budget", "direction": "outbound", "instructions_per_request": 900,
             "max_instructions_per_request": 950,
             "callbacks": {"proxy_on_request_headers": 600, "proxy_on_log": 300},
             "requests_per_second": 100000.0, "error": null},
            {"module": "eastwest", "direction": "outbound", "error": "refused its configuration"}
        ]
    }"#;

    #[test]
    fn parses_the_harness_report() {
        let report = HarnessReport::parse(HARNESS_FIXTURE).unwrap();
        assert_eq!(report.harness_requests_per_second, Some(812_345.6));
        assert_eq!(report.modules.len(), 5);
        let label = report.module("label-enrich", "outbound").unwrap();
        assert_eq!(label.instructions_per_request, Some(1800));
        assert_eq!(label.max_instructions_per_request, Some(2100));
        assert_eq!(label.callbacks["proxy_on_request_headers"], 1200);
        assert_eq!(label.error, None);
        let one = report.instructions(&["label-enrich"], "outbound").unwrap();
        assert_eq!(one.per_request, 1800);
        let chain = report
            .instructions(&["label-enrich", "telemetry", "retry-budget"], "outbound")
            .unwrap();
        assert_eq!(chain.per_request, 5200);
        assert_eq!(chain.max_per_request, 5550);
        assert_eq!(chain.callbacks["proxy_on_log"], 2800);
        assert_eq!(chain.callbacks["proxy_on_request_headers"], 1900);
        assert_eq!(
            report.instructions(&["eastwest"], "outbound").unwrap_err(),
            "eastwest: refused its configuration"
        );
        assert!(report
            .instructions(&["nothing"], "outbound")
            .unwrap_err()
            .contains("no outbound figures"));
    }

    #[test]
    fn a_broken_harness_report_is_an_error_not_a_panic() {
        for text in [
            "",
            "[]",
            "{}",
            r#"{"modules": [{"direction": "outbound"}]}"#,
            r#"{"modules": [{"module": "x", "direction": "outbound", "instructions_per_request": -1}]}"#,
            r#"{"modules": [{"module": "x", "direction": "outbound", "callbacks": []}]}"#,
        ] {
            assert!(HarnessReport::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(Verdict::of(Some(5.0), 5.0), Verdict::Met);
        assert_eq!(Verdict::of(Some(-1.0), 5.0), Verdict::Met);
        assert_eq!(Verdict::of(Some(5.01), 5.0), Verdict::Missed);
        assert_eq!(Verdict::of(None, 5.0), Verdict::Unknown);
        assert_eq!(Verdict::of(Some(f64::NAN), 5.0), Verdict::Unknown);
        // Saving more than the whole budget is noise, not a result.
        assert_eq!(Verdict::of(Some(-5.0), 5.0), Verdict::Met);
        assert_eq!(Verdict::of(Some(-40_000.0), 50.0), Verdict::Unclear);
        assert_eq!(Verdict::Unclear.as_str(), "unclear");
    }

    #[test]
    fn every_target_of_design_section_8_is_there() {
        let limit = |configuration: &str, figure: Figure| {
            TARGETS
                .iter()
                .find(|t| t.configuration == configuration && t.figure == figure)
                .map(|t| t.limit)
        };
        for module in [LABEL_ENRICH, TELEMETRY, RETRY_BUDGET] {
            assert_eq!(limit(module, Figure::CpuAddedUs), Some(5.0));
            assert_eq!(limit(module, Figure::CpuAddedShare), Some(0.10));
            assert_eq!(limit(module, Figure::RssOverWasmNoopMib), Some(4.0));
            assert_eq!(limit(module, Figure::Instructions), Some(3000.0));
        }
        for all in [EASTWEST, CHAIN] {
            assert_eq!(limit(all, Figure::CpuAddedUs), Some(12.0));
            assert_eq!(limit(all, Figure::CpuAddedShare), Some(0.22));
            assert_eq!(limit(all, Figure::RssOverWasmNoopMib), Some(6.0));
            assert_eq!(limit(all, Figure::Instructions), Some(6000.0));
            assert_eq!(limit(all, Figure::LatencyP50AddedUs), Some(20.0));
            assert_eq!(limit(all, Figure::LatencyP99AddedUs), Some(50.0));
        }
        assert!(TARGETS
            .iter()
            .all(|t| t.comparison == (t.configuration == CHAIN)));
        assert!(TARGETS
            .iter()
            .all(|t| CONFIGURATIONS.contains(&t.configuration)));
    }

    fn configuration(
        name: &str,
        status: Status,
        runs: Vec<Run>,
        modules: &[&str],
    ) -> ConfigurationResult {
        ConfigurationResult {
            name: name.into(),
            description: format!("the {name} configuration"),
            status,
            http_filters: vec![json!({"name": name})],
            envoy_run_dir: Some(format!("target/e2e-runs/{name}")),
            runs,
            harness_modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn sample_report(harness: Result<HarnessReport, String>) -> Report {
        let three = |cpu: [f64; 3], rss: f64, p50: [f64; 3]| {
            (0..3)
                .map(|i| run(i + 1, cpu[i], rss, p50[i], p50[i] * 2.0))
                .collect::<Vec<_>>()
        };
        Report {
            date: utc_timestamp(0),
            git_commit: Some("0123abcd".into()),
            git_dirty: Some(false),
            envoy_binary: "/envoy".into(),
            envoy_version: Some("1.40.0".into()),
            envoy_version_output: Some("envoy  version: abc/1.40.0/Clean/RELEASE/BoringSSL".into()),
            machine: json!({"cpus": 2}),
            options: json!({"rounds": 3}),
            request_headers: vec![("baggage".into(), "userid=7".into())],
            configurations: vec![
                configuration(
                    NO_FILTER,
                    Status::Measured,
                    three([50.0, 60.0, 52.0], 65.0, [200.0; 3]),
                    &[],
                ),
                configuration(
                    WASM_NOOP,
                    Status::Measured,
                    three([52.0, 61.0, 53.0], 80.0, [205.0; 3]),
                    &[],
                ),
                configuration(
                    LABEL_ENRICH,
                    Status::Measured,
                    three([54.0, 65.0, 56.0], 83.0, [210.0; 3]),
                    &["label-enrich"],
                ),
                configuration(
                    TELEMETRY,
                    Status::Measured,
                    three([80.0, 90.0, 82.0], 95.0, [260.0; 3]),
                    &["telemetry"],
                ),
                configuration(
                    EASTWEST,
                    Status::NotBuilt("dist/eastwest.wasm is missing".into()),
                    vec![],
                    &["eastwest"],
                ),
            ],
            harness,
            harness_raw: None,
            rate: 2000.0,
            connections: 16,
        }
    }

    #[test]
    fn targets_are_marked_met_missed_or_unknown() {
        let harness = HarnessReport::parse(HARNESS_FIXTURE).unwrap();
        let report = sample_report(Ok(harness));
        let results = report.target_results();
        let find = |configuration: &str, figure: Figure| {
            results
                .iter()
                .find(|r| r.target.configuration == configuration && r.target.figure == figure)
                .unwrap()
                .clone()
        };
        let cpu = find(LABEL_ENRICH, Figure::CpuAddedUs);
        assert_eq!(cpu.value, Some(4.0));
        assert_eq!(cpu.verdict, Verdict::Met);
        assert_eq!(
            find(LABEL_ENRICH, Figure::RssOverWasmNoopMib).verdict,
            Verdict::Met
        );
        assert_eq!(find(LABEL_ENRICH, Figure::Instructions).value, Some(1800.0));
        assert_eq!(find(TELEMETRY, Figure::CpuAddedUs).verdict, Verdict::Missed);
        assert_eq!(
            find(TELEMETRY, Figure::CpuAddedShare).verdict,
            Verdict::Missed
        );
        assert_eq!(find(TELEMETRY, Figure::Instructions).verdict, Verdict::Met);
        let eastwest = find(EASTWEST, Figure::CpuAddedUs);
        assert_eq!(eastwest.verdict, Verdict::Unknown);
        assert_eq!(eastwest.note.as_deref(), Some("not built"));
        assert_eq!(
            find(RETRY_BUDGET, Figure::CpuAddedUs).note.as_deref(),
            Some("not in this run")
        );

        let text = report.render();
        eprintln!("{text}");
        assert!(
            text.contains("not built: dist/eastwest.wasm is missing"),
            "{text}"
        );
        assert!(text.contains("MISSED"), "{text}");
        assert!(text.contains("1,800"), "{text}");
        assert!(text.contains("request_headers"), "{text}");
    }

    #[test]
    fn without_harness_figures_the_report_says_so() {
        let report = sample_report(Err("eastwest-harness bench wrote no JSON".into()));
        let text = report.render();
        assert!(
            text.contains("harness figures unavailable: eastwest-harness bench wrote no JSON"),
            "{text}"
        );
        let results = report.target_results();
        let instructions = results
            .iter()
            .find(|r| {
                r.target.configuration == LABEL_ENRICH && r.target.figure == Figure::Instructions
            })
            .unwrap();
        assert_eq!(instructions.verdict, Verdict::Unknown);
        let json = report.to_json();
        assert_eq!(json["harness"]["available"], false);
        assert_eq!(
            json["configurations"][2]["instructions"]["unavailable"],
            "harness figures unavailable"
        );
        assert_eq!(
            json["harness"]["reason"],
            "eastwest-harness bench wrote no JSON"
        );
    }

    #[test]
    fn configurations_left_out_are_listed_once_and_their_targets_stay_in_the_json() {
        let mut report = sample_report(Err("none".into()));
        report.configurations.push(configuration(
            RETRY_BUDGET,
            Status::Skipped,
            vec![],
            &["retry-budget"],
        ));
        report.configurations.push(configuration(
            CHAIN,
            Status::Failed("Envoy refused it\nlong log".into()),
            vec![],
            &[],
        ));
        let text = report.render();
        assert!(text.contains("left out (--only): retry-budget"), "{text}");
        assert!(!text.contains("retry-budget     CPU"), "{text}");
        assert!(text.contains("FAILED: Envoy refused it\n"), "{text}");
        let json = report.to_json();
        assert!(json["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["configuration"] == RETRY_BUDGET && t["note"] == "skipped (--only)"));
        assert_eq!(json["configurations"][6]["status"], "failed");
    }

    #[test]
    fn the_json_report_carries_every_figure_and_the_raw_rounds() {
        let harness = HarnessReport::parse(HARNESS_FIXTURE).unwrap();
        let mut report = sample_report(Ok(harness));
        report.harness_raw = Some(serde_json::from_str(HARNESS_FIXTURE).unwrap());
        let json = report.to_json();
        // Through text and back, as another run's tooling reads it.
        let json: Value =
            serde_json::from_str(&serde_json::to_string_pretty(&json).unwrap()).unwrap();
        assert_eq!(json["schema"], REPORT_SCHEMA);
        assert_eq!(json["date"], "1970-01-01T00:00:00Z");
        assert_eq!(json["git"]["commit"], "0123abcd");
        assert_eq!(json["git"]["dirty"], false);
        assert_eq!(json["envoy"]["version"], "1.40.0");
        assert_eq!(json["request_headers"][0], json!(["baggage", "userid=7"]));
        let configurations = json["configurations"].as_array().unwrap();
        assert_eq!(configurations.len(), 5);
        let label = &configurations[2];
        assert_eq!(label["name"], LABEL_ENRICH);
        assert_eq!(label["status"], "measured");
        for key in [
            "cpu_us_per_request",
            "cpu_added_us",
            "cpu_added_share",
            "requests_per_second",
            "errors",
            "rss_mib",
            "rss_added_over_no_filter_mib",
            "rss_added_over_wasm_noop_mib",
            "latency_p50_us",
            "latency_p99_us",
            "latency_p50_added_us",
            "latency_p99_added_us",
        ] {
            assert!(
                label["summary"][key].is_number(),
                "{key}: {}",
                label["summary"]
            );
        }
        assert_eq!(label["summary"]["cpu_added_us"], 4.0);
        assert_eq!(label["instructions"]["per_request"], 1800);
        assert_eq!(label["instructions"]["callbacks"]["proxy_on_log"], 100);
        let rounds = label["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 3);
        for key in [
            "round",
            "cpu_seconds",
            "requests",
            "duration_s",
            "cpu_us_per_request",
            "requests_per_second",
            "errors",
            "rss_kib",
        ] {
            assert!(rounds[0][key].is_number(), "{key}");
        }
        assert_eq!(rounds[1]["open_loop"]["p50_us"], 210.0);
        let eastwest = &configurations[4];
        assert_eq!(eastwest["status"], "not built");
        assert_eq!(eastwest["status_reason"], "dist/eastwest.wasm is missing");
        assert!(eastwest["summary"]["cpu_added_us"].is_null());
        let targets = json["targets"].as_array().unwrap();
        assert_eq!(targets.len(), TARGETS.len());
        assert!(targets.iter().any(|t| t["configuration"] == LABEL_ENRICH
            && t["figure"] == "cpu_added_us"
            && t["verdict"] == "met"
            && t["limit"] == 5.0));
        assert_eq!(json["harness"]["available"], true);
        assert_eq!(
            json["harness"]["report"]["modules"][0]["module"],
            "label-enrich"
        );
    }

    #[test]
    fn dates_and_versions() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(
            parse_envoy_version("\nenvoy  version: 6b9ed8e3/1.40.0/Clean/RELEASE/BoringSSL\n")
                .as_deref(),
            Some("1.40.0")
        );
        assert_eq!(parse_envoy_version("nothing here"), None);
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(18_342), "18,342");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
