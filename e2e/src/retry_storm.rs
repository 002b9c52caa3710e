//! The retry-storm experiment (docs/filters/retry-budget.md, "The retry-storm experiment"):
//! how much a callee's outage is amplified by its callers' retries, without a retry budget,
//! with Envoy's own `retry_budget` circuit breaker, and with eastwest's retry-budget filter in
//! each of its three modes.
//!
//! ```text
//! load generator --(open loop, `rate`/s)--> caller sidecar --> callee sidecar --> TestApp
//!                                           (outbound, 2 workers,  (inbound, 2 workers)
//!                                            retries 2 on 5xx)
//! ```
//!
//! Each run: `warmup` of healthy traffic (at least one budget window, so the budget starts
//! full as in a steady state), then `outage` during which the app answers every request 503
//! at once ([`TestApp::set_outage`]), then `after` of healthy traffic again. The load is the
//! same in every run: `rate` original requests per second on a fixed schedule
//! ([`LoadPlan::rate`]), so the originals per second do not drop when retries slow the
//! responses down. What a run measures, over the outage:
//!
//! * originals: requests the load generator started during the outage (its own records);
//! * app requests: attempts that reached the app (its `requests_seen`, read as the outage
//!   starts and as it ends);
//! * amplification = app requests / originals (3 when every failed original is retried twice);
//! * retries admitted / wanted: the retries that reached the app (app requests − originals)
//!   out of the 2 × originals the router would have made (every original fails during the
//!   outage);
//! * denials: `eastwest_retry_budget_denied_total` (from `/stats/prometheus` of the sidecar
//!   running the filter) or, for Envoy's budget, `upstream_rq_retry_overflow`; one denial
//!   ends the retries of one request;
//! * Envoy's own counters on both sidecars ([`EnvoyCounts`]), as a cross-check;
//! * recovery: from the end of the outage until the success ratio over a rolling
//!   `recovery_window` of responses (by completion time) is back at `recovery_success` and
//!   stays there ([`recovery_time`]).
//!
//! [`Bound`] is what the budget's configuration allows; see its documentation for the
//! derivation.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::app::TestApp;
use crate::bootstrap::{
    bootstrap, feature_filter, ClusterBuilder, ListenerBuilder, Node, TrafficDirection,
};
use crate::client::http_request;
use crate::envoy::{Envoy, EnvoyOptions};
use crate::load::{self, LoadPlan, LoadReport, RequestRecord};
use crate::module_under_test::{Feature, ModuleUnderTest};
use crate::paths::free_port;

/// What limits the caller's retries in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Only the retry policy (2 retries per request); Envoy's `max_retries` circuit breaker is
    /// lifted as Istio does, so nothing else limits retries.
    None,
    /// Envoy's `circuit_breakers.thresholds[0].retry_budget` on the caller's cluster.
    EnvoyNative,
    /// eastwest `client`: an upstream HTTP filter of the caller's cluster to the callee.
    Client,
    /// eastwest `client-headers`: an HTTP filter on the caller's outbound listener.
    ClientHeaders,
    /// eastwest `server`: an HTTP filter on the callee's inbound listener; the caller has no
    /// budget.
    Server,
}

impl Budget {
    /// Every run of the experiment, in the order it runs them.
    pub const ALL: [Budget; 5] = [
        Budget::None,
        Budget::EnvoyNative,
        Budget::Client,
        Budget::ClientHeaders,
        Budget::Server,
    ];

    /// The row name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Budget::None => "no budget",
            Budget::EnvoyNative => "envoy retry_budget",
            Budget::Client => "eastwest client",
            Budget::ClientHeaders => "eastwest client-headers",
            Budget::Server => "eastwest server",
        }
    }

    /// The filter's `mode`, for the eastwest runs.
    pub fn eastwest_mode(self) -> Option<&'static str> {
        match self {
            Budget::Client => Some("client"),
            Budget::ClientHeaders => Some("client-headers"),
            Budget::Server => Some("server"),
            Budget::None | Budget::EnvoyNative => None,
        }
    }
}

/// The experiment's parameters. [`Experiment::default`] is what `cargo xtask retry-storm` and
/// the test run.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Original requests per second (open loop).
    pub rate: f64,
    /// Healthy traffic before the outage (at least `ttl_seconds`, so the budget window is full).
    pub warmup: Duration,
    pub outage: Duration,
    /// Healthy traffic after the outage.
    pub after: Duration,
    /// The eastwest budget (`ratio`, `min_retries_per_second`, `ttl_seconds`).
    pub ratio: f64,
    pub min_retries_per_second: f64,
    pub ttl_seconds: f64,
    /// The caller's retry policy: `num_retries` on `5xx,reset,connect-failure` with Envoy's
    /// jittered exponential back-off.
    pub num_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Envoy's `retry_budget`: `budget_percent` and `min_retry_concurrency`.
    pub native_budget_percent: f64,
    pub native_min_retry_concurrency: u32,
    /// Recovery: the rolling window and the success ratio it must reach.
    pub recovery_window: Duration,
    pub recovery_success: f64,
    /// Envoy worker threads of each sidecar.
    pub envoy_workers: u32,
    /// The module that runs eastwest's budget: dist/retry-budget.wasm, or dist/eastwest.wasm
    /// with only its `retry_budget` section.
    pub module: ModuleUnderTest,
}

impl Default for Experiment {
    fn default() -> Experiment {
        Experiment {
            rate: 200.0,
            warmup: Duration::from_secs(2),
            outage: Duration::from_secs(4),
            after: Duration::from_secs(2),
            ratio: 0.2,
            min_retries_per_second: 2.0,
            ttl_seconds: 2.0,
            num_retries: 2,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            native_budget_percent: 20.0,
            native_min_retry_concurrency: 3,
            recovery_window: Duration::from_millis(200),
            recovery_success: 0.99,
            envoy_workers: 2,
            module: ModuleUnderTest::Separate,
        }
    }
}

/// Slots per budget window, as the filter cuts it (`filters/retry-budget/src/window.rs`).
pub const BUDGET_SLOTS: u64 = 10;

/// The attempts during the outage that the budget's configuration allows, as an amplification
/// (attempts per original request).
///
/// The filter guarantees, for every window of `BUDGET_SLOTS` consecutive slots of
/// `ttl / BUDGET_SLOTS`: retries admitted ≤ `ratio` × originals + `reserve`, where `reserve` =
/// ⌊`min_retries_per_second` × `ttl`⌋. An outage of length O touches at most
/// n = ⌊O / slot⌋ + 2 slots; cover them with m = ⌈n / 10⌉ back-to-back windows ending at the
/// outage's last slot (the first one reaches back before the outage: the budget earned by the
/// healthy traffic just before it). Adding up the windows' guarantees:
///
/// ```text
/// retries ≤ ratio × (rate × m × ttl + 1) + m × reserve
/// amplification = 1 + retries / originals,   originals ≥ rate × O − 1
/// ```
///
/// which is `1 + ratio × (O + ttl)/O + min_retries_per_second × (O + ttl)/(rate × O)` when O is
/// a multiple of `ttl` (then m = O/ttl + 1).
///
/// Tolerances, in attempts:
/// * `edge`: the outage is measured by the app's count and the load generator's records,
///   read within milliseconds of the outage's start and end; an original and its attempts can
///   fall on different sides of that instant. Allowed: the traffic of 10 ms at each end (2 ×
///   `rate` × 10 ms originals, each with up to `num_retries` retries).
/// * `in_flight` (`client-headers` only): that mode decides when a request arrives (room for
///   at least one retry: the router may retry) and charges the retries when the request ends.
///   Requests let through before the retries of the earlier ones are charged may all retry:
///   up to `num_retries` × (`rate` × L + 1) + 1 extra retries per window, where L is the
///   longest time from arrival to charge: the back-offs' maximum (Envoy waits a random time
///   below min(base × 2^(k−1), max) before retry k) plus 10 ms per attempt. The two Envoy
///   workers share one budget window with compare-and-swap and publish their originals once
///   per slot; unpublished originals only make the budget smaller, so they add nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// Budget windows covering the outage (m).
    pub windows: u64,
    /// ⌊min_retries_per_second × ttl⌋.
    pub reserve: u64,
    /// Most retries the guarantee allows during the outage.
    pub retries: f64,
    /// Fewest originals the load generator sends during the outage.
    pub originals: f64,
    /// Measurement tolerance at the outage's ends, in attempts.
    pub edge: f64,
    /// `client-headers`' extra retries of requests in flight, in attempts.
    pub in_flight: f64,
    /// L: the longest time from a request's arrival to the charge of its retries.
    pub charge_delay: Duration,
}

impl Bound {
    pub fn new(experiment: &Experiment) -> Bound {
        let ttl = experiment.ttl_seconds;
        let slot = ttl / BUDGET_SLOTS as f64;
        let outage = experiment.outage.as_secs_f64();
        let slots_touched = (outage / slot + 1e-9).floor() as u64 + 2;
        let windows = slots_touched.div_ceil(BUDGET_SLOTS);
        let reserve = (experiment.min_retries_per_second * ttl).floor() as u64;
        let rate = experiment.rate;
        let retries =
            experiment.ratio * (rate * windows as f64 * ttl + 1.0) + (windows * reserve) as f64;
        let originals = (rate * outage - 1.0).max(1.0);
        let retries_per_request = f64::from(experiment.num_retries);
        let edge = 2.0 * rate * 0.010 * (1.0 + retries_per_request);
        let charge_delay =
            backoff_ceiling(experiment) + Duration::from_millis(10) * (experiment.num_retries + 1);
        let in_flight = windows as f64
            * (retries_per_request * (rate * charge_delay.as_secs_f64() + 1.0) + 1.0);
        Bound {
            windows,
            reserve,
            retries,
            originals,
            edge,
            in_flight,
            charge_delay,
        }
    }

    /// The guarantee alone, without tolerances.
    pub fn strict(&self) -> f64 {
        1.0 + self.retries / self.originals
    }

    /// What a run with `budget` may measure: the guarantee plus the tolerances that apply.
    /// `None` for runs without an eastwest budget.
    pub fn allowed(&self, budget: Budget) -> Option<f64> {
        let extra = match budget {
            Budget::Client | Budget::Server => self.edge,
            Budget::ClientHeaders => self.edge + self.in_flight,
            Budget::None | Budget::EnvoyNative => return None,
        };
        Some(1.0 + (self.retries + extra) / self.originals)
    }
}

/// The longest Envoy waits before all its retries of one request together: retry k waits a
/// random time below min(base × 2^(k−1), max) (Envoy's JitteredExponentialBackOffStrategy).
pub fn backoff_ceiling(experiment: &Experiment) -> Duration {
    (0..experiment.num_retries)
        .map(|k| {
            experiment
                .backoff_base
                .saturating_mul(1u32 << k.min(20))
                .min(experiment.backoff_max)
        })
        .sum()
}

/// Counters of both sidecars (differences over the outage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvoyCounts {
    /// Caller: `http.outbound.downstream_rq_total` (original requests).
    pub caller_requests: u64,
    /// Caller: `cluster.checkout.upstream_rq_total` (attempts toward the callee).
    pub caller_attempts: u64,
    /// Caller: `cluster.checkout.upstream_rq_retry` (retries the router made).
    pub caller_retries: u64,
    /// Caller: `cluster.checkout.upstream_rq_retry_overflow` (retries a circuit breaker or
    /// Envoy's retry budget refused).
    pub caller_retry_overflow: u64,
    /// Callee: `http.inbound.downstream_rq_total` (attempts reaching the callee's sidecar).
    pub callee_requests: u64,
    /// Callee: `cluster.app.upstream_rq_total` (attempts forwarded to the app).
    pub callee_to_app: u64,
    /// `eastwest_retry_budget_denied_total` of whichever sidecar runs the filter.
    pub eastwest_denied: u64,
}

impl EnvoyCounts {
    fn delta(&self, before: &EnvoyCounts) -> EnvoyCounts {
        EnvoyCounts {
            caller_requests: self.caller_requests.saturating_sub(before.caller_requests),
            caller_attempts: self.caller_attempts.saturating_sub(before.caller_attempts),
            caller_retries: self.caller_retries.saturating_sub(before.caller_retries),
            caller_retry_overflow: self
                .caller_retry_overflow
                .saturating_sub(before.caller_retry_overflow),
            callee_requests: self.callee_requests.saturating_sub(before.callee_requests),
            callee_to_app: self.callee_to_app.saturating_sub(before.callee_to_app),
            eastwest_denied: self.eastwest_denied.saturating_sub(before.eastwest_denied),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub budget: Budget,
    /// Requests the load generator started during the outage.
    pub originals: u64,
    /// Of those, the ones that did not end in a 2xx.
    pub failed_originals: u64,
    /// Attempts that reached the app during the outage.
    pub app_requests: u64,
    /// Envoy's counters over the outage.
    pub envoy: EnvoyCounts,
    /// From the end of the outage until the rolling success ratio is back (None: never).
    pub recovery: Option<Duration>,
    /// Success ratio of the responses completed from `recovery` to the end of the run.
    pub success_after_recovery: f64,
    /// Caller's connections per Envoy worker (`listener.<address>.worker_<n>.downstream_cx_total`).
    pub caller_connections_per_worker: Vec<u64>,
    /// The load generator's summary line.
    pub load_summary: String,
    /// Largest delay of a request behind its schedule.
    pub max_lag: Duration,
    /// Run directories of the two sidecars, for post-mortems.
    pub run_dirs: Vec<String>,
}

impl Run {
    /// Attempts per original request during the outage.
    pub fn amplification(&self) -> f64 {
        self.app_requests as f64 / self.originals.max(1) as f64
    }

    /// Retries that reached the app: every original reaches it once.
    pub fn retries_admitted(&self) -> u64 {
        self.app_requests.saturating_sub(self.originals)
    }

    /// The retries the router would have made: `num_retries` for every original, as every
    /// first attempt fails during the outage.
    pub fn retries_wanted(&self, experiment: &Experiment) -> u64 {
        self.originals * u64::from(experiment.num_retries)
    }

    /// Denials of the budget under test: eastwest's metric, or Envoy's overflow counter.
    pub fn denials(&self) -> u64 {
        match self.budget {
            Budget::Client | Budget::ClientHeaders | Budget::Server => self.envoy.eastwest_denied,
            Budget::None | Budget::EnvoyNative => self.envoy.caller_retry_overflow,
        }
    }
}

/// Tag extraction for the eastwest metrics' tags (the regex of DESIGN.md §4, as
/// `eastwest_common::metric_name::stats_tag_regex` writes it).
pub fn stats_tag_regex(tag: &str) -> String {
    format!(r"({tag}=\.=(.*?);\.;)")
}

const BUDGET_TAGS: [&str; 4] = [
    "destination_service",
    "destination_namespace",
    "source_service",
    "mode",
];

fn tagged_bootstrap(node: &Node, listener: Value, cluster: Value) -> Value {
    let regexes: Vec<(&str, String)> = BUDGET_TAGS
        .iter()
        .map(|tag| (*tag, stats_tag_regex(tag)))
        .collect();
    let tags: Vec<(&str, &str)> = regexes
        .iter()
        .map(|(tag, regex)| (*tag, regex.as_str()))
        .collect();
    bootstrap(node, free_port(), vec![listener], vec![cluster], &tags)
}

fn node(service: &str) -> Node {
    Node::istio_sidecar(&format!("{service}-v1"), "shop", &[("app", service)])
}

fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

impl Experiment {
    /// The filter's configuration for `mode`.
    pub fn filter_config(&self, mode: &str) -> Value {
        json!({
            "mode": mode,
            "ratio": self.ratio,
            "min_retries_per_second": self.min_retries_per_second,
            "ttl_seconds": self.ttl_seconds,
            "peer_trust": "any",
        })
    }

    /// The caller's route retry policy.
    pub fn retry_policy(&self) -> Value {
        json!({
            "retry_on": "5xx,reset,connect-failure",
            "num_retries": self.num_retries,
            "retry_back_off": {
                "base_interval": seconds(self.backoff_base),
                "max_interval": seconds(self.backoff_max),
            },
        })
    }

    /// The caller cluster's circuit breakers: Envoy's retry budget, or `max_retries` lifted as
    /// Istio does (Envoy's default of 3 concurrent retries would be a budget of its own).
    pub fn circuit_breakers(&self, budget: Budget) -> Value {
        match budget {
            Budget::EnvoyNative => json!({"thresholds": [{
                "retry_budget": {
                    "budget_percent": {"value": self.native_budget_percent},
                    "min_retry_concurrency": self.native_min_retry_concurrency,
                },
            }]}),
            _ => json!({"thresholds": [{"max_retries": u32::MAX}]}),
        }
    }

    /// The eastwest budget's filter in `mode`, in the experiment's module.
    fn budget_filter(&self, mode: &str) -> Result<Value> {
        feature_filter(self.module, Feature::RetryBudget, self.filter_config(mode))
    }

    fn envoy_options(&self) -> EnvoyOptions {
        EnvoyOptions {
            concurrency: self.envoy_workers,
            ..EnvoyOptions::default()
        }
    }

    /// The callee's sidecar: inbound listener toward the app; the filter in `server` mode when
    /// that is the run.
    fn callee(&self, budget: Budget, app_port: u16) -> Result<(Envoy, u16)> {
        let port = free_port();
        let mut listener = ListenerBuilder::new("inbound", port, "app")
            .traffic_direction(TrafficDirection::Inbound);
        if budget == Budget::Server {
            listener = listener.http_filter(self.budget_filter("server")?);
        }
        let envoy = Envoy::start(
            &self.module.tag(&format!(
                "storm-callee-{}",
                budget.label().replace(' ', "-")
            )),
            tagged_bootstrap(
                &node("checkout"),
                listener.build(),
                ClusterBuilder::new("app", app_port).build(),
            ),
            &self.envoy_options(),
        )?;
        Ok((envoy, port))
    }

    /// The caller's sidecar: outbound listener with the retry policy and attempt counts,
    /// toward the callee's sidecar; the budget of the run.
    fn caller(&self, budget: Budget, callee_port: u16) -> Result<(Envoy, u16)> {
        let port = free_port();
        let mut listener = ListenerBuilder::new("outbound", port, "checkout")
            .traffic_direction(TrafficDirection::Outbound)
            .retry_policy(self.retry_policy())
            .virtual_host_field("include_request_attempt_count", json!(true));
        let mut cluster = ClusterBuilder::new("checkout", callee_port)
            .field("circuit_breakers", self.circuit_breakers(budget));
        match budget {
            Budget::Client => {
                cluster = cluster.upstream_http_filter(self.budget_filter("client")?);
            }
            Budget::ClientHeaders => {
                listener = listener.http_filter(self.budget_filter("client-headers")?);
            }
            Budget::None | Budget::EnvoyNative | Budget::Server => {}
        }
        let envoy = Envoy::start(
            &self.module.tag(&format!(
                "storm-caller-{}",
                budget.label().replace(' ', "-")
            )),
            tagged_bootstrap(&node("frontend"), listener.build(), cluster.build()),
            &self.envoy_options(),
        )?;
        Ok((envoy, port))
    }

    /// Runs the experiment with `budget`: fresh app and sidecars, the load, the outage.
    pub fn run(&self, budget: Budget) -> Result<Run> {
        // Every run needs the module, even those that do not load it.
        crate::paths::dist_wasm(self.module.wasm_name(Feature::RetryBudget))?;
        let app = TestApp::start()?;
        let (callee, callee_port) = self.callee(budget, app.port())?;
        let (caller, port) = self.caller(budget, callee_port)?;
        let url = format!("http://127.0.0.1:{port}/pay");
        let baggage = b"service.name=frontend,k8s.namespace.name=shop";
        // The whole chain works before the load starts.
        let probe = http_request("GET", &url, &[("baggage", baggage)], "")?;
        if probe.status != 200 || app.requests_seen() != 1 {
            bail!(
                "{}: a request through both sidecars got {} (app saw {})",
                budget.label(),
                probe.status,
                app.requests_seen()
            );
        }

        let total = self.warmup + self.outage + self.after;
        let plan = LoadPlan::new(&url, (self.rate * total.as_secs_f64()).round() as u64)
            .rate(self.rate)
            .concurrency(256)
            .max_duration(total + Duration::from_secs(5))
            .request_timeout(Duration::from_secs(5))
            .header("baggage", baggage.to_vec())
            .record_requests(true);
        let (sender, receiver) = mpsc::channel();
        let began = Instant::now();
        let generator = std::thread::spawn(move || {
            let report = load::run(&plan);
            let _ = sender.send(());
            report
        });
        std::thread::sleep(self.warmup.saturating_sub(began.elapsed()));
        let before = snapshot(&caller, &callee)?;
        app.set_outage(true);
        let app_at_start = app.requests_seen();
        let outage_start = Instant::now();
        std::thread::sleep(self.outage.saturating_sub(outage_start.elapsed()));
        let during = snapshot(&caller, &callee)?;
        app.set_outage(false);
        let app_at_end = app.requests_seen();
        let outage_end = Instant::now();
        // The generator ends by itself (bounded in count and time).
        let _ = receiver.recv_timeout(total + Duration::from_secs(30));
        let report = generator
            .join()
            .map_err(|_| anyhow::anyhow!("the load generator's thread panicked"))??;
        let caller_stats = caller.stats()?;

        let start = offset(&report, outage_start);
        let end = offset(&report, outage_end);
        let in_outage: Vec<&RequestRecord> = report
            .records
            .iter()
            .filter(|record| record.start >= start && record.start < end)
            .collect();
        let originals = in_outage.len() as u64;
        let failed_originals = in_outage
            .iter()
            .filter(|record| !record.outcome.is_success())
            .count() as u64;
        let recovery = recovery_time(
            &report.records,
            end,
            self.recovery_window,
            self.recovery_success,
        );
        let success_after_recovery = recovery.map_or(0.0, |recovery| {
            success_ratio(&report.records, end + recovery, Duration::MAX)
        });
        let listener_prefix = format!("listener.127.0.0.1_{port}.worker_");
        let caller_connections_per_worker = caller_stats
            .iter()
            .filter(|(name, _)| {
                name.starts_with(&listener_prefix) && name.ends_with(".downstream_cx_total")
            })
            .map(|(_, value)| *value)
            .collect();
        Ok(Run {
            budget,
            originals,
            failed_originals,
            app_requests: app_at_end.saturating_sub(app_at_start),
            envoy: during.delta(&before),
            recovery,
            success_after_recovery,
            caller_connections_per_worker,
            load_summary: report.summary(),
            max_lag: report.max_lag,
            run_dirs: vec![
                caller.run_dir().display().to_string(),
                callee.run_dir().display().to_string(),
            ],
        })
    }

    /// Every run, one after another; `progress` sees each as it ends.
    pub fn run_all(&self, mut progress: impl FnMut(&Run)) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for budget in Budget::ALL {
            let run = self
                .run(budget)
                .with_context(|| format!("retry-storm run `{}`", budget.label()))?;
            progress(&run);
            runs.push(run);
        }
        Ok(runs)
    }

    /// One line describing the setup.
    pub fn describe(&self) -> String {
        format!(
            "{} original requests/s (open loop), {:?} healthy, {:?} outage (every request 503), \
             {:?} healthy; caller retries {} times on 5xx (back-off {:?}..{:?}); eastwest budget \
             ratio {}, min_retries_per_second {}, ttl_seconds {}; Envoy retry_budget \
             budget_percent {}, min_retry_concurrency {}; {} Envoy workers per sidecar",
            self.rate,
            self.warmup,
            self.outage,
            self.after,
            self.num_retries,
            self.backoff_base,
            self.backoff_max,
            self.ratio,
            self.min_retries_per_second,
            self.ttl_seconds,
            self.native_budget_percent,
            self.native_min_retry_concurrency,
            self.envoy_workers,
        )
    }
}

/// `instant` as an offset from the start of the load run (zero if before it).
fn offset(report: &LoadReport, instant: Instant) -> Duration {
    instant.saturating_duration_since(report.started_at)
}

fn snapshot(caller: &Envoy, callee: &Envoy) -> Result<EnvoyCounts> {
    let caller_stats = caller.stats()?;
    let callee_stats = callee.stats()?;
    let get = |stats: &std::collections::BTreeMap<String, u64>, name: &str| {
        stats.get(name).copied().unwrap_or(0)
    };
    let denied = prometheus_sum(&caller.prometheus()?, "eastwest_retry_budget_denied_total")
        + prometheus_sum(&callee.prometheus()?, "eastwest_retry_budget_denied_total");
    Ok(EnvoyCounts {
        caller_requests: get(&caller_stats, "http.outbound.downstream_rq_total"),
        caller_attempts: get(&caller_stats, "cluster.checkout.upstream_rq_total"),
        caller_retries: get(&caller_stats, "cluster.checkout.upstream_rq_retry"),
        caller_retry_overflow: get(&caller_stats, "cluster.checkout.upstream_rq_retry_overflow"),
        callee_requests: get(&callee_stats, "http.inbound.downstream_rq_total"),
        callee_to_app: get(&callee_stats, "cluster.app.upstream_rq_total"),
        eastwest_denied: denied,
    })
}

/// The sum of every sample of `metric` in a Prometheus exposition, including the series Envoy
/// 1.36 to 1.38 keep in an upstream filter's cluster scope
/// (`envoy_cluster_wasmcustom_<metric>`).
pub fn prometheus_sum(exposition: &str, metric: &str) -> u64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            name == metric
                || name
                    .strip_suffix(metric)
                    .is_some_and(|prefix| prefix.ends_with("_wasmcustom_"))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The share of 2xx among the requests that completed (or failed) in `[from, from + length)`;
/// 1 when none did.
pub fn success_ratio(records: &[RequestRecord], from: Duration, length: Duration) -> f64 {
    let until = from.saturating_add(length);
    let (mut total, mut good) = (0u64, 0u64);
    for record in records {
        if record.end >= from && record.end < until {
            total += 1;
            good += u64::from(record.outcome.is_success());
        }
    }
    if total == 0 {
        1.0
    } else {
        good as f64 / total as f64
    }
}

/// Step between the rolling windows [`recovery_time`] looks at.
pub const RECOVERY_STEP: Duration = Duration::from_millis(5);

/// How long after `recovered_at` success is back: the smallest `r` (in steps of
/// [`RECOVERY_STEP`]) such that every `window` of responses (by completion time) starting at
/// `recovered_at + r` or later, up to the last response, has a success ratio of at least
/// `target`. `None` if even the last window falls short (or there is no full window).
pub fn recovery_time(
    records: &[RequestRecord],
    recovered_at: Duration,
    window: Duration,
    target: f64,
) -> Option<Duration> {
    let last = records.iter().map(|record| record.end).max()?;
    let mut starts = Vec::new();
    let mut at = recovered_at;
    while at + window <= last {
        starts.push(at);
        at += RECOVERY_STEP;
    }
    let mut recovered = None;
    for start in starts.iter().rev() {
        if success_ratio(records, *start, window) >= target {
            recovered = Some(*start - recovered_at);
        } else {
            break;
        }
    }
    recovered
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.0}%", 100.0 * part as f64 / whole as f64)
    }
}

/// The experiment's table: one row per run.
pub fn table(experiment: &Experiment, runs: &[Run]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<24} {:>9} {:>12} {:>13} {:>24} {:>8} {:>9}\n",
        "mode",
        "originals",
        "app requests",
        "amplification",
        "retries admitted/wanted",
        "denials",
        "recovery"
    ));
    for run in runs {
        let admitted = run.retries_admitted();
        let wanted = run.retries_wanted(experiment);
        out.push_str(&format!(
            "{:<24} {:>9} {:>12} {:>12.2}x {:>24} {:>8} {:>9}\n",
            run.budget.label(),
            run.originals,
            run.app_requests,
            run.amplification(),
            format!("{admitted}/{wanted} ({})", percent(admitted, wanted)),
            run.denials(),
            run.recovery
                .map_or("never".to_string(), |r| format!("{} ms", r.as_millis())),
        ));
    }
    out
}

/// Envoy's own counters over the outage, one row per run.
pub fn envoy_table(runs: &[Run]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "mode", "caller rq", "attempts", "retries", "overflow", "callee rq", "to app", "workers"
    ));
    for run in runs {
        let counts = &run.envoy;
        let workers = run
            .caller_connections_per_worker
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("+");
        out.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            run.budget.label(),
            counts.caller_requests,
            counts.caller_attempts,
            counts.caller_retries,
            counts.caller_retry_overflow,
            counts.callee_requests,
            counts.callee_to_app,
            workers,
        ));
    }
    out
}

/// The bound for the configured parameters, in words and numbers.
pub fn describe_bound(experiment: &Experiment) -> String {
    let bound = Bound::new(experiment);
    format!(
        "budget bound during the outage: {windows} windows of {ttl} s cover it, each allowing \
         {ratio} × originals + {reserve} retries: at most {retries:.0} retries for at least \
         {originals:.0} originals, amplification <= {strict:.3}; allowed with the measurement \
         tolerance ({edge:.0} attempts): {client:.3} (client, server); plus requests in flight \
         before their retries are charged ({in_flight:.0} attempts, L = {delay} ms): {headers:.3} \
         (client-headers)",
        windows = bound.windows,
        ttl = experiment.ttl_seconds,
        ratio = experiment.ratio,
        reserve = bound.reserve,
        retries = bound.retries,
        originals = bound.originals,
        strict = bound.strict(),
        edge = bound.edge,
        client = bound.allowed(Budget::Client).unwrap_or(f64::NAN),
        in_flight = bound.in_flight,
        delay = bound.charge_delay.as_millis(),
        headers = bound.allowed(Budget::ClientHeaders).unwrap_or(f64::NAN),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RequestOutcome;

    fn record(end_ms: u64, status: u16) -> RequestRecord {
        RequestRecord {
            index: end_ms,
            start: Duration::from_millis(end_ms.saturating_sub(1)),
            end: Duration::from_millis(end_ms),
            outcome: RequestOutcome::Status(status),
        }
    }

    #[test]
    fn the_bound_matches_the_closed_form_when_the_outage_is_whole_windows() {
        let experiment = Experiment::default();
        let bound = Bound::new(&experiment);
        // 4 s outage, 2 s windows: 3 windows, reserve 4.
        assert_eq!((bound.windows, bound.reserve), (3, 4));
        let closed_form = 1.0 + 0.2 * 6.0 / 4.0 + 2.0 * 6.0 / (200.0 * 4.0);
        assert!(
            (bound.strict() - closed_form).abs() < 0.002,
            "{} vs {closed_form}",
            bound.strict()
        );
        // Back-offs below 25 ms and 50 ms, plus 10 ms per attempt.
        assert_eq!(bound.charge_delay, Duration::from_millis(105));
        let client = bound.allowed(Budget::Client).unwrap();
        let headers = bound.allowed(Budget::ClientHeaders).unwrap();
        assert!(bound.strict() < client && client < headers, "{bound:?}");
        assert_eq!(bound.allowed(Budget::None), None);
    }

    #[test]
    fn an_outage_between_window_boundaries_needs_another_window() {
        let experiment = Experiment {
            outage: Duration::from_millis(3_900),
            ..Experiment::default()
        };
        // 19 slots + 2 = 21 touched: 3 windows.
        assert_eq!(Bound::new(&experiment).windows, 3);
        let experiment = Experiment {
            outage: Duration::from_millis(4_100),
            ..Experiment::default()
        };
        // 20 + 2 = 22: still 3; at 8.1 s it takes 5.
        assert_eq!(Bound::new(&experiment).windows, 3);
        let experiment = Experiment {
            outage: Duration::from_millis(8_100),
            ..Experiment::default()
        };
        assert_eq!(Bound::new(&experiment).windows, 5);
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_maximum() {
        let experiment = Experiment {
            num_retries: 5,
            ..Experiment::default()
        };
        // 25 + 50 + 100 + 200 + 250 (capped).
        assert_eq!(backoff_ceiling(&experiment), Duration::from_millis(625));
    }

    #[test]
    fn recovery_is_when_every_later_window_is_good() {
        // Failures until 1000 ms, one straggler failing at 1040 ms, then successes every 5 ms.
        let mut records: Vec<RequestRecord> = (0..200).map(|i| record(i * 5, 503)).collect();
        records.push(record(1_040, 503));
        records.extend((201..600).map(|i| record(i * 5, 200)));
        let window = Duration::from_millis(200);
        let recovery = recovery_time(&records, Duration::from_millis(1_000), window, 0.99);
        // The first window without the straggler starts just after 1040 ms.
        assert_eq!(recovery, Some(Duration::from_millis(45)));
        // A failure late in the run moves the recovery past it.
        records.push(record(2_500, 503));
        let recovery = recovery_time(&records, Duration::from_millis(1_000), window, 0.99);
        assert_eq!(recovery, Some(Duration::from_millis(1_505)));
        // Never recovered: the last window still fails.
        records.push(record(2_990, 503));
        assert_eq!(
            recovery_time(&records, Duration::from_millis(1_000), window, 0.99),
            None
        );
        assert_eq!(recovery_time(&[], Duration::ZERO, window, 0.99), None);
    }

    #[test]
    fn success_ratio_counts_by_completion_time() {
        let records = [
            record(10, 200),
            record(20, 503),
            record(30, 200),
            record(40, 200),
        ];
        let ratio = success_ratio(
            &records,
            Duration::from_millis(10),
            Duration::from_millis(30),
        );
        assert!((ratio - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(
            success_ratio(&records, Duration::from_secs(1), Duration::from_millis(5)),
            1.0
        );
    }

    #[test]
    fn prometheus_sum_adds_every_series_of_one_metric() {
        let exposition = "\
# TYPE eastwest_retry_budget_denied_total counter
eastwest_retry_budget_denied_total{destination_service=\"checkout\",mode=\"client\"} 7
eastwest_retry_budget_denied_total{destination_service=\"other\",mode=\"client\"} 5
eastwest_retry_budget_denied_total_other 100
envoy_cluster_wasmcustom_eastwest_retry_budget_denied_total{envoy_cluster_name=\"checkout\"} 2
other_eastwest_retry_budget_denied_total 1000
eastwest_retry_budget_admitted_total{destination_service=\"checkout\"} 3
";
        assert_eq!(
            prometheus_sum(exposition, "eastwest_retry_budget_denied_total"),
            14
        );
        assert_eq!(prometheus_sum(exposition, "missing"), 0);
    }

    #[test]
    fn budgets_map_to_filter_modes_and_envoy_settings() {
        let experiment = Experiment::default();
        assert_eq!(
            Budget::ClientHeaders.eastwest_mode(),
            Some("client-headers")
        );
        assert_eq!(Budget::EnvoyNative.eastwest_mode(), None);
        let native = experiment.circuit_breakers(Budget::EnvoyNative);
        assert_eq!(
            native["thresholds"][0]["retry_budget"]["budget_percent"]["value"],
            20.0
        );
        assert_eq!(
            experiment.circuit_breakers(Budget::None)["thresholds"][0]["max_retries"],
            u32::MAX
        );
        assert_eq!(
            experiment.retry_policy()["retry_back_off"]["base_interval"],
            "0.025s"
        );
        let config = experiment.filter_config("server");
        assert_eq!(config["ttl_seconds"], 2.0);
        assert_eq!(config["peer_trust"], "any");
    }
}
