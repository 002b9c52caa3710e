//! `eastwest-harness bench`: the typical request, the sidecar it runs in, the figures.

use std::path::{Path, PathBuf};

use eastwest_harness::bench::{self, Direction, Settings};
use eastwest_harness::scenario::{self, Overrides};
use eastwest_harness::{Harness, Options};

const DIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist");
const TYPICAL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scenarios/typical-outbound.yaml"
);

/// The modules of dist/ that exist (a message for each one missing).
fn dist_modules(names: &[&str]) -> Vec<(String, Vec<u8>)> {
    names
        .iter()
        .filter_map(|name| {
            let path = format!("{DIST}/{name}.wasm");
            match std::fs::read(&path) {
                Ok(wasm) => Some((name.to_string(), wasm)),
                Err(_) => {
                    eprintln!("skipped {name}: no {path} (run `cargo xtask build`)");
                    None
                }
            }
        })
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eastwest-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_typical_outbound_scenario_is_what_bench_sends() {
    let scenario = scenario::parse(&std::fs::read_to_string(TYPICAL).unwrap()).unwrap();
    assert_eq!(
        scenario.properties.as_ref().unwrap(),
        &bench::sidecar_properties(Direction::Outbound)
    );
    assert_eq!(scenario.streams.len(), 4);
    for stream in &scenario.streams {
        assert_eq!(
            stream.request.message(),
            bench::typical_request(Direction::Outbound)
        );
        assert_eq!(
            stream.upstream.as_ref().unwrap().message(),
            bench::typical_response(Direction::Outbound)
        );
    }
    // The fourth stream costs what bench reports for a warm request.
    for (name, wasm) in dist_modules(&["label-enrich", "telemetry", "retry-budget", "eastwest"]) {
        let config = bench::default_config(&name, Direction::Outbound);
        let overrides = Overrides {
            config: Some(config.clone().into_bytes()),
            ..Overrides::default()
        };
        let (_, output) = scenario::run(&wasm, &scenario, overrides).unwrap();
        let figure = bench::measure(&name, &wasm, &config, Direction::Outbound, 3);
        assert_eq!(figure.error, None);
        assert_eq!(
            output.streams[3].instructions, figure.instructions_per_request,
            "{name}"
        );
    }
}

#[test]
fn the_typical_request_has_eight_headers_and_the_response_a_peer_header_outbound() {
    let outbound = bench::typical_request(Direction::Outbound);
    assert_eq!(outbound.headers.len(), 8);
    assert_eq!(outbound.get_header("baggage"), Some("userid=7"));
    let inbound = bench::typical_request(Direction::Inbound);
    assert_eq!(
        inbound.get_header("baggage"),
        Some("userid=7,service.name=cart,k8s.namespace.name=shop")
    );
    let response = bench::typical_response(Direction::Outbound);
    assert_eq!(response.get_header(":status"), Some("200"));
    assert_eq!(
        response.get_header("content-length"),
        Some(response.body.len().to_string().as_str())
    );
    assert_eq!(
        response.get_header("x-eastwest-peer"),
        Some("service.name=orders,k8s.namespace.name=shop")
    );
    assert_eq!(
        bench::typical_response(Direction::Inbound).get_header("x-eastwest-peer"),
        None
    );
}

#[test]
fn default_configurations_and_targets() {
    use Direction::{Inbound, Outbound};
    assert_eq!(
        bench::default_config("label-enrich", Outbound),
        r#"{"peer_trust":"any"}"#
    );
    assert_eq!(bench::default_config("telemetry", Inbound), "{}");
    assert_eq!(
        bench::default_config("retry-budget", Outbound),
        r#"{"mode":"client-headers"}"#
    );
    assert_eq!(
        bench::default_config("retry-budget", Inbound),
        r#"{"mode":"server"}"#
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&bench::default_config("eastwest", Inbound)).unwrap();
    assert_eq!(
        sidecar,
        serde_json::json!({"label_enrich": {"peer_trust": "any"}, "telemetry": {},
            "retry_budget": {"mode": "server"}})
    );
    assert_eq!(bench::default_config("something-else", Outbound), "{}");
    assert_eq!(bench::target("telemetry"), Some(3_000));
    assert_eq!(bench::target("eastwest"), Some(6_000));
    assert_eq!(bench::target("something-else"), None);
}

/// In the sidecar bench sets up, every filter takes its normal path: no problem counted, no
/// warning, the labels of both ends known.
#[test]
fn the_filters_take_their_normal_paths_in_both_directions() {
    for (name, wasm) in dist_modules(&["label-enrich", "telemetry", "retry-budget", "eastwest"]) {
        for direction in Direction::BOTH {
            let mut h = Harness::new(
                &wasm,
                Options {
                    config: bench::default_config(&name, direction).into_bytes(),
                    properties: bench::sidecar_properties(direction),
                    ..Options::default()
                },
            )
            .unwrap();
            let mut last = 0;
            for _ in 0..3 {
                last = h.run(
                    0,
                    None,
                    bench::typical_request(direction),
                    Some((bench::typical_response(direction), 0)),
                );
            }
            let what = format!("{name} {}", direction.name());
            assert!(h.traps.is_empty(), "{what}: {:?}", h.traps);
            let result = h.result(last);
            assert!(result.complete && result.local_reply.is_none(), "{what}");
            let warnings: Vec<_> = h.logs().into_iter().filter(|l| l.level != "info").collect();
            assert!(warnings.is_empty(), "{what}: {warnings:?}");
            for metric in h.metrics() {
                let problem = ["malformed", "refused", "fail_open", "overflow", "denied"]
                    .iter()
                    .any(|word| metric.name.contains(word));
                assert!(
                    !problem || metric.value == 0,
                    "{what}: {} = {}",
                    metric.name,
                    metric.value
                );
            }
            let upstream = result.upstream_request.unwrap();
            let downstream = result.downstream_response.unwrap();
            let stamps = name == "label-enrich" || name == "eastwest";
            if stamps && direction == Direction::Outbound {
                let baggage = upstream.get_header("baggage").unwrap();
                assert!(baggage.contains("service.name=cart"), "{what}: {baggage}");
                assert!(baggage.contains("userid=7"), "{what}: {baggage}");
            }
            if stamps && direction == Direction::Inbound {
                let peer = downstream.get_header("x-eastwest-peer").unwrap_or_default();
                assert!(peer.contains("service.name=orders"), "{what}: {peer}");
            }
            if name == "telemetry" || name == "eastwest" {
                let series = h.metrics().into_iter().find(|m| {
                    m.name.ends_with("eastwest_requests_total")
                        && m.name.contains("source_service=.=cart;")
                        && m.name.contains("destination_service=.=orders;")
                        && m.name.contains("destination_namespace=.=shop;")
                });
                assert_eq!(series.map(|m| m.value), Some(3), "{what}");
            }
        }
    }
}

#[test]
fn reports_every_module_its_target_and_refused_configurations() {
    let dir = temp_dir("report");
    std::fs::write(dir.join("other.wasm"), bench::TRIVIAL_FILTER_WAT).unwrap();
    let modules = dist_modules(&["label-enrich", "retry-budget"]);
    for (name, wasm) in &modules {
        std::fs::write(dir.join(format!("{name}.wasm")), wasm).unwrap();
    }
    let mut settings = Settings {
        requests: 8,
        ..Settings::default()
    };
    settings
        .configs
        .insert("retry-budget".into(), r#"{"mode": "sometimes"}"#.into());
    let report = bench::run(&dir, &settings).unwrap();
    assert!(report.harness_requests_per_second > 0.0);
    let names: Vec<(String, String)> = report
        .modules
        .iter()
        .map(|f| (f.module.clone(), f.direction.clone()))
        .collect();
    let mut expected = Vec::new();
    let mut all: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    all.push("other");
    all.sort();
    for name in all {
        for direction in ["outbound", "inbound"] {
            expected.push((name.to_string(), direction.to_string()));
        }
    }
    assert_eq!(names, expected);
    for figure in &report.modules {
        match figure.module.as_str() {
            "retry-budget" => {
                let error = figure.error.as_deref().unwrap();
                assert!(error.contains("configuration was rejected"), "{error}");
                assert!(error.contains("mode"), "{error}");
                assert_eq!(figure.instructions_per_request, 0);
            }
            _ => {
                assert_eq!(figure.error, None, "{figure:?}");
                assert!(figure.instructions_per_request > 0);
                assert!(figure.max_instructions_per_request >= figure.instructions_per_request);
                assert_eq!(
                    figure.callbacks.values().sum::<u64>(),
                    figure.instructions_per_request,
                    "{figure:?}"
                );
                assert!(figure.callbacks.contains_key("proxy_on_request_headers"));
            }
        }
    }
    // The no-op module (given `{}`) has no target; each of this project's filters has 3,000.
    let table = bench::table(&report);
    let row = |module: &str, direction: &str| {
        table
            .lines()
            .find(|line| line.starts_with(&format!("{module:<12}  {direction:<9}")))
            .unwrap_or_else(|| panic!("no row {module} {direction}:\n{table}"))
            .to_string()
    };
    assert!(row("other", "outbound").ends_with("-  -"), "{table}");
    if modules.iter().any(|(name, _)| name == "label-enrich") {
        let line = row("label-enrich", "outbound");
        let figure = &report.modules[0];
        let status = if figure.instructions_per_request <= 3_000 {
            "met"
        } else {
            "MISSED"
        };
        assert!(line.ends_with(&format!("<= 3000  {status}")), "{table}");
    }
    assert!(
        row("retry-budget", "inbound").contains("error: proxy_on_configure returned false"),
        "{table}"
    );
    assert!(table.contains("instructions per callback"), "{table}");
    assert!(table.contains("request_headers"), "{table}");
}

#[test]
fn a_burst_on_some_requests_shows_in_the_maximum_not_the_median() {
    // Every fourth request takes a detour of 1,000 loop iterations (a counter in a global).
    let wat = r#"(module
      (memory (export "memory") 1)
      (global $n (mut i32) (i32.const 0))
      (func $spin (param i32) (loop (br_if 0 (local.tee 0 (i32.sub (local.get 0) (i32.const 1))))))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (if (i32.eqz (i32.rem_u (global.get $n) (i32.const 4)))
          (then (call $spin (i32.const 1000))))
        (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let figure = bench::measure("burst", wat.as_bytes(), "", Direction::Outbound, 20);
    assert_eq!(figure.error, None);
    assert!(
        figure.max_instructions_per_request > figure.instructions_per_request + 4_000,
        "{figure:?}"
    );
    assert_eq!(
        figure.callbacks["proxy_on_request_headers"],
        figure.instructions_per_request
    );
    let trap = r#"(module
      (memory (export "memory") 1)
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) unreachable)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let figure = bench::measure("trap", trap.as_bytes(), "", Direction::Inbound, 2);
    let error = figure.error.unwrap();
    assert!(
        error.starts_with("trapped in proxy_on_response_headers"),
        "{error}"
    );
}

#[test]
fn a_configuration_for_a_module_that_is_not_there_is_refused() {
    let dir = temp_dir("unknown");
    let mut settings = Settings {
        requests: 4,
        ..Settings::default()
    };
    settings.configs.insert("nope".into(), "{}".into());
    let error = bench::run(Path::new(&dir), &settings).unwrap_err();
    assert!(error.0.contains("nope.wasm"), "{error}");
}
