//! The sidecar of one demo service: an Envoy bootstrap shaped like an Istio sidecar's, with
//! `dist/eastwest.wasm` (label-enrich, telemetry and retry-budget in one Wasm module,
//! docs/filters/sidecar.md) as one HTTP filter on each listener, as the shipped configurations
//! run it.
//!
//! * inbound listener (mTLS server: the service's SPIFFE certificate, client certificates
//!   required): eastwest.wasm with label-enrich, telemetry (with `expected_dependencies`) and
//!   retry-budget in `server` mode, then the router to the service's own port;
//! * outbound listener (plain HTTP on 127.0.0.1, where the service sends its calls): one
//!   virtual host per destination service, chosen by `Host`, with the retry policy and
//!   `include_request_attempt_count`; eastwest.wasm with label-enrich, telemetry and
//!   retry-budget in `client-headers` mode (as Istio's WasmPlugin places it: when the budget
//!   toward a destination is spent it sets `x-envoy-max-retries: 0`, so the router makes no
//!   retry). Not `client` mode (an upstream filter on each cluster, which refuses exactly the
//!   retry over budget): the call then ends with the filter's own local reply, which carries no
//!   `x-eastwest-peer`, so telemetry on the caller would report those calls with
//!   `destination_service="unknown"` and the demo's service map would lose them;
//! * both listeners' filters share one VM (the same `vm_config`); the settings the features
//!   share (`direction`, `peer_trust`, `trust_domain`) are given once, at the top level of each
//!   listener's configuration;
//! * one cluster per destination service (Istio's naming, `outbound|80||<svc>.shop.svc.cluster.local`,
//!   from which retry-budget takes the destination service and namespace) toward that
//!   service's inbound listener, over HTTP/2 with mTLS (this service's certificate, the
//!   destination's SPIFFE id required of the server);
//! * node metadata as Istio writes it (`NAMESPACE`, `WORKLOAD_NAME`, pod `LABELS` with app,
//!   team, criticality, environment) and the locality's region and zone;
//! * the shipped `stats_tags`, histogram buckets and access-log format fragments.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::fragments;
use super::topology::{self, ServiceSpec, SERVICES};
use crate::bootstrap::{
    bootstrap, wasm_filter, ClusterBuilder, ListenerBuilder, Node, TrafficDirection,
};
use crate::certs::WorkloadCert;
use crate::paths::dist_wasm;

/// The ports of one service and its sidecar, all on 127.0.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The service itself (plain HTTP; the traffic driver and the outage switch use it).
    pub app: u16,
    /// The sidecar's inbound listener (mTLS), where the other sidecars send.
    pub inbound: u16,
    /// The sidecar's outbound listener (plain HTTP), where the service sends its calls.
    pub outbound: u16,
    /// The sidecar's admin interface (`/stats/prometheus`).
    pub admin: u16,
}

/// The module the sidecars run, from `dist/`.
#[derive(Debug, Clone)]
pub struct Filters {
    /// `dist/eastwest.wasm`: label-enrich, telemetry and retry-budget in one module.
    pub eastwest: PathBuf,
}

impl Filters {
    /// `dist/eastwest.wasm`, or an error saying to run `cargo xtask build`.
    pub fn from_dist() -> Result<Filters> {
        Ok(Filters {
            eastwest: dist_wasm("eastwest")?,
        })
    }
}

/// The name, root id and VM id of the sidecars' one Wasm filter.
pub const FILTER_NAME: &str = "eastwest";

/// The route retry policy of every outbound virtual host, as the shipped configurations set
/// it: exponential backoff with full jitter.
pub fn retry_policy() -> Value {
    json!({
        "retry_on": "5xx,reset,connect-failure",
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    })
}

/// retry-budget's configuration on the outbound listener (its `retry_budget` section): the
/// defaults written out, and a tighter budget toward payments (a critical service that should not be hammered while it
/// recovers).
pub fn client_budget() -> Value {
    json!({
        "mode": "client-headers",
        "ratio": 0.2,
        "min_retries_per_second": 10,
        "ttl_seconds": 10,
        "destinations": {"payments": {"ratio": 0.1, "min_retries_per_second": 5}},
    })
}

/// eastwest.wasm's configuration on one side: the shared settings at the top level (the
/// direction, mTLS trust in the demo's trust domain), label-enrich with its defaults, then
/// telemetry's and retry-budget's sections.
pub fn eastwest_config(direction: &str, telemetry: Value, retry_budget: Value) -> Value {
    json!({
        "direction": direction,
        "peer_trust": "mtls",
        "trust_domain": topology::TRUST_DOMAIN,
        "label_enrich": {},
        "telemetry": telemetry,
        "retry_budget": retry_budget,
    })
}

/// The node of `service`'s sidecar.
pub fn node(service: &ServiceSpec) -> Node {
    Node::istio_sidecar(
        service.name,
        topology::NAMESPACE,
        &[
            ("app", service.name),
            ("team", service.team),
            ("criticality", service.criticality),
            ("environment", topology::ENVIRONMENT),
        ],
    )
    .with_locality(Some(service.region), Some(service.zone))
}

/// Everything a sidecar bootstrap needs besides the service.
pub struct MeshLayout<'a> {
    /// The ports of every service, by name.
    pub ports: &'a dyn Fn(&str) -> Ports,
    pub filters: &'a Filters,
    /// Where the access logs go (`<service>-inbound.log`, `<service>-outbound.log`).
    pub log_dir: &'a Path,
}

/// The bootstrap of `service`'s sidecar presenting `cert`.
pub fn sidecar_bootstrap(
    service: &ServiceSpec,
    cert: &WorkloadCert,
    layout: &MeshLayout<'_>,
) -> Result<Value> {
    let ports = (layout.ports)(service.name);
    let filters = layout.filters;
    let access_log = fragments::access_log_format()?;
    let expected: Vec<Value> = topology::EXPECTED_DEPENDENCIES
        .iter()
        .map(|(source, destination)| json!({"source": source, "destination": destination}))
        .collect();

    let app_cluster = format!("inbound|{}||", ports.app);
    let inbound = ListenerBuilder::new("inbound", ports.inbound, &app_cluster)
        .traffic_direction(TrafficDirection::Inbound)
        .stat_prefix("inbound")
        .downstream_tls(cert)
        // eastwest.wasm runs label-enrich first (the others reuse what it resolved), and
        // counts in telemetry the requests retry-budget sheds.
        .http_filter(wasm_filter(
            FILTER_NAME,
            &filters.eastwest,
            eastwest_config(
                "inbound",
                json!({"expected_dependencies": expected}),
                json!({"mode": "server"}),
            ),
        ))
        .route_field("timeout", json!("5s"))
        .access_log(
            &layout.log_dir.join(format!("{}-inbound.log", service.name)),
            &access_log,
        )
        .build();

    // Like an Istio sidecar, every sidecar can reach every other service: whether a call is
    // expected is for telemetry to judge, not for the routing to prevent.
    let destinations: Vec<&ServiceSpec> = SERVICES
        .iter()
        .filter(|other| other.name != service.name)
        .collect();
    let virtual_hosts: Vec<Value> = destinations
        .iter()
        .map(|destination| {
            json!({
                "name": destination.name,
                "domains": [
                    destination.name,
                    format!("{}:*", destination.name),
                    format!("{}.{}", destination.name, topology::NAMESPACE),
                    format!("{}.{}.svc.cluster.local", destination.name, topology::NAMESPACE),
                ],
                "routes": [{
                    "match": {"prefix": "/"},
                    "route": {
                        "cluster": topology::outbound_cluster(destination.name),
                        "timeout": "5s",
                        "retry_policy": retry_policy(),
                    },
                }],
                // The attempt number (x-envoy-attempt-count) for the callee's retry-budget.
                "include_request_attempt_count": true,
            })
        })
        .collect();
    let outbound = ListenerBuilder::new("outbound", ports.outbound, "unused")
        .traffic_direction(TrafficDirection::Outbound)
        .stat_prefix("outbound")
        .http_filter(wasm_filter(
            FILTER_NAME,
            &filters.eastwest,
            eastwest_config("outbound", json!({}), client_budget()),
        ))
        .hcm_field(
            "route_config",
            json!({"name": "outbound", "virtual_hosts": virtual_hosts}),
        )
        .access_log(
            &layout
                .log_dir
                .join(format!("{}-outbound.log", service.name)),
            &access_log,
        )
        .build();

    let mut clusters = vec![ClusterBuilder::new(&app_cluster, ports.app).build()];
    for destination in destinations {
        let destination_ports = (layout.ports)(destination.name);
        clusters.push(
            ClusterBuilder::new(
                &topology::outbound_cluster(destination.name),
                destination_ports.inbound,
            )
            .upstream_tls(
                cert,
                Some(&format!(
                    "{}.{}.svc.cluster.local",
                    destination.name,
                    topology::NAMESPACE
                )),
            )
            .expect_server_uri_san(&topology::spiffe_id(destination.name))
            .http2(true)
            .build(),
        );
    }

    let tags = fragments::stats_tags()?;
    let tags: Vec<(&str, &str)> = tags
        .iter()
        .map(|(tag, regex)| (tag.as_str(), regex.as_str()))
        .collect();
    let mut config = bootstrap(
        &node(service),
        ports.admin,
        vec![inbound, outbound],
        clusters,
        &tags,
    );
    config["stats_config"]["histogram_bucket_settings"] = fragments::histogram_bucket_settings()?;
    // Histograms reach /stats/prometheus at each stats flush: every second rather than 5 s.
    config["stats_flush_interval"] = json!("1s");
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_routes_by_host_with_eastwest_wasm_on_both_listeners() {
        let ca = crate::certs::TestCa::new(topology::TRUST_DOMAIN).unwrap();
        let cert = ca.issue_workload(topology::NAMESPACE, "checkout").unwrap();
        let filters = Filters {
            eastwest: "/d/eastwest.wasm".into(),
        };
        let ports = |name: &str| {
            let base = 10_000 + 10 * SERVICES.iter().position(|s| s.name == name).unwrap() as u16;
            Ports {
                app: base,
                inbound: base + 1,
                outbound: base + 2,
                admin: base + 3,
            }
        };
        let layout = MeshLayout {
            ports: &ports,
            filters: &filters,
            log_dir: Path::new("/logs"),
        };
        let checkout = topology::service("checkout").unwrap();
        let config = sidecar_bootstrap(checkout, &cert, &layout).unwrap();

        assert_eq!(config["node"]["metadata"]["LABELS"]["team"], "orders");
        assert_eq!(config["node"]["locality"]["region"], "eu-west-1");
        let listeners = config["static_resources"]["listeners"].as_array().unwrap();
        let hcm = |i: usize| &listeners[i]["filter_chains"][0]["filters"][0]["typed_config"];
        let inbound_filters: Vec<&str> = hcm(0)["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(inbound_filters, ["eastwest", "envoy.filters.http.router"]);
        let configuration = |i: usize| -> Value {
            let filter = &hcm(i)["http_filters"][0]["typed_config"]["config"];
            assert_eq!(
                filter["vm_config"]["code"]["local"]["filename"],
                "/d/eastwest.wasm"
            );
            serde_json::from_str(filter["configuration"]["value"].as_str().unwrap()).unwrap()
        };
        let inbound = configuration(0);
        assert_eq!(inbound["direction"], "inbound");
        assert_eq!(inbound["peer_trust"], "mtls");
        assert_eq!(inbound["trust_domain"], topology::TRUST_DOMAIN);
        assert_eq!(inbound["label_enrich"], json!({}));
        assert_eq!(
            inbound["telemetry"]["expected_dependencies"]
                .as_array()
                .unwrap()
                .len(),
            topology::EXPECTED_DEPENDENCIES.len()
        );
        assert_eq!(inbound["retry_budget"], json!({"mode": "server"}));
        let outbound = configuration(1);
        assert_eq!(outbound["direction"], "outbound");
        assert_eq!(outbound["telemetry"], json!({}));
        assert_eq!(outbound["retry_budget"], client_budget());
        assert_eq!(
            hcm(0)["http_filters"][0]["typed_config"]["config"]["vm_config"],
            hcm(1)["http_filters"][0]["typed_config"]["config"]["vm_config"],
            "one VM for both listeners"
        );
        assert_eq!(
            listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
                ["require_client_certificate"],
            true
        );
        let hosts = hcm(1)["route_config"]["virtual_hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 3);
        let payments = hosts.iter().find(|h| h["name"] == "payments").unwrap();
        assert_eq!(
            payments["routes"][0]["route"]["cluster"],
            "outbound|80||payments.shop.svc.cluster.local"
        );
        assert_eq!(payments["include_request_attempt_count"], true);
        let clusters = config["static_resources"]["clusters"].as_array().unwrap();
        let to_payments = clusters
            .iter()
            .find(|c| c["name"] == "outbound|80||payments.shop.svc.cluster.local")
            .unwrap();
        assert_eq!(
            to_payments["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ["address"]["socket_address"]["port_value"],
            ports("payments").inbound
        );
        let outbound_filters: Vec<&str> = hcm(1)["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(outbound_filters, ["eastwest", "envoy.filters.http.router"]);
        assert!(
            config["stats_config"]["stats_tags"]
                .as_array()
                .unwrap()
                .len()
                >= 19
        );
    }
}
