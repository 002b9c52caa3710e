//! The thin proxy-wasm layer: reads the attempt headers and the destination, asks the budget
//! (kept in shared data, see `ledger`), and enforces its answer as the configured mode says.
//! Whatever goes wrong on the filter's side lets the request through and is counted.
//!
//! [`RetryBudget`] is the feature (also run by the one-module sidecar, `eastwest-sidecar`);
//! `Root` and `Stream` run it as the `retry-budget` module.

use std::cell::RefCell;
use std::rc::Rc;

use eastwest_common::host::{self, Exchange, Resolver};
use eastwest_common::labels::{Label, UNKNOWN};
use eastwest_common::memo::Memo;
use eastwest_common::metric_name::tagged_name;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::{Assignment, Mode, Settings, OVERFLOW};
use crate::ledger::{self, Decision, SharedStore, StoreError, Trouble};
use eastwest_common::cluster::{self, Destination};

use crate::request::{
    self, Attempt, BUDGET_EXHAUSTED, BUDGET_HEADER, DENIED_BODY, DENIED_GRPC_STATUS, DENIED_STATUS,
    ENVOY_ATTEMPT_COUNT, ENVOY_MAX_RETRIES, ENVOY_RATELIMITED, GRPC_PREVIOUS_ATTEMPTS,
    GRPC_RETRY_PUSHBACK,
};
use crate::window::{Params, Window};

pub const FILTER: &str = "retry-budget";

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

/// Proxy-wasm shared data, without the SDK's panics.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        host::shared_data(key).map_err(|_| StoreError::Refused)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        host::set_shared_data(key, value, cas).map_err(|status| match status {
            Status::CasMismatch => StoreError::CasMismatch,
            _ => StoreError::Refused,
        })
    }
}

/// Why the filter let a request through without the budget's say (`reason` tag of
/// `eastwest_retry_budget_fail_open_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailOpen {
    Ledger(Trouble),
    AttemptHeader,
    ClockUnavailable,
    HostCall,
}

impl FailOpen {
    const ALL: [FailOpen; 7] = [
        FailOpen::Ledger(Trouble::SharedData),
        FailOpen::Ledger(Trouble::Contention),
        FailOpen::Ledger(Trouble::MalformedState),
        FailOpen::Ledger(Trouble::ClockReset),
        FailOpen::AttemptHeader,
        FailOpen::ClockUnavailable,
        FailOpen::HostCall,
    ];

    fn as_str(self) -> &'static str {
        match self {
            FailOpen::Ledger(trouble) => trouble.as_str(),
            FailOpen::AttemptHeader => "attempt_header",
            FailOpen::ClockUnavailable => "clock_unavailable",
            FailOpen::HostCall => "host_call",
        }
    }

    fn index(self) -> usize {
        FailOpen::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// One budget as this VM sees it: where it lives in shared data, its parameters, the
/// deposits not yet published, and its metric ids.
struct Budget {
    key: String,
    params: Params,
    pending: Window,
    /// `client-headers`: the shared window as read in the slot it was read in. Within one slot
    /// the budget only gains room from deposits (kept in `pending`), so it is read once per slot
    /// instead of on every request; this worker's own writes drop it. Other workers' retries
    /// are seen from the next slot (`ttl / 10`) on.
    shared_view: Option<SlotView>,
    /// `destination_service` and, in `server` mode, `source_service`, for log lines.
    describe: String,
    admitted: Option<u32>,
    denied: Option<u32>,
}

/// The shared window as read in one slot, and whether the budget was seen to have room then:
/// within the slot only deposits change it, which only add room, so a yes holds for the slot.
struct SlotView {
    slot: u64,
    shared: Window,
    has_room: bool,
}

/// The retry-budget feature of one VM.
pub struct RetryBudget {
    settings: Settings,
    resolver: Resolver,
    budgets: RefCell<Vec<Budget>>,
    /// Budget index by subject (destination service, or calling service in `server` mode).
    subjects: RefCell<rustc_hash::FxHashMap<String, usize>>,
    /// Budgets that count against `max_budgets` (not the configured destinations' nor the
    /// overflow budget).
    counted: std::cell::Cell<usize>,
    /// Budget index by the raw input it came from (cluster name; authority or caller), so that
    /// a repeated destination is not parsed again.
    by_cluster: RefCell<Memo<usize>>,
    by_other: RefCell<Memo<usize>>,
    fail_open: Vec<Option<u32>>,
    own: host::OwnLabelsCell,
}

impl RetryBudget {
    /// Defines the fixed metrics and asks for the timer that publishes deposits.
    pub fn new(settings: Settings) -> RetryBudget {
        let fail_open = FailOpen::ALL
            .iter()
            .map(|reason| {
                let name = tagged_name(
                    &[("reason", reason.as_str())],
                    "eastwest_retry_budget_fail_open_total",
                );
                hostcalls::define_metric(MetricType::Counter, &name).ok()
            })
            .collect();
        let period = settings.publish_period_millis() as u32;
        let mut subjects = rustc_hash::FxHashMap::default();
        // Sized up front (configured destinations and the overflow budget too) so that no
        // request pays for growing it.
        let capacity = settings.max_budgets_per_vm();
        subjects.reserve(capacity);
        let feature = RetryBudget {
            own: host::OwnLabelsCell::new(&settings.labels),
            resolver: Resolver::new(settings.labels.clone()),
            budgets: RefCell::new(Vec::with_capacity(capacity)),
            subjects: RefCell::new(subjects),
            counted: std::cell::Cell::new(0),
            by_cluster: RefCell::new(Memo::new(eastwest_common::memo::DEFAULT_CAPACITY)),
            by_other: RefCell::new(Memo::new(eastwest_common::memo::DEFAULT_CAPACITY)),
            settings,
            fail_open,
        };
        feature.own.refresh(&feature.settings.labels, |_| {});
        if host::set_tick_period(period).is_err() {
            log(
                LogLevel::Warn,
                "the host refused a timer; deposits are published only with retries",
            );
        }
        feature
    }

    fn count_fail_open(&self, reason: FailOpen) {
        if let Some(id) = self.fail_open[reason.index()] {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// The budget for `subject` (a destination service, or a calling service in `server`
    /// mode), created (with its metrics) on first use; beyond `max_budgets`, the overflow one
    /// (configured destinations always get their own: [`Settings::assign`]).
    fn budget_index(&self, subject: &str, destination: &Destination) -> usize {
        let mut subjects = self.subjects.borrow_mut();
        if let Some(index) = subjects.get(subject) {
            return *index;
        }
        let subject = match self.settings.assign(subject, self.counted.get()) {
            Assignment::Configured => subject,
            Assignment::Counted => {
                self.counted.set(self.counted.get() + 1);
                subject
            }
            Assignment::Overflow => OVERFLOW,
        };
        if let Some(index) = subjects.get(subject) {
            return *index;
        }
        // The overflow budget of the client modes is no destination's: it is labelled
        // `overflow`, as telemetry's overflow series are.
        let overflow_destination;
        let destination = if subject == OVERFLOW && self.settings.mode != Mode::Server {
            overflow_destination = Destination {
                service: OVERFLOW.to_string(),
                namespace: OVERFLOW.to_string(),
            };
            &overflow_destination
        } else {
            destination
        };
        let mut budgets = self.budgets.borrow_mut();
        budgets.push(self.new_budget(subject, destination));
        subjects.insert(subject.to_string(), budgets.len() - 1);
        budgets.len() - 1
    }

    fn with_budget<R>(&self, index: usize, action: impl FnOnce(&mut Budget) -> R) -> Option<R> {
        self.budgets.borrow_mut().get_mut(index).map(action)
    }

    fn new_budget(&self, subject: &str, destination: &Destination) -> Budget {
        let mode = self.settings.mode;
        let mut tags: Vec<(&str, &str)> = vec![
            ("destination_service", &destination.service),
            ("destination_namespace", &destination.namespace),
            ("mode", mode.as_str()),
        ];
        let (params, describe) = match mode {
            Mode::Server => {
                tags.push(("source_service", subject));
                (
                    self.settings.params_for(&destination.service),
                    format!("from {subject} to {}", destination.service),
                )
            }
            Mode::Client | Mode::ClientHeaders => (
                self.settings.params_for(subject),
                format!("toward {subject}"),
            ),
        };
        let define = |metric: &str| {
            hostcalls::define_metric(MetricType::Counter, &tagged_name(&tags, metric)).ok()
        };
        Budget {
            key: request::budget_key(mode.as_str(), subject),
            params,
            pending: Window::new(),
            shared_view: None,
            describe,
            admitted: define("eastwest_retry_budget_admitted_total"),
            denied: define("eastwest_retry_budget_denied_total"),
        }
    }

    /// Publishes each budget's deposits once per slot: the only shared-data write that does
    /// not come from a retry.
    pub fn on_tick(&self) {
        let Some(now) = host::now_nanos() else {
            return;
        };
        for budget in self.budgets.borrow_mut().iter_mut() {
            if !budget.pending.is_empty() {
                budget.shared_view = None;
            }
            if let Some(trouble) = ledger::publish(
                &HostStore,
                &budget.key,
                &budget.params,
                &mut budget.pending,
                now,
            ) {
                self.count_fail_open(FailOpen::Ledger(trouble));
            }
        }
    }

    pub fn on_request_headers(&self, stream: &mut StreamState, exchange: &mut Exchange) -> Action {
        match self.settings.mode {
            Mode::Client | Mode::Server => self.admit_attempt(stream, exchange),
            Mode::ClientHeaders => {
                self.cap_retries(stream);
                Action::Continue
            }
        }
    }

    pub fn on_response_headers(&self, stream: &StreamState) {
        if stream.retries_disabled {
            let failed = host::header_value(MapType::HttpResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|status| std::str::from_utf8(&status).ok()?.parse::<u32>().ok())
                .is_some_and(|status| status >= 500);
            if failed {
                self.deny_visibly(stream);
            }
        }
    }

    pub fn on_log(&self, stream: &StreamState, exchange: &mut Exchange) {
        if self.settings.mode == Mode::ClientHeaders {
            self.charge_retries(stream, exchange);
        }
    }

    /// The budget of an outbound request: its cluster (Istio's names carry service and
    /// namespace), else its authority.
    fn outbound_budget(&self) -> usize {
        let cluster = host::upstream_cluster();
        if let Some(cluster) = &cluster {
            let mut by_cluster = self.by_cluster.borrow_mut();
            if let Some(index) = by_cluster.get(&[cluster]) {
                return *index;
            }
            if let Some(destination) = cluster::destination_from_cluster(cluster) {
                let index = self.budget_index(&destination.service, &destination);
                by_cluster.insert(&[cluster], index);
                return index;
            }
        }
        let mut recent = self.by_other.borrow_mut();
        let authority = request_header(":authority");
        let parts: [&[u8]; 2] = [b"authority", authority.as_deref().unwrap_or_default()];
        if let Some(index) = recent.get(&parts) {
            return *index;
        }
        let destination = authority
            .as_deref()
            .and_then(cluster::destination_from_host)
            .unwrap_or_else(|| Destination {
                service: UNKNOWN.to_string(),
                namespace: UNKNOWN.to_string(),
            });
        let index = self.budget_index(&destination.service, &destination);
        recent.insert(&parts, index);
        index
    }

    /// The budget this request draws on, by mode.
    fn budget_of_request(&self, exchange: &Exchange) -> usize {
        match self.settings.mode {
            Mode::Server => {
                // A caller whose claims are refused still gets a budget (its certificate's
                // service, else `unknown`'s); label-enrich and telemetry count the refusals.
                let caller = exchange
                    .source
                    .clone()
                    .unwrap_or_else(|| self.resolver.inbound_source().0);
                let service = caller.labels.get_or_unknown(Label::Service);
                let parts: [&[u8]; 2] = [b"caller", service.as_bytes()];
                if let Some(index) = self.by_other.borrow().get(&parts) {
                    return *index;
                }
                self.own.refresh(&self.settings.labels, |_| {});
                let own = self.own.get();
                let destination = Destination {
                    service: own.labels.get_or_unknown(Label::Service).to_string(),
                    namespace: own.labels.get_or_unknown(Label::Namespace).to_string(),
                };
                let index = self.budget_index(service, &destination);
                self.by_other.borrow_mut().insert(&parts, index);
                index
            }
            Mode::Client | Mode::ClientHeaders => self.outbound_budget(),
        }
    }

    fn now(&self) -> Option<u64> {
        let now = host::now_nanos();
        if now.is_none() {
            self.count_fail_open(FailOpen::ClockUnavailable);
        }
        now
    }

    /// `client` and `server`: a first attempt deposits; a retry withdraws, or is refused.
    fn admit_attempt(&self, stream: &mut StreamState, exchange: &Exchange) -> Action {
        let envoy_count = request_header(ENVOY_ATTEMPT_COUNT);
        let grpc_previous = request_header(GRPC_PREVIOUS_ATTEMPTS);
        let (attempt, bad) = request::attempt(envoy_count.as_deref(), grpc_previous.as_deref());
        if bad.is_some() {
            self.count_fail_open(FailOpen::AttemptHeader);
        }
        let Some(now) = self.now() else {
            return Action::Continue;
        };
        let index = self.budget_of_request(exchange);
        stream.budget = Some(index);
        let decision = self
            .with_budget(index, |budget| match attempt {
                Attempt::First => {
                    let slot = budget.params.slot_of(now);
                    budget.pending.add(slot, 1, 0);
                    None
                }
                Attempt::Retry(_) => {
                    budget.shared_view = None;
                    let (decision, trouble) = ledger::withdraw(
                        &HostStore,
                        &budget.key,
                        &budget.params,
                        &mut budget.pending,
                        now,
                        1,
                    );
                    match decision {
                        Decision::Admitted | Decision::FailedOpen(_) => count(budget.admitted, 1),
                        Decision::Denied => {
                            count(budget.denied, 1);
                            log(
                                LogLevel::Debug,
                                &format!(
                                    "denied a retry {} ({} mode): the budget of the last window is spent",
                                    budget.describe,
                                    self.settings.mode.as_str()
                                ),
                            );
                        }
                    }
                    Some((decision, trouble))
                }
            })
            .flatten();
        match decision {
            Some((decision, trouble)) => {
                if let Some(trouble) = trouble {
                    self.count_fail_open(FailOpen::Ledger(trouble));
                }
                if decision == Decision::Denied {
                    return self.refuse();
                }
                Action::Continue
            }
            None => Action::Continue,
        }
    }

    /// Answers a refused retry locally with a response that Envoy's router does not retry
    /// (`x-envoy-ratelimited`) and that tells gRPC clients not to retry either.
    fn refuse(&self) -> Action {
        let grpc = request_header("content-type")
            .is_some_and(|value| value.starts_with(b"application/grpc"));
        let mut headers: Vec<(&[u8], &[u8])> = vec![
            (BUDGET_HEADER.as_bytes(), BUDGET_EXHAUSTED.as_bytes()),
            (ENVOY_RATELIMITED.as_bytes(), b"true"),
        ];
        let grpc_status = if grpc {
            headers.push((GRPC_RETRY_PUSHBACK.as_bytes(), b"-1"));
            DENIED_GRPC_STATUS
        } else {
            -1
        };
        match host::send_local_reply(
            DENIED_STATUS,
            "retry_budget_exhausted",
            &headers,
            DENIED_BODY.as_bytes(),
            grpc_status,
        ) {
            Ok(()) => Action::Pause,
            Err(_) => {
                // Could not refuse: let the retry through rather than hang the request.
                self.count_fail_open(FailOpen::HostCall);
                Action::Continue
            }
        }
    }

    /// `client-headers`: a first attempt deposits; when the budget has no room left, the
    /// router is told not to retry this request.
    fn cap_retries(&self, stream: &mut StreamState) {
        let Some(now) = self.now() else { return };
        let index = self.outbound_budget();
        stream.budget = Some(index);
        let room = self
            .with_budget(index, |budget| {
                let slot = budget.params.slot_of(now);
                budget.pending.add(slot, 1, 0);
                let view = match &mut budget.shared_view {
                    Some(view) if view.slot == slot => view,
                    _ => budget.shared_view.insert(SlotView {
                        slot,
                        shared: ledger::shared_window(&HostStore, &budget.key)?,
                        has_room: false,
                    }),
                };
                if !view.has_room {
                    view.has_room =
                        ledger::has_room_in(&view.shared, &budget.params, &budget.pending, now);
                }
                Ok(view.has_room)
            })
            .unwrap_or(Ok(true));
        match room {
            Ok(true) => {}
            Ok(false) => {
                match host::set_header(MapType::HttpRequestHeaders, ENVOY_MAX_RETRIES, Some(b"0")) {
                    Ok(()) => stream.retries_disabled = true,
                    Err(_) => self.count_fail_open(FailOpen::HostCall),
                }
            }
            Err(trouble) => self.count_fail_open(FailOpen::Ledger(trouble)),
        }
    }

    /// `client-headers`: a failed response whose retries the budget switched off.
    fn deny_visibly(&self, stream: &StreamState) {
        let _ = host::set_header(
            MapType::HttpResponseHeaders,
            BUDGET_HEADER,
            Some(BUDGET_EXHAUSTED.as_bytes()),
        );
        if let Some(index) = stream.budget {
            self.with_budget(index, |budget| {
                count(budget.denied, 1);
                log(
                    LogLevel::Debug,
                    &format!(
                        "denied the retries of a failed request {} (client-headers mode): \
                         the budget of the last window is spent",
                        budget.describe
                    ),
                );
            });
        }
    }

    /// `client-headers`: the retries the router made for this request, charged to the budget
    /// when the request ends (the only shared-data write of this mode besides publishing).
    fn charge_retries(&self, stream: &StreamState, exchange: &mut Exchange) {
        let Some(index) = stream.budget else {
            return;
        };
        let attempts = exchange.upstream_attempts().unwrap_or(0);
        if attempts <= 1 {
            return;
        }
        let retries = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
        let Some(now) = self.now() else { return };
        self.with_budget(index, |budget| {
            count(budget.admitted, retries);
            budget.shared_view = None;
            if let Some(trouble) = ledger::charge(
                &HostStore,
                &budget.key,
                &budget.params,
                &mut budget.pending,
                now,
                retries,
            ) {
                self.count_fail_open(FailOpen::Ledger(trouble));
            }
        });
    }
}

fn count(id: Option<u32>, by: u32) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, i64::from(by));
    }
}

fn request_header(name: &str) -> Option<Vec<u8>> {
    host::header_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// What a stream remembers between its callbacks.
#[derive(Default)]
pub struct StreamState {
    /// The budget this request draws on.
    budget: Option<usize>,
    /// `client-headers`: the request went out with `x-envoy-max-retries: 0`.
    retries_disabled: bool,
}

// The separate module's contexts (unused when the sidecar embeds the feature).
#[cfg_attr(feature = "embedded", allow(dead_code))]
struct Root {
    feature: Option<Rc<RetryBudget>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(settings) = host::configure(FILTER, Settings::parse) else {
            return false;
        };
        self.feature = Some(Rc::new(RetryBudget::new(settings)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(feature) = &self.feature {
            feature.on_tick();
        }
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
    feature: Rc<RetryBudget>,
    state: StreamState,
    exchange: Exchange,
}

impl Context for Stream {}

// The callbacks implemented here are listed in Cargo.toml (`callbacks`); the build removes
// the SDK's other stream callbacks from the exports.
impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.feature
            .on_request_headers(&mut self.state, &mut self.exchange)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.feature.on_response_headers(&self.state);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.feature.on_log(&self.state, &mut self.exchange);
    }
}
