//! Throughput and per-request cost figures (run: `cargo test --release -p eastwest-harness
//! --test throughput -- --ignored --nocapture`).

use std::time::Instant;

use eastwest_harness::{Harness, Message, Options};
use serde_json::json;

const TRIVIAL: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#;

fn measure(name: &str, wasm: &[u8], options: Options, requests: usize) {
    let mut h = Harness::new(wasm, options).unwrap();
    let request = Message::get("/").header("baggage", "userid=7");
    let start = Instant::now();
    let mut instructions = 0;
    for _ in 0..requests {
        let id = h.run(0, None, request.clone(), None);
        instructions = h.result(id).instructions;
    }
    let elapsed = start.elapsed();
    println!(
        "{name}: {:.0} requests/s on one core, {instructions} instructions/request",
        requests as f64 / elapsed.as_secs_f64()
    );
}

#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    measure(
        "trivial filter",
        TRIVIAL.as_bytes(),
        Options::default(),
        20_000,
    );
    let label_enrich = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/label-enrich.wasm"
    ))
    .unwrap();
    for (direction, value) in [("outbound", 2), ("inbound", 1)] {
        let options = Options {
            properties: json!({"xds": {"listener_direction": value, "node": {"metadata": {
                "NAMESPACE": "shop", "LABELS": {"app": "cart", "team": "web"}}}}}),
            ..Options::default()
        };
        measure(
            &format!("label-enrich {direction}"),
            &label_enrich,
            options,
            5_000,
        );
    }
}
