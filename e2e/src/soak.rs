//! `cargo xtask soak`: the demo mesh ([`crate::demo`]: four services, each behind an Envoy
//! sidecar running `dist/eastwest.wasm` with label-enrich, telemetry and retry-budget, mTLS
//! between them) kept under a steady open-loop load for a long time, with payments failing for
//! `outage` every `outage_every`, so that every outage starts a retry storm that the callers'
//! retry budgets must hold.
//!
//! Every `sample_every` it records, per sidecar: the Envoy process's RSS (`VmRSS` of
//! `/proc/<pid>/status`), Envoy's own allocator figures (`server.memory_allocated`,
//! `server.memory_heap_size`), the Wasm VMs Envoy reports (`wasm.envoy.wasm.runtime.v8.active`:
//! Envoy exposes no per-VM memory figure, so the VMs' linear memory is only visible inside the
//! RSS), the `eastwest_*` series of `/stats/prometheus`, the retry budgets' shared-data keys and
//! decisions, and the router's attempts per destination cluster; and the driver's outcomes.
//!
//! Shared-data keys: proxy-wasm cannot list shared data, and Envoy keeps no statistic of it.
//! retry-budget keeps exactly one key per budget (`eastwest.retry_budget.v1/<mode>/<subject>`)
//! and defines that budget's `eastwest_retry_budget_admitted_total` series when it creates the
//! key, so the keys are counted as the distinct label sets of that metric per sidecar.
//!
//! It passes when ([`Verdict`]):
//! * no request failed outside an outage and its settling time (the outage explains every
//!   failure inside it: payments is required by checkout, which is required by frontend);
//! * each sidecar's RSS at the end is less than 2% above its RSS at 10% of the run (the slope
//!   per hour, by least squares over the same samples, is reported too);
//! * the number of `eastwest_*` series and of budget keys after the first outage never grows;
//! * the retry amplification of every caller → destination hop during each outage (the
//!   router's attempts over its original requests, from the caller's cluster counters) stays
//!   within the bound the budget's configuration allows ([`crate::retry_storm::Bound`], the
//!   derivation of docs/filters/retry-budget.md, with the demo's budgets and retry policy).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::client::{http_request_with, RequestOptions};
use crate::demo::driver::{Driver, DriverCounts};
use crate::demo::mesh::Mesh;
use crate::demo::metrics::parse_exposition;
use crate::demo::report::escape;
use crate::demo::{self, parse_duration, sidecar, signal, topology};
use crate::paths::workspace_root;
use crate::retry_storm::{Budget, Experiment};

/// The share of the run after which RSS must have settled (the issue's "first 10%").
pub const WARMUP_SHARE: f64 = 0.10;
/// Most RSS growth allowed after the warm-up, in percent.
pub const MAX_RSS_GROWTH_PERCENT: f64 = 2.0;
/// After an outage ends, how long the retries of the last failing requests take to land: the
/// amplification is measured up to this point.
const RETRY_SETTLE: Duration = Duration::from_secs(1);
/// After an outage ends, how long failures are still the outage's: requests that were in
/// flight when it ended (frontend retries checkout, which retries payments, each with back-off).
const FAILURE_GRACE: Duration = Duration::from_secs(3);

pub const USAGE: &str = "\
usage: eastwest-soak [--duration 1h] [--rate 40] [--outage-every 5m] [--outage 10s]
                     [--workers 2] [--sample-every 10s] [--out-dir DIR] [--service-binary PATH]

  --duration D       how long the load runs (default 1h; at least 1m)
  --rate N           requests per second to the frontend, open loop (default 40)
  --outage-every D   payments fails once per period, in the middle of it (default 5m, or a
                     third of the duration for runs shorter than 15m)
  --outage D         how long each outage lasts (default 10s)
  --workers N        Envoy worker threads per sidecar (--concurrency; default 2)
  --sample-every D   how often the sidecars are sampled (default 10s)
  --out-dir DIR      report.html, soak.json, summary.txt, certs/ and logs/ (default target/soak)
  --service-binary P the eastwest-demo-service binary (default: next to this one)
";

/// The soak's command line.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakOptions {
    pub duration: Duration,
    pub rate: f64,
    pub outage_every: Duration,
    pub outage: Duration,
    pub workers: u32,
    pub sample_every: Duration,
    pub out_dir: PathBuf,
    pub service_binary: PathBuf,
}

impl SoakOptions {
    /// The options, or `None` when help was asked for.
    pub fn parse_args(args: &[String]) -> Result<Option<SoakOptions>> {
        let mut options = SoakOptions {
            duration: Duration::from_secs(3600),
            rate: 40.0,
            outage_every: Duration::ZERO,
            outage: Duration::from_secs(10),
            workers: 2,
            sample_every: Duration::from_secs(10),
            out_dir: workspace_root().join("target/soak"),
            service_binary: std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.join("eastwest-demo-service")))
                .unwrap_or_else(|| PathBuf::from("eastwest-demo-service")),
        };
        let mut outage_every = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String> {
                match &inline {
                    Some(value) => Ok(value.clone()),
                    None => args
                        .next()
                        .cloned()
                        .with_context(|| format!("{flag} needs a value\n\n{USAGE}")),
                }
            };
            match flag {
                "-h" | "--help" => return Ok(None),
                "--duration" => options.duration = parse_duration(&value()?)?,
                "--rate" => {
                    options.rate = value()?
                        .parse()
                        .ok()
                        .filter(|rate: &f64| (1.0..=1000.0).contains(rate))
                        .context("--rate: requests per second, 1 to 1000")?
                }
                "--outage-every" => outage_every = Some(parse_duration(&value()?)?),
                "--outage" => options.outage = parse_duration(&value()?)?,
                "--workers" => {
                    options.workers = value()?
                        .parse()
                        .ok()
                        .filter(|workers| (1..=16).contains(workers))
                        .context("--workers: 1 to 16")?
                }
                "--sample-every" => options.sample_every = parse_duration(&value()?)?,
                "--out-dir" => options.out_dir = PathBuf::from(value()?),
                "--service-binary" => options.service_binary = PathBuf::from(value()?),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if options.duration < Duration::from_secs(60) {
            bail!("--duration must be at least 1m (a warm-up, outages and recoveries)");
        }
        options.outage_every =
            outage_every.unwrap_or(if options.duration >= Duration::from_secs(900) {
                Duration::from_secs(300)
            } else {
                options.duration / 3
            });
        if options.outage.is_zero() || options.outage + FAILURE_GRACE * 2 > options.outage_every {
            bail!(
                "--outage {:?} must be shorter than --outage-every {:?} minus {:?}",
                options.outage,
                options.outage_every,
                FAILURE_GRACE * 2
            );
        }
        if options.sample_every < Duration::from_secs(1) {
            bail!("--sample-every must be at least 1s");
        }
        Ok(Some(options))
    }

    /// When each outage starts: in the middle of each period that has room for it and its
    /// settling time before the end of the run.
    pub fn outage_starts(&self) -> Vec<Duration> {
        let mut starts = Vec::new();
        let mut period_start = Duration::ZERO;
        while period_start < self.duration {
            let start = period_start + self.outage_every / 2;
            if start + self.outage + FAILURE_GRACE * 2 <= self.duration {
                starts.push(start);
            }
            period_start += self.outage_every;
        }
        starts
    }
}

/// What one sidecar looked like at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SidecarSample {
    /// `VmRSS` of the Envoy process, bytes.
    pub rss_bytes: u64,
    /// `server.memory_allocated` and `server.memory_heap_size` (Envoy's allocator).
    pub memory_allocated: Option<u64>,
    pub memory_heap_size: Option<u64>,
    /// `wasm.envoy.wasm.runtime.v8.active`: live V8 VMs.
    pub wasm_vms: Option<u64>,
    /// Distinct `eastwest_*` series (a histogram counts once).
    pub series: BTreeSet<String>,
    /// Retry budgets, i.e. shared-data keys (see the module documentation).
    pub budget_keys: BTreeSet<String>,
    pub admitted: f64,
    pub denied: f64,
    /// Per outbound destination service: (`upstream_rq_total`, `upstream_rq_retry`).
    pub attempts: BTreeMap<String, (u64, u64)>,
}

/// Why a sample was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Regular,
    /// Just before an outage starts.
    OutageStart,
    /// `RETRY_SETTLE` after an outage ended: the end of the amplification window.
    RetriesSettled,
    /// `FAILURE_GRACE` after an outage ended: later failures are unexplained.
    GraceOver,
    /// After the traffic stopped and the driver drained.
    Final,
}

#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the traffic started.
    pub at: Duration,
    pub kind: SampleKind,
    pub driver: DriverCounts,
    /// In the order of [`Mesh::services`]; `None` where the sidecar did not answer.
    pub sidecars: Vec<Option<SidecarSample>>,
}

/// One caller → destination hop during one outage.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub caller: String,
    pub destination: String,
    /// Original requests (attempts − retries) and attempts of the caller's router.
    pub originals: u64,
    pub attempts: u64,
    /// What the budget's configuration allows (attempts per original).
    pub bound: f64,
}

impl Hop {
    pub fn amplification(&self) -> f64 {
        self.attempts as f64 / self.originals.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct Outage {
    pub start: Duration,
    pub end: Duration,
    /// Index of the samples that open and close its amplification window and its grace.
    pub start_sample: usize,
    pub settled_sample: usize,
    pub grace_sample: usize,
    /// The hops toward failing services (those whose callers retried), sorted.
    pub hops: Vec<Hop>,
}

/// A whole soak.
#[derive(Debug, Clone)]
pub struct SoakRecord {
    pub options: SoakOptions,
    pub names: Vec<String>,
    pub pids: Vec<u32>,
    pub samples: Vec<Sample>,
    pub outages: Vec<Outage>,
    pub elapsed: Duration,
    pub interrupted: bool,
}

/// One sidecar's memory over the run.
#[derive(Debug, Clone, PartialEq)]
pub struct RssTrend {
    pub name: String,
    pub first: u64,
    /// At the first sample at or after 10% of the run.
    pub baseline: u64,
    pub end: u64,
    pub growth_percent: f64,
    /// Least squares over the samples from the baseline on.
    pub slope_mib_per_hour: f64,
    pub slope_percent_per_hour: f64,
}

/// The pass/fail figures.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub explained_errors: u64,
    /// (interval start, end, failures) outside every outage and its grace.
    pub unexplained: Vec<(Duration, Duration, u64)>,
    pub rss: Vec<RssTrend>,
    /// Series and keys (summed over the sidecars) at the first outage's grace sample, the most
    /// after it, and the names that appeared after it.
    pub series_plateau: (usize, usize),
    pub keys_plateau: (usize, usize),
    pub new_series: Vec<String>,
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn request_options() -> RequestOptions {
    RequestOptions {
        timeout: Duration::from_secs(5),
        ..RequestOptions::default()
    }
}

/// `VmRSS` of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The destination service of an Istio-style outbound cluster name.
fn cluster_destination(cluster: &str) -> Option<&str> {
    let host = cluster.strip_prefix("outbound|80||")?;
    host.split('.').next()
}

fn sample_sidecar(pid: u32, admin_port: u16) -> Option<SidecarSample> {
    let options = request_options();
    let get = |path: &str| -> Option<String> {
        let url = format!("http://127.0.0.1:{admin_port}{path}");
        let response = http_request_with(&options, "GET", &url, &[], "").ok()?;
        (response.status == 200).then(|| response.text())
    };
    let stats = crate::envoy::parse_stats_json(&get("/stats?format=json")?).ok()?;
    let exposition = get("/stats/prometheus?filter=eastwest_")?;
    let mut sample = SidecarSample {
        rss_bytes: rss_bytes(pid)?,
        memory_allocated: stats.get("server.memory_allocated").copied(),
        memory_heap_size: stats.get("server.memory_heap_size").copied(),
        wasm_vms: stats.get("wasm.envoy.wasm.runtime.v8.active").copied(),
        ..SidecarSample::default()
    };
    for (name, value) in &stats {
        let Some(rest) = name.strip_prefix("cluster.") else {
            continue;
        };
        for (suffix, retry) in [(".upstream_rq_total", false), (".upstream_rq_retry", true)] {
            if let Some(destination) = rest.strip_suffix(suffix).and_then(cluster_destination) {
                let entry = sample.attempts.entry(destination.to_owned()).or_default();
                if retry {
                    entry.1 = *value;
                } else {
                    entry.0 = *value;
                }
            }
        }
    }
    for metric in parse_exposition(&exposition) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| metric.name.strip_suffix(suffix))
            .unwrap_or(&metric.name);
        let labels: Vec<String> = metric
            .labels
            .iter()
            .filter(|(key, _)| key.as_str() != "le")
            .map(|(key, value)| format!("{key}={value:?}"))
            .collect();
        let labels = labels.join(",");
        sample.series.insert(format!("{base}{{{labels}}}"));
        match metric.name.as_str() {
            "eastwest_retry_budget_admitted_total" => {
                sample.admitted += metric.value;
                sample.budget_keys.insert(labels);
            }
            "eastwest_retry_budget_denied_total" => sample.denied += metric.value,
            _ => {}
        }
    }
    Some(sample)
}

fn sample(mesh: &Mesh, at: Duration, kind: SampleKind, driver: DriverCounts) -> Sample {
    // Four sidecars at once: the window boundaries should be one instant, not four.
    let sidecars = std::thread::scope(|scope| {
        let handles: Vec<_> = mesh
            .services
            .iter()
            .map(|service| {
                let (pid, admin) = (service.sidecar.pid(), service.ports.admin);
                scope.spawn(move || sample_sidecar(pid, admin))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().ok().flatten())
            .collect()
    });
    Sample {
        at,
        kind,
        driver,
        sidecars,
    }
}

/// The demo's client-side budget toward `destination`: (ratio, min_retries_per_second, ttl).
fn budget_params(destination: &str) -> (f64, f64, f64) {
    let config = sidecar::client_budget();
    let field = |key: &str| {
        config
            .pointer(&format!("/destinations/{destination}/{key}"))
            .or_else(|| config.get(key))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    (
        field("ratio"),
        field("min_retries_per_second"),
        field("ttl_seconds"),
    )
}

/// `"0.025s"` → 25 ms.
fn protobuf_seconds(value: &Value) -> Option<Duration> {
    let seconds: f64 = value.as_str()?.strip_suffix('s')?.parse().ok()?;
    Some(Duration::from_secs_f64(seconds))
}

/// The bound [`crate::retry_storm::Bound`] puts on one hop's amplification over a window of
/// `window` with `originals` original requests, for the demo's retry policy and the budget
/// toward `destination` (`client-headers` mode, `workers` Envoy workers).
pub fn hop_bound(destination: &str, originals: u64, window: Duration, workers: u32) -> f64 {
    let (ratio, min_retries_per_second, ttl_seconds) = budget_params(destination);
    let policy = sidecar::retry_policy();
    let defaults = Experiment::default();
    let experiment = Experiment {
        rate: originals as f64 / window.as_secs_f64().max(1e-3),
        outage: window,
        ratio,
        min_retries_per_second,
        ttl_seconds,
        num_retries: policy["num_retries"]
            .as_u64()
            .map_or(defaults.num_retries, |n| n as u32),
        backoff_base: protobuf_seconds(&policy["retry_back_off"]["base_interval"])
            .unwrap_or(defaults.backoff_base),
        backoff_max: protobuf_seconds(&policy["retry_back_off"]["max_interval"])
            .unwrap_or(defaults.backoff_max),
        envoy_workers: workers,
        ..defaults
    };
    crate::retry_storm::Bound::new(&experiment)
        .allowed(Budget::ClientHeaders)
        .unwrap_or(f64::INFINITY)
}

/// The hops whose callers retried between two samples.
fn hops(names: &[String], before: &Sample, after: &Sample, workers: u32) -> Vec<Hop> {
    let window = after.at.saturating_sub(before.at);
    let mut hops = Vec::new();
    for (index, caller) in names.iter().enumerate() {
        let (Some(Some(start)), Some(Some(end))) =
            (before.sidecars.get(index), after.sidecars.get(index))
        else {
            continue;
        };
        for (destination, &(total, retries)) in &end.attempts {
            let (total_before, retries_before) =
                start.attempts.get(destination).copied().unwrap_or_default();
            let attempts = total.saturating_sub(total_before);
            let retried = retries.saturating_sub(retries_before);
            if attempts == 0 || destination == caller {
                continue;
            }
            let originals = attempts.saturating_sub(retried);
            hops.push(Hop {
                caller: caller.clone(),
                destination: destination.clone(),
                originals,
                attempts,
                bound: hop_bound(destination, originals, window, workers),
            });
        }
    }
    hops.retain(|hop| hop.attempts > hop.originals || hop.destination == topology::OUTAGE_SERVICE);
    hops
}

fn stamp(at: Duration) -> String {
    let seconds = at.as_secs();
    format!(
        "[{:>2}:{:02}:{:02}]",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_progress(record: &SoakRecord, phase: &str) {
    let Some(last) = record.samples.last() else {
        return;
    };
    let previous = record
        .samples
        .iter()
        .rev()
        .skip(1)
        .find(|sample| sample.kind == SampleKind::Regular || sample.at.is_zero());
    let recent = previous.map_or(last.driver, |p| last.driver.minus(&p.driver));
    let seconds = previous.map_or(1.0, |p| (last.at - p.at).as_secs_f64().max(1e-3));
    let rss: Vec<String> = record
        .names
        .iter()
        .zip(&last.sidecars)
        .map(|(name, sidecar)| match sidecar {
            Some(sidecar) => format!("{name} {:.1}", mib(sidecar.rss_bytes)),
            None => format!("{name} ?"),
        })
        .collect();
    let sum =
        |f: &dyn Fn(&SidecarSample) -> f64| -> f64 { last.sidecars.iter().flatten().map(f).sum() };
    println!(
        "{} {phase:<15} {:>7} requests {:>5} failed | {:>5.1} req/s | RSS MiB {} | series {:.0} keys {:.0} | retries admitted {:.0} denied {:.0}",
        stamp(last.at),
        last.driver.sent,
        last.driver.errors,
        recent.finished() as f64 / seconds,
        rss.join(", "),
        sum(&|s| s.series.len() as f64),
        sum(&|s| s.budget_keys.len() as f64),
        sum(&|s| s.admitted),
        sum(&|s| s.denied),
    );
}

/// Runs the soak; `signal::install()` must have been called. Returns the record; the caller
/// judges it with [`judge`].
pub fn run(options: &SoakOptions) -> Result<SoakRecord> {
    if !options.service_binary.is_file() {
        bail!(
            "{} not found; build it with `cargo build -p eastwest-e2e --bin eastwest-demo-service` \
             (`cargo xtask soak` does) or pass --service-binary",
            options.service_binary.display()
        );
    }
    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("cannot create {}", options.out_dir.display()))?;
    // Envoy runs in its own directory: the certificates' paths must be absolute.
    let out_dir = std::fs::canonicalize(&options.out_dir)
        .with_context(|| format!("cannot resolve {}", options.out_dir.display()))?;
    println!(
        "Starting 4 services and their Envoy sidecars (dist/eastwest.wasm: label-enrich, telemetry, \
         retry-budget; --concurrency {}) on 127.0.0.1 ...",
        options.workers
    );
    let mesh = Mesh::start_with_workers(&options.service_binary, &out_dir, options.workers)?;
    let names: Vec<String> = mesh
        .services
        .iter()
        .map(|s| s.spec.name.to_owned())
        .collect();
    let pids: Vec<u32> = mesh.services.iter().map(|s| s.sidecar.pid()).collect();
    for service in &mesh.services {
        println!(
            "  {:<9} sidecar pid {} admin :{} ({})",
            service.spec.name,
            service.sidecar.pid(),
            service.ports.admin,
            service.sidecar.run_dir().display()
        );
    }
    let result = drive(options, &mesh, names, pids);
    let processes = mesh.processes();
    drop(mesh);
    println!(
        "Stopped all {} processes of the mesh (pids {}).",
        processes.len(),
        processes
            .iter()
            .map(|(_, pid)| pid.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    result
}

fn drive(
    options: &SoakOptions,
    mesh: &Mesh,
    names: Vec<String>,
    pids: Vec<u32>,
) -> Result<SoakRecord> {
    demo::check_mesh(mesh)?;
    let entry = mesh.service(topology::ENTRY).context("no entry service")?;
    let starts = options.outage_starts();
    println!(
        "Driving {:.0} requests/s (open loop) to frontend for {}; payments fails for {} at {} \
         ({} outages); sampling every {}.\n",
        options.rate,
        crate::demo::summary::seconds(options.duration),
        crate::demo::summary::seconds(options.outage),
        starts
            .iter()
            .map(|start| stamp(*start))
            .collect::<Vec<_>>()
            .join(" "),
        starts.len(),
        crate::demo::summary::seconds(options.sample_every),
    );
    let mut record = SoakRecord {
        options: options.clone(),
        names,
        pids,
        samples: Vec::new(),
        outages: Vec::new(),
        elapsed: Duration::ZERO,
        interrupted: false,
    };
    let mut driver = Driver::start(
        &format!("http://127.0.0.1:{}/", entry.ports.app),
        options.rate,
    )?;
    let started = Instant::now();
    record.samples.push(sample(
        mesh,
        Duration::ZERO,
        SampleKind::Regular,
        driver.counts(),
    ));
    let mut next_regular = options.sample_every;
    let mut pending_starts = starts.into_iter().peekable();
    // The outage in progress: (its index in record.outages, when it ends).
    let mut current: Option<(usize, Duration)> = None;
    let mut settles: Vec<(usize, Duration)> = Vec::new();
    let mut graces: Vec<(usize, Duration)> = Vec::new();
    loop {
        if signal::interrupted() {
            record.interrupted = true;
            println!("\nCtrl-C: stopping the traffic and the mesh.");
            break;
        }
        let now = started.elapsed();
        if now >= options.duration {
            break;
        }
        if let Some((index, end)) = current {
            if now >= end {
                demo::set_outage(mesh, false)?;
                record.outages[index].end = started.elapsed();
                println!("{} payments recovered", stamp(started.elapsed()));
                settles.push((index, started.elapsed() + RETRY_SETTLE));
                graces.push((index, started.elapsed() + FAILURE_GRACE));
                current = None;
            }
        } else if pending_starts.peek().is_some_and(|start| now >= *start) {
            pending_starts.next();
            let index = record.outages.len();
            let at = started.elapsed();
            record
                .samples
                .push(sample(mesh, at, SampleKind::OutageStart, driver.counts()));
            demo::set_outage(mesh, true)?;
            let start = started.elapsed();
            println!(
                "{} payments starts failing (outage {} of {}): every request answered 503",
                stamp(start),
                index + 1,
                record.outages.len() + 1 + pending_starts.len()
            );
            record.outages.push(Outage {
                start,
                end: start,
                start_sample: record.samples.len() - 1,
                settled_sample: 0,
                grace_sample: 0,
                hops: Vec::new(),
            });
            current = Some((index, start + options.outage));
        }
        if let Some(position) = settles.iter().position(|(_, at)| now >= *at) {
            let (index, _) = settles.remove(position);
            let at = started.elapsed();
            record.samples.push(sample(
                mesh,
                at,
                SampleKind::RetriesSettled,
                driver.counts(),
            ));
            let outage = &mut record.outages[index];
            outage.settled_sample = record.samples.len() - 1;
            outage.hops = hops(
                &record.names,
                &record.samples[outage.start_sample],
                &record.samples[outage.settled_sample],
                options.workers,
            );
            for hop in &outage.hops {
                println!(
                    "{}   {} → {}: {} originals, {} attempts: amplification {:.2} (bound {:.2})",
                    stamp(at),
                    hop.caller,
                    hop.destination,
                    hop.originals,
                    hop.attempts,
                    hop.amplification(),
                    hop.bound
                );
            }
        }
        if let Some(position) = graces.iter().position(|(_, at)| now >= *at) {
            let (index, _) = graces.remove(position);
            let at = started.elapsed();
            record
                .samples
                .push(sample(mesh, at, SampleKind::GraceOver, driver.counts()));
            record.outages[index].grace_sample = record.samples.len() - 1;
        }
        if now >= next_regular {
            let at = started.elapsed();
            record
                .samples
                .push(sample(mesh, at, SampleKind::Regular, driver.counts()));
            let phase = if current.is_some() {
                "payments failing"
            } else if graces.is_empty() {
                "healthy"
            } else {
                "recovering"
            };
            print_progress(&record, phase);
            while next_regular <= started.elapsed() {
                next_regular += options.sample_every;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if current.is_some() {
        demo::set_outage(mesh, false)?;
    }
    record.elapsed = started.elapsed();
    let counts = driver.stop();
    record
        .samples
        .push(sample(mesh, started.elapsed(), SampleKind::Final, counts));
    // An outage cut short by Ctrl-C has no settle or grace sample: it is left out.
    record
        .outages
        .retain(|outage| outage.settled_sample > 0 && outage.grace_sample > 0);
    Ok(record)
}

/// Least squares slope of `points` (x, y); 0 with fewer than two distinct x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if variance <= 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

/// The RSS trend of sidecar `index` over the samples (`warmup_end`: the end of the warm-up).
pub fn rss_trend(record: &SoakRecord, index: usize) -> Option<RssTrend> {
    let warmup_end = record.elapsed.mul_f64(WARMUP_SHARE);
    let points: Vec<(Duration, u64)> = record
        .samples
        .iter()
        .filter(|sample| sample.kind != SampleKind::Final)
        .filter_map(|sample| Some((sample.at, sample.sidecars.get(index)?.as_ref()?.rss_bytes)))
        .collect();
    let first = points.first()?.1;
    let settled: Vec<(Duration, u64)> = points
        .iter()
        .copied()
        .filter(|(at, _)| *at >= warmup_end)
        .collect();
    let baseline = settled.first()?.1;
    let end = settled.last()?.1;
    let fit: Vec<(f64, f64)> = settled
        .iter()
        .map(|(at, rss)| (at.as_secs_f64() / 3600.0, mib(*rss)))
        .collect();
    let slope_mib_per_hour = slope(&fit);
    Some(RssTrend {
        name: record.names[index].clone(),
        first,
        baseline,
        end,
        growth_percent: (end as f64 - baseline as f64) / baseline as f64 * 100.0,
        slope_mib_per_hour,
        slope_percent_per_hour: slope_mib_per_hour / mib(baseline) * 100.0,
    })
}

/// Judges a run by the criteria of the module documentation.
pub fn judge(record: &SoakRecord) -> Verdict {
    let last = record.samples.last().map(|s| s.driver).unwrap_or_default();
    let mut failures = Vec::new();
    // Failures between two samples are explained when the interval lies within an outage
    // (from the sample before it starts to the end of its grace).
    let explained_ranges: Vec<(Duration, Duration)> = record
        .outages
        .iter()
        .map(|outage| {
            (
                record.samples[outage.start_sample].at,
                record.samples[outage.grace_sample].at,
            )
        })
        .collect();
    let mut ordered: Vec<&Sample> = record.samples.iter().collect();
    ordered.sort_by_key(|sample| sample.at);
    let (mut explained_errors, mut unexplained) = (0, Vec::new());
    for pair in ordered.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let errors = to.driver.errors.saturating_sub(from.driver.errors);
        if errors == 0 {
            continue;
        }
        if explained_ranges
            .iter()
            .any(|(start, end)| from.at >= *start && to.at <= *end)
        {
            explained_errors += errors;
        } else {
            unexplained.push((from.at, to.at, errors));
        }
    }
    if !unexplained.is_empty() {
        failures.push(format!(
            "{} requests failed outside the outages: {}",
            unexplained.iter().map(|u| u.2).sum::<u64>(),
            unexplained
                .iter()
                .map(|(from, to, n)| format!("{n} between {} and {}", stamp(*from), stamp(*to)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if last.sent == 0 || last.ok == 0 {
        failures.push("no request succeeded".into());
    }

    let rss: Vec<RssTrend> = (0..record.names.len())
        .filter_map(|index| rss_trend(record, index))
        .collect();
    if rss.len() != record.names.len() {
        failures.push("some sidecar's RSS could not be read".into());
    }
    for trend in &rss {
        if trend.growth_percent >= MAX_RSS_GROWTH_PERCENT {
            failures.push(format!(
                "{}'s RSS grew {:.2}% after the warm-up ({:.1} → {:.1} MiB; {:+.2} MiB/h)",
                trend.name,
                trend.growth_percent,
                mib(trend.baseline),
                mib(trend.end),
                trend.slope_mib_per_hour
            ));
        }
    }

    // The plateau: every series and key the mesh has once one outage (and its storm) is over.
    let totals = |sample: &Sample| -> (usize, usize) {
        let series = sample
            .sidecars
            .iter()
            .flatten()
            .map(|s| s.series.len())
            .sum();
        let keys = sample
            .sidecars
            .iter()
            .flatten()
            .map(|s| s.budget_keys.len())
            .sum();
        (series, keys)
    };
    let (mut series_plateau, mut keys_plateau, mut new_series) = ((0, 0), (0, 0), Vec::new());
    match record.outages.first() {
        None => failures.push("no outage completed: the plateau was never reached".into()),
        Some(first) => {
            let plateau_sample = &record.samples[first.grace_sample];
            let plateau = totals(plateau_sample);
            let later: Vec<&Sample> = record
                .samples
                .iter()
                .filter(|sample| {
                    sample.at > plateau_sample.at && sample.sidecars.iter().all(Option::is_some)
                })
                .collect();
            let most = later
                .iter()
                .map(|s| totals(s))
                .fold(plateau, |a, b| (a.0.max(b.0), a.1.max(b.1)));
            series_plateau = (plateau.0, most.0);
            keys_plateau = (plateau.1, most.1);
            if let Some(final_sample) = later.last() {
                for (index, sidecar) in final_sample.sidecars.iter().enumerate() {
                    let (Some(Some(at_plateau)), Some(now)) =
                        (plateau_sample.sidecars.get(index), sidecar)
                    else {
                        continue;
                    };
                    for series in now.series.difference(&at_plateau.series) {
                        new_series.push(format!("{}: {series}", record.names[index]));
                    }
                }
            }
            // A series for an outcome first seen later (a response code, a failure flag such as
            // UO when a circuit breaker trips in the third storm) is not growth of the
            // cardinality: what must not grow is the set of metrics per workload pair.
            let pairs = |sample: &Sample| -> usize {
                sample
                    .sidecars
                    .iter()
                    .flatten()
                    .map(|s| {
                        s.series
                            .iter()
                            .map(|series| without_outcome_labels(series))
                            .collect::<BTreeSet<String>>()
                            .len()
                    })
                    .sum()
            };
            let pairs_at_plateau = pairs(plateau_sample);
            let most_pairs = later
                .iter()
                .map(|s| pairs(s))
                .fold(pairs_at_plateau, usize::max);
            if most_pairs > pairs_at_plateau {
                failures.push(format!(
                    "eastwest series for new workload pairs after the first outage: {} → {} ({})",
                    pairs_at_plateau,
                    most_pairs,
                    new_series.join("; ")
                ));
            }
            if most.1 > plateau.1 {
                failures.push(format!(
                    "retry-budget keys grew after the first outage: {} → {}",
                    plateau.1, most.1
                ));
            }
        }
    }

    for (number, outage) in record.outages.iter().enumerate() {
        if !outage
            .hops
            .iter()
            .any(|hop| hop.destination == topology::OUTAGE_SERVICE)
        {
            failures.push(format!(
                "outage {}: no caller of {} was measured",
                number + 1,
                topology::OUTAGE_SERVICE
            ));
        }
        for hop in &outage.hops {
            if hop.amplification() > hop.bound {
                failures.push(format!(
                    "outage {} at {}: {} → {} amplification {:.3} above the bound {:.3} ({} attempts for {} originals)",
                    number + 1,
                    stamp(outage.start),
                    hop.caller,
                    hop.destination,
                    hop.amplification(),
                    hop.bound,
                    hop.attempts,
                    hop.originals
                ));
            }
        }
    }
    if record.interrupted {
        failures.push("interrupted before the end".into());
    }
    Verdict {
        sent: last.sent,
        ok: last.ok,
        errors: last.errors,
        explained_errors,
        unexplained,
        rss,
        series_plateau,
        keys_plateau,
        new_series,
        failures,
    }
}

/// The summary printed at the end and written to summary.txt.
pub fn summary_text(record: &SoakRecord, verdict: &Verdict) -> String {
    let mut text = String::new();
    let options = &record.options;
    let _ = writeln!(
        text,
        "Soak: {} of {:.0} requests/s to frontend, {} outages of payments ({} each, every {}), sidecars with {} workers",
        crate::demo::summary::seconds(record.elapsed),
        options.rate,
        record.outages.len(),
        crate::demo::summary::seconds(options.outage),
        crate::demo::summary::seconds(options.outage_every),
        options.workers
    );
    let _ = writeln!(
        text,
        "\nRequests: {} sent, {} succeeded, {} failed: {} during the outages (payments is required by \
         checkout, checkout by frontend; from the sample before each outage to {} s after it), {} outside them",
        verdict.sent,
        verdict.ok,
        verdict.errors,
        verdict.explained_errors,
        FAILURE_GRACE.as_secs(),
        verdict.unexplained.iter().map(|u| u.2).sum::<u64>()
    );
    let _ = writeln!(
        text,
        "\nEnvoy RSS per sidecar (VmRSS; baseline at {:.0}% of the run, must grow < {MAX_RSS_GROWTH_PERCENT}% after it):",
        WARMUP_SHARE * 100.0
    );
    for trend in &verdict.rss {
        let _ = writeln!(
            text,
            "  {:<9} start {:>6.1} MiB  baseline {:>6.1} MiB  end {:>6.1} MiB  growth {:+.2}%  slope {:+.2} MiB/h ({:+.2}%/h)",
            trend.name,
            mib(trend.first),
            mib(trend.baseline),
            mib(trend.end),
            trend.growth_percent,
            trend.slope_mib_per_hour,
            trend.slope_percent_per_hour
        );
    }
    if let Some(last) = record
        .samples
        .iter()
        .rev()
        .find(|s| s.sidecars.iter().all(Option::is_some))
    {
        let _ = writeln!(text, "\nAt the end, per sidecar (Envoy's allocator, Wasm VMs, series, budget keys, budget decisions):");
        for (name, sidecar) in record.names.iter().zip(&last.sidecars) {
            let Some(sidecar) = sidecar else { continue };
            let _ = writeln!(
                text,
                "  {:<9} allocated {:>6.1} MiB  heap {:>6.1} MiB  V8 VMs {}  series {:>3}  keys {}  admitted {:.0}  denied {:.0}",
                name,
                sidecar.memory_allocated.map_or(f64::NAN, mib),
                sidecar.memory_heap_size.map_or(f64::NAN, mib),
                sidecar.wasm_vms.map_or("?".to_owned(), |n| n.to_string()),
                sidecar.series.len(),
                sidecar.budget_keys.len(),
                sidecar.admitted,
                sidecar.denied
            );
        }
    }
    let _ = writeln!(
        text,
        "\nSeries (eastwest_*, all sidecars): {} after the first outage, at most {} after it; \
         retry-budget keys: {} after the first outage, at most {} after it",
        verdict.series_plateau.0,
        verdict.series_plateau.1,
        verdict.keys_plateau.0,
        verdict.keys_plateau.1
    );
    let _ = writeln!(
        text,
        "\nRetry amplification per outage (attempts / originals of each caller's router toward the \
         destination, from the outage's start to {} s after its end; bound: docs/filters/retry-budget.md, \
         computed by retry_storm::Bound for the demo's client-headers budgets):",
        RETRY_SETTLE.as_secs()
    );
    for (number, outage) in record.outages.iter().enumerate() {
        let hops: Vec<String> = outage
            .hops
            .iter()
            .map(|hop| {
                format!(
                    "{}→{} {:.2} ≤ {:.2} ({}/{})",
                    hop.caller,
                    hop.destination,
                    hop.amplification(),
                    hop.bound,
                    hop.attempts,
                    hop.originals
                )
            })
            .collect();
        let _ = writeln!(
            text,
            "  {:>2}. {} {}",
            number + 1,
            stamp(outage.start),
            hops.join("  ")
        );
    }
    if verdict.passed() {
        let _ = writeln!(text, "\nPASSED");
    } else {
        let _ = writeln!(text, "\nFAILED:");
        for failure in &verdict.failures {
            let _ = writeln!(text, "  - {failure}");
        }
    }
    text
}

/// soak.json: the samples (without the series names) and the outages.
pub fn record_json(record: &SoakRecord, verdict: &Verdict) -> Value {
    let samples: Vec<Value> = record
        .samples
        .iter()
        .map(|sample| {
            json!({
                "at_seconds": sample.at.as_secs_f64(),
                "kind": format!("{:?}", sample.kind),
                "sent": sample.driver.sent,
                "ok": sample.driver.ok,
                "errors": sample.driver.errors,
                "sidecars": record.names.iter().zip(&sample.sidecars).map(|(name, sidecar)| {
                    sidecar.as_ref().map(|s| json!({
                        "name": name,
                        "rss_bytes": s.rss_bytes,
                        "memory_allocated": s.memory_allocated,
                        "memory_heap_size": s.memory_heap_size,
                        "wasm_vms": s.wasm_vms,
                        "series": s.series.len(),
                        "budget_keys": s.budget_keys.len(),
                        "admitted": s.admitted,
                        "denied": s.denied,
                        "attempts": s.attempts,
                    }))
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let outages: Vec<Value> = record
        .outages
        .iter()
        .map(|outage| {
            json!({
                "start_seconds": outage.start.as_secs_f64(),
                "end_seconds": outage.end.as_secs_f64(),
                "hops": outage.hops.iter().map(|hop| json!({
                    "caller": hop.caller,
                    "destination": hop.destination,
                    "originals": hop.originals,
                    "attempts": hop.attempts,
                    "amplification": hop.amplification(),
                    "bound": hop.bound,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "duration_seconds": record.elapsed.as_secs_f64(),
        "rate": record.options.rate,
        "workers": record.options.workers,
        "sidecar_pids": record.pids,
        "passed": verdict.passed(),
        "failures": verdict.failures,
        "samples": samples,
        "outages": outages,
    })
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#8c564b",
];
const CHART_W: f64 = 1280.0;
const CHART_H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

/// How a series is drawn.
#[derive(Clone, Copy, PartialEq)]
enum Style {
    Line,
    Dots,
    /// Short horizontal ticks (a bound).
    Ticks,
}

/// A series of a chart: name, colour, style and (x seconds, y) points.
type Series<'a> = (String, &'a str, Style, Vec<(f64, f64)>);

struct Chart<'a> {
    title: &'a str,
    unit: &'a str,
    x_max: f64,
    /// Minutes on the x axis instead of seconds.
    minutes: bool,
    y_range: Option<(f64, f64)>,
    shades: &'a [(f64, f64)],
    /// A dashed vertical line (the end of the warm-up).
    marker: Option<(f64, &'a str)>,
}

fn nice_step(range: f64) -> f64 {
    let raw = (range / 5.0).max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// Labels that say how a request ended rather than who talked to whom.
const OUTCOME_LABELS: [&str; 4] = ["response_code", "grpc_status", "failure", "le"];

/// A series (`name{a="1",b="2"}`) without its outcome labels: the metric of one workload pair.
fn without_outcome_labels(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_string();
    };
    let labels = labels.trim_end_matches('}');
    let kept: Vec<&str> = labels
        .split("\",")
        .filter(|label| {
            let key = label.split('=').next().unwrap_or_default();
            !OUTCOME_LABELS.contains(&key)
        })
        .collect();
    format!("{name}{{{}}}", kept.join("\","))
}

fn chart_svg(chart: &Chart<'_>, series: &[Series<'_>]) -> String {
    let values = series.iter().flat_map(|s| s.3.iter().map(|p| p.1));
    let (y_min, y_max) = chart.y_range.unwrap_or_else(|| {
        let max = values.fold(0.0, f64::max);
        (0.0, if max <= 0.0 { 1.0 } else { max * 1.1 })
    });
    let y_step = nice_step(y_max - y_min);
    let y_lo = (y_min / y_step).floor() * y_step;
    let y_hi = ((y_max / y_step).ceil() * y_step).max(y_lo + y_step);
    let plot_w = CHART_W - LEFT - RIGHT;
    let plot_h = CHART_H - TOP - BOTTOM;
    let px = |x: f64| LEFT + plot_w * (x / chart.x_max.max(1e-9)).clamp(0.0, 1.0);
    let py = |y: f64| TOP + plot_h - plot_h * ((y - y_lo) / (y_hi - y_lo)).clamp(0.0, 1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{CHART_W}\" height=\"{CHART_H}\" viewBox=\"0 0 {CHART_W} {CHART_H}\">\n<text x=\"{LEFT}\" y=\"18\" font-size=\"14\" font-weight=\"600\">{}</text>\n",
        escape(chart.title)
    );
    for (start, end) in chart.shades {
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#fbe3e3\"/>",
            px(*start),
            (px(*end) - px(*start)).max(1.5)
        );
    }
    let mut y = y_lo;
    while y <= y_hi + y_step * 1e-6 {
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            LEFT + plot_w,
            py(y),
            py(y),
            LEFT - 5.0,
            py(y) + 4.0,
            if y_step < 1.0 { format!("{y:.2}") } else { format!("{y:.0}") }
        );
        y += y_step;
    }
    let x_unit = if chart.minutes { 60.0 } else { 1.0 };
    let x_step = nice_step(chart.x_max / x_unit) * x_unit;
    let mut x = 0.0;
    while x <= chart.x_max + 1e-9 {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#555\">{:.0}{}</text>",
            px(x),
            TOP + plot_h + 15.0,
            x / x_unit,
            if chart.minutes { " min" } else { " s" }
        );
        x += x_step;
    }
    if let Some((at, label)) = chart.marker {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{TOP}\" y2=\"{1:.1}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/><text x=\"{2:.1}\" y=\"{3:.1}\" font-size=\"11\" fill=\"#555\">{4}</text>",
            px(at),
            TOP + plot_h,
            px(at) + 4.0,
            TOP + 12.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{0:.1}\" font-size=\"11\" fill=\"#555\" transform=\"rotate(-90 14 {0:.1})\" text-anchor=\"middle\">{1}</text>",
        TOP + plot_h / 2.0,
        escape(chart.unit)
    );
    for (name, color, style, points) in series {
        match style {
            Style::Line => {
                let path: Vec<String> = points
                    .iter()
                    .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                    .collect();
                let _ = writeln!(
                    svg,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\"><title>{}</title></polyline>",
                    path.join(" "),
                    escape(name)
                );
            }
            Style::Dots => {
                for (x, y) in points {
                    let _ = writeln!(
                        svg,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{}: {y:.3}</title></circle>",
                        px(*x),
                        py(*y),
                        escape(name)
                    );
                }
            }
            Style::Ticks => {
                for (x, y) in points {
                    let _ = writeln!(
                        svg,
                        "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"{color}\" stroke-width=\"3\"><title>{3}: {y:.3}</title></line>",
                        px(*x) - 9.0,
                        px(*x) + 9.0,
                        py(*y),
                        escape(name)
                    );
                }
            }
        }
    }
    let mut lx = LEFT;
    let ly = CHART_H - 10.0;
    for (name, color, style, _) in series {
        let mark = match style {
            Style::Line => format!(
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"3\" fill=\"{color}\"/>",
                ly - 5.0
            ),
            Style::Dots => format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>",
                lx + 7.0,
                ly - 4.0
            ),
            Style::Ticks => format!(
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"3\" fill=\"{color}\"/>",
                ly - 5.0
            ),
        };
        let _ = writeln!(
            svg,
            "{mark}<text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"12\">{}</text>",
            lx + 18.0,
            escape(name)
        );
        lx += 30.0 + 7.0 * name.chars().count() as f64;
    }
    if !chart.shades.is_empty() {
        let _ = writeln!(
            svg,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#fbe3e3\" stroke=\"#e0b4b4\"/><text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"12\">payments outage</text>",
            ly - 10.0,
            lx + 16.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The self-contained report: RSS, rate and errors, budget decisions, series and keys, and
/// amplification per outage against its bound, over time.
pub fn report_html(record: &SoakRecord, verdict: &Verdict) -> String {
    let x_max = record.elapsed.as_secs_f64().max(1.0);
    let minutes = x_max >= 600.0;
    let shades: Vec<(f64, f64)> = record
        .outages
        .iter()
        .map(|o| (o.start.as_secs_f64(), o.end.as_secs_f64()))
        .collect();
    let warmup = x_max * WARMUP_SHARE;
    let chart = |title: &'static str, unit: &'static str, y_range: Option<(f64, f64)>| Chart {
        title,
        unit,
        x_max,
        minutes,
        y_range,
        shades: &shades,
        marker: Some((warmup, "end of warm-up (10%)")),
    };
    let mut ordered: Vec<&Sample> = record.samples.iter().collect();
    ordered.sort_by_key(|sample| sample.at);
    let per_sidecar = |f: &dyn Fn(&SidecarSample) -> Option<f64>| -> Vec<Series<'_>> {
        record
            .names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let points = ordered
                    .iter()
                    .filter_map(|s| {
                        Some((s.at.as_secs_f64(), f(s.sidecars.get(index)?.as_ref()?)?))
                    })
                    .collect();
                (
                    name.clone(),
                    COLORS[index % COLORS.len()],
                    Style::Line,
                    points,
                )
            })
            .collect()
    };
    let rss = per_sidecar(&|s| Some(mib(s.rss_bytes)));
    let rss_values: Vec<f64> = rss.iter().flat_map(|s| s.3.iter().map(|p| p.1)).collect();
    let rss_range = (
        rss_values.iter().copied().fold(f64::INFINITY, f64::min) * 0.97,
        rss_values.iter().copied().fold(0.0, f64::max) * 1.02,
    );
    let allocated = per_sidecar(&|s| s.memory_allocated.map(mib));

    // Rates per interval between consecutive samples.
    let mut ok_rate = Vec::new();
    let mut error_rate = Vec::new();
    let mut admitted_rate = Vec::new();
    let mut denied_rate = Vec::new();
    let mut series_count = Vec::new();
    let mut keys_count = Vec::new();
    for pair in ordered.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let seconds = (to.at - from.at).as_secs_f64();
        if seconds < 0.5 {
            continue;
        }
        // Steps: each rate holds over its interval.
        let (x0, x) = (from.at.as_secs_f64(), to.at.as_secs_f64());
        let step = |points: &mut Vec<(f64, f64)>, y: f64| points.extend([(x0, y), (x, y)]);
        let delta = to.driver.minus(&from.driver);
        step(&mut ok_rate, delta.ok as f64 / seconds);
        step(&mut error_rate, delta.errors as f64 / seconds);
        let total = |s: &Sample, f: &dyn Fn(&SidecarSample) -> f64| -> f64 {
            s.sidecars.iter().flatten().map(f).sum()
        };
        if from
            .sidecars
            .iter()
            .chain(&to.sidecars)
            .all(Option::is_some)
        {
            step(
                &mut admitted_rate,
                (total(to, &|s| s.admitted) - total(from, &|s| s.admitted)) / seconds,
            );
            step(
                &mut denied_rate,
                (total(to, &|s| s.denied) - total(from, &|s| s.denied)) / seconds,
            );
        }
    }
    for sample in &ordered {
        if sample.sidecars.iter().all(Option::is_some) {
            let x = sample.at.as_secs_f64();
            series_count.push((
                x,
                sample
                    .sidecars
                    .iter()
                    .flatten()
                    .map(|s| s.series.len() as f64)
                    .sum(),
            ));
            keys_count.push((
                x,
                sample
                    .sidecars
                    .iter()
                    .flatten()
                    .map(|s| s.budget_keys.len() as f64)
                    .sum(),
            ));
        }
    }
    let mut amplification: Vec<Series<'_>> = Vec::new();
    let hop_names: BTreeSet<(String, String)> = record
        .outages
        .iter()
        .flat_map(|o| {
            o.hops
                .iter()
                .map(|h| (h.caller.clone(), h.destination.clone()))
        })
        .collect();
    for (index, (caller, destination)) in hop_names.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let hop_points = |f: &dyn Fn(&Hop) -> f64| -> Vec<(f64, f64)> {
            record
                .outages
                .iter()
                .flat_map(|o| {
                    o.hops
                        .iter()
                        .filter(|h| &h.caller == caller && &h.destination == destination)
                        .map(|h| {
                            (
                                o.start.as_secs_f64()
                                    + o.end.saturating_sub(o.start).as_secs_f64() / 2.0,
                                f(h),
                            )
                        })
                })
                .collect()
        };
        amplification.push((
            format!("{caller}→{destination}"),
            color,
            Style::Dots,
            hop_points(&|h| h.amplification()),
        ));
        amplification.push((
            format!("bound {caller}→{destination}"),
            color,
            Style::Ticks,
            hop_points(&|h| h.bound),
        ));
    }

    let amplification_max = amplification
        .iter()
        .flat_map(|s| s.3.iter().map(|p| p.1))
        .fold(3.0, f64::max);
    let charts = [
        chart_svg(
            &chart("Envoy RSS per sidecar (VmRSS)", "MiB", Some(rss_range)),
            &rss,
        ),
        chart_svg(
            &chart(
                "Requests to frontend per second, by outcome",
                "requests/s",
                None,
            ),
            &[
                ("succeeded".to_owned(), "#2ca02c", Style::Line, ok_rate),
                ("failed".to_owned(), "#d62728", Style::Line, error_rate),
            ],
        ),
        chart_svg(
            &Chart {
                marker: None,
                ..chart(
                    "Retry amplification toward failing services during each outage, and its bound",
                    "attempts per original",
                    Some((1.0, amplification_max)),
                )
            },
            &amplification,
        ),
        chart_svg(
            &chart(
                "Retry-budget decisions per second (all sidecars)",
                "retries/s",
                None,
            ),
            &[
                ("admitted".to_owned(), "#1f77b4", Style::Line, admitted_rate),
                ("denied".to_owned(), "#d62728", Style::Line, denied_rate),
            ],
        ),
        chart_svg(
            &chart(
                "eastwest_* series and retry-budget shared-data keys (all sidecars)",
                "count",
                None,
            ),
            &[
                ("series".to_owned(), "#1f77b4", Style::Line, series_count),
                ("budget keys".to_owned(), "#ff7f0e", Style::Line, keys_count),
            ],
        ),
        chart_svg(
            &chart(
                "Envoy's allocator: server.memory_allocated per sidecar",
                "MiB",
                None,
            ),
            &allocated,
        ),
    ];
    let summary = summary_text(record, verdict);
    let status = if verdict.passed() {
        "<p style=\"color:#1a7f37;font-weight:600\">PASSED</p>"
    } else {
        "<p style=\"color:#b00;font-weight:600\">FAILED</p>"
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>eastwest soak</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1320px}}pre{{background:#f6f6f6;padding:12px;font-size:12px;white-space:pre-wrap}}svg{{display:block;margin:12px 0 22px}}</style>\
         </head><body><h1>eastwest soak</h1>{status}\n{}\n<pre>{}</pre></body></html>\n",
        charts.join("\n"),
        escape(&summary)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_outcome_of_a_known_pair_is_not_a_new_series_identity() {
        let seen = r#"eastwest_upstream_failures_total{destination_service="payments",failure="UF",reporter="source",source_service="inventory"}"#;
        let new_flag = r#"eastwest_upstream_failures_total{destination_service="payments",failure="UO",reporter="source",source_service="inventory"}"#;
        let new_pair = r#"eastwest_upstream_failures_total{destination_service="payments",failure="UF",reporter="source",source_service="frontend"}"#;
        assert_eq!(
            without_outcome_labels(seen),
            without_outcome_labels(new_flag)
        );
        assert_ne!(
            without_outcome_labels(seen),
            without_outcome_labels(new_pair)
        );
        let code = r#"eastwest_requests_total{destination_service="a",response_code="503",source_service="b"}"#;
        assert_eq!(
            without_outcome_labels(code),
            r#"eastwest_requests_total{destination_service="a",source_service="b"}"#
        );
    }

    fn parse(args: &[&str]) -> Result<Option<SoakOptions>> {
        SoakOptions::parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_default_to_an_hour_with_an_outage_every_five_minutes() {
        let options = parse(&[]).unwrap().unwrap();
        assert_eq!(options.duration, Duration::from_secs(3600));
        assert_eq!(options.outage_every, Duration::from_secs(300));
        assert_eq!(options.workers, 2);
        assert_eq!(options.outage_starts().len(), 12);
        assert_eq!(options.outage_starts()[0], Duration::from_secs(150));
        let short = parse(&["--duration", "2m"]).unwrap().unwrap();
        assert_eq!(short.outage_every, Duration::from_secs(40));
        assert_eq!(
            short.outage_starts(),
            [20, 60, 100].map(Duration::from_secs).to_vec()
        );
        assert!(parse(&["--duration", "30s"]).is_err());
        assert!(parse(&["--outage", "60s", "--outage-every", "1m"]).is_err());
        assert!(parse(&["--workers", "0"]).is_err());
        assert_eq!(parse(&["--help"]).unwrap(), None);
    }

    #[test]
    fn the_bound_of_a_hop_follows_the_budget_toward_its_destination() {
        // payments has the tighter budget (ratio 0.1, 5 retries/s): a smaller bound than
        // checkout's (0.2, 10/s) for the same traffic, and both far below no budget's 3.
        let payments = hop_bound("payments", 400, Duration::from_secs(11), 2);
        let checkout = hop_bound("checkout", 400, Duration::from_secs(11), 2);
        assert!(
            1.0 < payments && payments < checkout && checkout < 3.0,
            "{payments} {checkout}"
        );
    }

    #[test]
    fn the_slope_is_the_least_squares_fit() {
        let points = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)];
        assert!((slope(&points) - 2.0).abs() < 1e-12);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
        assert_eq!(
            cluster_destination("outbound|80||payments.shop.svc.cluster.local"),
            Some("payments")
        );
        assert_eq!(cluster_destination("inbound|1234||"), None);
    }
}
