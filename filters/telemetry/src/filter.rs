//! The thin proxy-wasm layer: at the end of each stream (`on_log`) reads what Envoy knows about
//! the request, resolves both ends' labels, and records the metrics. Every host call's failure
//! is counted and skipped; a request is never affected.
//!
//! [`Telemetry`] is the feature (also run by the one-module sidecar, `eastwest-sidecar`);
//! `Root` and `Stream` run it as the `telemetry` module.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

use eastwest_common::host::{self, paths, Exchange, Resolver};
use eastwest_common::labels::{Label, Labels};
use eastwest_common::metric_name::tagged_name;
use eastwest_common::party::Party;
use eastwest_common::properties::Direction;
use eastwest_common::resolve::{Problem, Problems, DESTINATION_STATE_KEY, SOURCE_STATE_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MapType, MetricType};

use crate::config::Settings;
use crate::dependencies::is_expected;
use crate::response_flags::upstream_failures;
use crate::series::{Series, SeriesTable};
use crate::tags::{Metric, Reporter, RequestTags, Tag};

pub const FILTER: &str = "telemetry";
/// Most distinct unexpected pairs warned about per VM (the warning is a log line; the counter
/// keeps counting beyond).
const MAX_WARNED_PAIRS: usize = 1000;

// The one-module sidecar links this crate as a library and registers its own root context.
#[cfg(not(feature = "embedded"))]
proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { shared: None }));
}}

fn log(level: LogLevel, message: &str) {
    host::log(FILTER, level, message);
}

/// Distinct outcomes (response code, protocol, gRPC status) cached per service pair; rarer
/// ones take the table's slower path, with the same result.
const MAX_OUTCOMES_PER_PAIR: usize = 16;

/// A request's outcome as far as the series of `eastwest_requests_total` and the duration
/// histogram tell them apart.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Outcome {
    response_code: i64,
    grpc: bool,
    /// `None`: unknown (a gRPC request without a status).
    grpc_status: Option<i64>,
}

/// What one service pair (as both ends' filter-state encodings say it) resolved to: its
/// series, so that a known pair costs one hash lookup instead of a tagged-name key per metric.
struct PairSeries {
    reporter: Reporter,
    source: Rc<Party>,
    destination: Rc<Party>,
    /// `eastwest_requests_total` and the duration histogram, per outcome.
    outcomes: Vec<(Outcome, Option<Series>, Option<Series>)>,
    failures: Vec<(&'static str, Series)>,
    retries: Option<Series>,
    /// Whether `expected_dependencies` allows the pair (`true` when the check is off).
    expected: bool,
}

impl PairSeries {
    fn is(&self, reporter: Reporter, source: &Rc<Party>, destination: &Rc<Party>) -> bool {
        self.reporter == reporter
            && self.source.same_as(source)
            && self.destination.same_as(destination)
    }
}

fn pair_hash(reporter: Reporter, source: &Party, destination: &Party) -> u64 {
    use eastwest_common::bytes::mix;
    mix(mix(reporter as u64, source.hash), destination.hash)
}

/// The telemetry feature of one VM.
pub struct Telemetry {
    settings: Settings,
    resolver: Resolver,
    /// The tags each metric carries, in the order of `Metric::ALL`.
    metric_tags: Vec<Vec<Tag>>,
    series: RefCell<SeriesTable>,
    /// The series of known pairs, by [`pair_hash`] (a pair whose hash collides with another's
    /// is not cached); at most `max_series` pairs, as every pair has a series of its own.
    pairs: RefCell<rustc_hash::FxHashMap<u64, PairSeries>>,
    /// `eastwest_overflow_total{metric}` ids, in the order of `Metric::ALL`.
    overflow: Vec<Option<u32>>,
    /// `eastwest_telemetry_malformed_total{reason}` ids, in the order of `Problem::ALL`.
    malformed: Vec<Option<u32>>,
    own: host::OwnLabelsCell,
    warned_direction: Cell<bool>,
    warned_pairs: RefCell<HashSet<(String, String)>>,
}

impl Telemetry {
    /// Defines the fixed metrics, reserves the tables (so that no request pays for growing
    /// them) and resolves this workload's labels.
    pub fn new(settings: Settings) -> Telemetry {
        let define = |name: String| hostcalls::define_metric(MetricType::Counter, &name).ok();
        let mut pairs = rustc_hash::FxHashMap::default();
        pairs.reserve(settings.max_series);
        let feature = Telemetry {
            metric_tags: Metric::ALL
                .iter()
                .map(|metric| metric.tags(&settings.dimensions))
                .collect(),
            series: RefCell::new(SeriesTable::new(settings.max_series)),
            pairs: RefCell::new(pairs),
            overflow: Metric::ALL
                .iter()
                .map(|metric| {
                    define(tagged_name(
                        &[("metric", metric.name())],
                        "eastwest_overflow_total",
                    ))
                })
                .collect(),
            malformed: Problem::ALL
                .iter()
                .map(|problem| {
                    define(tagged_name(
                        &[("reason", problem.as_str())],
                        "eastwest_telemetry_malformed_total",
                    ))
                })
                .collect(),
            own: host::OwnLabelsCell::new(&settings.labels),
            resolver: Resolver::new(settings.labels.clone()),
            settings,
            warned_direction: Cell::new(false),
            warned_pairs: RefCell::new(HashSet::new()),
        };
        feature.refresh_own();
        feature
    }

    fn count(&self, problem: Problem, count: u32) {
        if let Some(id) = self.malformed[problem.index()] {
            let _ = hostcalls::increment_metric(id, i64::from(count));
        }
    }

    fn count_problems(&self, problems: &Problems) {
        for (problem, count) in problems.iter() {
            self.count(problem, count);
        }
    }

    /// Resolves this workload's labels from the node, once the host exposes it.
    fn refresh_own(&self) {
        self.own.refresh(&self.settings.labels, |own| {
            if own.invalid_values > 0 || own.undecodable.is_some() {
                self.count(
                    Problem::NodeMetadata,
                    own.invalid_values + u32::from(own.undecodable.is_some()),
                );
                log(
                    LogLevel::Warn,
                    "node metadata holds invalid or undecodable labels; they are ignored",
                );
            }
        });
    }

    /// The series of `metric` for these tag values (defining it on first use).
    fn lookup(&self, metric: Metric, tags: &[(&str, &str)]) -> Series {
        let metric_type = match metric {
            Metric::Duration => MetricType::Histogram,
            _ => MetricType::Counter,
        };
        self.series
            .borrow_mut()
            .lookup(metric.name(), tags, |name| {
                hostcalls::define_metric(metric_type, name).ok()
            })
    }

    /// The id to record `metric` in, counting an overflow when the cap folded the series.
    fn use_series(&self, metric: Metric, series: Series) -> Option<u32> {
        match series {
            Series::Known(id) => Some(id),
            Series::Overflow(id) => {
                if let Some(overflow) = self.overflow[metric.index()] {
                    let _ = hostcalls::increment_metric(overflow, 1);
                }
                Some(id)
            }
            Series::Unavailable => {
                self.count(Problem::HostCall, 1);
                None
            }
        }
    }

    fn tag_values<'a>(
        &self,
        metric: Metric,
        tags: &'a RequestTags<'a>,
        extra: Option<(&'static str, &'a str)>,
    ) -> Vec<(&'static str, &'a str)> {
        let mut values: Vec<(&'static str, &'a str)> = self.metric_tags[metric.index()]
            .iter()
            .map(|tag| (tag.name(), tags.value(*tag)))
            .collect();
        values.extend(extra);
        values
    }

    /// The series of `metric` for this request, defined on first use; `cached` is the pair's
    /// cache slot for it (filled on a miss, unless the host refused the definition).
    fn series(
        &self,
        metric: Metric,
        tags: &RequestTags,
        extra: Option<(&'static str, &str)>,
    ) -> Series {
        self.lookup(metric, &self.tag_values(metric, tags, extra))
    }

    /// Once per request, when Envoy has finished with it: every outcome is known then.
    pub fn on_log(&self, exchange: &mut Exchange) {
        self.refresh_own();
        let Some(direction) = exchange.direction(self.settings.direction) else {
            self.count(Problem::DirectionUnknown, 1);
            if !self.warned_direction.replace(true) {
                log(
                    LogLevel::Warn,
                    "the listener reports no traffic direction; set \"direction\" in the \
                     configuration or traffic_direction on the listener. Nothing is reported.",
                );
            }
            return;
        };
        let reporter = match direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        };
        let (source, destination) = self.ends(reporter, exchange);
        let response_code = host::int_property(paths::RESPONSE_CODE).unwrap_or(0);
        let grpc = host::header_value(MapType::HttpRequestHeaders, "content-type")
            .ok()
            .flatten()
            .is_some_and(|value| value.starts_with(b"application/grpc"));
        let grpc_status = if grpc {
            host::int_property(paths::RESPONSE_GRPC_STATUS)
        } else {
            None
        };
        let outcome = Outcome {
            response_code,
            grpc,
            grpc_status,
        };
        let duration = host::int_property(paths::REQUEST_DURATION);
        let flags = host::int_property(paths::RESPONSE_FLAGS).unwrap_or(0) as u64;
        let attempts = if reporter == Reporter::Source {
            exchange.upstream_attempts().unwrap_or(0)
        } else {
            0
        };

        let hash = pair_hash(reporter, &source, &destination);
        let mut pairs = self.pairs.borrow_mut();
        let room = pairs.len() < self.settings.max_series;
        let cached = match pairs.entry(hash) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let pair = entry.into_mut();
                pair.is(reporter, &source, &destination).then_some(pair)
            }
            std::collections::hash_map::Entry::Vacant(entry) if room => {
                let expected =
                    self.settings
                        .expected_dependencies
                        .as_ref()
                        .is_none_or(|expected| {
                            is_expected(
                                expected,
                                source.labels.get_or_unknown(Label::Service),
                                destination.labels.get_or_unknown(Label::Service),
                            )
                        });
                Some(entry.insert(PairSeries {
                    reporter,
                    source: source.clone(),
                    destination: destination.clone(),
                    outcomes: Vec::new(),
                    failures: Vec::new(),
                    retries: None,
                    expected,
                }))
            }
            std::collections::hash_map::Entry::Vacant(_) => None,
        };
        let mut request = Recorder {
            feature: self,
            pair: cached,
            reporter,
            source: &source,
            destination: &destination,
            outcome,
            tag_strings: None,
        };
        request.record(duration, flags, attempts);
    }

    /// Both ends' labels: what an earlier feature of this module resolved, else label-enrich's
    /// filter state when it ran first, else resolved here with the same rules (this workload
    /// from the node; the peer from its trusted claims).
    fn ends(&self, reporter: Reporter, exchange: &Exchange) -> (Rc<Party>, Rc<Party>) {
        let state = |key: &str| self.resolver.from_state(key);
        match reporter {
            Reporter::Source => {
                let source = exchange
                    .source
                    .clone()
                    .or_else(|| state(SOURCE_STATE_KEY))
                    .unwrap_or_else(|| self.own.get());
                let destination = exchange
                    .destination
                    .clone()
                    .or_else(|| state(DESTINATION_STATE_KEY))
                    .unwrap_or_else(|| {
                        let resolution = self.resolver.outbound_from_response();
                        self.count_problems(&resolution.outcome.problems);
                        resolution.destination.clone()
                    });
                (source, destination)
            }
            Reporter::Destination => {
                let destination = exchange
                    .destination
                    .clone()
                    .or_else(|| state(DESTINATION_STATE_KEY))
                    .unwrap_or_else(|| self.own.get());
                let source = exchange.source.clone().unwrap_or_else(|| {
                    let (source, problems) = self.resolver.inbound_source();
                    if let Some(problems) = problems {
                        self.count_problems(&problems);
                    }
                    source
                });
                (source, destination)
            }
        }
    }

    fn warn_unexpected(&self, source: &Labels, destination: &Labels) {
        let pair = (
            source.get_or_unknown(Label::Service).to_string(),
            destination.get_or_unknown(Label::Service).to_string(),
        );
        let mut warned = self.warned_pairs.borrow_mut();
        if warned.len() >= MAX_WARNED_PAIRS || warned.contains(&pair) {
            return;
        }
        log(
            LogLevel::Warn,
            &format!(
                "unexpected dependency: {} (namespace {}, team {}) called {} (namespace {}, team {}); \
                 it is not in expected_dependencies",
                pair.0,
                source.get_or_unknown(Label::Namespace),
                source.get_or_unknown(Label::Team),
                pair.1,
                destination.get_or_unknown(Label::Namespace),
                destination.get_or_unknown(Label::Team),
            ),
        );
        warned.insert(pair);
    }
}

/// Records one request's metrics, through its pair's cached series when there are some.
struct Recorder<'a> {
    feature: &'a Telemetry,
    pair: Option<&'a mut PairSeries>,
    reporter: Reporter,
    source: &'a Party,
    destination: &'a Party,
    outcome: Outcome,
    /// The response code and gRPC status as tag values, made on the first cache miss.
    tag_strings: Option<(String, String)>,
}

impl Recorder<'_> {
    /// The series of `metric` on the slow path (the full tag values).
    fn lookup(&mut self, metric: Metric, extra: Option<(&'static str, &str)>) -> Series {
        let (response_code, grpc_status) = self.tag_strings.get_or_insert_with(|| {
            let grpc_status = match (self.outcome.grpc, self.outcome.grpc_status) {
                (false, _) => "none".to_string(),
                (true, None) => "unknown".to_string(),
                (true, Some(status)) => status.to_string(),
            };
            (self.outcome.response_code.to_string(), grpc_status)
        });
        let tags = RequestTags {
            reporter: self.reporter,
            source: &self.source.labels,
            destination: &self.destination.labels,
            response_code,
            grpc: self.outcome.grpc,
            grpc_status,
        };
        self.feature.series(metric, &tags, extra)
    }

    fn increment(&self, metric: Metric, series: Series, by: i64) {
        if let Some(id) = self.feature.use_series(metric, series) {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    /// The request and duration series of this outcome.
    fn outcome_series(&mut self, record_duration: bool) -> (Series, Option<Series>) {
        let outcome = self.outcome;
        if let Some(pair) = &self.pair {
            if let Some((_, Some(requests), duration)) =
                pair.outcomes.iter().find(|(known, _, _)| *known == outcome)
            {
                if duration.is_some() || !record_duration {
                    return (*requests, *duration);
                }
            }
        }
        let requests = self.lookup(Metric::Requests, None);
        let duration = record_duration.then(|| self.lookup(Metric::Duration, None));
        if let Some(pair) = self.pair.as_deref_mut() {
            let cacheable =
                |series: Option<Series>| series.filter(|series| *series != Series::Unavailable);
            match pair
                .outcomes
                .iter()
                .position(|(known, _, _)| *known == outcome)
            {
                Some(index) => {
                    let entry = &mut pair.outcomes[index];
                    entry.1 = cacheable(Some(requests));
                    entry.2 = cacheable(duration).or(entry.2);
                }
                None if pair.outcomes.len() < MAX_OUTCOMES_PER_PAIR => {
                    pair.outcomes
                        .push((outcome, cacheable(Some(requests)), cacheable(duration)));
                }
                None => {}
            }
        }
        (requests, duration)
    }

    fn record(&mut self, duration_nanos: Option<i64>, flags: u64, attempts: i64) {
        let (requests, duration) = self.outcome_series(duration_nanos.is_some());
        self.increment(Metric::Requests, requests, 1);
        if let (Some(nanos), Some(series)) = (duration_nanos, duration) {
            let milliseconds =
                u64::try_from(nanos).unwrap_or(0).saturating_add(500_000) / 1_000_000;
            if let Some(id) = self.feature.use_series(Metric::Duration, series) {
                let _ = hostcalls::record_metric(id, milliseconds);
            }
        }
        for failure in upstream_failures(flags) {
            let cached = self.pair.as_ref().and_then(|pair| {
                pair.failures
                    .iter()
                    .find(|(name, _)| *name == failure)
                    .map(|(_, series)| *series)
            });
            let series = cached.unwrap_or_else(|| {
                let series = self.lookup(Metric::UpstreamFailures, Some(("failure", failure)));
                if let Some(pair) = self.pair.as_deref_mut() {
                    if series != Series::Unavailable {
                        pair.failures.push((failure, series));
                    }
                }
                series
            });
            self.increment(Metric::UpstreamFailures, series, 1);
        }
        if attempts > 1 {
            let cached = self.pair.as_ref().and_then(|pair| pair.retries);
            let series = cached.unwrap_or_else(|| {
                let series = self.lookup(Metric::RetryAttempts, None);
                if let Some(pair) = self.pair.as_deref_mut() {
                    pair.retries = (series != Series::Unavailable).then_some(series);
                }
                series
            });
            self.increment(Metric::RetryAttempts, series, attempts - 1);
        }
        let expected = match &self.pair {
            Some(pair) => pair.expected,
            None => self
                .feature
                .settings
                .expected_dependencies
                .as_ref()
                .is_none_or(|expected| {
                    is_expected(
                        expected,
                        self.source.labels.get_or_unknown(Label::Service),
                        self.destination.labels.get_or_unknown(Label::Service),
                    )
                }),
        };
        if !expected {
            // Rare by nature (an alert): the slow path is fine.
            let series = self.lookup(Metric::UnexpectedDependency, None);
            self.increment(Metric::UnexpectedDependency, series, 1);
            self.feature
                .warn_unexpected(&self.source.labels, &self.destination.labels);
        }
    }
}

// The separate module's contexts (unused when the sidecar embeds the feature).
#[cfg_attr(feature = "embedded", allow(dead_code))]
struct Root {
    shared: Option<Rc<Telemetry>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(settings) = host::configure(FILTER, Settings::parse) else {
            return false;
        };
        self.shared = Some(Rc::new(Telemetry::new(settings)));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Stream { shared }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// The separate module's contexts (unused when the sidecar embeds the feature).
#[cfg_attr(feature = "embedded", allow(dead_code))]
struct Stream {
    shared: Rc<Telemetry>,
}

impl Context for Stream {}

// Only `on_log`: the module exports no other stream callback (Cargo.toml `callbacks`).
impl HttpContext for Stream {
    /// Once per request, when Envoy has finished with it: every outcome is known then.
    fn on_log(&mut self) {
        self.shared.on_log(&mut Exchange::default());
    }
}
