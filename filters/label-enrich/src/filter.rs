//! The thin proxy-wasm layer: reads headers and properties from Envoy, lets `logic` decide,
//! writes the result back. Every host call's failure is counted and the request goes on.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use eastwest_common::host;
use eastwest_common::labels::Labels;
use eastwest_common::metric_name::tagged_name;
use eastwest_common::peer::ISTIO_PEER_METADATA_HEADER;
use eastwest_common::properties::Direction;
use eastwest_common::trust::Refusal;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

use crate::config::Settings;
use eastwest_common::resolve::{
    self, Problem, Problems, DESTINATION_STATE_KEY, PEER_HEADER, SOURCE_HEADER, SOURCE_STATE_KEY,
};

const FILTER: &str = "label-enrich";
const BAGGAGE: &str = "baggage";

proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { shared: None }));
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

/// This workload's labels, in the two encodings the hot path needs, computed once.
struct Own {
    /// Members stamped into baggage and `x-eastwest-peer` (only labels that are known).
    wire: String,
    /// All six labels, `unknown` included: the filter-state value.
    complete: String,
}

impl Own {
    fn new(labels: &Labels) -> Own {
        Own {
            wire: labels.to_baggage_members(),
            complete: labels.to_complete_members(),
        }
    }
}

/// Per-VM state shared by the root context and its streams.
struct Shared {
    settings: Settings,
    metrics: Metrics,
    own: RefCell<Own>,
    /// The node could not be read at configure time; try once more on the first request.
    node_pending: Cell<bool>,
    warned_direction: Cell<bool>,
}

impl Shared {
    /// Own labels: configuration first, then the node's metadata.
    fn resolve_own(&self) -> Option<Own> {
        let own = host::own_labels(&self.settings.labels)?;
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
        Some(Own::new(&own.labels))
    }

    fn count(&self, problem: Problem, count: u32) {
        let mut problems = Problems::default();
        problems.add(problem, count);
        self.metrics.count_problems(&problems);
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
        let shared = Shared {
            own: RefCell::new(Own::new(&settings.labels.local)),
            settings,
            metrics: Metrics::define(),
            node_pending: Cell::new(false),
            warned_direction: Cell::new(false),
        };
        match shared.resolve_own() {
            Some(own) => *shared.own.borrow_mut() = own,
            None => shared.node_pending.set(true),
        }
        self.shared = Some(Rc::new(shared));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Stream {
            shared,
            direction: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    shared: Rc<Shared>,
    direction: Option<Direction>,
}

impl Context for Stream {}

impl Stream {
    fn count_problems(&self, problems: &Problems, what: &str) {
        if problems == &Problems::default() {
            return;
        }
        self.shared.metrics.count_problems(problems);
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
            self.shared.metrics.count_refusal(peer, refusal);
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
            self.shared.count(Problem::HostCall, 1);
        }
    }

    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        host::header_value(map, name).unwrap_or_else(|_| {
            self.shared.count(Problem::HostCall, 1);
            None
        })
    }

    /// Replaces every value of a header by one value (`None`: removes it).
    fn write_header(&self, map: MapType, name: &str, value: Option<&[u8]>, existing_values: usize) {
        if existing_values > 1 && value.is_some() {
            // Envoy versions differ on whether a replace touches only the first value.
            let _ = host::set_header(map, name, None);
        }
        if host::set_header(map, name, value).is_err() {
            self.shared.count(Problem::HostCall, 1);
        }
    }

    fn baggage_values(&self) -> Vec<Vec<u8>> {
        host::header_values(MapType::HttpRequestHeaders, BAGGAGE).unwrap_or_else(|_| {
            self.shared.count(Problem::HostCall, 1);
            Vec::new()
        })
    }

    fn outbound_request(&self) {
        let own = self.shared.own.borrow();
        let values = self.baggage_values();
        let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        if !own.wire.is_empty() || eastwest_common::baggage::has_label_members(&slices) {
            let rebuilt = eastwest_common::baggage::replace_label_members(&slices, &own.wire);
            self.write_header(
                MapType::HttpRequestHeaders,
                BAGGAGE,
                rebuilt.as_deref(),
                values.len(),
            );
        }
        self.set_state(SOURCE_STATE_KEY, &own.complete);
    }

    fn inbound_request(&self) {
        let values = self.baggage_values();
        let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let peer_metadata = self.header(MapType::HttpRequestHeaders, ISTIO_PEER_METADATA_HEADER);
        let identity = host::downstream_identity(self.shared.settings.labels.peer_trust);
        let outcome = resolve::inbound_request(
            &self.shared.settings.labels,
            &slices,
            peer_metadata.as_deref(),
            &identity,
        );
        self.count_problems(&outcome.problems, "caller input");
        self.count_refusal(Peer::Source, outcome.refused);
        if let Some(rebuilt) = &outcome.rewrite_baggage {
            self.write_header(
                MapType::HttpRequestHeaders,
                BAGGAGE,
                rebuilt.as_deref(),
                values.len(),
            );
        }
        if outcome.remove_peer_metadata {
            self.write_header(
                MapType::HttpRequestHeaders,
                ISTIO_PEER_METADATA_HEADER,
                None,
                1,
            );
        }
        // Always written, so that a caller can never hand the application its own version.
        let members = outcome.source.to_baggage_members();
        let source_value = (!members.is_empty()).then_some(members.as_bytes());
        self.write_header(MapType::HttpRequestHeaders, SOURCE_HEADER, source_value, 2);
        self.set_state(SOURCE_STATE_KEY, &outcome.source.to_complete_members());
        self.set_state(DESTINATION_STATE_KEY, &self.shared.own.borrow().complete);
    }

    fn outbound_response(&self) {
        let peer_header = self.header(MapType::HttpResponseHeaders, PEER_HEADER);
        if peer_header.is_some() {
            self.write_header(MapType::HttpResponseHeaders, PEER_HEADER, None, 1);
        }
        let identity = host::upstream_identity();
        let outcome = resolve::outbound_response(
            &self.shared.settings.labels,
            peer_header.as_deref(),
            &identity,
            host::upstream_cluster,
        );
        self.count_problems(&outcome.problems, "destination input");
        self.count_refusal(Peer::Destination, outcome.refused);
        self.set_state(
            DESTINATION_STATE_KEY,
            &outcome.destination.to_complete_members(),
        );
    }

    fn inbound_response(&self) {
        let own = self.shared.own.borrow();
        let value = (!own.wire.is_empty()).then_some(own.wire.as_bytes());
        self.write_header(MapType::HttpResponseHeaders, PEER_HEADER, value, 1);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.shared.node_pending.replace(false) {
            if let Some(own) = self.shared.resolve_own() {
                *self.shared.own.borrow_mut() = own;
            }
        }
        self.direction = self
            .shared
            .settings
            .direction
            .or_else(host::listener_direction);
        match self.direction {
            Some(Direction::Outbound) => self.outbound_request(),
            Some(Direction::Inbound) => self.inbound_request(),
            None => {
                self.shared.count(Problem::DirectionUnknown, 1);
                if !self.shared.warned_direction.replace(true) {
                    log(
                        LogLevel::Warn,
                        "the listener reports no traffic direction; set \"direction\" in the \
                         configuration or traffic_direction on the listener. Requests pass unchanged.",
                    );
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.direction {
            Some(Direction::Outbound) => self.outbound_response(),
            Some(Direction::Inbound) => self.inbound_response(),
            None => {}
        }
        Action::Continue
    }
}
