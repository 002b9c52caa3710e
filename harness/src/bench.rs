//! `eastwest-harness bench`: throughput of the harness itself (requests per second through a
//! trivial filter on one core) and the exact cost, in wasm instructions per request, of every
//! module in a directory (the eastwest filters in dist/), outbound and inbound.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::{Harness, HarnessError, Message, Options};

/// The cheapest filter there is: Continue from request headers, nothing else. Its rate is the
/// harness's own overhead per request.
pub const TRIVIAL_FILTER_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#;

/// One row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub filter: String,
    pub requests_per_second: f64,
    pub instructions_per_request: u64,
}

/// A sidecar's node as Istio bootstraps it, on the given side of the call
/// (`listener_direction`: 1 inbound, 2 outbound).
fn sidecar_properties(listener_direction: i64) -> serde_json::Value {
    json!({"xds": {"listener_direction": listener_direction, "node": {"metadata": {
        "NAMESPACE": "shop",
        "LABELS": {"app": "cart", "team": "web", "criticality": "high", "environment": "prod"},
    }}}})
}

/// Sends `requests` identical requests through `wasm` on one worker and times them.
pub fn measure(
    filter: &str,
    wasm: &[u8],
    options: Options,
    requests: usize,
) -> Result<Figure, HarnessError> {
    let mut harness = Harness::new(wasm, options)?;
    let request = Message::get("/orders")
        .header(":authority", "checkout.shop")
        .header("baggage", "userid=7");
    // One request first so that one-time work (metric definitions, caches) is not timed.
    let warm = harness.run(0, None, request.clone(), None);
    let mut instructions = harness.result(warm).instructions;
    let started = Instant::now();
    for _ in 0..requests {
        let id = harness.run(0, None, request.clone(), None);
        instructions = harness.result(id).instructions;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(trap) = harness.traps.first() {
        return Err(HarnessError(format!(
            "{filter} trapped in {}: {}",
            trap.callback, trap.message
        )));
    }
    Ok(Figure {
        filter: filter.to_string(),
        requests_per_second: requests as f64 / elapsed.max(f64::MIN_POSITIVE),
        instructions_per_request: instructions,
    })
}

/// The trivial filter, then every `*.wasm` in `modules_dir` (sorted by name), outbound and
/// inbound.
pub fn run(modules_dir: &Path, requests: usize) -> Result<Vec<Figure>, HarnessError> {
    let mut figures = vec![measure(
        "trivial (no-op)",
        TRIVIAL_FILTER_WAT.as_bytes(),
        Options::default(),
        requests,
    )?];
    let entries = std::fs::read_dir(modules_dir)
        .map_err(|e| HarnessError(format!("cannot list {}: {e}", modules_dir.display())))?;
    let mut modules: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    modules.sort();
    for path in modules {
        let wasm = std::fs::read(&path)
            .map_err(|e| HarnessError(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (direction, listener_direction) in [("outbound", 2), ("inbound", 1)] {
            let options = Options {
                properties: sidecar_properties(listener_direction),
                ..Options::default()
            };
            // Filters cost far more than the no-op: fewer requests give as steady a rate.
            let figure = measure(
                &format!("{name} {direction}"),
                &wasm,
                options,
                (requests / 4).max(1),
            )?;
            figures.push(figure);
        }
    }
    Ok(figures)
}

/// The report as a table.
pub fn table(figures: &[Figure]) -> String {
    let width = figures
        .iter()
        .map(|f| f.filter.len())
        .max()
        .unwrap_or(0)
        .max("filter".len());
    let mut out = format!(
        "{:<width$}  {:>12}  {:>20}\n",
        "filter", "requests/s", "instructions/request"
    );
    for figure in figures {
        out.push_str(&format!(
            "{:<width$}  {:>12.0}  {:>20}\n",
            figure.filter, figure.requests_per_second, figure.instructions_per_request
        ));
    }
    out
}
