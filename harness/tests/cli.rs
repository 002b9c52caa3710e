//! The `eastwest-harness run` command: JSON output, Prometheus text, exit codes.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_eastwest-harness");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const SCENARIO: &str = "harness/scenarios/label-enrich-outbound.yaml";

#[test]
fn runs_a_scenario_and_prints_one_json_document() {
    let (code, stdout, stderr) = run(&["run", "dist/label-enrich.wasm", "--scenario", SCENARIO]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let streams = doc["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 2);
    let headers = &streams[0]["upstream_request"]["headers"];
    let baggage = headers
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0] == "baggage")
        .unwrap();
    assert!(baggage[1]
        .as_str()
        .unwrap()
        .starts_with("service.name=frontend,"));
    assert!(streams[0]["instructions"].as_u64().unwrap() > 0);
    assert_eq!(streams[1]["upstream_request"]["body"], "{\"item\": 1}");
    assert!(doc["traps"].as_array().unwrap().is_empty());
    assert!(doc["metrics"].as_array().unwrap().len() > 1);
}

#[test]
fn prints_prometheus_text_with_stats_tags() {
    let (code, stdout, stderr) = run(&[
        "run",
        "dist/label-enrich.wasm",
        "--scenario",
        SCENARIO,
        "--workers",
        "2",
        "--prometheus",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(
        "eastwest_label_enrich_claims_refused_total{reason=\"no_mtls\",peer=\"destination\"} 1"
    ));
}

#[test]
fn failures_exit_non_zero_and_name_the_cause() {
    let (code, _, stderr) = run(&["run", "Cargo.toml", "--scenario", SCENARIO]);
    assert_eq!(code, 3);
    assert!(stderr.contains("bad module"), "{stderr}");
    let (code, _, stderr) = run(&["run", "dist/label-enrich.wasm", "--scenario", "Cargo.toml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bad scenario"), "{stderr}");
    let (code, _, stderr) = run(&["run", "dist/label-enrich.wasm"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("missing --scenario"), "{stderr}");
    let dir = std::env::temp_dir().join(format!("eastwest-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::write(&config, r#"{"peer_trust": "sometimes"}"#).unwrap();
    let (code, _, stderr) = run(&[
        "run",
        "dist/label-enrich.wasm",
        "--scenario",
        SCENARIO,
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 3);
    assert!(stderr.contains("peer_trust"), "{stderr}");
}

#[test]
fn a_trap_exits_with_1_and_still_prints_the_document() {
    let dir = std::env::temp_dir().join(format!("eastwest-cli-trap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("trap.wat");
    std::fs::write(
        &module,
        r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable))"#,
    )
    .unwrap();
    let scenario = dir.join("scenario.yaml");
    std::fs::write(
        &scenario,
        "streams:\n  - request: {headers: {':path': '/'}}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&[
        "run",
        module.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("trapped in proxy_on_request_headers"),
        "{stderr}"
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["streams"][0]["local_reply"]["status"], 503);
    assert!(doc["streams"][0]["upstream_request"].is_null());
}

#[test]
fn bench_prints_a_row_for_the_no_op_filter_and_each_module_and_direction() {
    let (code, stdout, stderr) = run(&["bench", "--requests", "8"]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(2)
        .map(|line| line.split_whitespace().collect())
        .collect();
    let names: Vec<String> = rows
        .iter()
        .map(|row| row[..row.len() - 2].join(" "))
        .collect();
    assert_eq!(names[0], "trivial (no-op)");
    assert!(
        names.contains(&"label-enrich outbound".to_string()),
        "{stdout}"
    );
    assert!(
        names.contains(&"label-enrich inbound".to_string()),
        "{stdout}"
    );
    for row in &rows {
        let instructions: u64 = row[row.len() - 1].parse().unwrap();
        assert!(instructions > 0, "{stdout}");
    }
    let (code, _, stderr) = run(&["bench", "--requests", "0"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--requests"), "{stderr}");
}
