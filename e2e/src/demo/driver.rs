//! The traffic driver: GET requests at a fixed rate (open loop: a slow answer does not slow
//! the next request down, as with real users) to the entry service, counted as they finish.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::load::new_latency_histogram;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Driver::stop`] waits for requests still in flight.
const DRAIN: Duration = Duration::from_secs(6);

/// What the driver has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverCounts {
    pub sent: u64,
    /// Answered below 500.
    pub ok: u64,
    /// Answered 5xx, not answered, or timed out.
    pub errors: u64,
}

impl DriverCounts {
    pub fn finished(&self) -> u64 {
        self.ok + self.errors
    }

    pub fn minus(&self, earlier: &DriverCounts) -> DriverCounts {
        DriverCounts {
            sent: self.sent.saturating_sub(earlier.sent),
            ok: self.ok.saturating_sub(earlier.ok),
            errors: self.errors.saturating_sub(earlier.errors),
        }
    }

    pub fn error_ratio(&self) -> f64 {
        if self.finished() == 0 {
            0.0
        } else {
            self.errors as f64 / self.finished() as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

/// A running driver; [`Driver::stop`] ends it (dropping it does too).
pub struct Driver {
    counters: Arc<Counters>,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Driver {
    /// Starts sending GET `url` at `rate` requests per second.
    pub fn start(url: &str, rate: f64) -> Result<Driver> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("demo-driver")
            .enable_all()
            .build()
            .context("cannot start the driver's tokio runtime")?;
        let counters = Arc::new(Counters::default());
        let latencies = Arc::new(Mutex::new(new_latency_histogram()));
        let stop = Arc::new(AtomicBool::new(false));
        let url: hyper::Uri = url.parse().context("the driver's URL")?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
        {
            let (counters, latencies, stop) = (counters.clone(), latencies.clone(), stop.clone());
            runtime.spawn(async move {
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::SeqCst) {
                    ticker.tick().await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    counters.sent.fetch_add(1, Ordering::SeqCst);
                    counters.in_flight.fetch_add(1, Ordering::SeqCst);
                    let (client, url, counters, latencies) = (
                        client.clone(),
                        url.clone(),
                        counters.clone(),
                        latencies.clone(),
                    );
                    tokio::spawn(async move {
                        let started = tokio::time::Instant::now();
                        let request = Request::get(url)
                            .body(Full::new(Bytes::new()))
                            .expect("a valid request");
                        let exchange = async {
                            let response = client.request(request).await.ok()?;
                            let status = response.status().as_u16();
                            response.into_body().collect().await.ok()?;
                            Some(status)
                        };
                        let status = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                            .await
                            .ok()
                            .flatten();
                        if status.is_some_and(|status| status < 500) {
                            counters.ok.fetch_add(1, Ordering::SeqCst);
                        } else {
                            counters.errors.fetch_add(1, Ordering::SeqCst);
                        }
                        let micros = started.elapsed().as_micros() as u64;
                        if let Ok(mut histogram) = latencies.lock() {
                            let high = histogram.high();
                            let _ = histogram.record(micros.clamp(1, high));
                        }
                        counters.in_flight.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Ok(Driver {
            counters,
            latencies,
            stop,
            runtime: Some(runtime),
        })
    }

    pub fn counts(&self) -> DriverCounts {
        DriverCounts {
            sent: self.counters.sent.load(Ordering::SeqCst),
            ok: self.counters.ok.load(Ordering::SeqCst),
            errors: self.counters.errors.load(Ordering::SeqCst),
        }
    }

    /// The `q` quantile of the end-to-end latency so far, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        let histogram = self.latencies.lock().ok()?;
        (!histogram.is_empty()).then(|| histogram.value_at_quantile(q) as f64 / 1000.0)
    }

    /// Stops sending, waits up to a few seconds for the requests in flight, then stops.
    pub fn stop(&mut self) -> DriverCounts {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + DRAIN;
        while self.counters.in_flight.load(Ordering::SeqCst) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        self.counts()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
