//! label-enrich's fast integration tests in the harness (no Envoy): each runs against
//! dist/label-enrich.wasm and against dist/eastwest.wasm with only the `label_enrich` section.

#[path = "../../e2e/src/module_under_test.rs"]
mod module_under_test;

use eastwest_common::metric_name::stats_tag_regex;
use eastwest_harness::{Harness, Message, Options};
use module_under_test::{Feature, ModuleUnderTest};
use serde_json::{json, Value};

const FEATURE: Feature = Feature::LabelEnrich;

const CALLER_LABELS: &str = "service.name=frontend,k8s.namespace.name=shop,\
    deployment.environment.name=prod,cloud.region=eu-west-1,eastwest.team=web,\
    service.criticality=high";
const CALLEE_LABELS: &str = "service.name=checkout,k8s.namespace.name=shop,\
    deployment.environment.name=prod,cloud.region=eu-west-1,eastwest.team=payments,\
    service.criticality=critical";

/// An Istio sidecar's node, as Envoy 1.40 exposes it: `xds.node`, plus the listener direction.
fn sidecar(workload: &str, team: &str, criticality: &str, direction: i64) -> Value {
    json!({"xds": {
        "listener_direction": direction,
        "node": {
            "id": format!("sidecar~127.0.0.1~{workload}-0.shop~shop.svc.cluster.local"),
            "cluster": format!("{workload}.shop"),
            "metadata": {
                "NAME": format!("{workload}-7d9f-0"),
                "NAMESPACE": "shop",
                "WORKLOAD_NAME": format!("{workload}-v1"),
                "LABELS": {"app": workload, "team": team, "criticality": criticality, "environment": "prod"},
            },
            "locality": {"region": "eu-west-1", "zone": "eu-west-1a"},
        },
    }})
}

fn harness(module: ModuleUnderTest, config: Value, properties: Value, workers: usize) -> Harness {
    Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, config),
            properties,
            workers,
            ..Options::default()
        },
    )
    .unwrap()
}

fn outbound_stamps_baggage_from_node_metadata_and_keeps_other_members(module: ModuleUnderTest) {
    let mut h = harness(module, json!({}), sidecar("frontend", "web", "high", 2), 2);
    let request = Message::get("/")
        .header(
            "baggage",
            "userid=alice%20b;prop=1, session=x,service.name=forged",
        )
        .header("baggage", "tenant=acme");
    let id = h.run(1, None, request, None);
    let result = h.result(id);
    let upstream = result.upstream_request.expect("reaches the upstream");
    assert_eq!(
        upstream.header_values("baggage"),
        vec![format!(
            "{CALLER_LABELS},userid=alice%20b;prop=1, session=x,tenant=acme"
        )]
    );
    assert!(result.local_reply.is_none());
    assert_eq!(
        result.downstream_response.unwrap().get_header(":status"),
        Some("200")
    );
    assert!(result.instructions > 0);
    assert!(h.traps.is_empty(), "{:?}", h.traps);
}

for_each_module!(outbound_stamps_baggage_from_node_metadata_and_keeps_other_members);

fn outbound_removes_the_peer_header_from_the_response(module: ModuleUnderTest) {
    let mut h = harness(module, json!({}), sidecar("frontend", "web", "high", 2), 1);
    let upstream = Message::status(200)
        .header("x-eastwest-peer", CALLEE_LABELS)
        .body("ok");
    let id = h.run(0, None, Message::get("/"), Some((upstream, 0)));
    let response = h.result(id).downstream_response.unwrap();
    assert_eq!(response.get_header("x-eastwest-peer"), None);
    assert_eq!(response.body, b"ok");
}

for_each_module!(outbound_removes_the_peer_header_from_the_response);

fn inbound_with_peer_trust_any_sets_the_source_header_and_answers_with_its_labels(
    module: ModuleUnderTest,
) {
    let mut h = harness(
        module,
        json!({"peer_trust": "any"}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let request = Message::get("/").header("baggage", &format!("{CALLER_LABELS},userid=7"));
    let id = h.run(0, None, request, None);
    let result = h.result(id);
    let upstream = result.upstream_request.unwrap();
    assert_eq!(
        upstream.get_header("x-eastwest-source"),
        Some(CALLER_LABELS)
    );
    let response = result.downstream_response.unwrap();
    assert_eq!(response.get_header("x-eastwest-peer"), Some(CALLEE_LABELS));
}

for_each_module!(inbound_with_peer_trust_any_sets_the_source_header_and_answers_with_its_labels);

fn inbound_refuses_claims_without_mtls_and_counts_them(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let request = Message::get("/")
        .header("baggage", "service.name=admin,userid=7")
        .header("x-eastwest-source", "service.name=admin");
    let id = h.run(0, None, request, None);
    let upstream = h.result(id).upstream_request.unwrap();
    assert_eq!(upstream.get_header("x-eastwest-source"), None);
    assert_eq!(
        upstream.header_values("baggage"),
        vec!["userid=7".to_string()]
    );
    let name = "peer=.=source;.;reason=.=no_mtls;.;eastwest_label_enrich_claims_refused_total";
    assert_eq!(h.metric(name), Some(1));
    let tags: Vec<(String, String)> = ["reason", "peer"]
        .iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect();
    let text = h.prometheus(&tags).unwrap();
    assert!(
        text.contains(
            "eastwest_label_enrich_claims_refused_total{reason=\"no_mtls\",peer=\"source\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("# TYPE eastwest_label_enrich_malformed_total counter"),
        "{text}"
    );
}

for_each_module!(inbound_refuses_claims_without_mtls_and_counts_them);

fn inbound_trusts_an_mtls_peer_whose_spiffe_namespace_matches(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let connection = json!({"connection": {
        "mtls": true,
        "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/frontend",
    }});
    let request = Message::get("/").header("baggage", &format!("{CALLER_LABELS},userid=7"));
    let id = h.run(0, Some(&connection), request, None);
    let upstream = h.result(id).upstream_request.unwrap();
    assert_eq!(
        upstream.get_header("x-eastwest-source"),
        Some(CALLER_LABELS)
    );
}

for_each_module!(inbound_trusts_an_mtls_peer_whose_spiffe_namespace_matches);

fn invalid_configuration_is_refused_with_the_field_named(module: ModuleUnderTest) {
    let error = Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, json!({"peer_trust": "sometimes"})),
            ..Options::default()
        },
    )
    .err()
    .expect("refused");
    assert!(
        error.0.contains("proxy_on_configure returned false"),
        "{error}"
    );
    let wanted = module.config_error(FEATURE, "peer_trust: ");
    assert!(error.0.contains(&wanted), "{wanted:?} in {error}");
}

for_each_module!(invalid_configuration_is_refused_with_the_field_named);

fn unknown_direction_passes_traffic_and_warns_once(module: ModuleUnderTest) {
    let mut h = harness(module, json!({}), json!({}), 1);
    for _ in 0..2 {
        let id = h.run(0, None, Message::get("/").header("baggage", "a=1"), None);
        let upstream = h.result(id).upstream_request.unwrap();
        assert_eq!(upstream.header_values("baggage"), vec!["a=1".to_string()]);
    }
    let warnings = h.logs().into_iter().filter(|l| l.level == "warn").count();
    assert_eq!(warnings, 1);
}

for_each_module!(unknown_direction_passes_traffic_and_warns_once);

/// Istio's `x-envoy-peer-metadata`: base64 of a `google.protobuf.Struct` of workload metadata.
fn istio_peer_metadata(namespace: &str, app: &str) -> String {
    use base64::Engine;
    use prost::Message;
    use prost_types::{value::Kind, Struct, Value as ProtoValue};
    let string = |value: &str| ProtoValue {
        kind: Some(Kind::StringValue(value.to_string())),
    };
    let labels = Struct {
        fields: [("app".to_string(), string(app))].into_iter().collect(),
    };
    let metadata = Struct {
        fields: [
            ("NAMESPACE".to_string(), string(namespace)),
            ("WORKLOAD_NAME".to_string(), string(&format!("{app}-v1"))),
            (
                "LABELS".to_string(),
                ProtoValue {
                    kind: Some(Kind::StructValue(labels)),
                },
            ),
        ]
        .into_iter()
        .collect(),
    };
    base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec())
}

fn shop_frontend_certificate() -> Value {
    json!({"connection": {
        "mtls": true,
        "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/frontend",
    }})
}

fn inbound_refuses_peer_metadata_that_contradicts_the_certificate(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let request = Message::get("/")
        .header("baggage", "k8s.namespace.name=shop,userid=7")
        .header(
            "x-envoy-peer-metadata",
            &istio_peer_metadata("kube-system", "admin"),
        );
    let id = h.run(0, Some(&shop_frontend_certificate()), request, None);
    let upstream = h.result(id).upstream_request.unwrap();
    // Only what the certificate proves and the baggage claims in agreement with it.
    assert_eq!(
        upstream.get_header("x-eastwest-source"),
        Some("k8s.namespace.name=shop")
    );
    assert_eq!(upstream.get_header("x-envoy-peer-metadata"), None);
    let name = "peer=.=source;.;reason=.=peer_metadata_mismatch;.;\
                eastwest_label_enrich_claims_refused_total";
    assert_eq!(h.metric(name), Some(1));
}

for_each_module!(inbound_refuses_peer_metadata_that_contradicts_the_certificate);

fn inbound_uses_peer_metadata_that_agrees_with_the_certificate(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let blob = istio_peer_metadata("shop", "frontend");
    let request = Message::get("/").header("x-envoy-peer-metadata", &blob);
    let id = h.run(0, Some(&shop_frontend_certificate()), request, None);
    let upstream = h.result(id).upstream_request.unwrap();
    assert_eq!(
        upstream.get_header("x-eastwest-source"),
        Some("service.name=frontend,k8s.namespace.name=shop")
    );
    assert_eq!(
        upstream.header_values("x-envoy-peer-metadata"),
        vec![blob.clone()]
    );
}

for_each_module!(inbound_uses_peer_metadata_that_agrees_with_the_certificate);

fn inbound_refuses_several_peer_metadata_values_and_removes_them(module: ModuleUnderTest) {
    let mut h = harness(
        module,
        json!({}),
        sidecar("checkout", "payments", "critical", 1),
        1,
    );
    let request = Message::get("/")
        .header(
            "x-envoy-peer-metadata",
            &istio_peer_metadata("shop", "frontend"),
        )
        .header(
            "x-envoy-peer-metadata",
            &istio_peer_metadata("shop", "admin"),
        );
    let id = h.run(0, Some(&shop_frontend_certificate()), request, None);
    let upstream = h.result(id).upstream_request.unwrap();
    assert_eq!(
        upstream.get_header("x-eastwest-source"),
        Some("k8s.namespace.name=shop")
    );
    assert!(upstream.header_values("x-envoy-peer-metadata").is_empty());
    let name =
        "peer=.=source;.;reason=.=repeated_header;.;eastwest_label_enrich_claims_refused_total";
    assert_eq!(h.metric(name), Some(1));
}

for_each_module!(inbound_refuses_several_peer_metadata_values_and_removes_them);

fn outbound_refuses_several_peer_header_values(module: ModuleUnderTest) {
    let mut h = harness(module, json!({}), sidecar("frontend", "web", "high", 2), 1);
    let upstream = Message::status(200)
        .header(
            "x-eastwest-peer",
            "service.name=checkout,k8s.namespace.name=shop",
        )
        .header(
            "x-eastwest-peer",
            "service.name=admin,k8s.namespace.name=shop",
        );
    let upstream_certificate = json!({"upstream": {
        "uri_san_peer_certificate": "spiffe://cluster.local/ns/shop/sa/checkout",
    }});
    let id = h.run(
        0,
        Some(&upstream_certificate),
        Message::get("/"),
        Some((upstream, 0)),
    );
    let response = h.result(id).downstream_response.unwrap();
    assert!(response.header_values("x-eastwest-peer").is_empty());
    let name = "peer=.=destination;.;reason=.=repeated_header;.;\
                eastwest_label_enrich_claims_refused_total";
    assert_eq!(h.metric(name), Some(1));
}

for_each_module!(outbound_refuses_several_peer_header_values);
