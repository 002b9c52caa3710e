//! The test application: the service behind the sidecars.
//!
//! It answers every request with JSON describing what it received, so tests can see exactly
//! what a sidecar forwarded:
//!
//! ```json
//! {"method": "GET", "path": "/x?y=1", "headers": [["host", "..."], ...], "body": "..."}
//! ```
//!
//! Header values are lossy UTF-8; every header is listed, duplicates included (values of one
//! name in the order they arrived). Request headers steer the answer:
//!
//! | header | effect |
//! |---|---|
//! | `x-test-delay-ms: N` | sleep N ms before answering |
//! | `x-test-status: N` | answer with status N |
//! | `x-test-response-header: name=value` | add a response header (repeatable), as an app that sets headers would |
//! | `x-test-reset: 1` | close the connection without a complete response (HTTP/2: reset the stream) |
//! | `x-test-delay-ms-choices: 2*90,20-40*8,200-400*2` | sleep a delay drawn from weighted choices (a long tail); see [`DelayChoices`] |
//! | `x-test-seed: N` | draw the `x-test-delay-ms-choices` delay from N alone (the same N, the same delay: [`DelayChoices::for_seed`]) |
//! | `x-test-close-mid-response: 1` | send the status, headers (with the full `content-length`) and half of the body, then close the TCP connection (HTTP/2: reset the stream) |
//! | `x-test-fail-every: N` | every Nth request carrying this header (counted by the app, over all such requests, retries included) gets a 503 |
//! | `x-test-grpc-status: N` | answer as a gRPC server would: `content-type: application/grpc`, the echo as one length-prefixed gRPC message, then `grpc-status: N` and `grpc-message` in the trailers |
//! | `x-test-grpc-trailers-only: 1` | with `x-test-grpc-status`: a gRPC "trailers-only" answer, as servers send for immediate errors: `grpc-status` and `grpc-message` in the response headers, no body, the stream ends with the headers |
//!
//! Order: the delays (`x-test-delay-ms`, then the drawn one) come first, then `x-test-reset`,
//! then `x-test-fail-every`, then `x-test-close-mid-response`, then the normal answer with
//! `x-test-status` (a gRPC answer when `x-test-grpc-status` is set; its HTTP status is 200
//! unless `x-test-status` says otherwise; `x-test-response-header` applies to it too).
//! Trailers travel over HTTP/2; over HTTP/1.1 hyper sends them only in a chunked response
//! to a request with `te: trailers`, so gRPC tests use h2c. A fail-every request is counted when it arrives, so the failing ones are
//! exactly the Nth, 2Nth, ... arrivals. Delays are tokio sleeps: never shorter than asked,
//! rounded up to the next millisecond tick.
//!
//! A malformed control header gets a 400 whose body says what is wrong. The app speaks
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Names of the request headers that steer the test app.
pub const DELAY_CONTROL: &str = "x-test-delay-ms";
pub const STATUS_CONTROL: &str = "x-test-status";
pub const RESPONSE_HEADER_CONTROL: &str = "x-test-response-header";
pub const RESET_CONTROL: &str = "x-test-reset";
pub const DELAY_CHOICES_CONTROL: &str = "x-test-delay-ms-choices";
pub const SEED_CONTROL: &str = "x-test-seed";
pub const CLOSE_MID_RESPONSE_CONTROL: &str = "x-test-close-mid-response";
pub const FAIL_EVERY_CONTROL: &str = "x-test-fail-every";
pub const GRPC_STATUS_CONTROL: &str = "x-test-grpc-status";
pub const GRPC_TRAILERS_ONLY_CONTROL: &str = "x-test-grpc-trailers-only";

/// The `grpc-message` of every gRPC answer of the app.
pub const GRPC_MESSAGE: &str = "status set by x-test-grpc-status";

/// The app's counters, shared by every connection of one app.
#[derive(Debug, Default)]
struct AppState {
    requests_seen: Arc<AtomicU64>,
    /// Requests that carried `x-test-fail-every` (the sequence the Nth is counted in).
    fail_every_seen: AtomicU64,
    /// 503s answered because of `x-test-fail-every`.
    fail_every_failed: AtomicU64,
    /// Responses cut off by `x-test-close-mid-response`.
    closed_mid_response: AtomicU64,
    /// While set, every request is answered 503 at once ([`TestApp::set_outage`]).
    outage: std::sync::atomic::AtomicBool,
    /// 503s answered because of an outage.
    outage_failures: AtomicU64,
}

/// The test application running in this process on its own tokio runtime; stops on drop.
pub struct TestApp {
    port: u16,
    state: Arc<AppState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestApp {
    /// Starts the app on a free port of 127.0.0.1.
    pub fn start() -> Result<TestApp> {
        Self::start_on_port(0)
    }

    /// Starts the app on `port` of 127.0.0.1 (0: any free port), e.g. to bring an app back
    /// on the port a sidecar's cluster points to.
    pub fn start_on_port(port: u16) -> Result<TestApp> {
        // Bound here, before returning, so the port accepts connections as soon as we return.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("test app: cannot bind 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("test-app-{port}"))
            .enable_all()
            .build()
            .context("test app: cannot start its tokio runtime")?;
        let state = Arc::new(AppState::default());
        let shared = state.clone();
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve_state(listener, shared).await,
                Err(error) => eprintln!("test app on port {port}: {error}"),
            }
        });
        Ok(TestApp {
            port,
            state,
            runtime: Some(runtime),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many requests the app has received (including ones it was told to reset).
    pub fn requests_seen(&self) -> u64 {
        self.state.requests_seen.load(Ordering::SeqCst)
    }

    /// How many requests carried `x-test-fail-every`.
    pub fn fail_every_seen(&self) -> u64 {
        self.state.fail_every_seen.load(Ordering::SeqCst)
    }

    /// How many 503s the app answered because of `x-test-fail-every`.
    pub fn fail_every_failures(&self) -> u64 {
        self.state.fail_every_failed.load(Ordering::SeqCst)
    }

    /// How many responses the app cut off because of `x-test-close-mid-response`.
    pub fn closed_mid_response(&self) -> u64 {
        self.state.closed_mid_response.load(Ordering::SeqCst)
    }

    /// Starts (`true`) or ends an outage: while it lasts, every request is answered with a
    /// 503 as soon as it arrives, whatever its headers say, as a failing service does.
    pub fn set_outage(&self, failing: bool) {
        self.state.outage.store(failing, Ordering::SeqCst);
    }

    /// How many 503s the app answered because of an outage.
    pub fn outage_failures(&self) -> u64 {
        self.state.outage_failures.load(Ordering::SeqCst)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside async code blocking would panic: stop without waiting.
            runtime.shutdown_background();
        } else {
            // Waiting for the tasks to be dropped means the port is closed once drop returns,
            // so a test can rely on "app down" right away.
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Serves the test app on `listener` until the runtime stops; counts requests in
/// `requests_seen`.
pub async fn serve(listener: TcpListener, requests_seen: Arc<AtomicU64>) {
    let state = AppState {
        requests_seen,
        ..AppState::default()
    };
    serve_state(listener, Arc::new(state)).await
}

async fn serve_state(listener: TcpListener, state: Arc<AppState>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("test app: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { handle(request, &state).await }
            });
            // Errors here are clients going away or resets the test asked for.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds 127.0.0.1:`port` and serves the test app forever on a runtime with
/// `worker_threads` threads; calls `on_listening` with the bound address once bound.
pub fn run_forever(
    port: u16,
    worker_threads: usize,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .await
            .with_context(|| format!("cannot bind 127.0.0.1:{port}"))?;
        on_listening(listener.local_addr()?);
        serve(listener, Arc::new(AtomicU64::new(0))).await;
        Ok(())
    })
}

/// The app was told to reset: returning an error makes hyper drop the connection (HTTP/1.1)
/// or reset the stream (HTTP/2) without a response.
#[derive(Debug)]
struct ResetRequested;

impl std::fmt::Display for ResetRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested by x-test-reset")
    }
}

impl std::error::Error for ResetRequested {}

struct Instructions {
    delay: Option<Duration>,
    status: StatusCode,
    response_headers: Vec<(HeaderName, HeaderValue)>,
    reset: bool,
    delay_choices: Option<DelayChoices>,
    seed: Option<u64>,
    close_mid_response: bool,
    fail_every: Option<u64>,
    grpc: Option<GrpcAnswer>,
}

/// How to answer as a gRPC server (`x-test-grpc-status`).
struct GrpcAnswer {
    status: u32,
    /// `grpc-status` in the response headers, no body (`x-test-grpc-trailers-only: 1`).
    trailers_only: bool,
}

fn instructions(request: &Request<Incoming>) -> Result<Instructions, String> {
    let headers = request.headers();
    let text = |name: &str| -> Result<Option<&str>, String> {
        headers
            .get(name)
            .map(|value| {
                value
                    .to_str()
                    .map(str::trim)
                    .map_err(|_| format!("{name} is not ASCII"))
            })
            .transpose()
    };
    let delay = text(DELAY_CONTROL)?
        .map(|value| {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{DELAY_CONTROL}: {value:?} is not a number of milliseconds"))
        })
        .transpose()?;
    let status = text(STATUS_CONTROL)?
        .map(|value| {
            value
                .parse::<u16>()
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| format!("{STATUS_CONTROL}: {value:?} is not an HTTP status code"))
        })
        .transpose()?
        .unwrap_or(StatusCode::OK);
    let mut response_headers = Vec::new();
    for value in headers.get_all(RESPONSE_HEADER_CONTROL) {
        let invalid = || format!("{RESPONSE_HEADER_CONTROL}: {value:?} is not name=value");
        let (name, header_value) = value
            .as_bytes()
            .iter()
            .position(|&byte| byte == b'=')
            .map(|at| value.as_bytes().split_at(at))
            .ok_or_else(invalid)?;
        let name = HeaderName::from_bytes(name.trim_ascii()).map_err(|_| invalid())?;
        let header_value =
            HeaderValue::from_bytes(header_value[1..].trim_ascii()).map_err(|_| invalid())?;
        response_headers.push((name, header_value));
    }
    let reset = text(RESET_CONTROL)?.is_some_and(|value| value == "1");
    let delay_choices = text(DELAY_CHOICES_CONTROL)?
        .map(|value| {
            DelayChoices::parse(value).map_err(|error| format!("{DELAY_CHOICES_CONTROL}: {error}"))
        })
        .transpose()?;
    let seed = text(SEED_CONTROL)?
        .map(|value| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{SEED_CONTROL}: {value:?} is not an unsigned integer"))
        })
        .transpose()?;
    let close_mid_response = text(CLOSE_MID_RESPONSE_CONTROL)?.is_some_and(|value| value == "1");
    let fail_every = text(FAIL_EVERY_CONTROL)?
        .map(|value| {
            value
                .parse::<u64>()
                .ok()
                .filter(|&every| every > 0)
                .ok_or_else(|| format!("{FAIL_EVERY_CONTROL}: {value:?} is not a positive integer"))
        })
        .transpose()?;
    let grpc_status = text(GRPC_STATUS_CONTROL)?
        .map(|value| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{GRPC_STATUS_CONTROL}: {value:?} is not a gRPC status code"))
        })
        .transpose()?;
    let trailers_only = text(GRPC_TRAILERS_ONLY_CONTROL)?.is_some_and(|value| value == "1");
    if trailers_only && grpc_status.is_none() {
        return Err(format!(
            "{GRPC_TRAILERS_ONLY_CONTROL} needs {GRPC_STATUS_CONTROL}"
        ));
    }
    let grpc = grpc_status.map(|status| GrpcAnswer {
        status,
        trailers_only,
    });
    Ok(Instructions {
        delay,
        status,
        response_headers,
        reset,
        delay_choices,
        seed,
        close_mid_response,
        fail_every,
        grpc,
    })
}

async fn handle(
    request: Request<Incoming>,
    state: &AppState,
) -> Result<Response<AppBody>, ResetRequested> {
    state.requests_seen.fetch_add(1, Ordering::SeqCst);
    if state.outage.load(Ordering::SeqCst) {
        state.outage_failures.fetch_add(1, Ordering::SeqCst);
        return Ok(plain_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "outage".into(),
        ));
    }
    let instructions = match instructions(&request) {
        Ok(instructions) => instructions,
        Err(message) => return Ok(plain_response(StatusCode::BAD_REQUEST, message)),
    };
    // Counted on arrival, so the failing ones are exactly the Nth, 2Nth, ... arrivals.
    let fail_every_failure = instructions.fail_every.and_then(|every| {
        let arrival = state.fail_every_seen.fetch_add(1, Ordering::SeqCst) + 1;
        (arrival % every == 0).then_some(arrival)
    });
    let method = request.method().as_str().to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| request.uri().to_string());
    let headers: Vec<[String; 2]> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            [
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ]
        })
        .collect();
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(ResetRequested), // the client went away mid-body
    };
    if let Some(delay) = instructions.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(choices) = &instructions.delay_choices {
        let seed = instructions.seed.unwrap_or_else(unseeded);
        tokio::time::sleep(choices.for_seed(seed)).await;
    }
    if instructions.reset {
        return Err(ResetRequested);
    }
    if let Some(arrival) = fail_every_failure {
        state.fail_every_failed.fetch_add(1, Ordering::SeqCst);
        return Ok(plain_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{FAIL_EVERY_CONTROL}: failing arrival {arrival}"),
        ));
    }
    let echo = serde_json::json!({
        "method": method,
        "path": path,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let echo = Bytes::from(echo.to_string());
    if let Some(grpc) = &instructions.grpc {
        return Ok(grpc_response(grpc, echo, &instructions));
    }
    let mut response = if instructions.close_mid_response {
        state.closed_mid_response.fetch_add(1, Ordering::SeqCst);
        let length = echo.len();
        let mut response = Response::new(AppBody::close_mid_response(echo));
        // The full length, so every client can tell the body was cut off.
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
        response
    } else {
        Response::new(AppBody::full(echo))
    };
    *response.status_mut() = instructions.status;
    let response_headers = response.headers_mut();
    response_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in instructions.response_headers {
        response_headers.append(name, value);
    }
    Ok(response)
}

/// A gRPC server's answer: HTTP 200 (or `x-test-status`), `content-type: application/grpc`,
/// and either the echo as one length-prefixed message followed by trailers carrying
/// `grpc-status` and `grpc-message`, or (trailers-only) both in the headers and no body.
fn grpc_response(grpc: &GrpcAnswer, echo: Bytes, instructions: &Instructions) -> Response<AppBody> {
    let mut status_headers = HeaderMap::new();
    status_headers.insert("grpc-status", HeaderValue::from(grpc.status));
    status_headers.insert("grpc-message", HeaderValue::from_static(GRPC_MESSAGE));
    let mut response = if grpc.trailers_only {
        let mut response = Response::new(AppBody::empty());
        response.headers_mut().extend(status_headers);
        response
    } else {
        // Uncompressed flag, big-endian length, message.
        let mut message = Vec::with_capacity(5 + echo.len());
        message.push(0);
        message.extend_from_slice(&(echo.len() as u32).to_be_bytes());
        message.extend_from_slice(&echo);
        Response::new(AppBody::with_trailers(Bytes::from(message), status_headers))
    };
    *response.status_mut() = instructions.status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    for (name, value) in &instructions.response_headers {
        headers.append(name, value.clone());
    }
    response
}

fn plain_response(status: StatusCode, message: String) -> Response<AppBody> {
    let mut response = Response::new(AppBody::full(Bytes::from(message)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A seed for a request without `x-test-seed`: different for every request and every run.
fn unseeded() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        AtomicU64::new(splitmix64(now ^ u64::from(std::process::id())))
    });
    next.fetch_add(1, Ordering::Relaxed)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed hash of a 64-bit counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The body of a test-app response: the whole body (then trailers, for a gRPC answer), no
/// body at all (a gRPC trailers-only answer), or (for `x-test-close-mid-response`) the first
/// half and then an error, which makes hyper close the connection (HTTP/1.1) or reset the
/// stream (HTTP/2) after the status, the headers and that half went out.
pub struct AppBody {
    data: Option<Bytes>,
    /// Sent after the data (HTTP/2 trailers).
    trailers: Option<HeaderMap>,
    /// Set for a response to cut off: the pause before the cut, so the first half is
    /// flushed to the socket before the connection closes.
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
    length: u64,
}

/// How long a cut-off response waits between its first half and the close.
const CLOSE_MID_RESPONSE_PAUSE: Duration = Duration::from_millis(20);

impl AppBody {
    fn full(data: Bytes) -> AppBody {
        AppBody {
            length: data.len() as u64,
            data: Some(data),
            trailers: None,
            cut: None,
        }
    }

    /// No body: the stream ends with the response headers.
    fn empty() -> AppBody {
        AppBody {
            length: 0,
            data: None,
            trailers: None,
            cut: None,
        }
    }

    fn with_trailers(data: Bytes, trailers: HeaderMap) -> AppBody {
        AppBody {
            trailers: Some(trailers),
            ..AppBody::full(data)
        }
    }

    fn close_mid_response(data: Bytes) -> AppBody {
        let length = data.len() as u64;
        AppBody {
            data: Some(data.slice(..data.len() / 2)),
            trailers: None,
            cut: Some(Box::pin(tokio::time::sleep(CLOSE_MID_RESPONSE_PAUSE))),
            length,
        }
    }
}

/// The error a cut-off body ends with.
#[derive(Debug)]
pub struct ClosedMidResponse;

impl std::fmt::Display for ClosedMidResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response cut off by x-test-close-mid-response")
    }
}

impl std::error::Error for ClosedMidResponse {}

impl Body for AppBody {
    type Data = Bytes;
    type Error = ClosedMidResponse;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClosedMidResponse>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match self.cut.as_mut() {
            None => Poll::Ready(None),
            Some(pause) => match pause.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(Some(Err(ClosedMidResponse))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none() && self.cut.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.length)
    }
}

/// A delay distribution given as weighted choices, the value of `x-test-delay-ms-choices`:
/// comma-separated `DELAY[*WEIGHT]` items, where DELAY is `MS` (exactly MS milliseconds) or
/// `LO-HI` (uniform between LO and HI ms, microsecond resolution) and WEIGHT a positive
/// integer (default 1). `2*90,20-40*8,200-400*2`: 90% of requests take 2 ms, 8% between 20
/// and 40 ms, 2% between 200 and 400 ms: p50 2 ms, p95 32.5 ms, p99 300 ms.
///
/// The draw for a request is a pure function of a 64-bit seed ([`DelayChoices::for_seed`]):
/// `x-test-seed: N` makes it reproducible, so a test can compute the exact delays it asked
/// for; without it the app uses a fresh seed per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayChoices {
    choices: Vec<DelayChoice>,
}

/// One item of [`DelayChoices`]: a delay uniform in `low..=high` (microseconds), `weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayChoice {
    pub low_us: u64,
    pub high_us: u64,
    pub weight: u64,
}

impl DelayChoices {
    /// Parses the header format (whitespace around items and numbers is allowed).
    pub fn parse(text: &str) -> Result<DelayChoices, String> {
        let ms = |value: &str| -> Result<u64, String> {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms <= 3_600_000)
                .map(|ms| ms * 1000)
                .ok_or_else(|| format!("{value:?} is not a delay in ms (0 to 3600000)"))
        };
        let mut choices = Vec::new();
        for item in text.split(',') {
            let (delay, weight) = match item.split_once('*') {
                Some((delay, weight)) => (
                    delay,
                    weight
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|&weight| (1..=1_000_000).contains(&weight))
                        .ok_or_else(|| {
                            format!("{weight:?} is not a weight (an integer, 1 to 1000000)")
                        })?,
                ),
                None => (item, 1),
            };
            let (low_us, high_us) = match delay.split_once('-') {
                Some((low, high)) => (ms(low)?, ms(high)?),
                None => (ms(delay)?, ms(delay)?),
            };
            if low_us > high_us {
                return Err(format!("{delay:?}: the range is empty"));
            }
            choices.push(DelayChoice {
                low_us,
                high_us,
                weight,
            });
        }
        Ok(DelayChoices { choices })
    }

    pub fn choices(&self) -> &[DelayChoice] {
        &self.choices
    }

    fn total_weight(&self) -> u64 {
        self.choices.iter().map(|choice| choice.weight).sum()
    }

    /// The delay the app sleeps for a request with `x-test-seed: seed`.
    pub fn for_seed(&self, seed: u64) -> Duration {
        let pick = splitmix64(seed);
        let within = splitmix64(pick ^ 0x5DEE_CE66_D1CE_F00D);
        let mut ticket = pick % self.total_weight();
        for choice in &self.choices {
            if ticket < choice.weight {
                let span = choice.high_us - choice.low_us + 1;
                return Duration::from_micros(choice.low_us + within % span);
            }
            ticket -= choice.weight;
        }
        unreachable!("the ticket is below the total weight")
    }

    /// The exact `q` quantile (0..=1) of the distribution: the smallest delay d with
    /// P(delay <= d) >= q, at microsecond resolution.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.total_weight() as f64;
        let cdf = |x: u64| -> f64 {
            self.choices
                .iter()
                .map(|choice| {
                    let share = if x >= choice.high_us {
                        1.0
                    } else if x < choice.low_us {
                        0.0
                    } else {
                        (x - choice.low_us + 1) as f64 / (choice.high_us - choice.low_us + 1) as f64
                    };
                    share * choice.weight as f64
                })
                .sum::<f64>()
                / total
        };
        let (mut low, mut high) = (
            0u64,
            self.choices.iter().map(|c| c.high_us).max().unwrap_or(0),
        );
        while low < high {
            let middle = low + (high - low) / 2;
            if cdf(middle) >= q {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        Duration::from_micros(low)
    }
}

impl std::fmt::Display for DelayChoices {
    /// The header value (delays in whole ms, as the format has them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, choice) in self.choices.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if choice.low_us == choice.high_us {
                write!(f, "{}", choice.low_us / 1000)?;
            } else {
                write!(f, "{}-{}", choice.low_us / 1000, choice.high_us / 1000)?;
            }
            write!(f, "*{}", choice.weight)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_choices_parse_print_draw_and_quantiles() {
        let choices = DelayChoices::parse(" 2*90, 20-40*8 ,200-400*2").unwrap();
        assert_eq!(choices.to_string(), "2*90,20-40*8,200-400*2");
        assert_eq!(choices.quantile(0.5), Duration::from_millis(2));
        assert_eq!(choices.quantile(0.90), Duration::from_millis(2));
        // 95%: 5/8 into the 20-40 ms range; 99%: half-way into 200-400 ms.
        let p95 = choices.quantile(0.95).as_micros() as i64;
        assert!((p95 - 32_500).abs() <= 2, "{p95}");
        let p99 = choices.quantile(0.99).as_micros() as i64;
        assert!((p99 - 300_000).abs() <= 2, "{p99}");
        assert_eq!(choices.for_seed(7), choices.for_seed(7));
        let draws: Vec<Duration> = (0..10_000).map(|seed| choices.for_seed(seed)).collect();
        let fast = draws
            .iter()
            .filter(|d| **d == Duration::from_millis(2))
            .count();
        assert!((8_800..9_200).contains(&fast), "{fast}");
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(400)));
        assert_eq!(
            DelayChoices::parse("7").unwrap().for_seed(1),
            Duration::from_millis(7)
        );
        for bad in ["", "x", "5*0", "9-3", "5*", "1,,2", "-1"] {
            assert!(DelayChoices::parse(bad).is_err(), "{bad:?}");
        }
    }
}
