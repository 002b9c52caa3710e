//! The thin proxy-wasm layer: reads the attempt headers and the destination, asks the budget
//! (kept in shared data, see `ledger`), and enforces its answer as the configured mode says.
//! Whatever goes wrong on the filter's side lets the request through and is counted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use eastwest_common::host;
use eastwest_common::labels::{Label, Labels, UNKNOWN};
use eastwest_common::metric_name::tagged_name;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::{Mode, Settings};
use crate::ledger::{self, Decision, SharedStore, StoreError, Trouble};
use eastwest_common::cluster::{self, Destination};

use crate::request::{
    self, Attempt, BUDGET_EXHAUSTED, BUDGET_HEADER, DENIED_BODY, DENIED_GRPC_STATUS, DENIED_STATUS,
    ENVOY_ATTEMPT_COUNT, ENVOY_MAX_RETRIES, ENVOY_RATELIMITED, GRPC_PREVIOUS_ATTEMPTS,
    GRPC_RETRY_PUSHBACK,
};
use crate::window::{Params, Window};

const FILTER: &str = "retry-budget";
/// The budget that budgets beyond `max_budgets` share.
const OVERFLOW: &str = "overflow";

proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { shared: None }));
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
    /// `destination_service` and, in `server` mode, `source_service`, for log lines.
    describe: String,
    admitted: Option<u32>,
    denied: Option<u32>,
}

/// Per-VM state shared by the root context and its streams.
struct Shared {
    settings: Settings,
    budgets: RefCell<HashMap<String, Budget>>,
    fail_open: Vec<Option<u32>>,
    own: host::OwnLabelsCell,
}

impl Shared {
    fn count_fail_open(&self, reason: FailOpen) {
        if let Some(id) = self.fail_open[reason.index()] {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn own_labels(&self) -> std::cell::Ref<'_, Labels> {
        self.own.refresh(&self.settings.labels, |_| {});
        self.own.get()
    }

    /// Runs `action` on the budget for `subject` (a destination service, or a calling service
    /// in `server` mode), creating it (and its metrics) on first use.
    fn with_budget<R>(
        &self,
        subject: &str,
        destination: &Destination,
        action: impl FnOnce(&mut Budget) -> R,
    ) -> R {
        let mut budgets = self.budgets.borrow_mut();
        if let Some(budget) = budgets.get_mut(subject) {
            return action(budget);
        }
        let subject = if budgets.len() < self.settings.max_budgets {
            subject
        } else {
            OVERFLOW
        };
        let budget = budgets
            .entry(subject.to_string())
            .or_insert_with(|| self.new_budget(subject, destination));
        action(budget)
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
            describe,
            admitted: define("eastwest_retry_budget_admitted_total"),
            denied: define("eastwest_retry_budget_denied_total"),
        }
    }
}

fn count(id: Option<u32>, by: u32) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, i64::from(by));
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
        let shared = Shared {
            own: host::OwnLabelsCell::new(&settings.labels),
            settings,
            budgets: RefCell::new(HashMap::new()),
            fail_open,
        };
        shared.own.refresh(&shared.settings.labels, |_| {});
        if host::set_tick_period(period).is_err() {
            log(
                LogLevel::Warn,
                "the host refused a timer; deposits are published only with retries",
            );
        }
        self.shared = Some(Rc::new(shared));
        true
    }

    /// Publishes each budget's deposits once per slot: the only shared-data write that does
    /// not come from a retry.
    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        let Some(now) = host::now_nanos() else {
            return;
        };
        for budget in shared.budgets.borrow_mut().values_mut() {
            if let Some(trouble) = ledger::publish(
                &HostStore,
                &budget.key,
                &budget.params,
                &mut budget.pending,
                now,
            ) {
                shared.count_fail_open(FailOpen::Ledger(trouble));
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Stream {
            shared,
            subject: None,
            retries_disabled: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    shared: Rc<Shared>,
    /// The budget this request draws on, with its destination.
    subject: Option<(String, Destination)>,
    /// `client-headers`: the request went out with `x-envoy-max-retries: 0`.
    retries_disabled: bool,
}

impl Context for Stream {}

fn request_header(name: &str) -> Option<Vec<u8>> {
    host::header_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.shared.settings.mode {
            Mode::Client | Mode::Server => self.admit_attempt(),
            Mode::ClientHeaders => {
                self.cap_retries();
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.retries_disabled {
            let failed = host::header_value(MapType::HttpResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|status| std::str::from_utf8(&status).ok()?.parse::<u32>().ok())
                .is_some_and(|status| status >= 500);
            if failed {
                self.deny_visibly();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.shared.settings.mode == Mode::ClientHeaders {
            self.charge_retries();
        }
    }
}

impl Stream {
    /// The destination of an outbound request: its cluster (Istio's names carry service and
    /// namespace), else its authority.
    fn outbound_destination() -> Destination {
        host::upstream_cluster()
            .and_then(|cluster| cluster::destination_from_cluster(&cluster))
            .or_else(|| {
                request_header(":authority")
                    .and_then(|authority| cluster::destination_from_host(&authority))
            })
            .unwrap_or_else(|| Destination {
                service: UNKNOWN.to_string(),
                namespace: UNKNOWN.to_string(),
            })
    }

    /// The budget subject and the destination of this request, by mode.
    fn subject(&self) -> (String, Destination) {
        let shared = &self.shared;
        match shared.settings.mode {
            Mode::Server => {
                // A caller whose claims are refused still gets a budget (its certificate's
                // service, else `unknown`'s); label-enrich and telemetry count the refusals.
                let (caller, _problems) = host::inbound_source(&shared.settings.labels);
                let own = shared.own_labels();
                let destination = Destination {
                    service: own.get_or_unknown(Label::Service).to_string(),
                    namespace: own.get_or_unknown(Label::Namespace).to_string(),
                };
                (
                    caller.get_or_unknown(Label::Service).to_string(),
                    destination,
                )
            }
            Mode::Client | Mode::ClientHeaders => {
                let destination = Stream::outbound_destination();
                (destination.service.clone(), destination)
            }
        }
    }

    fn now(&self) -> Option<u64> {
        let now = host::now_nanos();
        if now.is_none() {
            self.shared.count_fail_open(FailOpen::ClockUnavailable);
        }
        now
    }

    /// `client` and `server`: a first attempt deposits; a retry withdraws, or is refused.
    fn admit_attempt(&mut self) -> Action {
        let shared = self.shared.clone();
        let envoy_count = request_header(ENVOY_ATTEMPT_COUNT);
        let grpc_previous = request_header(GRPC_PREVIOUS_ATTEMPTS);
        let (attempt, bad) = request::attempt(envoy_count.as_deref(), grpc_previous.as_deref());
        if bad.is_some() {
            shared.count_fail_open(FailOpen::AttemptHeader);
        }
        let Some(now) = self.now() else {
            return Action::Continue;
        };
        let (subject, destination) = self.subject();
        let decision = shared.with_budget(&subject, &destination, |budget| match attempt {
            Attempt::First => {
                let slot = budget.params.slot_of(now);
                budget.pending.add(slot, 1, 0);
                None
            }
            Attempt::Retry(_) => {
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
                                shared.settings.mode.as_str()
                            ),
                        );
                    }
                }
                Some((decision, trouble))
            }
        });
        self.subject = Some((subject, destination));
        match decision {
            Some((decision, trouble)) => {
                if let Some(trouble) = trouble {
                    shared.count_fail_open(FailOpen::Ledger(trouble));
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
                self.shared.count_fail_open(FailOpen::HostCall);
                Action::Continue
            }
        }
    }

    /// `client-headers`: a first attempt deposits; when the budget has no room left, the
    /// router is told not to retry this request.
    fn cap_retries(&mut self) {
        let shared = self.shared.clone();
        let Some(now) = self.now() else { return };
        let (subject, destination) = self.subject();
        let room = shared.with_budget(&subject, &destination, |budget| {
            let slot = budget.params.slot_of(now);
            budget.pending.add(slot, 1, 0);
            ledger::has_room(
                &HostStore,
                &budget.key,
                &budget.params,
                &budget.pending,
                now,
            )
        });
        self.subject = Some((subject, destination));
        match room {
            Ok(true) => {}
            Ok(false) => {
                match host::set_header(MapType::HttpRequestHeaders, ENVOY_MAX_RETRIES, Some(b"0")) {
                    Ok(()) => self.retries_disabled = true,
                    Err(_) => shared.count_fail_open(FailOpen::HostCall),
                }
            }
            Err(trouble) => shared.count_fail_open(FailOpen::Ledger(trouble)),
        }
    }

    /// `client-headers`: a failed response whose retries the budget switched off.
    fn deny_visibly(&self) {
        let shared = &self.shared;
        let _ = host::set_header(
            MapType::HttpResponseHeaders,
            BUDGET_HEADER,
            Some(BUDGET_EXHAUSTED.as_bytes()),
        );
        if let Some((subject, destination)) = &self.subject {
            shared.with_budget(subject, destination, |budget| {
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
    fn charge_retries(&self) {
        let shared = &self.shared;
        let Some((subject, destination)) = &self.subject else {
            return;
        };
        let attempts = host::property(&["upstream", "request_attempt_count"])
            .and_then(|value| eastwest_common::properties::decode_int64(&value))
            .unwrap_or(0);
        if attempts <= 1 {
            return;
        }
        let retries = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
        let Some(now) = self.now() else { return };
        shared.with_budget(subject, destination, |budget| {
            count(budget.admitted, retries);
            if let Some(trouble) = ledger::charge(
                &HostStore,
                &budget.key,
                &budget.params,
                &mut budget.pending,
                now,
                retries,
            ) {
                shared.count_fail_open(FailOpen::Ledger(trouble));
            }
        });
    }
}
