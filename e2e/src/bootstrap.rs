//! Builders for static Envoy bootstraps (JSON, Envoy's v3 API).
//!
//! They cover what the end-to-end tests need (sidecar-like listeners, Wasm filters, mTLS,
//! retries, access logs, stats tags) and each builder has an escape hatch (`hcm_field`,
//! `route_field`, `field`) that sets any other field of the generated JSON, so a test never
//! has to hand-write a whole bootstrap for one extra setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::certs::WorkloadCert;
use crate::module_under_test::{Feature, ModuleUnderTest};

/// The Envoy node: identity, metadata (as an Istio sidecar's bootstrap carries it) and
/// locality.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    /// Becomes `node.metadata` (a JSON object).
    pub metadata: Value,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Node {
    /// A node with empty metadata and no locality.
    pub fn new(id: &str, cluster: &str) -> Node {
        Node {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
            metadata: json!({}),
            region: None,
            zone: None,
        }
    }

    /// A node as an Istio sidecar of `workload` in `namespace` announces itself: id
    /// `sidecar~127.0.0.1~<workload>-0.<namespace>~<namespace>.svc.cluster.local`, cluster
    /// `<workload>.<namespace>`, metadata `NAMESPACE`, `WORKLOAD_NAME` and the pod's `LABELS`.
    pub fn istio_sidecar(workload: &str, namespace: &str, pod_labels: &[(&str, &str)]) -> Node {
        let labels: Map<String, Value> = pod_labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), Value::from(*value)))
            .collect();
        Node {
            id: format!("sidecar~127.0.0.1~{workload}-0.{namespace}~{namespace}.svc.cluster.local"),
            cluster: format!("{workload}.{namespace}"),
            metadata: json!({
                "NAMESPACE": namespace,
                "WORKLOAD_NAME": workload,
                "LABELS": labels,
                "CLUSTER_ID": "Kubernetes",
                "MESH_ID": "cluster.local",
            }),
            region: None,
            zone: None,
        }
    }

    /// A sidecar of the tests' shop namespace: `workload` owned by `team`, with its
    /// criticality, environment `prod` and region `eu-west-1` (what the behaviour tests of the
    /// filters resolve this workload's labels from).
    pub fn shop_sidecar(workload: &str, team: &str, criticality: &str) -> Node {
        Node::istio_sidecar(
            workload,
            "shop",
            &[
                ("app", workload),
                ("team", team),
                ("criticality", criticality),
                ("environment", "prod"),
            ],
        )
        .with_locality(Some("eu-west-1"), Some("eu-west-1a"))
    }

    pub fn with_metadata(mut self, metadata: Value) -> Node {
        self.metadata = metadata;
        self
    }

    pub fn with_locality(mut self, region: Option<&str>, zone: Option<&str>) -> Node {
        self.region = region.map(str::to_owned);
        self.zone = zone.map(str::to_owned);
        self
    }

    /// The bootstrap's `node` object.
    pub fn to_json(&self) -> Value {
        let mut node = json!({
            "id": self.id,
            "cluster": self.cluster,
            "metadata": self.metadata,
        });
        if self.region.is_some() || self.zone.is_some() {
            let mut locality = Map::new();
            if let Some(region) = &self.region {
                locality.insert("region".into(), region.clone().into());
            }
            if let Some(zone) = &self.zone {
                locality.insert("zone".into(), zone.clone().into());
            }
            node["locality"] = Value::Object(locality);
        }
        node
    }
}

/// A full bootstrap: `node`, admin on 127.0.0.1:`admin_port`, the static listeners and
/// clusters, and `stats_config.stats_tags` from `(tag_name, regex)` pairs.
pub fn bootstrap(
    node: &Node,
    admin_port: u16,
    listeners: Vec<Value>,
    clusters: Vec<Value>,
    stats_tags: &[(&str, &str)],
) -> Value {
    let stats_tags: Vec<Value> = stats_tags
        .iter()
        .map(|(tag_name, regex)| json!({"tag_name": tag_name, "regex": regex}))
        .collect();
    json!({
        "node": node.to_json(),
        "admin": {"address": socket_address(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "stats_config": {"stats_tags": stats_tags},
    })
}

/// An `envoy.filters.http.wasm` HTTP filter running `wasm_path` on V8, configured the way
/// Istio passes a WasmPlugin's `pluginConfig`: the JSON as a `google.protobuf.StringValue`.
///
/// `name`, `root_id` and `vm_id` are all `filter_name`; `fail_open` is false, so a filter that
/// fails makes Envoy answer 503 rather than skip it. The HTTP filter entry is named
/// `filter_name` too, so several Wasm filters in one chain stay distinguishable (Envoy picks
/// the extension by `typed_config`'s type, not by name). The same JSON works as an upstream
/// HTTP filter ([`ClusterBuilder::upstream_http_filter`]).
pub fn wasm_filter(filter_name: &str, wasm_path: &Path, config: Value) -> Value {
    json!({
        "name": filter_name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": filter_name,
                "root_id": filter_name,
                "vm_config": {
                    "vm_id": filter_name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path.display().to_string()}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config.to_string(),
                },
                "fail_open": false,
            },
        },
    })
}

/// [`wasm_filter`] running `feature` in `module` (its own module, or the sidecar module with
/// only that feature's section) with the feature's configuration `config`. The filter is
/// named after the feature either way, so that several features' filters in one chain keep
/// their own names and VMs. Fails when the module has not been built.
pub fn feature_filter(
    module: ModuleUnderTest,
    feature: Feature,
    config: Value,
) -> anyhow::Result<Value> {
    let wasm = crate::paths::dist_wasm(module.wasm_name(feature))?;
    Ok(wasm_filter(
        feature.module(),
        &wasm,
        module.config(feature, config),
    ))
}

/// `envoy.config.core.v3.TrafficDirection` of a listener; Wasm filters read it as the
/// `listener_direction` property (Istio's sidecars mark inbound and outbound listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficDirection {
    Unspecified,
    Inbound,
    Outbound,
}

impl TrafficDirection {
    fn as_str(self) -> &'static str {
        match self {
            TrafficDirection::Unspecified => "UNSPECIFIED",
            TrafficDirection::Inbound => "INBOUND",
            TrafficDirection::Outbound => "OUTBOUND",
        }
    }
}

/// A listener on 127.0.0.1 with one HTTP connection manager that routes every path to one
/// cluster.
#[derive(Debug, Clone)]
pub struct ListenerBuilder {
    name: String,
    port: u16,
    cluster: String,
    direction: TrafficDirection,
    http_filters: Vec<Value>,
    retry_policy: Option<Value>,
    route_fields: Map<String, Value>,
    virtual_host_fields: Map<String, Value>,
    downstream_tls: Option<WorkloadCert>,
    require_client_certificate: bool,
    access_logs: Vec<(PathBuf, String)>,
    stat_prefix: Option<String>,
    hcm_fields: Map<String, Value>,
}

impl ListenerBuilder {
    /// Listener `name` on 127.0.0.1:`port`, routing all paths to `cluster`.
    pub fn new(name: &str, port: u16, cluster: &str) -> ListenerBuilder {
        ListenerBuilder {
            name: name.to_owned(),
            port,
            cluster: cluster.to_owned(),
            direction: TrafficDirection::Unspecified,
            http_filters: Vec::new(),
            retry_policy: None,
            route_fields: Map::new(),
            virtual_host_fields: Map::new(),
            downstream_tls: None,
            require_client_certificate: true,
            access_logs: Vec::new(),
            stat_prefix: None,
            hcm_fields: Map::new(),
        }
    }

    pub fn traffic_direction(mut self, direction: TrafficDirection) -> Self {
        self.direction = direction;
        self
    }

    /// Appends an HTTP filter (e.g. [`wasm_filter`]); the router is always added last.
    pub fn http_filter(mut self, filter: Value) -> Self {
        self.http_filters.push(filter);
        self
    }

    /// The route's `retry_policy` (`envoy.config.route.v3.RetryPolicy` as JSON), e.g.
    /// `{"retry_on": "5xx", "num_retries": 2}`.
    pub fn retry_policy(mut self, retry_policy: Value) -> Self {
        self.retry_policy = Some(retry_policy);
        self
    }

    /// Sets any other field of the route action (`envoy.config.route.v3.RouteAction`), e.g.
    /// `("timeout", json!("2s"))`.
    pub fn route_field(mut self, key: &str, value: Value) -> Self {
        self.route_fields.insert(key.to_owned(), value);
        self
    }

    /// Sets any other field of the virtual host (`envoy.config.route.v3.VirtualHost`), e.g.
    /// `("include_request_attempt_count", json!(true))`.
    pub fn virtual_host_field(mut self, key: &str, value: Value) -> Self {
        self.virtual_host_fields.insert(key.to_owned(), value);
        self
    }

    /// Terminates TLS with `cert` and validates client certificates against its CA; client
    /// certificates are required unless [`Self::require_client_certificate`] says otherwise.
    /// ALPN offers h2 and http/1.1.
    pub fn downstream_tls(mut self, cert: &WorkloadCert) -> Self {
        self.downstream_tls = Some(cert.clone());
        self
    }

    pub fn require_client_certificate(mut self, required: bool) -> Self {
        self.require_client_certificate = required;
        self
    }

    /// Adds a file access log (`envoy.access_loggers.file`) at `path` in text format `format`
    /// (a newline is appended if missing).
    pub fn access_log(mut self, path: &Path, format: &str) -> Self {
        let mut format = format.to_owned();
        if !format.ends_with('\n') {
            format.push('\n');
        }
        self.access_logs.push((path.to_path_buf(), format));
        self
    }

    /// The HTTP connection manager's stat prefix (default: the listener name).
    pub fn stat_prefix(mut self, prefix: &str) -> Self {
        self.stat_prefix = Some(prefix.to_owned());
        self
    }

    /// Sets any other field of the HTTP connection manager, e.g.
    /// `("forward_client_cert_details", json!("SANITIZE_SET"))`.
    pub fn hcm_field(mut self, key: &str, value: Value) -> Self {
        self.hcm_fields.insert(key.to_owned(), value);
        self
    }

    pub fn build(self) -> Value {
        let mut route_action = Map::new();
        route_action.insert("cluster".into(), self.cluster.clone().into());
        if let Some(retry_policy) = self.retry_policy {
            route_action.insert("retry_policy".into(), retry_policy);
        }
        route_action.extend(self.route_fields);

        let mut http_filters = self.http_filters;
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            },
        }));

        let mut virtual_host = json!({
            "name": "all",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": route_action}],
        });
        if let Some(fields) = virtual_host.as_object_mut() {
            fields.extend(self.virtual_host_fields);
        }
        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": self.stat_prefix.unwrap_or_else(|| self.name.clone()),
            "codec_type": "AUTO",
            "route_config": {
                "name": format!("{}-routes", self.name),
                "virtual_hosts": [virtual_host],
            },
            "http_filters": http_filters,
        });
        if !self.access_logs.is_empty() {
            hcm["access_log"] = self
                .access_logs
                .iter()
                .map(|(path, format)| {
                    json!({
                        "name": "envoy.access_loggers.file",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                            "path": path.display().to_string(),
                            "log_format": {"text_format_source": {"inline_string": format}},
                        },
                    })
                })
                .collect();
        }
        if let Some(hcm) = hcm.as_object_mut() {
            hcm.extend(self.hcm_fields);
        }

        let mut filter_chain = json!({
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm,
            }],
        });
        if let Some(cert) = &self.downstream_tls {
            filter_chain["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": self.require_client_certificate,
                    "common_tls_context": common_tls_context(
                        Some(cert),
                        &cert.ca_path,
                        None,
                        &["h2", "http/1.1"],
                    ),
                },
            });
        }

        let mut listener = json!({
            "name": self.name,
            "address": socket_address(self.port),
            "filter_chains": [filter_chain],
        });
        if self.direction != TrafficDirection::Unspecified {
            listener["traffic_direction"] = self.direction.as_str().into();
        }
        listener
    }
}

/// A STATIC cluster with one endpoint, 127.0.0.1:`port`.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    name: String,
    port: u16,
    connect_timeout: Duration,
    upstream_tls: Option<UpstreamTls>,
    http2: bool,
    upstream_http_filters: Vec<Value>,
    fields: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct UpstreamTls {
    client_cert: Option<WorkloadCert>,
    ca_path: PathBuf,
    sni: Option<String>,
    expected_server_san: Option<String>,
}

impl ClusterBuilder {
    /// Cluster `name` sending to 127.0.0.1:`port`; connect timeout 1 s, HTTP/1.1.
    pub fn new(name: &str, port: u16) -> ClusterBuilder {
        ClusterBuilder {
            name: name.to_owned(),
            port,
            connect_timeout: Duration::from_secs(1),
            upstream_tls: None,
            http2: false,
            upstream_http_filters: Vec::new(),
            fields: Map::new(),
        }
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Originates TLS presenting `client_cert` (mTLS) and validating the server against the
    /// same CA; `sni` is sent if given.
    pub fn upstream_tls(mut self, client_cert: &WorkloadCert, sni: Option<&str>) -> Self {
        self.upstream_tls = Some(UpstreamTls {
            client_cert: Some(client_cert.clone()),
            ca_path: client_cert.ca_path.clone(),
            sni: sni.map(str::to_owned),
            expected_server_san: None,
        });
        self
    }

    /// Originates TLS without a client certificate, validating the server against `ca_path`
    /// (to test that a server requiring mTLS refuses such clients).
    pub fn upstream_tls_without_client_cert(mut self, ca_path: &Path, sni: Option<&str>) -> Self {
        self.upstream_tls = Some(UpstreamTls {
            client_cert: None,
            ca_path: ca_path.to_path_buf(),
            sni: sni.map(str::to_owned),
            expected_server_san: None,
        });
        self
    }

    /// With upstream TLS: accept only a server whose certificate has this URI SAN (e.g. the
    /// destination's SPIFFE id), as Istio's outbound clusters do.
    pub fn expect_server_uri_san(mut self, uri: &str) -> Self {
        if let Some(tls) = &mut self.upstream_tls {
            tls.expected_server_san = Some(uri.to_owned());
        }
        self
    }

    /// Speak HTTP/2 to the upstream (explicit `http2_protocol_options`; h2c without TLS).
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Appends an upstream HTTP filter (runs per attempt, after the router); the
    /// `envoy.filters.http.upstream_codec` filter is always added last.
    pub fn upstream_http_filter(mut self, filter: Value) -> Self {
        self.upstream_http_filters.push(filter);
        self
    }

    /// Sets any other field of the cluster, e.g. `("circuit_breakers", json!({...}))`.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.fields.insert(key.to_owned(), value);
        self
    }

    pub fn build(self) -> Value {
        let mut cluster = json!({
            "name": self.name,
            "type": "STATIC",
            "connect_timeout": protobuf_duration(self.connect_timeout),
            "load_assignment": {
                "cluster_name": self.name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(self.port)}}]}],
            },
        });
        if let Some(tls) = &self.upstream_tls {
            let alpn: &[&str] = if self.http2 { &["h2"] } else { &[] };
            let mut context = json!({
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common_tls_context(
                    tls.client_cert.as_ref(),
                    &tls.ca_path,
                    tls.expected_server_san.as_deref(),
                    alpn,
                ),
            });
            if let Some(sni) = &tls.sni {
                context["sni"] = sni.clone().into();
            }
            cluster["transport_socket"] =
                json!({"name": "envoy.transport_sockets.tls", "typed_config": context});
        }
        if self.http2 || !self.upstream_http_filters.is_empty() {
            let protocol = if self.http2 {
                json!({"http2_protocol_options": {}})
            } else {
                json!({"http_protocol_options": {}})
            };
            let mut options = json!({
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol,
            });
            if !self.upstream_http_filters.is_empty() {
                let mut filters = self.upstream_http_filters.clone();
                filters.push(json!({
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
                    },
                }));
                options["http_filters"] = filters.into();
            }
            cluster["typed_extension_protocol_options"] =
                json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options});
        }
        if let Some(cluster) = cluster.as_object_mut() {
            cluster.extend(self.fields);
        }
        cluster
    }
}

fn socket_address(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn common_tls_context(
    own_cert: Option<&WorkloadCert>,
    ca_path: &Path,
    expected_peer_uri_san: Option<&str>,
    alpn: &[&str],
) -> Value {
    let mut validation = json!({"trusted_ca": {"filename": ca_path.display().to_string()}});
    if let Some(uri) = expected_peer_uri_san {
        validation["match_typed_subject_alt_names"] =
            json!([{"san_type": "URI", "matcher": {"exact": uri}}]);
    }
    let mut context = json!({"validation_context": validation});
    if let Some(cert) = own_cert {
        context["tls_certificates"] = json!([{
            "certificate_chain": {"filename": cert.cert_path.display().to_string()},
            "private_key": {"filename": cert.key_path.display().to_string()},
        }]);
    }
    if !alpn.is_empty() {
        context["alpn_protocols"] = json!(alpn);
    }
    context
}

/// A protobuf JSON duration: "1s", "0.25s".
fn protobuf_duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_protobuf_json_syntax() {
        assert_eq!(protobuf_duration(Duration::from_secs(1)), "1s");
        assert_eq!(protobuf_duration(Duration::from_millis(250)), "0.25s");
    }

    #[test]
    fn wasm_filter_passes_configuration_as_a_json_string() {
        let filter = wasm_filter(
            "label-enrich",
            Path::new("/x/label-enrich.wasm"),
            json!({"local": {"team": "payments"}}),
        );
        let config = &filter["typed_config"]["config"];
        assert_eq!(config["root_id"], "label-enrich");
        assert_eq!(config["vm_config"]["vm_id"], "label-enrich");
        assert_eq!(
            config["configuration"]["value"],
            r#"{"local":{"team":"payments"}}"#
        );
    }

    #[test]
    fn node_locality_only_when_given() {
        assert!(Node::new("a", "b").to_json().get("locality").is_none());
        let node = Node::new("a", "b").with_locality(Some("eu-west-1"), None);
        assert_eq!(node.to_json()["locality"], json!({"region": "eu-west-1"}));
    }

    #[test]
    fn router_is_last_and_retry_policy_is_on_the_route() {
        let listener = ListenerBuilder::new("out", 1, "app")
            .http_filter(json!({"name": "first"}))
            .retry_policy(json!({"retry_on": "5xx"}))
            .build();
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        let filters = hcm["http_filters"].as_array().unwrap();
        assert_eq!(filters[0]["name"], "first");
        assert_eq!(filters[1]["name"], "envoy.filters.http.router");
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
        assert_eq!(route["retry_policy"]["retry_on"], "5xx");
    }
}
