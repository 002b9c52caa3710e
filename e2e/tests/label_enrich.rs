//! label-enrich in real Envoy: two sidecars on loopback (the caller's outbound listener → the
//! callee's inbound listener → the test application), Istio-style node metadata and a
//! locality region in each bootstrap, with and without mTLS. Each test runs against
//! dist/label-enrich.wasm and against dist/eastwest.wasm with only the `label_enrich` section.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use eastwest_common::metric_name::stats_tag_regex;
use eastwest_e2e::{
    bootstrap, feature_filter, for_each_module, free_port, http_request, ClusterBuilder, Envoy,
    EnvoyOptions, Feature, ListenerBuilder, ModuleUnderTest, Node, Response, TestApp, TestCa,
    TrafficDirection,
};
use prost::Message;
use serde_json::{json, Value};

const FEATURE: Feature = Feature::LabelEnrich;

const CALLER_LABELS: &str = "service.name=frontend,k8s.namespace.name=shop,\
    deployment.environment.name=prod,cloud.region=eu-west-1,eastwest.team=web,\
    service.criticality=high";
const CALLEE_LABELS: &str = "service.name=checkout,k8s.namespace.name=shop,\
    deployment.environment.name=prod,cloud.region=eu-west-1,eastwest.team=payments,\
    service.criticality=critical";
const ACCESS_LOG_FORMAT: &str = "source=\"%FILTER_STATE(wasm.eastwest.source:PLAIN)%\" \
    destination=\"%FILTER_STATE(wasm.eastwest.destination:PLAIN)%\"";

fn stats_tags() -> Vec<(String, String)> {
    ["reason", "peer"]
        .iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect()
}

struct MeshOptions {
    module: ModuleUnderTest,
    peer_trust: &'static str,
    /// The namespace in the caller's SPIFFE certificate; `None`: no mTLS between the sidecars.
    caller_cert_namespace: Option<&'static str>,
}

/// caller sidecar (outbound) → callee sidecar (inbound) → test application.
struct Mesh {
    app: TestApp,
    caller: Envoy,
    callee: Envoy,
    caller_port: u16,
    callee_port: u16,
    caller_access_log: PathBuf,
    _ca: Option<TestCa>,
}

impl Mesh {
    fn start(name: &str, options: MeshOptions) -> Result<Mesh> {
        let module = options.module;
        let name = &module.tag(name);
        let app = TestApp::start()?;
        let tags = stats_tags();
        let tags: Vec<(&str, &str)> = tags.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
        let config = json!({"peer_trust": options.peer_trust});
        let ca = match options.caller_cert_namespace {
            Some(_) => Some(TestCa::new("cluster.local")?),
            None => None,
        };
        let (caller_port, callee_port) = (free_port(), free_port());
        let log_dir = log_dir(name)?;
        let caller_access_log = log_dir.join("caller-access.log");

        // The callee: direction comes from the listener (INBOUND), not from the configuration.
        let mut inbound = ListenerBuilder::new("inbound", callee_port, "app")
            .traffic_direction(TrafficDirection::Inbound)
            .http_filter(feature_filter(module, FEATURE, config.clone())?)
            .access_log(&log_dir.join("callee-access.log"), ACCESS_LOG_FORMAT);
        let mut to_callee = ClusterBuilder::new("callee", callee_port);
        if let (Some(ca), Some(namespace)) = (&ca, options.caller_cert_namespace) {
            let callee_cert = ca.issue_workload("shop", "checkout")?;
            let caller_cert = ca.issue_workload(namespace, "frontend")?;
            inbound = inbound.downstream_tls(&callee_cert);
            to_callee = to_callee.upstream_tls(&caller_cert, Some("localhost"));
        }
        let callee_config = bootstrap(
            &Node::shop_sidecar("checkout", "payments", "critical"),
            free_port(),
            vec![inbound.build()],
            vec![ClusterBuilder::new("app", app.port()).build()],
            &tags,
        );
        // Debug level for Wasm: the filter logs every skipped input and refusal there.
        let callee_options = EnvoyOptions {
            component_log_level: Some("wasm:debug".into()),
            ..EnvoyOptions::default()
        };
        let outbound = ListenerBuilder::new("outbound", caller_port, "callee")
            .traffic_direction(TrafficDirection::Outbound)
            .http_filter(feature_filter(module, FEATURE, config)?)
            .access_log(&caller_access_log, ACCESS_LOG_FORMAT);
        let caller_config = bootstrap(
            &Node::shop_sidecar("frontend", "web", "high"),
            free_port(),
            vec![outbound.build()],
            vec![to_callee.build()],
            &tags,
        );
        let mut envoys = Envoy::start_many(vec![
            (format!("{name}-callee"), callee_config, callee_options),
            (
                format!("{name}-caller"),
                caller_config,
                EnvoyOptions::default(),
            ),
        ])?;
        let (caller, callee) = (envoys.pop().unwrap(), envoys.pop().unwrap());
        Ok(Mesh {
            app,
            caller,
            callee,
            caller_port,
            callee_port,
            caller_access_log,
            _ca: ca,
        })
    }

    fn call(&self, headers: &[(&str, &[u8])]) -> Response {
        let response = http_request(
            "GET",
            &format!("http://127.0.0.1:{}/orders", self.caller_port),
            headers,
            "",
        )
        .expect("request through the caller's sidecar");
        assert_eq!(
            response.status,
            200,
            "{}\ncaller:\n{}\ncallee:\n{}",
            response.text(),
            self.caller.log(),
            self.callee.log()
        );
        response
    }

    fn call_callee_directly(&self, headers: &[(&str, &[u8])]) -> Response {
        let response = http_request(
            "GET",
            &format!("http://127.0.0.1:{}/orders", self.callee_port),
            headers,
            "",
        )
        .expect("request to the callee's sidecar");
        assert_eq!(
            response.status,
            200,
            "{}\n{}",
            response.text(),
            self.callee.log()
        );
        response
    }

    /// The last line of the caller's access log that mentions a destination, waiting for the
    /// log to be flushed.
    fn caller_access_log_line(&self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.caller_access_log).unwrap_or_default();
            if let Some(line) = text.lines().last() {
                return line.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the caller's access log stayed empty"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn log_dir(name: &str) -> Result<PathBuf> {
    let dir = eastwest_e2e::workspace_root()
        .join("target/e2e-runs")
        .join(format!("{name}-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The values of request header `name` as the application received them.
fn app_saw(response: &Response, name: &str) -> Vec<String> {
    let body: Value = response.json();
    body["headers"]
        .as_array()
        .expect("the test app lists headers")
        .iter()
        .filter(|pair| pair[0].as_str() == Some(name))
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A counter from Envoy's Prometheus output, by metric name and labels (`0` when absent).
fn prometheus_counter(envoy: &Envoy, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn callee_app_sees_caller_labels_and_baggage_arrives_unchanged(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-labels",
        MeshOptions {
            module,
            peer_trust: "any",
            caller_cert_namespace: None,
        },
    )
    .unwrap();
    let response = mesh.call(&[
        (
            "baggage",
            b"userid=alice%20b;prop=1, session=x,service.name=forged",
        ),
        ("baggage", b"tenant=acme"),
    ]);
    assert_eq!(
        app_saw(&response, "x-eastwest-source"),
        vec![CALLER_LABELS.to_string()]
    );
    let baggage = app_saw(&response, "baggage");
    assert_eq!(
        baggage.len(),
        1,
        "several baggage headers are merged: {baggage:?}"
    );
    assert_eq!(
        baggage[0],
        format!("{CALLER_LABELS},userid=alice%20b;prop=1, session=x,tenant=acme"),
        "the caller's labels replace its own members; every other member is byte for byte"
    );
    assert_eq!(mesh.app.requests_seen(), 1);
}

for_each_module!(callee_app_sees_caller_labels_and_baggage_arrives_unchanged);

fn caller_gets_no_peer_header_and_logs_the_destination(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-peer",
        MeshOptions {
            module,
            peer_trust: "any",
            caller_cert_namespace: None,
        },
    )
    .unwrap();
    // The callee's application tries to claim another identity; its sidecar overwrites it.
    let response = mesh.call(&[(
        "x-test-response-header",
        b"x-eastwest-peer=service.name=evil",
    )]);
    assert_eq!(
        response.header("x-eastwest-peer"),
        None,
        "the caller's app must not see x-eastwest-peer"
    );
    let line = mesh.caller_access_log_line();
    assert_eq!(
        line,
        format!("source=\"{CALLER_LABELS}\" destination=\"{CALLEE_LABELS}\""),
    );
}

for_each_module!(caller_gets_no_peer_header_and_logs_the_destination);

fn forged_claim_without_mtls_is_not_trusted(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-forged",
        MeshOptions {
            module,
            peer_trust: "mtls",
            caller_cert_namespace: None,
        },
    )
    .unwrap();
    // Through the caller's sidecar, and straight to the callee's (an attacker skipping it).
    let through = mesh.call(&[("baggage", b"service.name=admin,userid=7")]);
    let direct = mesh.call_callee_directly(&[
        ("baggage", b"service.name=admin,userid=7"),
        ("x-eastwest-source", b"service.name=admin"),
    ]);
    for response in [&through, &direct] {
        assert!(
            app_saw(response, "x-eastwest-source").is_empty(),
            "{}",
            response.text()
        );
        let baggage = app_saw(response, "baggage");
        assert_eq!(
            baggage,
            vec!["userid=7".to_string()],
            "label claims are stripped, the rest kept"
        );
    }
    assert_eq!(
        prometheus_counter(
            &mesh.callee,
            "eastwest_label_enrich_claims_refused_total",
            &[("peer", "source"), ("reason", "no_mtls")]
        ),
        2
    );
    mesh.callee
        .wait_for_log(
            "refused the caller's label claims: no_mtls",
            Duration::from_secs(10),
        )
        .unwrap();
}

for_each_module!(forged_claim_without_mtls_is_not_trusted);

fn mtls_claims_are_trusted_when_the_namespace_matches(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-mtls-ok",
        MeshOptions {
            module,
            peer_trust: "mtls",
            caller_cert_namespace: Some("shop"),
        },
    )
    .unwrap();
    let response = mesh.call(&[("baggage", b"userid=7")]);
    assert_eq!(
        app_saw(&response, "x-eastwest-source"),
        vec![CALLER_LABELS.to_string()]
    );
    assert_eq!(
        app_saw(&response, "baggage"),
        vec![format!("{CALLER_LABELS},userid=7")]
    );
    // The caller trusts the destination's claims too: its certificate says ns/shop.
    assert_eq!(
        mesh.caller_access_log_line(),
        format!("source=\"{CALLER_LABELS}\" destination=\"{CALLEE_LABELS}\"")
    );
}

for_each_module!(mtls_claims_are_trusted_when_the_namespace_matches);

fn mtls_claims_are_refused_when_the_namespace_differs(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-mtls-bad",
        MeshOptions {
            module,
            peer_trust: "mtls",
            caller_cert_namespace: Some("other"),
        },
    )
    .unwrap();
    let response = mesh.call(&[("baggage", b"userid=7")]);
    // Only what the certificate proves reaches the application.
    assert_eq!(
        app_saw(&response, "x-eastwest-source"),
        vec!["k8s.namespace.name=other".to_string()]
    );
    assert_eq!(app_saw(&response, "baggage"), vec!["userid=7".to_string()]);
    assert_eq!(
        prometheus_counter(
            &mesh.callee,
            "eastwest_label_enrich_claims_refused_total",
            &[("peer", "source"), ("reason", "namespace_mismatch")]
        ),
        1
    );
}

for_each_module!(mtls_claims_are_refused_when_the_namespace_differs);

fn malformed_input_never_fails_a_request_and_is_counted(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-malformed",
        MeshOptions {
            module,
            peer_trust: "any",
            caller_cert_namespace: None,
        },
    )
    .unwrap();
    let mut oversized = b"service.name=admin,".to_vec();
    oversized.extend(std::iter::repeat_n(b'x', 9000));
    let garbage_struct =
        base64::engine::general_purpose::STANDARD.encode(b"\xff\xff\xff\xff\xff\xff");
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("baggage", &oversized)],
        vec![("baggage", b"service.name=%zz,eastwest.team=%FF%FE,userid=1")],
        vec![(
            "baggage",
            b"service.name=caf\xe9,k8s.namespace.name=\x80\x81",
        )],
        vec![("x-envoy-peer-metadata", b"!!! not base64 !!!")],
        vec![("x-envoy-peer-metadata", garbage_struct.as_bytes())],
        vec![("x-envoy-peer-metadata", b"\xff\xfe\xfd")],
        vec![("baggage", b",,,;;;===,\t,")],
    ];
    for headers in &cases {
        let response = mesh.call_callee_directly(headers);
        let source = app_saw(&response, "x-eastwest-source");
        assert!(
            source.iter().all(|value| !value.contains("admin")),
            "no label read from oversized baggage: {source:?}"
        );
    }
    let counter = |reason| {
        prometheus_counter(
            &mesh.callee,
            "eastwest_label_enrich_malformed_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(counter("baggage_oversized"), 1);
    assert_eq!(counter("baggage_member"), 4);
    assert_eq!(counter("peer_metadata"), 3);
    for logged in [
        "skipped malformed caller input: baggage_oversized x1",
        "skipped malformed caller input: baggage_member x2",
        "skipped malformed caller input: peer_metadata x1",
    ] {
        mesh.callee
            .wait_for_log(logged, Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no debug line {logged:?}:\n{}", mesh.callee.log()));
    }
    // Through both sidecars as well.
    mesh.call(&[("baggage", b"\xff\xfe=\x80,service.name=%")]);
}

for_each_module!(malformed_input_never_fails_a_request_and_is_counted);

fn istio_peer_metadata_supplies_caller_labels(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-istio",
        MeshOptions {
            module,
            peer_trust: "any",
            caller_cert_namespace: None,
        },
    )
    .unwrap();
    let string = |value: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(value.into())),
    };
    let labels = prost_types::Struct {
        fields: [
            ("app".to_string(), string("reviews")),
            ("team".to_string(), string("books")),
        ]
        .into(),
    };
    let metadata = prost_types::Struct {
        fields: [
            ("NAMESPACE".to_string(), string("bookinfo")),
            ("WORKLOAD_NAME".to_string(), string("reviews-v2")),
            (
                "LABELS".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(labels)),
                },
            ),
        ]
        .into(),
    };
    let header = base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec());
    let response = mesh.call_callee_directly(&[("x-envoy-peer-metadata", header.as_bytes())]);
    assert_eq!(
        app_saw(&response, "x-eastwest-source"),
        vec!["service.name=reviews,k8s.namespace.name=bookinfo,eastwest.team=books".to_string()]
    );
}

for_each_module!(istio_peer_metadata_supplies_caller_labels);

/// Istio's peer metadata for `app` in `namespace`, as the header carries it.
fn peer_metadata_header(namespace: &str, app: &str) -> String {
    let string = |value: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(value.into())),
    };
    let labels = prost_types::Struct {
        fields: [("app".to_string(), string(app))].into(),
    };
    let metadata = prost_types::Struct {
        fields: [
            ("NAMESPACE".to_string(), string(namespace)),
            (
                "LABELS".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(labels)),
                },
            ),
        ]
        .into(),
    };
    base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec())
}

fn peer_metadata_contradicting_the_certificate_is_refused_and_removed(module: ModuleUnderTest) {
    let mesh = Mesh::start(
        "le-peer-metadata",
        MeshOptions {
            module,
            peer_trust: "mtls",
            caller_cert_namespace: Some("shop"),
        },
    )
    .unwrap();
    // The caller's certificate proves ns/shop; the blob claims kube-system.
    let forged = peer_metadata_header("kube-system", "admin");
    let response = mesh.call(&[("x-envoy-peer-metadata", forged.as_bytes())]);
    assert_eq!(
        app_saw(&response, "x-eastwest-source"),
        vec![CALLER_LABELS.to_string()]
    );
    assert!(app_saw(&response, "x-envoy-peer-metadata").is_empty());
    // Two values, one of them honest: neither is used, both are removed.
    let honest = peer_metadata_header("shop", "frontend");
    let response = mesh.call(&[
        ("x-envoy-peer-metadata", honest.as_bytes()),
        ("x-envoy-peer-metadata", forged.as_bytes()),
    ]);
    assert!(app_saw(&response, "x-envoy-peer-metadata").is_empty());
    for reason in ["peer_metadata_mismatch", "repeated_header"] {
        assert_eq!(
            prometheus_counter(
                &mesh.callee,
                "eastwest_label_enrich_claims_refused_total",
                &[("peer", "source"), ("reason", reason)]
            ),
            1,
            "{reason}"
        );
    }
}

for_each_module!(peer_metadata_contradicting_the_certificate_is_refused_and_removed);

fn invalid_configuration_is_refused_with_the_field_named(module: ModuleUnderTest) {
    let cases = [
        (
            json!({"peer_trust": "mtls", "bogus": 1}),
            "bogus: unknown field `bogus`",
        ),
        (
            json!({"local": {"team": 7}}),
            "local.team: invalid type: integer `7`",
        ),
        (
            json!({"local": {"criticality": "urgent"}}),
            "local.criticality:",
        ),
    ];
    for (index, (config, expected)) in cases.into_iter().enumerate() {
        let listener = ListenerBuilder::new("inbound", free_port(), "app")
            .http_filter(feature_filter(module, FEATURE, config).unwrap())
            .build();
        let log = Envoy::start_expecting_failure(
            &module.tag(&format!("le-invalid-{index}")),
            bootstrap(
                &Node::new("n", "c"),
                free_port(),
                vec![listener],
                vec![ClusterBuilder::new("app", free_port()).build()],
                &[],
            ),
            &EnvoyOptions::default(),
        )
        .unwrap();
        let wanted = module.config_error(FEATURE, expected);
        assert!(
            log.contains(&wanted),
            "Envoy's log lacks {wanted:?}:\n{log}"
        );
    }
}

for_each_module!(invalid_configuration_is_refused_with_the_field_named);

fn missing_node_metadata_and_unknown_direction_pass_traffic(module: ModuleUnderTest) {
    let app = TestApp::start().unwrap();
    let port = free_port();
    // No metadata, no traffic_direction on the listener, no direction configured.
    let listener = ListenerBuilder::new("plain", port, "app")
        .http_filter(feature_filter(module, FEATURE, json!({})).unwrap())
        .build();
    let tags = stats_tags();
    let tags: Vec<(&str, &str)> = tags.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
    let envoy = Envoy::start(
        &module.tag("le-bare"),
        bootstrap(
            &Node::new("bare", "bare"),
            free_port(),
            vec![listener],
            vec![ClusterBuilder::new("app", app.port()).build()],
            &tags,
        ),
        &EnvoyOptions::default(),
    )
    .unwrap();
    let response = http_request(
        "GET",
        &format!("http://127.0.0.1:{port}/"),
        &[("baggage", b"a=1")],
        "",
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(app_saw(&response, "baggage"), vec!["a=1".to_string()]);
    assert_eq!(
        prometheus_counter(
            &envoy,
            "eastwest_label_enrich_malformed_total",
            &[("reason", "direction_unknown")]
        ),
        1
    );
}

for_each_module!(missing_node_metadata_and_unknown_direction_pass_traffic);
