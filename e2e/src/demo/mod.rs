//! `cargo xtask demo`: a small east-west mesh of a shop on 127.0.0.1, driven with traffic, with
//! an outage injected partway through, summarised from the sidecars' metrics.
//!
//! Four services ([`topology::SERVICES`]: frontend → checkout → payments and inventory, and an
//! unexpected inventory → payments) run as `eastwest-demo-service` processes, each behind its
//! own Envoy sidecar ([`sidecar`]) running `dist/eastwest.wasm` (label-enrich, telemetry and
//! retry-budget in one module), mTLS with SPIFFE identities between the sidecars. The traffic driver ([`driver`]) calls the frontend
//! service directly, at a fixed rate, as the shop's edge would; from a third to two thirds of
//! the run payments answers every request 503, its callers' sidecars retry, and the retry
//! budget holds the storm. The summary ([`summary`]) and the HTML report ([`report`]) are
//! computed from the `eastwest_*` metrics of the sidecars' `/stats/prometheus`. Every process
//! is stopped by pid on every exit path, Ctrl-C included ([`signal`], [`mesh`]).

pub mod driver;
pub mod fragments;
pub mod mesh;
pub mod metrics;
pub mod record;
pub mod report;
pub mod service;
pub mod sidecar;
pub mod signal;
pub mod summary;
pub mod topology;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{http_request_with, RequestOptions};
use crate::paths::workspace_root;
use driver::Driver;
use mesh::Mesh;
use metrics::{parse_exposition, Snapshot};
use record::{RunRecord, Sample};

/// How often the demo scrapes the sidecars (the report's time resolution).
const SAMPLE_EVERY: Duration = Duration::from_millis(2500);
/// How often it prints a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The demo's command line.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// How long the traffic runs.
    pub duration: Duration,
    /// Requests per second to the frontend.
    pub rate: f64,
    /// Leave the mesh up after the traffic, until Ctrl-C.
    pub keep_running: bool,
    /// Where the report, certificates and logs go.
    pub out_dir: PathBuf,
    /// The `eastwest-demo-service` binary.
    pub service_binary: PathBuf,
}

pub const USAGE: &str = "\
usage: eastwest-demo [--duration 60s] [--rate 50] [--keep-running] [--out-dir DIR]
                     [--service-binary PATH]

  --duration D        how long the traffic runs (e.g. 60s, 2m, 90); default 60s, at least 6s.
                      payments fails from a third to two thirds of it.
  --rate N            requests per second to the frontend (default 50)
  --keep-running      leave the mesh up after the traffic and print the addresses to curl and
                      the Envoy admin endpoints to scrape; Ctrl-C stops it
  --out-dir DIR       report.html, certs/ and logs/ go here (default target/demo)
  --service-binary P  the eastwest-demo-service binary (default: next to this one)
";

/// Parses `60s`, `2m`, `1m30s`, `500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    let mut parsed_any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number
            .parse()
            .ok()
            .with_context(|| format!("{text:?} is not a duration (e.g. 60s, 2m, 1m30s)"))?;
        number.clear();
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => bail!("{text:?} is not a duration (e.g. 60s, 2m, 1m30s)"),
            }
        };
        total += Duration::from_secs_f64(value * unit);
        parsed_any = true;
    }
    if !number.is_empty() || !parsed_any {
        bail!("{text:?} is not a duration (e.g. 60s, 2m, 1m30s)");
    }
    Ok(total)
}

impl DemoOptions {
    /// The options, or `None` when help was asked for.
    pub fn parse_args(args: &[String]) -> Result<Option<DemoOptions>> {
        let mut options = DemoOptions {
            duration: Duration::from_secs(60),
            rate: 50.0,
            keep_running: false,
            out_dir: workspace_root().join("target/demo"),
            service_binary: default_service_binary(),
        };
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
                        .filter(|rate: &f64| (0.5..=2000.0).contains(rate))
                        .context("--rate: a number of requests per second, 0.5 to 2000")?
                }
                "--keep-running" => options.keep_running = true,
                "--out-dir" => options.out_dir = PathBuf::from(value()?),
                "--service-binary" => options.service_binary = PathBuf::from(value()?),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if options.duration < Duration::from_secs(6) {
            bail!(
                "--duration {:?} is too short: the outage needs a before, a during and an after \
                 (at least 6s)",
                options.duration
            );
        }
        Ok(Some(options))
    }
}

fn default_service_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("eastwest-demo-service")))
        .unwrap_or_else(|| PathBuf::from("eastwest-demo-service"))
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Ctrl-C or SIGTERM during the traffic.
    Interrupted,
}

fn stamp(elapsed: Duration) -> String {
    format!("[{:>5.1}s]", elapsed.as_secs_f64())
}

/// Scrapes every sidecar; None when none answered.
fn scrape(mesh: &Mesh) -> Option<Snapshot> {
    let options = RequestOptions {
        timeout: Duration::from_secs(3),
        ..RequestOptions::default()
    };
    let mut samples = Vec::new();
    let mut answered = 0;
    for service in &mesh.services {
        let url = format!(
            "http://127.0.0.1:{}/stats/prometheus?filter=eastwest_",
            service.ports.admin
        );
        if let Ok(response) = http_request_with(&options, "GET", &url, &[], "") {
            if response.status == 200 {
                answered += 1;
                samples.extend(parse_exposition(&response.text()));
            }
        }
    }
    (answered > 0).then(|| Snapshot::from_samples(&samples))
}

fn print_mesh(mesh: &Mesh, took: Duration) {
    println!(
        "Mesh up in {:.1} s: namespace {}, environment {}, mTLS with SPIFFE identities \
         (spiffe://{}/ns/{}/sa/<service>) between the sidecars",
        took.as_secs_f64(),
        topology::NAMESPACE,
        topology::ENVIRONMENT,
        topology::TRUST_DOMAIN,
        topology::NAMESPACE
    );
    for service in &mesh.services {
        let spec = service.spec;
        println!(
            "  {:<9} team {:<8} {:<8} {:<9}  service :{} (pid {})  sidecar (pid {}): inbound :{} outbound :{} admin :{}",
            spec.name,
            spec.team,
            spec.criticality,
            spec.region,
            service.ports.app,
            service.app.pid(),
            service.sidecar.pid(),
            service.ports.inbound,
            service.ports.outbound,
            service.ports.admin,
        );
    }
}

/// One request through the whole mesh, retried until it answers 200 (the sidecars are ready
/// before their first request, but a fresh connection pool can be slow on a busy machine).
pub fn check_mesh(mesh: &Mesh) -> Result<()> {
    let entry = mesh.service(topology::ENTRY).context("no entry service")?;
    let url = format!("http://127.0.0.1:{}/", entry.ports.app);
    let deadline = Instant::now() + Duration::from_secs(20);
    let options = RequestOptions {
        timeout: Duration::from_secs(5),
        ..RequestOptions::default()
    };
    loop {
        let last = match http_request_with(&options, "GET", &url, &[], "") {
            Ok(response) if response.status == 200 => {
                println!(
                    "Mesh check: GET {url} answered 200 through frontend → checkout → payments, inventory"
                );
                return Ok(());
            }
            Ok(response) => format!("status {}: {}", response.status, response.text()),
            Err(error) => format!("{error:#}"),
        };
        if signal::interrupted() {
            bail!("interrupted before the traffic started");
        }
        if Instant::now() > deadline {
            bail!(
                "the mesh does not answer: GET {url}: {last}\nservice logs and access logs: {}",
                mesh.log_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Starts (`on`) or ends the outage of [`topology::OUTAGE_SERVICE`].
pub fn set_outage(mesh: &Mesh, on: bool) -> Result<()> {
    let service = mesh
        .service(topology::OUTAGE_SERVICE)
        .context("no outage service")?;
    let url = format!(
        "http://127.0.0.1:{}/demo/outage?on={}",
        service.ports.app,
        u8::from(on)
    );
    let response = http_request_with(&RequestOptions::default(), "POST", &url, &[], "")?;
    if response.status != 200 {
        bail!("POST {url}: status {}", response.status);
    }
    Ok(())
}

fn phase(outage_start: Option<Duration>, outage_end: Option<Duration>) -> String {
    match (outage_start, outage_end) {
        (Some(_), Some(_)) => "recovered".to_owned(),
        (Some(_), None) => format!("{} failing", topology::OUTAGE_SERVICE),
        _ => "warm-up".to_owned(),
    }
}

/// Runs the demo; `signal::install()` must have been called.
pub fn run(options: &DemoOptions) -> Result<Outcome> {
    if !options.service_binary.is_file() {
        bail!(
            "{} not found; build it with `cargo build -p eastwest-e2e --bin eastwest-demo-service` \
             (`cargo xtask demo` does) or pass --service-binary",
            options.service_binary.display()
        );
    }
    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("cannot create {}", options.out_dir.display()))?;
    println!(
        "Starting 4 services and their Envoy sidecars (dist/eastwest.wasm: label-enrich, telemetry, retry-budget) on 127.0.0.1 ..."
    );
    let started = Instant::now();
    let mesh = Mesh::start(&options.service_binary, &options.out_dir)?;
    print_mesh(&mesh, started.elapsed());
    let processes = mesh.processes();
    let result = drive(options, &mesh);
    let record = match result {
        Ok(record) => record,
        Err(error) => {
            stop_mesh(mesh, &processes);
            return Err(error);
        }
    };
    let interrupted = record.interrupted;
    if !options.keep_running || interrupted {
        stop_mesh(mesh, &processes);
        print_results(options, &record)?;
    } else {
        print_results(options, &record)?;
        print_addresses(&mesh);
        while signal::sleep(Duration::from_secs(1)) {}
        println!("\nCtrl-C: stopping the mesh.");
        stop_mesh(mesh, &processes);
    }
    Ok(if interrupted {
        Outcome::Interrupted
    } else {
        Outcome::Completed
    })
}

fn stop_mesh(mesh: Mesh, processes: &[(String, u32)]) {
    drop(mesh);
    let pids: Vec<String> = processes.iter().map(|(_, pid)| pid.to_string()).collect();
    println!(
        "Stopped all {} processes of the mesh (pids {}).",
        processes.len(),
        pids.join(" ")
    );
}

fn print_results(options: &DemoOptions, record: &RunRecord) -> Result<()> {
    println!("\n{}", summary::summary_text(record));
    let report = options.out_dir.join("report.html");
    std::fs::write(&report, report::report_html(record))
        .with_context(|| format!("cannot write {}", report.display()))?;
    let shown = std::fs::canonicalize(&report).unwrap_or(report);
    println!("Report: {}", shown.display());
    Ok(())
}

fn print_addresses(mesh: &Mesh) {
    let port = |name: &str| mesh.service(name).map(|s| s.ports);
    let (Some(frontend), Some(checkout), Some(payments)) =
        (port("frontend"), port("checkout"), port("payments"))
    else {
        return;
    };
    let checkout_cert = &mesh.service("checkout").expect("checkout").cert;
    println!("\nThe mesh keeps running; Ctrl-C stops it. Try:");
    println!(
        "  curl -s http://127.0.0.1:{}/                    # the shop's entry: frontend → checkout → payments, inventory",
        frontend.app
    );
    println!(
        "  curl -s -H 'Host: payments' http://127.0.0.1:{}/pay   # a call as checkout makes it, through its sidecar",
        checkout.outbound
    );
    println!(
        "  curl -s --cacert {} --cert {} --key {} https://localhost:{}/pay   # payments' sidecar with checkout's certificate (mTLS)",
        checkout_cert.ca_path.display(),
        checkout_cert.cert_path.display(),
        checkout_cert.key_path.display(),
        payments.inbound
    );
    println!(
        "  curl -s -X POST 'http://127.0.0.1:{}/demo/outage?on=1'   # payments fails again (on=0 ends it)",
        payments.app
    );
    println!("Metrics (Prometheus text) of each sidecar:");
    for service in &mesh.services {
        println!(
            "  {:<9} http://127.0.0.1:{}/stats/prometheus",
            service.spec.name, service.ports.admin
        );
    }
    println!(
        "Access logs with both ends' labels: {}/<service>-inbound.log and -outbound.log",
        mesh.log_dir.display()
    );
}

/// The traffic phase: drive, inject the outage, sample and print progress.
fn drive(options: &DemoOptions, mesh: &Mesh) -> Result<RunRecord> {
    if signal::interrupted() {
        bail!("interrupted while the mesh started");
    }
    check_mesh(mesh)?;
    let entry = mesh.service(topology::ENTRY).context("no entry service")?;
    let outage_at = options.duration / 3;
    let recover_at = options.duration * 2 / 3;
    println!(
        "Driving {:.0} requests/s to frontend for {}; {} will fail from {} to {}.\n",
        options.rate,
        summary::seconds(options.duration),
        topology::OUTAGE_SERVICE,
        summary::seconds(outage_at),
        summary::seconds(recover_at)
    );
    let mut driver = Driver::start(
        &format!("http://127.0.0.1:{}/", entry.ports.app),
        options.rate,
    )?;
    let start = Instant::now();
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        driver: driver.counts(),
        mesh: scrape(mesh),
    }];
    let (mut outage_start, mut outage_end) = (None, None);
    let mut next_sample = SAMPLE_EVERY;
    let mut next_progress = PROGRESS_EVERY;
    let mut last_progress = samples[0].clone();
    let mut interrupted = false;
    loop {
        if signal::interrupted() {
            interrupted = true;
            println!("\nCtrl-C: stopping the traffic and the mesh.");
            break;
        }
        let elapsed = start.elapsed();
        if elapsed >= options.duration {
            break;
        }
        if elapsed >= next_sample {
            let sample = Sample {
                at: elapsed,
                driver: driver.counts(),
                mesh: scrape(mesh),
            };
            if elapsed >= next_progress {
                print_progress(&sample, &last_progress, &phase(outage_start, outage_end));
                last_progress = sample.clone();
                while next_progress <= elapsed {
                    next_progress += PROGRESS_EVERY;
                }
            }
            samples.push(sample);
            while next_sample <= elapsed {
                next_sample += SAMPLE_EVERY;
            }
        }
        let toggle = if outage_start.is_none() && elapsed >= outage_at {
            Some(true)
        } else if outage_start.is_some() && outage_end.is_none() && elapsed >= recover_at {
            Some(false)
        } else {
            None
        };
        if let Some(on) = toggle {
            set_outage(mesh, on)?;
            // A sample at each phase boundary, so the summary's phases are exact.
            samples.push(Sample {
                at: elapsed,
                driver: driver.counts(),
                mesh: scrape(mesh),
            });
            if on {
                outage_start = Some(elapsed);
                println!(
                    "{} {} starts failing: every request answered 503 (outage injected)",
                    stamp(elapsed),
                    topology::OUTAGE_SERVICE
                );
            } else {
                outage_end = Some(elapsed);
                println!("{} {} recovered", stamp(elapsed), topology::OUTAGE_SERVICE);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = start.elapsed().min(options.duration.max(start.elapsed()));
    if outage_start.is_some() && outage_end.is_none() && !interrupted {
        set_outage(mesh, false)?;
        outage_end = Some(elapsed);
    }
    let driver_counts = driver.stop();
    if !interrupted {
        println!(
            "{} traffic done; reading the sidecars' metrics",
            stamp(elapsed)
        );
        // Histograms reach /stats/prometheus at the next stats flush (every second).
        signal::sleep(Duration::from_millis(1500));
    }
    let last_mesh = scrape(mesh)
        .or_else(|| samples.iter().rev().find_map(|s| s.mesh.clone()))
        .unwrap_or_default();
    samples.push(Sample {
        at: elapsed,
        driver: driver_counts,
        mesh: Some(last_mesh.clone()),
    });
    Ok(RunRecord {
        planned: options.duration,
        elapsed,
        rate: options.rate,
        outage_start,
        outage_end,
        samples,
        mesh: last_mesh,
        driver: driver_counts,
        driver_p95_ms: driver.latency_ms(0.95),
        driver_p99_ms: driver.latency_ms(0.99),
        interrupted,
    })
}

fn print_progress(sample: &Sample, previous: &Sample, phase: &str) {
    let counts = sample.driver;
    let recent = counts.minus(&previous.driver);
    let seconds = (sample.at - previous.at).as_secs_f64().max(1e-3);
    let budget = sample
        .mesh
        .as_ref()
        .map(|mesh| mesh.budget_totals())
        .unwrap_or_default();
    println!(
        "{} {:<16} {:>6} requests {:>5} failed ({:>5.1}%) | last {:.0} s: {:>5.1} req/s, {:>5.1}% failed | retries admitted {:.0}, denied {:.0}",
        stamp(sample.at),
        phase,
        counts.sent,
        counts.errors,
        counts.error_ratio() * 100.0,
        seconds,
        recent.finished() as f64 / seconds,
        recent.error_ratio() * 100.0,
        budget.admitted,
        budget.denied,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_the_usual_forms() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        for bad in ["", "s", "10x", "1m30", "-5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_have_defaults_and_refuse_nonsense() {
        let parse = |args: &[&str]| {
            DemoOptions::parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        };
        let defaults = parse(&[]).unwrap().unwrap();
        assert_eq!(defaults.duration, Duration::from_secs(60));
        assert_eq!(defaults.rate, 50.0);
        assert!(!defaults.keep_running);
        assert!(defaults.out_dir.ends_with("target/demo"));
        let options = parse(&["--duration", "20s", "--keep-running", "--rate=10"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (options.duration, options.keep_running, options.rate),
            (Duration::from_secs(20), true, 10.0)
        );
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--duration", "2s"]).is_err());
        assert!(parse(&["--rate", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--duration"]).is_err());
    }
}
