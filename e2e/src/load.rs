//! The load generator: a fixed number of requests at a fixed concurrency over keep-alive
//! connections, with every latency recorded in an `hdrhistogram` — the ground truth that the
//! telemetry filter's histograms are checked against.
//!
//! ```no_run
//! use std::time::Duration;
//! use eastwest_e2e::load::{self, LoadPlan};
//!
//! let plan = LoadPlan::new("http://127.0.0.1:10000/work", 2_000)
//!     .concurrency(8)
//!     .max_duration(Duration::from_secs(10))
//!     .header("x-test-delay-ms-choices", "2*90,20-40*8,200-400*2")
//!     .per_request_headers(|index| vec![("x-test-seed".into(), index.to_string().into())]);
//! let report = load::run(&plan).unwrap();
//! assert_eq!(report.completed, 2_000);
//! println!("p99 {:?}\n{}", report.p(0.99), report.summary());
//! ```
//!
//! How it sends:
//! * `concurrency` workers, each with its own connection (HTTP/1.1, or HTTP/2 with prior
//!   knowledge when `http2` is set), sending one request at a time and reusing the connection
//!   (keep-alive) as long as the server keeps it open, as a pooled real client does. A worker
//!   opens a new connection when its connection is closed (by the server, `connection:
//!   close`, or after an error). So at most `concurrency` requests are in flight, and a
//!   sidecar in front of the server sees `concurrency` long-lived downstream connections.
//! * Requests are numbered 0..`requests`; a worker takes the next number when it is free.
//!   The number is what `per_request_headers` gets.
//! * Latency is what the client sees: from just before the request is handed to the
//!   connection to the last byte of the response body. Connecting is not included (it is
//!   counted in [`LoadReport::connections`]); the first request on a connection therefore
//!   costs the same as any other, which is how a sidecar measures it too (from the first
//!   request byte).
//! * Bounded: no request starts after `max_duration`, and requests still in flight at that
//!   point are abandoned (counted in [`LoadReport::abandoned`]) — `run` returns shortly after
//!   `max_duration` whatever the server does. Each request also has its own
//!   `request_timeout`.
//!
//! Every request the generator took a number for ends up in exactly one of `completed` (a
//! whole response, any status), `errors` (connect, reset, timeout) or `abandoned`:
//! `sent == completed + errors.total() + abandoned`.
//!
//! Open loop ([`LoadPlan::rate`]): instead of `concurrency` workers each waiting for its
//! previous response, request `i` starts at `i / rate` seconds after the run began, whatever
//! the earlier requests are doing, as independent users arrive. So the number of requests per
//! second stays the same when the server slows down or fails (a closed loop would send less
//! while retries slow the responses down). `concurrency` then caps the connections, i.e. the
//! requests in flight: a request that finds every connection busy waits for one (and
//! [`LoadReport::max_lag`] says how late it started). Idle connections are reused oldest
//! first, so the load spreads over every connection the run opened.
//!
//! With [`LoadPlan::record_requests`] the report also keeps one [`RequestRecord`] per request
//! (when it started and ended, and how), e.g. to compute the success ratio over time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Headers for one request, computed from its number.
pub type RequestHeaders = Arc<dyn Fn(u64) -> Vec<(String, Vec<u8>)> + Send + Sync>;

/// The lowest and highest latency the histogram records, in microseconds; slower responses
/// are recorded as the highest value (and counted in [`LoadReport::saturated`]).
pub const LATENCY_LOW_US: u64 = 1;
pub const LATENCY_HIGH_US: u64 = 60_000_000;
/// Significant digits of the latency histogram: values are exact to 0.1%.
pub const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// What to send. Build it with [`LoadPlan::new`] and the builder methods, or fill the fields.
#[derive(Clone)]
pub struct LoadPlan {
    /// `http://host:port/path?query`.
    pub url: String,
    pub method: String,
    pub body: Vec<u8>,
    /// How many requests to send in total.
    pub requests: u64,
    /// Workers (= connections = requests in flight at most); at least 1.
    pub concurrency: usize,
    /// Hard stop for the whole run.
    pub max_duration: Duration,
    /// Per request, from handing it to the connection to the last response byte.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Sent with every request (a `Host` header is added from the URL for HTTP/1.1).
    pub headers: Vec<(String, Vec<u8>)>,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// Further headers per request, from its number (0-based).
    pub per_request_headers: Option<RequestHeaders>,
    /// Open loop: requests started per second, on a fixed schedule (`None`: closed loop, each
    /// of `concurrency` workers sends its next request when the previous one ended).
    pub rate: Option<f64>,
    /// Keep a [`RequestRecord`] per request in [`LoadReport::records`].
    pub record_requests: bool,
}

impl std::fmt::Debug for LoadPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadPlan")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("body_len", &self.body.len())
            .field("requests", &self.requests)
            .field("concurrency", &self.concurrency)
            .field("max_duration", &self.max_duration)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("headers", &self.headers)
            .field("http2", &self.http2)
            .field("per_request_headers", &self.per_request_headers.is_some())
            .field("rate", &self.rate)
            .field("record_requests", &self.record_requests)
            .finish()
    }
}

impl LoadPlan {
    /// `requests` GETs of `url`, one at a time, stopping after 60 s at most; requests time
    /// out after 30 s, connecting after 5 s.
    pub fn new(url: impl Into<String>, requests: u64) -> LoadPlan {
        LoadPlan {
            url: url.into(),
            method: "GET".into(),
            body: Vec::new(),
            requests,
            concurrency: 1,
            max_duration: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            headers: Vec::new(),
            http2: false,
            per_request_headers: None,
            rate: None,
            record_requests: false,
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.to_owned();
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    pub fn max_duration(mut self, max_duration: Duration) -> Self {
        self.max_duration = max_duration;
        self
    }

    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Adds a header to every request (repeatable; duplicates are sent as duplicates).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn http2(mut self, http2: bool) -> Self {
        self.http2 = http2;
        self
    }

    /// Open loop: start `per_second` requests per second on a fixed schedule (request `i` at
    /// `i / per_second` s), whatever the responses do; `concurrency` caps the connections
    /// (requests in flight). `requests` and `max_duration` still bound the run.
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = Some(per_second);
        self
    }

    /// Keeps one [`RequestRecord`] per request in the report ([`LoadReport::records`]).
    pub fn record_requests(mut self, record: bool) -> Self {
        self.record_requests = record;
        self
    }

    /// Headers computed per request from its number, e.g. `x-test-seed`.
    pub fn per_request_headers(
        mut self,
        headers: impl Fn(u64) -> Vec<(String, Vec<u8>)> + Send + Sync + 'static,
    ) -> Self {
        self.per_request_headers = Some(Arc::new(headers));
        self
    }
}

/// Requests that got no complete response, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadErrors {
    /// The TCP connection (or the HTTP/2 handshake) could not be made.
    pub connect: u64,
    /// The connection closed or the stream was reset before the response was complete
    /// (including a body cut off after the headers).
    pub reset: u64,
    /// No complete response within `request_timeout`.
    pub timeout: u64,
}

impl LoadErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.reset + self.timeout
    }

    fn add(&mut self, other: &LoadErrors) {
        self.connect += other.connect;
        self.reset += other.reset;
        self.timeout += other.timeout;
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A complete response with this status.
    Status(u16),
    /// No connection could be made.
    Connect,
    /// The connection closed or the stream was reset before the response was complete.
    Reset,
    /// No complete response within `request_timeout`.
    Timeout,
    /// Still in flight when `max_duration` ran out.
    Abandoned,
}

impl RequestOutcome {
    /// A complete response with a 2xx status.
    pub fn is_success(self) -> bool {
        matches!(self, RequestOutcome::Status(status) if (200..300).contains(&status))
    }
}

/// One request of a run ([`LoadPlan::record_requests`]). Times are offsets from
/// [`LoadReport::started_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRecord {
    /// The request's number (0-based).
    pub index: u64,
    /// When the generator took the request, before connecting if it had to.
    pub start: Duration,
    /// When its outcome was known (the last response byte, or the error).
    pub end: Duration,
    pub outcome: RequestOutcome,
}

/// What happened.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests the plan asked for.
    pub planned: u64,
    /// Requests started (given a number), including the ones that failed to connect.
    pub sent: u64,
    /// Requests with a complete response, whatever its status.
    pub completed: u64,
    /// Completed requests by status code.
    pub by_status: BTreeMap<u16, u64>,
    pub errors: LoadErrors,
    /// Requests in flight when `max_duration` ran out.
    pub abandoned: u64,
    /// True if `max_duration` ran out before every planned request ended.
    pub stopped_by_deadline: bool,
    /// Latency of the completed requests in microseconds (1 µs to 60 s, 3 significant
    /// digits), request start to last response byte.
    pub latency: Histogram<u64>,
    /// Completed requests slower than 60 s, recorded as 60 s.
    pub saturated: u64,
    /// Connections opened.
    pub connections: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// When the run began: the origin of [`RequestRecord`] times and of the open-loop schedule.
    pub started_at: std::time::Instant,
    /// Open loop: the latest any request started after its scheduled time (waiting for a free
    /// connection, or a busy machine). Zero for a closed loop.
    pub max_lag: Duration,
    /// One record per request, by index, when the plan asked for them.
    pub records: Vec<RequestRecord>,
}

impl LoadReport {
    fn empty(planned: u64, started_at: std::time::Instant) -> LoadReport {
        LoadReport {
            planned,
            sent: 0,
            completed: 0,
            by_status: BTreeMap::new(),
            errors: LoadErrors::default(),
            abandoned: 0,
            stopped_by_deadline: false,
            latency: new_latency_histogram(),
            saturated: 0,
            connections: 0,
            elapsed: Duration::ZERO,
            started_at,
            max_lag: Duration::ZERO,
            records: Vec::new(),
        }
    }

    /// The `q` quantile (0..=1) of the completed requests' latency, e.g. `p(0.99)`; zero if
    /// none completed. Exact to 0.1% (the histogram's precision): the smallest recorded
    /// bucket value with at least `q` of the requests at or below it.
    pub fn p(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    /// Completed requests with status `status`.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Completed requests per second of the run.
    pub fn throughput(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line for logs and assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "planned {} sent {} completed {} by_status {:?} errors {:?} abandoned {} \
             stopped_by_deadline {} connections {} elapsed {:?} ({:.0} req/s) \
             p50 {:?} p95 {:?} p99 {:?} max {:?}",
            self.planned,
            self.sent,
            self.completed,
            self.by_status,
            self.errors,
            self.abandoned,
            self.stopped_by_deadline,
            self.connections,
            self.elapsed,
            self.throughput(),
            self.p(0.5),
            self.p(0.95),
            self.p(0.99),
            Duration::from_micros(self.latency.max()),
        )
    }

    fn merge(&mut self, other: &LoadReport) {
        self.sent += other.sent;
        self.completed += other.completed;
        for (status, count) in &other.by_status {
            *self.by_status.entry(*status).or_default() += count;
        }
        self.errors.add(&other.errors);
        self.abandoned += other.abandoned;
        self.stopped_by_deadline |= other.stopped_by_deadline;
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds always merge");
        self.saturated += other.saturated;
        self.connections += other.connections;
        self.max_lag = self.max_lag.max(other.max_lag);
        self.records.extend_from_slice(&other.records);
    }

    /// Counts one finished request (and records it if `record`).
    fn account(&mut self, done: &Done, record: bool) {
        self.sent += 1;
        if done.connected {
            self.connections += 1;
        }
        match done.outcome {
            RequestOutcome::Status(status) => {
                self.completed += 1;
                *self.by_status.entry(status).or_default() += 1;
            }
            RequestOutcome::Connect => self.errors.connect += 1,
            RequestOutcome::Reset => self.errors.reset += 1,
            RequestOutcome::Timeout => self.errors.timeout += 1,
            RequestOutcome::Abandoned => {
                self.abandoned += 1;
                self.stopped_by_deadline = true;
            }
        }
        if let Some(micros) = done.latency_micros {
            if micros > LATENCY_HIGH_US {
                self.saturated += 1;
            }
            self.latency
                .saturating_record(micros.clamp(LATENCY_LOW_US, LATENCY_HIGH_US));
        }
        if record {
            let origin = Instant::from_std(self.started_at);
            self.records.push(RequestRecord {
                index: done.index,
                start: done.start.saturating_duration_since(origin),
                end: done.end.saturating_duration_since(origin),
                outcome: done.outcome,
            });
        }
    }
}

/// An empty histogram with the load generator's bounds and precision.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LATENCY_LOW_US, LATENCY_HIGH_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("valid histogram bounds")
}

/// Runs `plan` to the end (or to `max_duration`) and reports. Blocking; it runs on its own
/// thread and single-threaded tokio runtime, so it can be called from plain tests and from
/// async code alike, and the generator never competes with itself for CPUs.
pub fn run(plan: &LoadPlan) -> Result<LoadReport> {
    let plan = plan.clone();
    std::thread::Builder::new()
        .name("eastwest-load".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("load generator: cannot start its tokio runtime")?;
            runtime.block_on(run_async(&plan))
        })
        .context("load generator: cannot start its thread")?
        .join()
        .map_err(|_| anyhow!("load generator: its thread panicked"))?
}

/// [`run`] on the caller's tokio runtime.
pub async fn run_async(plan: &LoadPlan) -> Result<LoadReport> {
    let target = Target::new(plan)?;
    if let Some(rate) = plan.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("load generator: the rate must be a positive number of requests per second, not {rate}");
        }
    }
    let started = Instant::now();
    let deadline = started + plan.max_duration;
    let mut report = match plan.rate {
        Some(rate) => run_open_loop(plan, &target, started, deadline, rate).await?,
        None => run_closed_loop(plan, &target, started, deadline).await?,
    };
    report.records.sort_by_key(|record| record.index);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// `concurrency` workers, each sending its next request when the previous one ended.
async fn run_closed_loop(
    plan: &LoadPlan,
    target: &Target,
    started: Instant,
    deadline: Instant,
) -> Result<LoadReport> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..plan.concurrency.max(1) {
        let worker = Worker {
            plan: plan.clone(),
            target: target.clone(),
            next: next.clone(),
            deadline,
            report: LoadReport::empty(plan.requests, started.into_std()),
            connection: None,
        };
        workers.spawn(worker.run());
    }
    let mut report = LoadReport::empty(plan.requests, started.into_std());
    while let Some(done) = workers.join_next().await {
        report.merge(&done.context("load generator: a worker panicked")?);
    }
    Ok(report)
}

/// Request `i` starts at `started + i / rate`, on a connection of the pool (at most
/// `concurrency` of them, idle ones reused oldest first).
async fn run_open_loop(
    plan: &LoadPlan,
    target: &Target,
    started: Instant,
    deadline: Instant,
    rate: f64,
) -> Result<LoadReport> {
    let mut report = LoadReport::empty(plan.requests, started.into_std());
    let plan = Arc::new(plan.clone());
    let idle: Arc<Mutex<VecDeque<Sender>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let mut in_flight = tokio::task::JoinSet::new();
    for index in 0..plan.requests {
        let scheduled = started + Duration::from_secs_f64(index as f64 / rate);
        if scheduled >= deadline {
            report.stopped_by_deadline = true;
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        let slot = match tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await {
            Ok(slot) => slot.context("load generator: the connection limit was closed")?,
            Err(_) => {
                report.stopped_by_deadline = true;
                break;
            }
        };
        report.max_lag = report.max_lag.max(Instant::now() - scheduled);
        let connection = idle.lock().ok().and_then(|mut idle| idle.pop_front());
        let (task_plan, task_target, task_idle) = (plan.clone(), target.clone(), idle.clone());
        in_flight.spawn(async move {
            let mut connection = connection;
            let done = exchange(&task_plan, &task_target, &mut connection, deadline, index).await;
            if let Some(sender) = connection {
                if let Ok(mut idle) = task_idle.lock() {
                    idle.push_back(sender);
                }
            }
            drop(slot);
            done
        });
        while let Some(done) = in_flight.try_join_next() {
            report.account(
                &done.context("load generator: a request task panicked")?,
                plan.record_requests,
            );
        }
    }
    while let Some(done) = in_flight.join_next().await {
        report.account(
            &done.context("load generator: a request task panicked")?,
            plan.record_requests,
        );
    }
    Ok(report)
}

/// The parsed URL.
#[derive(Clone)]
struct Target {
    /// `host:port` to connect to.
    address: String,
    /// The request URI: origin-form for HTTP/1.1, absolute for HTTP/2.
    uri: Uri,
    method: Method,
    /// Plan headers, validated once.
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Target {
    fn new(plan: &LoadPlan) -> Result<Target> {
        let uri: Uri = plan
            .url
            .parse()
            .with_context(|| format!("load generator: cannot parse URL {:?}", plan.url))?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "load generator: only http:// URLs are supported: {}",
                plan.url
            );
        }
        let authority = uri.authority().context("the URL has no host")?.clone();
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let mut headers = header_pairs(&plan.headers)?;
        let uri = if plan.http2 {
            uri
        } else {
            if !headers.iter().any(|(name, _)| name == HOST) {
                headers.push((HOST, HeaderValue::from_str(authority.as_str())?));
            }
            let path = uri.path_and_query().map_or("/", |path| path.as_str());
            path.parse().context("cannot parse the path")?
        };
        Ok(Target {
            address,
            uri,
            method: Method::from_bytes(plan.method.as_bytes()).context("invalid method")?,
            headers,
            body: Bytes::from(plan.body.clone()),
        })
    }
}

fn header_pairs(headers: &[(String, Vec<u8>)]) -> Result<Vec<(HeaderName, HeaderValue)>> {
    headers
        .iter()
        .map(|(name, value)| {
            Ok((
                HeaderName::from_bytes(name.as_bytes())
                    .with_context(|| format!("invalid header name {name:?}"))?,
                HeaderValue::from_bytes(value)
                    .with_context(|| format!("invalid value for header {name}"))?,
            ))
        })
        .collect()
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// One request, as it ended.
struct Done {
    index: u64,
    outcome: RequestOutcome,
    /// Completed requests: from handing the request to the connection to the last byte.
    latency_micros: Option<u64>,
    /// A new connection was opened for it.
    connected: bool,
    start: Instant,
    end: Instant,
}

struct Worker {
    plan: LoadPlan,
    target: Target,
    next: Arc<AtomicU64>,
    deadline: Instant,
    report: LoadReport,
    connection: Option<Sender>,
}

impl Worker {
    async fn run(mut self) -> LoadReport {
        loop {
            if Instant::now() >= self.deadline {
                // Whatever is left of the plan is not started.
                if self.next.load(Ordering::SeqCst) < self.plan.requests {
                    self.report.stopped_by_deadline = true;
                }
                break;
            }
            let index = self.next.fetch_add(1, Ordering::SeqCst);
            if index >= self.plan.requests {
                break;
            }
            let done = exchange(
                &self.plan,
                &self.target,
                &mut self.connection,
                self.deadline,
                index,
            )
            .await;
            self.report.account(&done, self.plan.record_requests);
            if done.outcome == RequestOutcome::Abandoned {
                break;
            }
        }
        self.report
    }
}

/// Sends request `index` on `connection` (opening one if there is none or it was closed) and
/// waits for the whole response. A connection that failed is dropped (`None`).
async fn exchange(
    plan: &LoadPlan,
    target: &Target,
    connection: &mut Option<Sender>,
    deadline: Instant,
    index: u64,
) -> Done {
    let start = Instant::now();
    let mut done = Done {
        index,
        outcome: RequestOutcome::Abandoned,
        latency_micros: None,
        connected: false,
        start,
        end: start,
    };
    let request = match build_request(plan, target, index) {
        Ok(request) => request,
        // Per-request headers that HTTP cannot carry: a bug in the test, not load.
        Err(error) => panic!("load generator: request {index}: {error:#}"),
    };
    let sender = match ready_sender(plan, target, connection, deadline).await {
        Ok((sender, connected)) => {
            done.connected = connected;
            sender
        }
        Err((outcome, connected)) => {
            done.connected = connected;
            done.outcome = outcome;
            done.end = Instant::now();
            return done;
        }
    };
    let sent = Instant::now();
    let limit = (sent + plan.request_timeout).min(deadline);
    let exchange = async {
        let response = match sender {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok::<u16, hyper::Error>(status)
    };
    done.outcome = match tokio::time::timeout_at(limit, exchange).await {
        Ok(Ok(status)) => {
            done.latency_micros = Some(sent.elapsed().as_micros() as u64);
            RequestOutcome::Status(status)
        }
        Ok(Err(_)) => {
            *connection = None;
            RequestOutcome::Reset
        }
        Err(_) => {
            *connection = None;
            if limit >= deadline && Instant::now() >= deadline {
                RequestOutcome::Abandoned
            } else {
                RequestOutcome::Timeout
            }
        }
    };
    done.end = Instant::now();
    done
}

fn build_request(plan: &LoadPlan, target: &Target, index: u64) -> Result<Request<Full<Bytes>>> {
    let mut request = Request::builder()
        .method(target.method.clone())
        .uri(target.uri.clone())
        .body(Full::new(target.body.clone()))?;
    let headers = request.headers_mut();
    for (name, value) in &target.headers {
        headers.append(name.clone(), value.clone());
    }
    if let Some(per_request) = &plan.per_request_headers {
        for (name, value) in header_pairs(&per_request(index))? {
            headers.append(name, value);
        }
    }
    Ok(request)
}

/// The connection, ready for a request (and whether it was opened just now); a new one if
/// there is none or the old one was closed. On failure, the outcome to count.
async fn ready_sender<'a>(
    plan: &LoadPlan,
    target: &Target,
    connection: &'a mut Option<Sender>,
    deadline: Instant,
) -> Result<(&'a mut Sender, bool), (RequestOutcome, bool)> {
    if let Some(sender) = connection {
        let ready = match sender {
            Sender::Http1(sender) => sender.ready().await.is_ok(),
            Sender::Http2(sender) => sender.ready().await.is_ok(),
        };
        if !ready {
            *connection = None;
        }
    }
    let mut connected = false;
    if connection.is_none() {
        let limit = (Instant::now() + plan.connect_timeout).min(deadline);
        match tokio::time::timeout_at(limit, connect(&target.address, plan.http2)).await {
            Ok(Ok(sender)) => {
                connected = true;
                *connection = Some(sender);
            }
            Ok(Err(_)) => return Err((RequestOutcome::Connect, false)),
            Err(_) if Instant::now() >= deadline => return Err((RequestOutcome::Abandoned, false)),
            Err(_) => return Err((RequestOutcome::Connect, false)),
        }
    }
    match connection.as_mut() {
        Some(sender) => Ok((sender, connected)),
        None => Err((RequestOutcome::Connect, connected)),
    }
}

async fn connect(address: &str, http2: bool) -> Result<Sender> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    if http2 {
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        sender.ready().await?;
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await?;
        tokio::spawn(connection);
        Ok(Sender::Http1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestApp;

    fn assert_accounted(report: &LoadReport) {
        assert_eq!(
            report.sent,
            report.completed + report.errors.total() + report.abandoned,
            "{}",
            report.summary()
        );
    }

    #[test]
    fn open_loop_keeps_its_schedule_while_responses_are_slow() {
        let app = TestApp::start().unwrap();
        // 100 requests at 100/s, each answered after 300 ms: a closed loop of 4 workers would
        // need 7.5 s; on schedule they take ~1 s plus the last response, with ~30 in flight.
        let plan = LoadPlan::new(format!("http://127.0.0.1:{}/slow", app.port()), 100)
            .rate(100.0)
            .concurrency(64)
            .header("x-test-delay-ms", "300")
            .record_requests(true);
        let report = run(&plan).unwrap();
        eprintln!("{}", report.summary());
        assert_accounted(&report);
        assert_eq!(report.status_count(200), 100, "{}", report.summary());
        assert!(
            report.elapsed < Duration::from_secs(3),
            "{}",
            report.summary()
        );
        assert!(
            (25..=64).contains(&report.connections),
            "about 30 requests in flight need about 30 connections: {}",
            report.summary()
        );
        assert_eq!(report.records.len(), 100);
        for (i, record) in report.records.iter().enumerate() {
            assert_eq!(record.index, i as u64);
            assert_eq!(record.outcome, RequestOutcome::Status(200));
            assert!(record.outcome.is_success());
            assert!(
                record.end >= record.start + Duration::from_millis(300),
                "{record:?}"
            );
            // Request i starts at i × 10 ms, give or take a busy machine.
            let scheduled = Duration::from_millis(10 * i as u64);
            assert!(
                record.start >= scheduled
                    && record.start <= scheduled + report.max_lag + Duration::from_millis(5),
                "{record:?} (max lag {:?})",
                report.max_lag
            );
        }
        assert!(
            report.max_lag < Duration::from_millis(250),
            "{:?}",
            report.max_lag
        );
        assert_eq!(app.requests_seen(), 100);
    }

    #[test]
    fn open_loop_waits_for_a_connection_when_all_are_busy_and_stops_at_the_deadline() {
        let app = TestApp::start().unwrap();
        // Two connections, 200 ms per request, 50 requests/s planned: the connections allow 10
        // per second, so requests start late and the 1 s limit cuts the run short.
        let plan = LoadPlan::new(format!("http://127.0.0.1:{}/", app.port()), 1_000)
            .rate(50.0)
            .concurrency(2)
            .header("x-test-delay-ms", "200")
            .max_duration(Duration::from_secs(1))
            .record_requests(true);
        let report = run(&plan).unwrap();
        eprintln!("{}", report.summary());
        assert_accounted(&report);
        assert!(report.stopped_by_deadline);
        assert_eq!(report.connections, 2, "{}", report.summary());
        assert!(
            (8..=12).contains(&report.sent),
            "two connections, 200 ms each, for 1 s: {}",
            report.summary()
        );
        assert!(
            report.max_lag >= Duration::from_millis(500),
            "{:?}",
            report.max_lag
        );
        assert_eq!(report.records.len() as u64, report.sent);
        assert!(report.elapsed < Duration::from_millis(1_500));
    }

    #[test]
    fn closed_loop_records_every_request_and_refuses_a_bad_rate() {
        let app = TestApp::start().unwrap();
        let url = format!("http://127.0.0.1:{}/", app.port());
        let report = run(&LoadPlan::new(&url, 20)
            .concurrency(2)
            .header("x-test-status", "503")
            .record_requests(true))
        .unwrap();
        assert_eq!(report.records.len(), 20);
        assert!(report
            .records
            .iter()
            .all(|record| record.outcome == RequestOutcome::Status(503)
                && !record.outcome.is_success()
                && record.end >= record.start));
        assert_eq!(report.max_lag, Duration::ZERO);
        // Without the option, no records.
        let report = run(&LoadPlan::new(&url, 5)).unwrap();
        assert!(report.records.is_empty());
        for rate in [0.0, -1.0, f64::NAN] {
            assert!(run(&LoadPlan::new(&url, 5).rate(rate)).is_err(), "{rate}");
        }
    }
}
