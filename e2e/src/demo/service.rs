//! A demo service (`eastwest-demo-service`): answers every request after some work of its
//! own and after calling its dependencies through its sidecar's outbound listener, naming the
//! destination service in `Host` so that the sidecar routes to it.
//!
//! ```text
//! eastwest-demo-service --name checkout --port 10001 --outbound-port 10002 \
//!     --work '2-4*95,10-20*5' --call payments:/pay:1:required --call inventory:/reserve:1:required
//! ```
//!
//! Endpoints, on the service's own port (not through the mesh):
//! * `GET|POST /demo/outage?on=1` starts an outage (every other request is answered 503 at
//!   once, as a crashed backend behind a healthy pod does), `?on=0` ends it;
//! * `GET /demo/health` answers 200.
//!
//! Every other request does the work, then the calls (those of one request concurrently),
//! and answers 200 with JSON naming the service, the caller as its sidecar vouched for it
//! (`x-eastwest-source`) and each call's status and time; 503 if a required call failed.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::DelayChoices;

/// How long a service waits for one dependency (the sidecar's route timeout is shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one service process does.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub name: String,
    pub port: u16,
    pub outbound_port: u16,
    pub work: DelayChoices,
    pub calls: Vec<Call>,
}

/// One dependency call: `SERVICE:PATH:PROBABILITY:required|optional`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub service: String,
    pub path: String,
    pub probability: f64,
    pub required: bool,
}

impl Call {
    pub fn parse(text: &str) -> Result<Call> {
        let parts: Vec<&str> = text.split(':').collect();
        let [service, path, probability, required] = parts[..] else {
            bail!("--call {text:?}: expected SERVICE:PATH:PROBABILITY:required|optional");
        };
        let probability: f64 = probability
            .parse()
            .ok()
            .filter(|p| (0.0..=1.0).contains(p))
            .with_context(|| format!("--call {text:?}: the probability must be 0 to 1"))?;
        let required = match required {
            "required" => true,
            "optional" => false,
            other => bail!("--call {text:?}: {other:?} is neither required nor optional"),
        };
        if service.is_empty() || !path.starts_with('/') {
            bail!("--call {text:?}: needs a service name and a path starting with /");
        }
        Ok(Call {
            service: service.to_owned(),
            path: path.to_owned(),
            probability,
            required,
        })
    }

    /// The command-line form [`Call::parse`] reads.
    pub fn to_arg(&self) -> String {
        let kind = if self.required {
            "required"
        } else {
            "optional"
        };
        format!("{}:{}:{}:{kind}", self.service, self.path, self.probability)
    }
}

impl ServiceOptions {
    pub const USAGE: &'static str = "usage: eastwest-demo-service --name NAME --port PORT \
        --outbound-port PORT [--work DELAY-CHOICES] [--call SERVICE:PATH:PROBABILITY:required|optional]...";

    pub fn parse_args(args: &[String]) -> Result<ServiceOptions> {
        let mut name = None;
        let mut port = None;
        let mut outbound_port = None;
        let mut work = DelayChoices::parse("1").map_err(anyhow::Error::msg)?;
        let mut calls = Vec::new();
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{flag} needs a value\n{}", Self::USAGE))
            };
            match flag.as_str() {
                "--name" => name = Some(value()?.clone()),
                "--port" => port = Some(value()?.parse().context("--port")?),
                "--outbound-port" => {
                    outbound_port = Some(value()?.parse().context("--outbound-port")?)
                }
                "--work" => {
                    work =
                        DelayChoices::parse(value()?).map_err(|e| anyhow::anyhow!("--work: {e}"))?
                }
                "--call" => calls.push(Call::parse(value()?)?),
                other => bail!("unknown argument {other:?}\n{}", Self::USAGE),
            }
        }
        Ok(ServiceOptions {
            name: name.with_context(|| format!("--name is required\n{}", Self::USAGE))?,
            port: port.with_context(|| format!("--port is required\n{}", Self::USAGE))?,
            outbound_port: outbound_port
                .with_context(|| format!("--outbound-port is required\n{}", Self::USAGE))?,
            work,
            calls,
        })
    }
}

struct State {
    options: ServiceOptions,
    outage: AtomicBool,
    requests: AtomicU64,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Serves until the process is killed.
pub fn run(options: ServiceOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(options))
}

async fn serve(options: ServiceOptions) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, options.port))
        .await
        .with_context(|| format!("{}: cannot bind 127.0.0.1:{}", options.name, options.port))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let state = Arc::new(State {
        options,
        outage: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        client,
    });
    println!(
        "{} listening on 127.0.0.1:{}, calling through 127.0.0.1:{}",
        state.options.name, state.options.port, state.options.outbound_port
    );
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, hyper::Error>(handle(request, state).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

async fn handle(request: Request<Incoming>, state: Arc<State>) -> Response<Full<Bytes>> {
    let name = &state.options.name;
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/demo/health" => return reply(StatusCode::OK, json!({"service": name})),
        "/demo/outage" => {
            let on = request.uri().query().unwrap_or("").contains("on=1");
            state.outage.store(on, Ordering::SeqCst);
            return reply(StatusCode::OK, json!({"service": name, "outage": on}));
        }
        _ => {}
    }
    let number = state.requests.fetch_add(1, Ordering::Relaxed);
    if state.outage.load(Ordering::SeqCst) {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"service": name, "error": "outage (injected by the demo)"}),
        );
    }
    let source = request
        .headers()
        .get("x-eastwest-source")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let seed = random_seed(number);
    tokio::time::sleep(state.options.work.for_seed(seed)).await;

    let chosen: Vec<&Call> = state
        .options
        .calls
        .iter()
        .enumerate()
        .filter(|(index, call)| unit_interval(seed ^ (*index as u64 + 1)) < call.probability)
        .map(|(_, call)| call)
        .collect();
    // The calls of one request run concurrently, as an async service makes them.
    let handles: Vec<_> = chosen
        .iter()
        .map(|call| tokio::spawn(call_dependency(state.clone(), (*call).clone())))
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.unwrap_or((None, Duration::ZERO)));
    }
    let mut failed = None;
    let calls: Vec<serde_json::Value> = chosen
        .iter()
        .zip(&results)
        .map(|(call, (status, elapsed))| {
            let ok = status.is_some_and(|s| s < 500);
            if !ok && call.required && failed.is_none() {
                failed = Some(call.service.clone());
            }
            json!({
                "service": call.service,
                "status": status,
                "ms": elapsed.as_millis() as u64,
            })
        })
        .collect();
    match failed {
        None => reply(
            StatusCode::OK,
            json!({"service": name, "source": source, "calls": calls}),
        ),
        Some(dependency) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"service": name, "source": source, "calls": calls,
                   "error": format!("{dependency} failed")}),
        ),
    }
}

/// Calls `call` through the sidecar; the status (None: no response) and the time it took.
async fn call_dependency(state: Arc<State>, call: Call) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let request = Request::builder()
        .uri(format!(
            "http://127.0.0.1:{}{}",
            state.options.outbound_port, call.path
        ))
        .header(HOST, call.service.as_str())
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let exchange = async {
        let response = state.client.request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    let status = tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .ok()
        .flatten();
    (status, started.elapsed())
}

/// A seed per request that differs between processes and runs.
fn random_seed(number: u64) -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        splitmix64(nanos ^ u64::from(std::process::id()) << 32)
    });
    splitmix64(base.wrapping_add(number))
}

/// A number in [0, 1) drawn from `seed`.
fn unit_interval(seed: u64) -> f64 {
    (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_through_their_argument_form() {
        let call = Call::parse("payments:/holds:0.1:optional").unwrap();
        assert_eq!(
            call,
            Call {
                service: "payments".into(),
                path: "/holds".into(),
                probability: 0.1,
                required: false
            }
        );
        assert_eq!(Call::parse(&call.to_arg()).unwrap(), call);
        for bad in [
            "payments:/x:2:required",
            "payments:x:1:required",
            "a:/b:1:maybe",
            "a:/b",
        ] {
            assert!(Call::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_need_name_and_ports() {
        let args = |text: &str| -> Vec<String> { text.split(' ').map(String::from).collect() };
        let options = ServiceOptions::parse_args(&args(
            "--name checkout --port 1 --outbound-port 2 --call payments:/pay:1:required",
        ))
        .unwrap();
        assert_eq!(
            (options.name.as_str(), options.port, options.outbound_port),
            ("checkout", 1, 2)
        );
        assert_eq!(options.calls.len(), 1);
        assert!(ServiceOptions::parse_args(&args("--name x --port 1")).is_err());
        assert!(
            ServiceOptions::parse_args(&args("--name x --port 1 --outbound-port 2 --x 1")).is_err()
        );
    }

    #[test]
    fn the_draws_are_spread_over_the_unit_interval() {
        let draws: Vec<f64> = (0..10_000).map(|i| unit_interval(random_seed(i))).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let below = draws.iter().filter(|d| **d < 0.1).count();
        assert!((800..1200).contains(&below), "{below}");
    }
}
