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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
}

impl LoadReport {
    fn empty(planned: u64) -> LoadReport {
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
    let started = Instant::now();
    let deadline = started + plan.max_duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..plan.concurrency.max(1) {
        let worker = Worker {
            plan: plan.clone(),
            target: target.clone(),
            next: next.clone(),
            deadline,
            report: LoadReport::empty(plan.requests),
            connection: None,
        };
        workers.spawn(worker.run());
    }
    let mut report = LoadReport::empty(plan.requests);
    while let Some(done) = workers.join_next().await {
        report.merge(&done.context("load generator: a worker panicked")?);
    }
    report.elapsed = started.elapsed();
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

enum Outcome {
    Completed(u16),
    Connect,
    Reset,
    Timeout,
    /// The hard stop came first.
    Abandoned,
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
            self.report.sent += 1;
            match self.one_request(index).await {
                Outcome::Completed(status) => {
                    self.report.completed += 1;
                    *self.report.by_status.entry(status).or_default() += 1;
                }
                Outcome::Connect => self.report.errors.connect += 1,
                Outcome::Reset => self.report.errors.reset += 1,
                Outcome::Timeout => self.report.errors.timeout += 1,
                Outcome::Abandoned => {
                    self.report.abandoned += 1;
                    self.report.stopped_by_deadline = true;
                    break;
                }
            }
        }
        self.report
    }

    async fn one_request(&mut self, index: u64) -> Outcome {
        let request = match self.build_request(index) {
            Ok(request) => request,
            // Per-request headers that HTTP cannot carry: a bug in the test, not load.
            Err(error) => panic!("load generator: request {index}: {error:#}"),
        };
        let (request_timeout, deadline) = (self.plan.request_timeout, self.deadline);
        let sender = match self.ready_sender().await {
            Ok(sender) => sender,
            Err(outcome) => return outcome,
        };
        let started = Instant::now();
        let limit = (started + request_timeout).min(deadline);
        let exchange = async {
            let response = match sender {
                Sender::Http1(sender) => sender.send_request(request).await,
                Sender::Http2(sender) => sender.send_request(request).await,
            }?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        };
        match tokio::time::timeout_at(limit, exchange).await {
            Ok(Ok(status)) => {
                let micros = started.elapsed().as_micros() as u64;
                if micros > LATENCY_HIGH_US {
                    self.report.saturated += 1;
                }
                self.report
                    .latency
                    .saturating_record(micros.clamp(LATENCY_LOW_US, LATENCY_HIGH_US));
                Outcome::Completed(status)
            }
            Ok(Err(_)) => {
                self.connection = None;
                Outcome::Reset
            }
            Err(_) => {
                self.connection = None;
                if limit >= self.deadline && Instant::now() >= self.deadline {
                    Outcome::Abandoned
                } else {
                    Outcome::Timeout
                }
            }
        }
    }

    fn build_request(&self, index: u64) -> Result<Request<Full<Bytes>>> {
        let mut request = Request::builder()
            .method(self.target.method.clone())
            .uri(self.target.uri.clone())
            .body(Full::new(self.target.body.clone()))?;
        let headers = request.headers_mut();
        for (name, value) in &self.target.headers {
            headers.append(name.clone(), value.clone());
        }
        if let Some(per_request) = &self.plan.per_request_headers {
            for (name, value) in header_pairs(&per_request(index))? {
                headers.append(name, value);
            }
        }
        Ok(request)
    }

    /// The worker's connection, ready for a request; a new one if there is none or the old
    /// one was closed.
    async fn ready_sender(&mut self) -> Result<&mut Sender, Outcome> {
        if let Some(sender) = &mut self.connection {
            let ready = match sender {
                Sender::Http1(sender) => sender.ready().await.is_ok(),
                Sender::Http2(sender) => sender.ready().await.is_ok(),
            };
            if !ready {
                self.connection = None;
            }
        }
        if self.connection.is_none() {
            let limit = (Instant::now() + self.plan.connect_timeout).min(self.deadline);
            match tokio::time::timeout_at(limit, connect(&self.target.address, self.plan.http2))
                .await
            {
                Ok(Ok(sender)) => {
                    self.report.connections += 1;
                    self.connection = Some(sender);
                }
                Ok(Err(_)) => return Err(Outcome::Connect),
                Err(_) if Instant::now() >= self.deadline => return Err(Outcome::Abandoned),
                Err(_) => return Err(Outcome::Connect),
            }
        }
        Ok(self.connection.as_mut().expect("connected above"))
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
