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
//!
//! A malformed control header gets a 400 whose body says what is wrong. The app speaks
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
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

/// The test application running in this process on its own tokio runtime; stops on drop.
pub struct TestApp {
    port: u16,
    requests_seen: Arc<AtomicU64>,
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
        let requests_seen = Arc::new(AtomicU64::new(0));
        let counter = requests_seen.clone();
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, counter).await,
                Err(error) => eprintln!("test app on port {port}: {error}"),
            }
        });
        Ok(TestApp {
            port,
            requests_seen,
            runtime: Some(runtime),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many requests the app has received (including ones it was told to reset).
    pub fn requests_seen(&self) -> u64 {
        self.requests_seen.load(Ordering::SeqCst)
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
        let requests_seen = requests_seen.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let requests_seen = requests_seen.clone();
                async move { handle(request, &requests_seen).await }
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
    Ok(Instructions {
        delay,
        status,
        response_headers,
        reset,
    })
}

async fn handle(
    request: Request<Incoming>,
    requests_seen: &AtomicU64,
) -> Result<Response<Full<Bytes>>, ResetRequested> {
    requests_seen.fetch_add(1, Ordering::SeqCst);
    let instructions = match instructions(&request) {
        Ok(instructions) => instructions,
        Err(message) => return Ok(plain_response(StatusCode::BAD_REQUEST, message)),
    };
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
    if instructions.reset {
        return Err(ResetRequested);
    }
    let echo = serde_json::json!({
        "method": method,
        "path": path,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
    *response.status_mut() = instructions.status;
    let response_headers = response.headers_mut();
    response_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in instructions.response_headers {
        response_headers.append(name, value);
    }
    Ok(response)
}

fn plain_response(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
