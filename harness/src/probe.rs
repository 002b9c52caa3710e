//! The probe filter (`probe/probe.wat`): it calls every host function with good and bad
//! arguments and answers each request locally with what came back, one `name=status[:value];`
//! entry per call. Run in the harness and in real Envoy, the two reports must agree entry by
//! entry: that is the proof that the harness behaves like Envoy (e2e test
//! `harness_agrees_with_envoy`).

use serde_json::{json, Value};

use crate::{Harness, HarnessError, Message, Options};

/// The probe's source, in the WebAssembly text format.
pub const PROBE_WAT: &str = include_str!("../probe/probe.wat");

/// The node the probe runs as, in the harness and in Envoy.
pub const NODE_ID: &str = "probe-node";
pub const NODE_CLUSTER: &str = "probe-cluster";
pub const REGION: &str = "eu-west-1";
pub const ZONE: &str = "eu-west-1a";

/// The node metadata the probe reads (`xds.node.metadata...`).
pub fn node_metadata() -> Value {
    json!({"NAMESPACE": "shop", "LABELS": {"app": "cart"}})
}

/// The request the probe answers: `GET /probe` with `x-probe-in: in`.
pub const PATH: &str = "/probe";

/// The probe's report when it runs in the harness (one worker, outbound listener).
pub fn report_in_harness() -> Result<String, HarnessError> {
    let mut harness = Harness::new(
        PROBE_WAT.as_bytes(),
        Options {
            root_id: "probe".into(),
            vm_id: "probe".into(),
            plugin_name: "probe".into(),
            properties: json!({"xds": {
                "listener_direction": 2,
                "node": {
                    "id": NODE_ID,
                    "cluster": NODE_CLUSTER,
                    "metadata": node_metadata(),
                    "locality": {"region": REGION, "zone": ZONE},
                },
            }}),
            ..Options::default()
        },
    )?;
    let request = Message::get(PATH).header("x-probe-in", "in");
    let id = harness.run(0, None, request, None);
    let reply = harness
        .result(id)
        .local_reply
        .ok_or_else(|| HarnessError("the probe did not answer locally".into()))?;
    String::from_utf8(reply.body)
        .map_err(|_| HarnessError("the probe's report is not UTF-8".into()))
}

/// A report split into its entries.
pub fn entries(report: &str) -> Vec<&str> {
    report
        .split(';')
        .filter(|entry| !entry.is_empty())
        .collect()
}
