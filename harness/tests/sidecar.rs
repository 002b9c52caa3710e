//! What only the one-module sidecar (dist/eastwest.wasm, DESIGN.md §8) has, in the harness:
//! its configuration. Errors name `<section>.<field>` (with the feature's own reason), shared
//! settings given once at the top level reach every section that has them, and a section's own
//! value wins. Each feature's behaviour in the sidecar is covered by the feature's tests
//! (label_enrich.rs, telemetry.rs, retry_budget.rs run against both modules); all three
//! together against the three modules chained in real Envoy by e2e/tests/sidecar.rs.

#[path = "../../e2e/src/module_under_test.rs"]
mod module_under_test;

use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_harness::{Harness, Message, Options};
use module_under_test::{Feature, ModuleUnderTest};
use serde_json::{json, Value};

/// The log line (and the harness's error) of a refused configuration.
fn refusal(module: ModuleUnderTest, feature: Feature, config: &Value) -> String {
    match Harness::new(
        &module.read_wasm(feature),
        Options {
            config: config.to_string().into_bytes(),
            ..Options::default()
        },
    ) {
        Ok(_) => panic!("{module:?} accepted {config}"),
        Err(error) => error.0,
    }
}

#[test]
fn configuration_errors_name_the_section_and_the_field() {
    let sidecar = ModuleUnderTest::Sidecar;
    // Inside a section: the feature's own error, its path under the section.
    let in_sections = [
        (Feature::Telemetry, json!({"max_series": 0}), "max_series: "),
        (
            Feature::RetryBudget,
            json!({"mode": "client", "destinations": {"payments": {"ratio": -1}}}),
            "destinations.payments.ratio: ",
        ),
        (Feature::LabelEnrich, json!({"bogus": 1}), "bogus: "),
        (
            Feature::LabelEnrich,
            json!({"local": {"team": 7}}),
            "local.team: ",
        ),
        (
            Feature::Telemetry,
            json!({"peer_trust": "sometimes"}),
            "peer_trust: ",
        ),
        // retry-budget has no `direction` (its `mode` says where it runs).
        (
            Feature::RetryBudget,
            json!({"direction": "outbound"}),
            "direction: ",
        ),
    ];
    for (feature, config, path) in in_sections {
        let separate = refusal(ModuleUnderTest::Separate, feature, &config);
        let separate_line = separate
            .lines()
            .find_map(|line| {
                line.find(&ModuleUnderTest::Separate.config_error(feature, path))
                    .map(|start| &line[start..])
            })
            .unwrap_or_else(|| panic!("the separate module's refusal names {path:?}: {separate}"));
        let reason = separate_line.split_once(path).unwrap().1;
        let error = refusal(sidecar, feature, &sidecar.config(feature, config.clone()));
        let wanted = format!("{}{reason}", sidecar.config_error(feature, path));
        assert!(
            error.contains(&wanted),
            "{config} in {}: {wanted:?} in {error}",
            feature.section()
        );
    }
    // The sidecar's own: the top level, shared settings there, the sections themselves.
    let own = [
        (
            json!({}),
            "eastwest: invalid configuration: (root): no feature is on: add at least one section \
             (label_enrich, telemetry, retry_budget)",
        ),
        (
            json!({"labels_enrich": {}}),
            "eastwest: invalid configuration: labels_enrich: unknown field",
        ),
        (
            json!({"telemetry": []}),
            "eastwest: invalid configuration: telemetry: must be an object",
        ),
        (
            json!({"local": {"criticality": "urgent"}, "telemetry": {}}),
            "eastwest: invalid configuration: local.criticality: ",
        ),
        (
            json!({"peer_trust": "sometimes", "label_enrich": {}}),
            "eastwest: invalid configuration: peer_trust: ",
        ),
        (
            json!({"max_baggage_bytes": 10, "retry_budget": {}}),
            "eastwest: invalid configuration: max_baggage_bytes: 10 is outside 256..=65536",
        ),
    ];
    for (config, wanted) in own {
        let error = refusal(sidecar, Feature::Telemetry, &config);
        assert!(
            error.contains("proxy_on_configure returned false"),
            "{error}"
        );
        assert!(error.contains(wanted), "{config}: {wanted:?} in {error}");
    }
}

#[test]
fn a_top_level_direction_is_accepted_without_reaching_retry_budget() {
    // retry-budget refuses `direction` in its own section (above); at the top level it goes
    // only to the sections that have it.
    Harness::new(
        &ModuleUnderTest::Sidecar.read_wasm(Feature::RetryBudget),
        Options {
            config: json!({"direction": "outbound", "retry_budget": {"mode": "client-headers"}})
                .to_string()
                .into_bytes(),
            ..Options::default()
        },
    )
    .unwrap();
}

/// An Istio sidecar's node with `listener_direction` (1 inbound, 2 outbound, `None`: absent).
fn node(direction: Option<i64>) -> Value {
    let mut properties = json!({"xds": {"node": {
        "id": "sidecar~127.0.0.1~checkout-0.shop~shop.svc.cluster.local",
        "metadata": {
            "NAMESPACE": "shop",
            "WORKLOAD_NAME": "checkout-v1",
            "LABELS": {"app": "checkout", "team": "payments", "owner": "platform",
                       "criticality": "critical", "environment": "prod"},
        },
        "locality": {"region": "eu-west-1"},
    }}});
    if let Some(direction) = direction {
        properties["xds"]["listener_direction"] = json!(direction);
    }
    properties
}

/// Everything a run shows of the sidecar, as text: per request the headers sent upstream, the
/// local reply or the response sent downstream, the stream's log lines; then every metric.
fn observe(config: &Value, properties: &Value, connection: &Value, requests: &[Message]) -> String {
    let mut h = Harness::new(
        &ModuleUnderTest::Sidecar.read_wasm(Feature::LabelEnrich),
        Options {
            config: config.to_string().into_bytes(),
            properties: properties.clone(),
            ..Options::default()
        },
    )
    .unwrap_or_else(|error| panic!("{config}: {error}"));
    let pairs = |headers: &[(Vec<u8>, Vec<u8>)]| -> String {
        headers
            .iter()
            .map(|(name, value)| {
                format!(
                    "    {}: {}\n",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value)
                )
            })
            .collect()
    };
    let mut out = String::new();
    for request in requests {
        let upstream = Message::status(200).header(
            "x-eastwest-peer",
            "service.name=payments,k8s.namespace.name=shop,eastwest.team=money",
        );
        let id = h.run(0, Some(connection), request.clone(), Some((upstream, 0)));
        let result = h.result(id);
        if let Some(sent) = &result.upstream_request {
            out.push_str(&format!("  upstream:\n{}", pairs(&sent.headers)));
        }
        if let Some(reply) = &result.local_reply {
            out.push_str(&format!(
                "  local reply {}:\n{}",
                reply.status,
                pairs(&reply.headers)
            ));
        }
        if let Some(response) = &result.downstream_response {
            out.push_str(&format!("  downstream:\n{}", pairs(&response.headers)));
        }
        for log in &result.logs {
            out.push_str(&format!("  log {}: {}\n", log.level, log.message));
        }
        h.advance(10);
    }
    assert!(h.traps.is_empty(), "{config}: {:?}", h.traps);
    let tags: Vec<(String, String)> = ALL_TAGS
        .iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect();
    out + &h.prometheus(&tags).unwrap()
}

/// A request carrying a caller's label claims, as a retry.
fn claiming_request(baggage_padding: usize) -> Message {
    let padding = "x".repeat(baggage_padding);
    Message::get("/pay")
        .header(
            "baggage",
            &format!(
                "service.name=frontend,k8s.namespace.name=shop,eastwest.team=web,pad={padding}"
            ),
        )
        .header("x-envoy-attempt-count", "2")
}

#[test]
fn shared_settings_at_the_top_level_reach_every_section_that_has_them_and_a_sections_own_wins() {
    let mtls_peer = json!({"connection": {
        "mtls": true,
        "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/frontend",
    }});
    let plain = json!({});
    let outbound = node(Some(2));
    let inbound = node(Some(1));
    // (setting, value, what shows its effect: node, connection, requests)
    let settings: [(&str, Value, &Value, &Value, Vec<Message>); 6] = [
        (
            "direction",
            json!("inbound"),
            &node(None),
            &mtls_peer,
            vec![claiming_request(0)],
        ),
        (
            "local",
            json!({"team": "override", "criticality": "low"}),
            &outbound,
            &plain,
            vec![Message::get("/"), Message::get("/")],
        ),
        (
            "label_keys",
            json!({"team": "owner"}),
            &outbound,
            &plain,
            vec![Message::get("/")],
        ),
        (
            "peer_trust",
            json!("any"),
            &inbound,
            &plain,
            vec![claiming_request(0), claiming_request(0)],
        ),
        (
            "trust_domain",
            json!("example.org"),
            &inbound,
            &mtls_peer,
            vec![claiming_request(0)],
        ),
        (
            "max_baggage_bytes",
            json!(256),
            &inbound,
            &mtls_peer,
            vec![claiming_request(300)],
        ),
    ];
    // Server mode: retry-budget reads the caller's labels (the claims) on the inbound side.
    let budget = json!({"mode": "server", "ratio": 0, "min_retries_per_second": 0.1});
    for (key, value, properties, connection, requests) in settings {
        let retry_budget_has_it = key != "direction";
        let mut per_section = json!({"label_enrich": {}, "telemetry": {}, "retry_budget": budget});
        let without = per_section.clone();
        per_section["label_enrich"][key] = value.clone();
        per_section["telemetry"][key] = value.clone();
        if retry_budget_has_it {
            per_section["retry_budget"][key] = value.clone();
        }
        let mut at_top = without.clone();
        at_top[key] = value.clone();

        let given_once = observe(&at_top, properties, connection, &requests);
        assert_eq!(
            given_once,
            observe(&per_section, properties, connection, &requests),
            "{key} at the top level: not as in each section"
        );
        assert_ne!(
            given_once,
            observe(&without, properties, connection, &requests),
            "{key}: the requests do not show the setting"
        );

        // A section's own value wins: label-enrich gets its default explicitly.
        let default_value = match key {
            "direction" => json!("outbound"),
            "local" | "label_keys" => json!({}),
            "peer_trust" => json!("mtls"),
            "trust_domain" => json!("cluster.local"),
            _ => json!(8192),
        };
        let mut own = at_top.clone();
        own["label_enrich"][key] = default_value.clone();
        let mut explicit = per_section.clone();
        explicit["label_enrich"][key] = default_value;
        let overridden = observe(&own, properties, connection, &requests);
        assert_eq!(
            overridden,
            observe(&explicit, properties, connection, &requests),
            "{key}: label_enrich's own value and the top level's"
        );
        assert_ne!(
            overridden, given_once,
            "{key}: label_enrich's own value made no difference"
        );
    }
}
