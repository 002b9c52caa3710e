//! `eastwest-harness bench`: throughput of the harness itself (requests per second through a
//! trivial filter on one core) and the exact cost, in wasm instructions, of a typical request
//! through every module in a directory (the eastwest filters in dist/), outbound and inbound,
//! per callback, against the targets of DESIGN.md §8.
//!
//! Every request is the same typical request (see [`typical_request`]) on one warm VM: after
//! [`WARMUP_REQUESTS`] requests that are not counted (one-time work such as defining metrics
//! and resolving this workload's labels), `requests` identical requests are timed and counted.
//! `instructions_per_request` is their median (they are usually all equal),
//! `max_instructions_per_request` the most any one of them cost (a burst of work on some
//! requests only, such as a hash table that grows, shows there), and `callbacks` the
//! instructions of one median request by callback.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::{Harness, HarnessError, Message, Options};

/// The cheapest filter there is: Continue from request headers, nothing else. Its rate is the
/// harness's own overhead per request.
pub const TRIVIAL_FILTER_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#;

/// Requests run before counting starts, so that one-time work is not counted.
pub const WARMUP_REQUESTS: usize = 10;

/// DESIGN.md §8: instructions per typical request of each filter alone.
pub const SINGLE_FILTER_TARGET: u64 = 3_000;
/// DESIGN.md §8: instructions per typical request of `eastwest.wasm` with all three features.
pub const SIDECAR_TARGET: u64 = 6_000;

/// The modules of this project and their targets.
const SINGLE_FILTERS: [&str; 3] = ["label-enrich", "telemetry", "retry-budget"];
const SIDECAR: &str = "eastwest";

/// Which side of the call the sidecar is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The caller's sidecar (`cart` calling `orders`): listener_direction 2.
    Outbound,
    /// The callee's sidecar (`orders`, called by `cart`): listener_direction 1.
    Inbound,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// An Istio sidecar's node (`xds.node`) for a workload of the `shop` namespace.
fn istio_node(app: &str, team: &str, criticality: &str) -> serde_json::Value {
    json!({
        "id": format!("sidecar~10.0.0.11~{app}-7d9f8b-x2x4q.shop~shop.svc.cluster.local"),
        "cluster": format!("{app}.shop"),
        "metadata": {
            "NAME": format!("{app}-7d9f8b-x2x4q"),
            "NAMESPACE": "shop",
            "WORKLOAD_NAME": app,
            "CLUSTER_ID": "Kubernetes",
            "MESH_ID": "cluster.local",
            "ISTIO_VERSION": "1.27.1",
            "SERVICE_ACCOUNT": app,
            "LABELS": {
                "app": app,
                "version": "v1",
                "service.istio.io/canonical-name": app,
                "service.istio.io/canonical-revision": "v1",
                "team": team,
                "criticality": criticality,
                "environment": "prod",
            },
        },
        "locality": {"region": "eu-west-1", "zone": "eu-west-1a"},
    })
}

/// What a real Istio sidecar (mTLS between sidecars) gives the filters for the typical request:
/// the node, the listener direction, the upstream cluster, the peer certificates, the attempt
/// count, the response code and flags, the request duration. Outbound it is `cart`'s sidecar
/// calling `orders`; inbound `orders`'s sidecar called by `cart`.
pub fn sidecar_properties(direction: Direction) -> serde_json::Value {
    let common = json!({
        "request": {"duration": 1_500_000, "protocol": "HTTP/1.1", "total_size": 0},
        "response": {"code": 200, "code_details": "via_upstream", "flags": 0, "total_size": 120},
    });
    let specific = match direction {
        Direction::Outbound => json!({
            "xds": {
                "listener_direction": 2,
                "cluster_name": "outbound|8080||orders.shop.svc.cluster.local",
                "route_name": "orders.shop.svc.cluster.local:8080",
                "node": istio_node("cart", "web", "high"),
            },
            "connection": {"mtls": false},
            "upstream": {
                "request_attempt_count": 1,
                "address": "10.0.0.12:8080",
                "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/orders",
            },
        }),
        Direction::Inbound => json!({
            "xds": {
                "listener_direction": 1,
                "cluster_name": "inbound|8080||",
                "route_name": "default",
                "node": istio_node("orders", "fulfilment", "critical"),
            },
            "connection": {
                "mtls": true,
                "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/cart",
            },
            "upstream": {"request_attempt_count": 1, "address": "127.0.0.6:8080"},
        }),
    };
    let mut properties = common;
    for (key, value) in specific.as_object().into_iter().flatten() {
        properties[key] = value.clone();
    }
    properties
}

/// A typical request as the sidecar's filters see it: eight headers, `baggage` with one
/// member that is not a label; inbound it also carries the caller's label members (`cart`'s,
/// as the caller's label-enrich stamps them).
pub fn typical_request(direction: Direction) -> Message {
    let baggage = match direction {
        Direction::Outbound => "userid=7",
        Direction::Inbound => "userid=7,service.name=cart,k8s.namespace.name=shop",
    };
    Message::new(&[
        (":authority", "orders.shop.svc.cluster.local:8080"),
        (":path", "/api/v1/orders/42"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "cart/1.4.2"),
        ("accept", "application/json"),
        ("x-request-id", "4f6c2a8e-9b1d-4c3e-8f7a-2d5b6e9c1a30"),
        ("baggage", baggage),
    ])
}

/// The body of the typical response.
pub const TYPICAL_RESPONSE_BODY: &str = r#"{"id":42,"status":"shipped","items":3}"#;

/// The upstream's answer: `200` with a small JSON body; outbound `orders`'s sidecar has stamped
/// its labels into `x-eastwest-peer` (inbound the upstream is the local application, which
/// sends none).
pub fn typical_response(direction: Direction) -> Message {
    let mut response = Message::status(200)
        .header("content-type", "application/json")
        .header("content-length", &TYPICAL_RESPONSE_BODY.len().to_string());
    if direction == Direction::Outbound {
        response = response.header(
            "x-eastwest-peer",
            "service.name=orders,k8s.namespace.name=shop",
        );
    }
    response.body(TYPICAL_RESPONSE_BODY)
}

/// The configuration a module gets unless `--config NAME=JSON` says otherwise.
pub fn default_config(module: &str, direction: Direction) -> String {
    let retry_mode = match direction {
        Direction::Outbound => "client-headers",
        Direction::Inbound => "server",
    };
    match module {
        "label-enrich" => json!({"peer_trust": "any"}).to_string(),
        "retry-budget" => json!({"mode": retry_mode}).to_string(),
        SIDECAR => json!({
            "label_enrich": {"peer_trust": "any"},
            "telemetry": {},
            "retry_budget": {"mode": retry_mode},
        })
        .to_string(),
        _ => "{}".to_string(),
    }
}

/// DESIGN.md §8's instructions per request for a module, when it has one.
pub fn target(module: &str) -> Option<u64> {
    if SINGLE_FILTERS.contains(&module) {
        Some(SINGLE_FILTER_TARGET)
    } else if module == SIDECAR {
        Some(SIDECAR_TARGET)
    } else {
        None
    }
}

/// One module in one direction. `error` is set (and the figures are zero) when the module
/// could not be measured: a refused configuration, a bad module, a trap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    pub module: String,
    pub direction: String,
    pub instructions_per_request: u64,
    pub max_instructions_per_request: u64,
    /// Instructions of one median request by callback (`proxy_on_request_headers`, ...).
    pub callbacks: BTreeMap<String, u64>,
    pub requests_per_second: f64,
    pub error: Option<String>,
}

/// The whole report, as `--json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Requests per second through the no-op filter: the harness's own cost per request.
    pub harness_requests_per_second: f64,
    pub modules: Vec<Figure>,
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests through the no-op filter; a quarter of that (at least one) through each module
    /// and direction, after the warm-up.
    pub requests: usize,
    /// Configuration by module name (file stem), replacing the default in both directions.
    pub configs: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            requests: 20_000,
            configs: BTreeMap::new(),
        }
    }
}

/// What one run of identical requests gave.
struct Measured {
    requests_per_second: f64,
    median: u64,
    max: u64,
    callbacks: BTreeMap<String, u64>,
}

fn measure_harness(
    harness: &mut Harness,
    direction: Direction,
    requests: usize,
) -> Result<Measured, String> {
    let request = typical_request(direction);
    let response = typical_response(direction);
    for _ in 0..WARMUP_REQUESTS {
        harness.run(0, None, request.clone(), Some((response.clone(), 0)));
    }
    let mut counts = Vec::with_capacity(requests);
    let mut ids = Vec::with_capacity(requests);
    let started = Instant::now();
    for _ in 0..requests {
        let id = harness.run(0, None, request.clone(), Some((response.clone(), 0)));
        counts.push(harness.instructions(id));
        ids.push(id);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(trap) = harness.traps.first() {
        return Err(format!("trapped in {}: {}", trap.callback, trap.message));
    }
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    let median = sorted[(sorted.len() - 1) / 2];
    let typical = counts
        .iter()
        .position(|&count| count == median)
        .map(|index| ids[index])
        .unwrap_or(0);
    Ok(Measured {
        requests_per_second: requests as f64 / elapsed.max(f64::MIN_POSITIVE),
        median,
        max: sorted[sorted.len() - 1],
        callbacks: harness.result(typical).instructions_by_callback(),
    })
}

/// Sends the typical request through `wasm` on one warm worker `requests` times; any failure
/// is the figure's `error`.
pub fn measure(
    module: &str,
    wasm: &[u8],
    config: &str,
    direction: Direction,
    requests: usize,
) -> Figure {
    let mut figure = Figure {
        module: module.to_string(),
        direction: direction.name().to_string(),
        instructions_per_request: 0,
        max_instructions_per_request: 0,
        callbacks: BTreeMap::new(),
        requests_per_second: 0.0,
        error: None,
    };
    let options = Options {
        config: config.as_bytes().to_vec(),
        properties: sidecar_properties(direction),
        ..Options::default()
    };
    let measured = Harness::new(wasm, options)
        .map_err(|e| e.0)
        .and_then(|mut harness| measure_harness(&mut harness, direction, requests.max(1)));
    match measured {
        Ok(measured) => {
            figure.instructions_per_request = measured.median;
            figure.max_instructions_per_request = measured.max;
            figure.callbacks = measured.callbacks;
            figure.requests_per_second = measured.requests_per_second;
        }
        Err(error) => figure.error = Some(error),
    }
    figure
}

/// The `*.wasm` files of a directory, sorted, with their names (file stems).
pub fn modules_in(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, HarnessError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| HarnessError(format!("cannot list {}: {e}", dir.display())))?;
    let mut modules: Vec<(String, std::path::PathBuf)> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .map(|path| {
            let name = path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, path)
        })
        .collect();
    modules.sort();
    Ok(modules)
}

/// The no-op filter, then every `*.wasm` in `modules_dir` (sorted by name), outbound and
/// inbound.
pub fn run(modules_dir: &Path, settings: &Settings) -> Result<Report, HarnessError> {
    let modules = modules_in(modules_dir)?;
    if let Some(unknown) = settings
        .configs
        .keys()
        .find(|name| !modules.iter().any(|(module, _)| module == *name))
    {
        return Err(HarnessError(format!(
            "--config {unknown}=...: there is no {}/{unknown}.wasm",
            modules_dir.display()
        )));
    }
    let trivial = measure(
        "trivial (no-op)",
        TRIVIAL_FILTER_WAT.as_bytes(),
        "",
        Direction::Outbound,
        settings.requests,
    );
    if let Some(error) = trivial.error {
        return Err(HarnessError(format!("the no-op filter: {error}")));
    }
    let mut report = Report {
        harness_requests_per_second: trivial.requests_per_second,
        modules: Vec::new(),
    };
    // Filters cost far more than the no-op: fewer requests give as steady a rate.
    let requests = (settings.requests / 4).max(1);
    for (name, path) in modules {
        let wasm = std::fs::read(&path);
        for direction in Direction::BOTH {
            let figure = match &wasm {
                Ok(wasm) => {
                    let config = settings
                        .configs
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| default_config(&name, direction));
                    measure(&name, wasm, &config, direction, requests)
                }
                Err(e) => Figure {
                    module: name.clone(),
                    direction: direction.name().to_string(),
                    instructions_per_request: 0,
                    max_instructions_per_request: 0,
                    callbacks: BTreeMap::new(),
                    requests_per_second: 0.0,
                    error: Some(format!("cannot read {}: {e}", path.display())),
                },
            };
            report.modules.push(figure);
        }
    }
    Ok(report)
}

/// Callbacks in the order a stream calls them, then any other in name order.
const CALLBACK_ORDER: [&str; 10] = [
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_log",
    "proxy_on_done",
    "proxy_on_delete",
];

fn callback_rank(name: &str) -> (usize, &str) {
    let rank = CALLBACK_ORDER
        .iter()
        .position(|known| *known == name)
        .unwrap_or(CALLBACK_ORDER.len());
    (rank, name)
}

/// The report as text: the harness's own rate, one row per module and direction (with the
/// target and whether it is met), then the instructions of each callback.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "harness: {:.0} requests/s through a no-op filter\n\n",
        report.harness_requests_per_second
    );
    let width = report
        .modules
        .iter()
        .map(|f| f.module.len())
        .max()
        .unwrap_or(0)
        .max("module".len());
    out.push_str(&format!(
        "{:<width$}  {:<9}  {:>10}  {:>12}  {:>13}  {:>8}  {}\n",
        "module", "direction", "requests/s", "instr/req", "max instr/req", "target", "status"
    ));
    for f in &report.modules {
        if let Some(error) = &f.error {
            out.push_str(&format!(
                "{:<width$}  {:<9}  error: {error}\n",
                f.module, f.direction
            ));
            continue;
        }
        let (target, status) = match target(&f.module) {
            Some(target) if f.instructions_per_request <= target => (format!("<= {target}"), "met"),
            Some(target) => (format!("<= {target}"), "MISSED"),
            None => ("-".to_string(), "-"),
        };
        out.push_str(&format!(
            "{:<width$}  {:<9}  {:>10.0}  {:>12}  {:>13}  {:>8}  {}\n",
            f.module,
            f.direction,
            f.requests_per_second,
            f.instructions_per_request,
            f.max_instructions_per_request,
            target,
            status
        ));
    }
    let mut callbacks: Vec<&str> = report
        .modules
        .iter()
        .flat_map(|f| f.callbacks.keys().map(String::as_str))
        .collect();
    callbacks.sort_by_key(|name| callback_rank(name));
    callbacks.dedup();
    if callbacks.is_empty() {
        return out;
    }
    out.push_str("\ninstructions per callback (one median request):\n");
    let short = |name: &str| name.trim_start_matches("proxy_on_").to_string();
    let widths: Vec<usize> = callbacks.iter().map(|c| short(c).len().max(6)).collect();
    out.push_str(&format!("{:<width$}  {:<9}", "module", "direction"));
    for (callback, w) in callbacks.iter().zip(&widths) {
        out.push_str(&format!("  {:>w$}", short(callback)));
    }
    out.push('\n');
    for f in report.modules.iter().filter(|f| f.error.is_none()) {
        out.push_str(&format!("{:<width$}  {:<9}", f.module, f.direction));
        for (callback, w) in callbacks.iter().zip(&widths) {
            let value = f
                .callbacks
                .get(*callback)
                .map_or("-".to_string(), u64::to_string);
            out.push_str(&format!("  {value:>w$}"));
        }
        out.push('\n');
    }
    out
}
