//! The thin proxy-wasm layer: reads headers and properties from Envoy, lets `logic` decide,
//! writes the result back. Every host call's failure is counted and the request goes on.
//!
//! [`LabelEnrich`] is the feature (also run by the one-module sidecar, `eastwest-sidecar`);
//! `Root` and `Stream` run it as the `label-enrich` module.

use std::cell::Cell;
use std::rc::Rc;

use eastwest_common::host::{self, Exchange, Resolver};
use eastwest_common::metric_name::tagged_name;
use eastwest_common::party::Party;
use eastwest_common::peer::ISTIO_PEER_METADATA_HEADER;
use eastwest_common::properties::Direction;
use eastwest_common::trust::Refusal;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

use crate::config::Settings;
use eastwest_common::resolve::{
    Problem, Problems, DESTINATION_STATE_KEY, PEER_HEADER, SOURCE_HEADER, SOURCE_STATE_KEY,
};

pub const FILTER: &str = "label-enrich";
const BAGGAGE: &str = "baggage";

// The one-module sidecar links this crate as a library and registers its own root context.
#[cfg(not(feature = "embedded"))]
proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { feature: None }));
}}

fn log(level: LogLevel, message: &str) {
    host::log(FILTER, level, message);
}

fn debug_enabled() -> bool {
    matches!(
        hostcalls::get_log_level(),
        Ok(LogLevel::Trace | LogLevel::Debug)
    )
}

/// Metric ids, defined once per VM at configure time.
struct Metrics {
    malformed: [Option<u32>; Problem::ALL.len()],
    /// Indexed by [`Peer`], then by [`Refusal`].
    refused: [[Option<u32>; Refusal::ALL.len()]; 2],
}

#[derive(Clone, Copy)]
enum Peer {
    Source = 0,
    Destination = 1,
}

impl Metrics {
    fn define() -> Metrics {
        let define = |name: String| hostcalls::define_metric(MetricType::Counter, &name).ok();
        let malformed = Problem::ALL.map(|problem| {
            define(tagged_name(
                &[("reason", problem.as_str())],
                "eastwest_label_enrich_malformed_total",
            ))
        });
        // In the order of `Peer`.
        let refused = ["source", "destination"].map(|peer| {
            Refusal::ALL.map(|refusal| {
                define(tagged_name(
                    &[("peer", peer), ("reason", refusal.as_str())],
                    "eastwest_label_enrich_claims_refused_total",
                ))
            })
        });
        Metrics { malformed, refused }
    }

    fn count_problems(&self, problems: &Problems) {
        for (problem, count) in problems.iter() {
            if let Some(id) = self.malformed[problem.index()] {
                let _ = hostcalls::increment_metric(id, i64::from(count));
            }
        }
    }

    fn count_refusal(&self, peer: Peer, refusal: Refusal) {
        if let Some(id) = self.refused[peer as usize][refusal.index()] {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// The label-enrich feature of one VM: its settings, metrics, this workload's labels and the
/// memos of recent peers' resolutions.
pub struct LabelEnrich {
    direction: Option<Direction>,
    resolver: Resolver,
    metrics: Metrics,
    own: host::OwnLabelsCell,
    warned_direction: Cell<bool>,
}

/// What a stream remembers between its callbacks.
#[derive(Default)]
pub struct StreamState {
    direction: Option<Direction>,
}

impl LabelEnrich {
    /// Defines the metrics and resolves this workload's labels (again on the first request if
    /// the host does not expose the node yet).
    pub fn new(settings: Settings) -> LabelEnrich {
        let feature = LabelEnrich {
            direction: settings.direction,
            own: host::OwnLabelsCell::new(&settings.labels),
            resolver: Resolver::new(settings.labels),
            metrics: Metrics::define(),
            warned_direction: Cell::new(false),
        };
        feature.refresh_own();
        feature
    }

    /// Own labels: configuration first, then the node's metadata.
    fn refresh_own(&self) {
        self.own.refresh(&self.resolver.settings, |own| {
            if own.invalid_values > 0 {
                self.count(Problem::NodeMetadata, own.invalid_values);
                log(
                    LogLevel::Warn,
                    "node metadata holds invalid label values; they are ignored",
                );
            }
            if let Some(error) = &own.undecodable {
                self.count(Problem::NodeMetadata, 1);
                log(
                    LogLevel::Warn,
                    &format!(
                        "node metadata cannot be decoded ({error}); using the configured labels only"
                    ),
                );
            }
        });
    }

    fn count(&self, problem: Problem, count: u32) {
        let mut problems = Problems::default();
        problems.add(problem, count);
        self.metrics.count_problems(&problems);
    }

    fn count_problems(&self, problems: &Problems, what: &str) {
        if problems == &Problems::default() {
            return;
        }
        self.metrics.count_problems(problems);
        if debug_enabled() {
            let summary: Vec<String> = problems
                .iter()
                .map(|(problem, count)| format!("{} x{count}", problem.as_str()))
                .collect();
            log(
                LogLevel::Debug,
                &format!("skipped malformed {what}: {}", summary.join(", ")),
            );
        }
    }

    fn count_refusal(&self, peer: Peer, refusal: Option<Refusal>) {
        if let Some(refusal) = refusal {
            self.metrics.count_refusal(peer, refusal);
            if debug_enabled() {
                let who = match peer {
                    Peer::Source => "caller",
                    Peer::Destination => "destination",
                };
                log(
                    LogLevel::Debug,
                    &format!("refused the {who}'s label claims: {}", refusal.as_str()),
                );
            }
        }
    }

    fn set_state(&self, key: &str, value: &str) {
        if host::set_filter_state(key, value.as_bytes()).is_err() {
            self.count(Problem::HostCall, 1);
        }
    }

    /// Replaces every value of a header by one value (`None`: removes it).
    fn write_header(&self, map: MapType, name: &str, value: Option<&[u8]>, existing_values: usize) {
        if existing_values > 1 && value.is_some() {
            // Envoy versions differ on whether a replace touches only the first value.
            let _ = host::set_header(map, name, None);
        }
        if host::set_header(map, name, value).is_err() {
            self.count(Problem::HostCall, 1);
        }
    }

    /// A header map, to read every value of a header from (empty when the host refuses or the
    /// encoding is inconsistent: counted, and the request goes on).
    fn headers(&self, map: MapType) -> host::HeaderMap {
        host::header_map(map).unwrap_or_else(|_| {
            self.count(Problem::HostCall, 1);
            host::HeaderMap::default()
        })
    }

    fn baggage<'a>(&self, headers: &'a host::HeaderMap) -> Vec<&'a [u8]> {
        headers.values(BAGGAGE).unwrap_or_else(|| {
            self.count(Problem::HostCall, 1);
            Vec::new()
        })
    }

    fn outbound_request(&self, exchange: &mut Exchange) {
        let own = self.own.get();
        let headers = self.headers(MapType::HttpRequestHeaders);
        let values = self.baggage(&headers);
        if !own.wire.is_empty() || eastwest_common::baggage::has_label_members(&values) {
            let rebuilt = eastwest_common::baggage::replace_label_members(&values, &own.wire);
            self.write_header(
                MapType::HttpRequestHeaders,
                BAGGAGE,
                rebuilt.as_deref(),
                values.len(),
            );
        }
        self.set_state(SOURCE_STATE_KEY, &own.state);
        exchange.source = Some(own);
    }

    fn inbound_request(&self, exchange: &mut Exchange) {
        let identity = host::downstream_identity_raw(self.resolver.settings.peer_trust);
        let headers = self.headers(MapType::HttpRequestHeaders);
        // Every value of both: a second one would otherwise go on uninspected.
        let [values, peer_metadata] = headers
            .values_of_each([BAGGAGE, ISTIO_PEER_METADATA_HEADER])
            .unwrap_or_else(|| {
                self.count(Problem::HostCall, 1);
                Default::default()
            });
        let resolution = self.resolver.inbound(&values, &peer_metadata, &identity);
        let decision = &resolution.decision;
        self.count_problems(&decision.problems, "caller input");
        self.count_refusal(Peer::Source, decision.refused);
        if let Some(members) = &decision.rewrite_members {
            let rebuilt = eastwest_common::baggage::replace_label_members(&values, members);
            self.write_header(
                MapType::HttpRequestHeaders,
                BAGGAGE,
                rebuilt.as_deref(),
                values.len(),
            );
        }
        if decision.remove_peer_metadata {
            self.write_header(
                MapType::HttpRequestHeaders,
                ISTIO_PEER_METADATA_HEADER,
                None,
                1,
            );
        }
        // Always written, so that a caller can never hand the application its own version.
        let source = &resolution.source;
        let source_value = (!source.wire.is_empty()).then_some(source.wire.as_bytes());
        self.write_header(MapType::HttpRequestHeaders, SOURCE_HEADER, source_value, 2);
        self.set_state(SOURCE_STATE_KEY, &source.state);
        let own = self.own.get();
        self.set_state(DESTINATION_STATE_KEY, &own.state);
        exchange.source = Some(source.clone());
        exchange.destination = Some(own);
    }

    fn outbound_response(&self, exchange: &mut Exchange) {
        // Every value, so that a second one is seen (and refused) rather than passed over.
        let headers = self.headers(MapType::HttpResponseHeaders);
        let peer_header = headers.values(PEER_HEADER).unwrap_or_default();
        if !peer_header.is_empty() {
            // Removes every value.
            self.write_header(MapType::HttpResponseHeaders, PEER_HEADER, None, 1);
        }
        let identity = host::upstream_identity_raw();
        let resolution = self.resolver.outbound(&peer_header, &identity);
        self.count_problems(&resolution.outcome.problems, "destination input");
        self.count_refusal(Peer::Destination, resolution.outcome.refused);
        self.set_state(DESTINATION_STATE_KEY, &resolution.destination.state);
        exchange.destination = Some(resolution.destination.clone());
    }

    fn inbound_response(&self) {
        let own: Rc<Party> = self.own.get();
        let value = (!own.wire.is_empty()).then_some(own.wire.as_bytes());
        self.write_header(MapType::HttpResponseHeaders, PEER_HEADER, value, 1);
    }

    pub fn on_request_headers(&self, stream: &mut StreamState, exchange: &mut Exchange) {
        self.refresh_own();
        stream.direction = exchange.direction(self.direction);
        match stream.direction {
            Some(Direction::Outbound) => self.outbound_request(exchange),
            Some(Direction::Inbound) => self.inbound_request(exchange),
            None => {
                self.count(Problem::DirectionUnknown, 1);
                if !self.warned_direction.replace(true) {
                    log(
                        LogLevel::Warn,
                        "the listener reports no traffic direction; set \"direction\" in the \
                         configuration or traffic_direction on the listener. Requests pass unchanged.",
                    );
                }
            }
        }
    }

    pub fn on_response_headers(&self, stream: &StreamState, exchange: &mut Exchange) {
        match stream.direction {
            Some(Direction::Outbound) => self.outbound_response(exchange),
            Some(Direction::Inbound) => self.inbound_response(),
            None => {}
        }
    }
}

// The separate module's contexts (unused when the sidecar embeds the feature).
#[cfg_attr(feature = "embedded", allow(dead_code))]
struct Root {
    feature: Option<Rc<LabelEnrich>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(settings) = host::configure(FILTER, Settings::parse) else {
            return false;
        };
        self.feature = Some(Rc::new(LabelEnrich::new(settings)));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let feature = self.feature.clone()?;
        Some(Box::new(Stream {
            feature,
            state: StreamState::default(),
            exchange: Exchange::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// The separate module's contexts (unused when the sidecar embeds the feature).
#[cfg_attr(feature = "embedded", allow(dead_code))]
struct Stream {
    feature: Rc<LabelEnrich>,
    state: StreamState,
    exchange: Exchange,
}

impl Context for Stream {}

// The callbacks implemented here are listed in Cargo.toml (`callbacks`); the build removes
// the SDK's other stream callbacks from the exports.
impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.feature
            .on_request_headers(&mut self.state, &mut self.exchange);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.feature
            .on_response_headers(&self.state, &mut self.exchange);
        Action::Continue
    }
}
