//! The thin proxy-wasm layer: at the end of each stream (`on_log`) reads what Envoy knows about
//! the request, resolves both ends' labels, and records the metrics. Every host call's failure
//! is counted and skipped; a request is never affected.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

use eastwest_common::host;
use eastwest_common::labels::{Label, Labels};
use eastwest_common::metric_name::tagged_name;
use eastwest_common::properties::{decode_int64, Direction};
use eastwest_common::resolve::{
    self, labels_from_state, Problem, Problems, DESTINATION_STATE_KEY, PEER_HEADER,
    SOURCE_STATE_KEY,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

use crate::config::Settings;
use crate::dependencies::is_expected;
use crate::response_flags::upstream_failures;
use crate::series::{Series, SeriesTable};
use crate::tags::{Metric, Reporter, RequestTags, Tag};

const FILTER: &str = "telemetry";
/// Most distinct unexpected pairs warned about per VM (the warning is a log line; the counter
/// keeps counting beyond).
const MAX_WARNED_PAIRS: usize = 1000;

proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { shared: None }));
}}

fn log(level: LogLevel, message: &str) {
    host::log(FILTER, level, message);
}

/// Per-VM state shared by the root context and its streams.
struct Shared {
    settings: Settings,
    /// The tags each metric carries, in the order of `Metric::ALL`.
    metric_tags: Vec<Vec<Tag>>,
    series: RefCell<SeriesTable>,
    /// `eastwest_overflow_total{metric}` ids, in the order of `Metric::ALL`.
    overflow: Vec<Option<u32>>,
    /// `eastwest_telemetry_malformed_total{reason}` ids, in the order of `Problem::ALL`.
    malformed: Vec<Option<u32>>,
    own: host::OwnLabelsCell,
    warned_direction: Cell<bool>,
    warned_pairs: RefCell<HashSet<(String, String)>>,
}

impl Shared {
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

    /// The series of `metric` for these tag values (defining it on first use), counting an
    /// overflow when the cap folds it.
    fn series(&self, metric: Metric, tags: &[(&str, &str)]) -> Option<u32> {
        let metric_type = match metric {
            Metric::Duration => MetricType::Histogram,
            _ => MetricType::Counter,
        };
        let found = self
            .series
            .borrow_mut()
            .lookup(metric.name(), tags, |name| {
                hostcalls::define_metric(metric_type, name).ok()
            });
        match found {
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
}

struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(settings) = host::configure(FILTER, Settings::parse) else {
            return false;
        };
        let define = |name: String| hostcalls::define_metric(MetricType::Counter, &name).ok();
        let shared = Shared {
            metric_tags: Metric::ALL
                .iter()
                .map(|metric| metric.tags(&settings.dimensions))
                .collect(),
            series: RefCell::new(SeriesTable::new(settings.max_series)),
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
            settings,
            warned_direction: Cell::new(false),
            warned_pairs: RefCell::new(HashSet::new()),
        };
        shared.refresh_own();
        self.shared = Some(Rc::new(shared));
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

struct Stream {
    shared: Rc<Shared>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    /// Once per request, when Envoy has finished with it: every outcome is known then.
    fn on_log(&mut self) {
        self.report();
    }
}

fn int_property(path: &[&str]) -> Option<i64> {
    host::property(path).and_then(|value| decode_int64(&value))
}

impl Stream {
    fn report(&self) {
        let shared = &self.shared;
        shared.refresh_own();
        let Some(direction) = shared.settings.direction.or_else(host::listener_direction) else {
            shared.count(Problem::DirectionUnknown, 1);
            if !shared.warned_direction.replace(true) {
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
        let (source, destination) = self.ends(reporter);
        let response_code = int_property(&["response", "code"]).unwrap_or(0).to_string();
        let grpc = host::header_value(MapType::HttpRequestHeaders, "content-type")
            .ok()
            .flatten()
            .is_some_and(|value| value.starts_with(b"application/grpc"));
        let grpc_status = if grpc {
            int_property(&["response", "grpc_status"])
                .map_or_else(|| "unknown".to_string(), |s| s.to_string())
        } else {
            "none".to_string()
        };
        let tags = RequestTags {
            reporter,
            source: &source,
            destination: &destination,
            response_code: &response_code,
            grpc,
            grpc_status: &grpc_status,
        };

        self.count(Metric::Requests, &tags, None, 1);
        if let Some(nanos) = int_property(&["request", "duration"]) {
            let milliseconds =
                u64::try_from(nanos).unwrap_or(0).saturating_add(500_000) / 1_000_000;
            if let Some(id) = shared.series(
                Metric::Duration,
                &self.tag_values(Metric::Duration, &tags, None),
            ) {
                let _ = hostcalls::record_metric(id, milliseconds);
            }
        }
        let flags = int_property(&["response", "flags"]).unwrap_or(0) as u64;
        for failure in upstream_failures(flags) {
            self.count(
                Metric::UpstreamFailures,
                &tags,
                Some(("failure", failure)),
                1,
            );
        }
        if reporter == Reporter::Source {
            let attempts = int_property(&["upstream", "request_attempt_count"]).unwrap_or(0);
            if attempts > 1 {
                self.count(Metric::RetryAttempts, &tags, None, attempts - 1);
            }
        }
        if let Some(expected) = &shared.settings.expected_dependencies {
            let (from, to) = (
                source.get_or_unknown(Label::Service),
                destination.get_or_unknown(Label::Service),
            );
            if !is_expected(expected, from, to) {
                self.count(Metric::UnexpectedDependency, &tags, None, 1);
                self.warn_unexpected(&source, &destination);
            }
        }
    }

    /// Both ends' labels: label-enrich's filter state when it ran first, else resolved here
    /// with the same rules (this workload from the node; the peer from its trusted claims).
    fn ends(&self, reporter: Reporter) -> (Labels, Labels) {
        let shared = &self.shared;
        let state = |key: &str| host::property(&[key]).map(|value| labels_from_state(&value));
        let own = || shared.own.get().clone();
        match reporter {
            Reporter::Source => {
                let source = state(SOURCE_STATE_KEY).unwrap_or_else(own);
                let destination = state(DESTINATION_STATE_KEY).unwrap_or_else(|| {
                    let header = host::header_value(MapType::HttpResponseHeaders, PEER_HEADER)
                        .ok()
                        .flatten();
                    let outcome = resolve::outbound_response(
                        &shared.settings.labels,
                        header.as_deref(),
                        &host::upstream_identity(),
                        host::upstream_cluster,
                    );
                    shared.count_problems(&outcome.problems);
                    outcome.destination
                });
                (source, destination)
            }
            Reporter::Destination => {
                let destination = state(DESTINATION_STATE_KEY).unwrap_or_else(own);
                let (source, problems) = host::inbound_source(&shared.settings.labels);
                shared.count_problems(&problems);
                (source, destination)
            }
        }
    }

    fn tag_values<'a>(
        &self,
        metric: Metric,
        tags: &'a RequestTags<'a>,
        extra: Option<(&'static str, &'a str)>,
    ) -> Vec<(&'static str, &'a str)> {
        let mut values: Vec<(&'static str, &'a str)> = self.shared.metric_tags[metric.index()]
            .iter()
            .map(|tag| (tag.name(), tags.value(*tag)))
            .collect();
        values.extend(extra);
        values
    }

    fn count(
        &self,
        metric: Metric,
        tags: &RequestTags,
        extra: Option<(&'static str, &str)>,
        by: i64,
    ) {
        let values = self.tag_values(metric, tags, extra);
        if let Some(id) = self.shared.series(metric, &values) {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    fn warn_unexpected(&self, source: &Labels, destination: &Labels) {
        let pair = (
            source.get_or_unknown(Label::Service).to_string(),
            destination.get_or_unknown(Label::Service).to_string(),
        );
        let mut warned = self.shared.warned_pairs.borrow_mut();
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
