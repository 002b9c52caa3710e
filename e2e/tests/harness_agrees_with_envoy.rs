//! Proof that the harness behaves like Envoy: the probe filter calls every host function with
//! good and bad arguments; its report from real Envoy 1.40 must equal its report from the
//! harness, entry by entry.

use eastwest_e2e::{
    bootstrap, free_port, http_request, wasm_filter, ClusterBuilder, Envoy, EnvoyOptions,
    ListenerBuilder, Node, TrafficDirection,
};
use eastwest_harness::probe;
use serde_json::json;

fn envoy_report() -> String {
    let dir = tempfile::tempdir().unwrap();
    let wasm_path = dir.path().join("probe.wasm");
    std::fs::write(&wasm_path, wat::parse_str(probe::PROBE_WAT).unwrap()).unwrap();
    let port = free_port();
    let listener = ListenerBuilder::new("probe", port, "app")
        .traffic_direction(TrafficDirection::Outbound)
        .http_filter(wasm_filter("probe", &wasm_path, json!({})))
        .build();
    let node = Node::new(probe::NODE_ID, probe::NODE_CLUSTER)
        .with_metadata(probe::node_metadata())
        .with_locality(Some(probe::REGION), Some(probe::ZONE));
    let envoy = Envoy::start(
        "harness-probe",
        bootstrap(
            &node,
            free_port(),
            vec![listener],
            vec![ClusterBuilder::new("app", free_port()).build()],
            &[],
        ),
        &EnvoyOptions {
            concurrency: 1,
            ..EnvoyOptions::default()
        },
    )
    .unwrap();
    let response = http_request(
        "GET",
        &format!("http://127.0.0.1:{port}{}", probe::PATH),
        &[("x-probe-in", b"in")],
        b"",
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}\n{}", response.text(), envoy.log());
    response.text()
}

#[test]
fn harness_agrees_with_envoy() {
    let harness = probe::report_in_harness().unwrap();
    let envoy = envoy_report();
    let (harness, envoy) = (probe::entries(&harness), probe::entries(&envoy));
    let differences: Vec<String> = harness
        .iter()
        .zip(envoy.iter())
        .filter(|(h, e)| h != e)
        .map(|(h, e)| format!("harness {h:<40} envoy {e}"))
        .collect();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert_eq!(
        harness.len(),
        envoy.len(),
        "the reports have different lengths"
    );
}
