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
fn bench_prints_a_row_per_module_and_direction_and_writes_json() {
    let dir = std::env::temp_dir().join(format!("eastwest-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let (code, stdout, stderr) = run(&[
        "bench",
        "--requests",
        "8",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    // Missed targets do not fail the command.
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("requests/s through a no-op filter"),
        "{stdout}"
    );
    let row = |module: &str, direction: &str| {
        stdout
            .lines()
            .find(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.len() > 2 && words[0] == module && words[1] == direction
            })
            .unwrap_or_else(|| panic!("no {module} {direction} row:\n{stdout}"))
    };
    for direction in ["outbound", "inbound"] {
        let line = row("label-enrich", direction);
        assert!(
            line.ends_with("<= 3000  met") || line.ends_with("<= 3000  MISSED"),
            "{line}"
        );
    }
    assert!(stdout.contains("instructions per callback"), "{stdout}");

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(doc["harness_requests_per_second"].as_f64().unwrap() > 0.0);
    let modules = doc["modules"].as_array().unwrap();
    let label_enrich = modules
        .iter()
        .find(|m| m["module"] == "label-enrich" && m["direction"] == "outbound")
        .unwrap();
    let mut keys: Vec<&str> = label_enrich
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "callbacks",
            "direction",
            "error",
            "instructions_per_request",
            "max_instructions_per_request",
            "module",
            "requests_per_second"
        ]
    );
    assert!(label_enrich["error"].is_null());
    let instructions = label_enrich["instructions_per_request"].as_u64().unwrap();
    assert!(instructions > 0);
    assert!(
        label_enrich["max_instructions_per_request"]
            .as_u64()
            .unwrap()
            >= instructions
    );
    let callbacks: u64 = label_enrich["callbacks"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(callbacks, instructions);
    assert!(
        label_enrich["callbacks"]["proxy_on_request_headers"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The build keeps only the callbacks a filter implements: label-enrich has no `on_log`,
    // so the host never calls one.
    assert!(
        label_enrich["callbacks"].get("proxy_on_log").is_none(),
        "{label_enrich}"
    );

    // A refused configuration is a row with an error, not a failure.
    let (code, stdout, stderr) = run(&[
        "bench",
        "--requests",
        "4",
        "--config",
        r#"label-enrich={"peer_trust": "sometimes"}"#,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        row_text(&stdout, "label-enrich", "outbound").contains("error: "),
        "{stdout}"
    );

    let (code, _, stderr) = run(&["bench", "--requests", "0"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--requests"), "{stderr}");
    let (code, _, stderr) = run(&["bench", "--config", "nope={}"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("nope.wasm"), "{stderr}");
    let (code, _, stderr) = run(&["bench", "--config", "label-enrich"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("NAME=JSON"), "{stderr}");
}

fn row_text<'a>(stdout: &'a str, module: &str, direction: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.starts_with(module) && line.contains(direction))
        .unwrap_or_default()
}

#[test]
fn profile_prints_the_top_functions_and_writes_folded_stacks() {
    let dir = std::env::temp_dir().join(format!("eastwest-cli-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("example.wat");
    std::fs::write(&module, PROFILE_EXAMPLE_WAT).unwrap();
    let scenario = dir.join("two.yaml");
    std::fs::write(
        &scenario,
        "streams:\n  - request: {headers: {':path': '/'}}\n  - request: {headers: {':path': '/'}}\n",
    )
    .unwrap();
    let out = dir.join("out.folded");
    let (code, stdout, stderr) = run(&[
        "profile",
        module.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--warmup",
        "1",
        "--top",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("1 stream after 1 warm-up stream: 102 instructions"),
        "{stdout}"
    );
    assert!(
        stdout.contains("proxy_on_request_headers 102 (1x)"),
        "{stdout}"
    );
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.contains("self%"))
        .take_while(|line| !line.is_empty())
        .collect();
    assert_eq!(table.len(), 3, "{stdout}");
    assert_eq!(
        table[1], "        62  60.8%        102 100.0%       1  f",
        "{stdout}"
    );
    assert_eq!(
        table[2], "        40  39.2%         40  39.2%      10  example::g",
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "f 62\nf;example::g 40\n"
    );

    // Without --out: target/profile/<module>.<scenario>.folded from the workspace root.
    let (code, stdout, stderr) = run(&[
        "profile",
        module.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("folded stacks: target/profile/example.two.folded"),
        "{stdout}"
    );
    let written = std::path::Path::new(ROOT).join("target/profile/example.two.folded");
    assert_eq!(
        std::fs::read_to_string(written).unwrap(),
        "f 124\nf;example::g 80\n"
    );

    let (code, _, stderr) = run(&[
        "profile",
        module.to_str().unwrap(),
        "--scenario",
        scenario.to_str().unwrap(),
        "--warmup",
        "2",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("none would be profiled"), "{stderr}");
    let (code, _, stderr) = run(&["profile", "Cargo.toml", "--scenario", SCENARIO]);
    assert_eq!(code, 3);
    assert!(stderr.contains("bad module"), "{stderr}");
}

/// `f` (proxy_on_request_headers) calls `example::g` ten times: f spends 1 (entering it) +
/// 10 × 6 (the loop body) + 1 (`i32.const 0`) = 62, g 10 × (1 + 3) = 40 (see tests/profile.rs
/// for how wasmtime counts).
const PROFILE_EXAMPLE_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func $_ZN7example1g17h0123456789abcdefE (param $x i32) (result i32)
    local.get $x
    i32.const 1
    i32.add)
  (func $f (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    loop
      local.get $i
      call $_ZN7example1g17h0123456789abcdefE
      local.tee $i
      i32.const 10
      i32.lt_u
      br_if 0
    end
    i32.const 0)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;

#[test]
fn profile_of_a_real_filter_equals_the_run_instructions() {
    let wasm = "dist/telemetry.wasm";
    if !std::path::Path::new(ROOT).join(wasm).exists() {
        eprintln!("skipped: no {wasm} (run `cargo xtask build`)");
        return;
    }
    let typical = "harness/scenarios/typical-outbound.yaml";
    let (code, stdout, stderr) = run(&["run", wasm, "--scenario", typical]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let last = doc["streams"][3]["instructions"].as_u64().unwrap();
    let dir = std::env::temp_dir().join(format!("eastwest-cli-real-{}", std::process::id()));
    let out = dir.join("telemetry.folded");
    let (code, stdout, stderr) = run(&[
        "profile",
        wasm,
        "--scenario",
        typical,
        "--warmup",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "1 stream after 3 warm-up streams: {last} instructions (the sum of their \
             `instructions`: {last})"
        )),
        "{stdout}"
    );
    let folded: u64 = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| line.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(folded, last);
}
