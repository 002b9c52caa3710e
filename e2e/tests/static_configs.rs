//! The shipped static Envoy configurations (`envoy-configs/static/`) load in the oldest and the
//! newest supported Envoy, carry the shared fragments unchanged, place the filters as
//! documented (the complete sidecars run `dist/eastwest.wasm`, one filter per listener, with
//! exactly the settings the three separate filters had; the minimal examples one separate module
//! each), and a complete sidecar pair serves traffic with the metrics the docs promise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_e2e::{
    dist_wasm, envoy_binary, envoy_oldest_binary, free_port, http_request, workspace_root, Envoy,
    EnvoyOptions, TestApp, ENVOY_OLDEST_VERSION, ENVOY_VERSION,
};
use serde_json::{json, Value};

#[path = "support/sidecar_config.rs"]
mod sidecar_config;
use sidecar_config::features_of_module;

/// The separate modules; `eastwest` is the one-module sidecar (DESIGN.md §8).
const FILTERS: [&str; 3] = ["label-enrich", "telemetry", "retry-budget"];
const MODULES: [&str; 4] = ["eastwest", "label-enrich", "telemetry", "retry-budget"];

/// Every file these tests know about; a new file under envoy-configs/static must be added here
/// (and is then checked like the others).
const STATIC_CONFIGS: [&str; 5] = [
    "sidecar-client-headers.yaml",
    "sidecar-client.yaml",
    "minimal/label-enrich.yaml",
    "minimal/telemetry.yaml",
    "minimal/retry-budget.yaml",
];

fn static_dir() -> PathBuf {
    workspace_root().join("envoy-configs/static")
}

/// Both ends of the supported range, newest first: (version, binary).
fn envoys() -> Vec<(&'static str, PathBuf)> {
    vec![
        (ENVOY_VERSION, envoy_binary().unwrap()),
        (ENVOY_OLDEST_VERSION, envoy_oldest_binary().unwrap()),
    ]
}

fn require_filters() {
    for module in MODULES {
        dist_wasm(module).unwrap();
    }
}

/// `envoy --mode validate` from the repository root, as the configs' comments say, so that
/// `dist/<module>.wasm` resolves.
fn validate(envoy: &Path, config: &Path) -> (bool, String) {
    eastwest_e2e::envoy::validate_config(envoy, config, &workspace_root())
}

/// The YAML files under `dir`, recursively, relative to it.
fn yaml_files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "yaml") {
                found.push(
                    path.strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    found.sort();
    found
}

fn load(relative: &str) -> Value {
    let text = std::fs::read_to_string(static_dir().join(relative)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn fragment(name: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("envoy-configs/fragments").join(name))
        .unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

#[test]
fn every_static_config_validates_on_the_oldest_and_the_newest_envoy() {
    require_filters();
    let mut expected: Vec<String> = STATIC_CONFIGS.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        yaml_files_under(&static_dir()),
        expected,
        "the files under envoy-configs/static are the ones this test knows"
    );
    for (version, envoy) in envoys() {
        for config in STATIC_CONFIGS {
            let (ok, log) = validate(&envoy, &static_dir().join(config));
            assert!(ok, "{config} does not validate on Envoy {version}:\n{log}");
            assert!(log.contains("OK"), "{config} on Envoy {version}: {log}");
        }
    }
}

/// A filter that refuses its configuration makes validation fail on both Envoy versions, with
/// the module's own message naming the path: `--mode validate` really runs every filter of the
/// sidecars, eastwest.wasm on both listeners (a shared setting, a setting in each section, a
/// misspelt section) and retry-budget's own module as an upstream filter of a cluster.
#[test]
fn a_broken_filter_configuration_fails_validation_on_both_envoys() {
    require_filters();
    let cases = [
        (
            "sidecar-client-headers.yaml",
            r#""peer_trust": "any","#,
            r#""peer_trust": "sometimes","#,
            "eastwest: invalid configuration: peer_trust: unknown variant `sometimes`",
        ),
        (
            "sidecar-client-headers.yaml",
            r#""telemetry": {"expected_dependencies": ["#,
            r#""telemetry": {"max_series": 0, "expected_dependencies": ["#,
            "eastwest: invalid configuration: telemetry.max_series",
        ),
        (
            "sidecar-client.yaml",
            r#"{"mode": "client", "ratio": 0.2"#,
            r#"{"mode": "clients", "ratio": 0.2"#,
            "eastwest-retry-budget: invalid configuration: mode",
        ),
        (
            "sidecar-client-headers.yaml",
            r#""retry_budget": {"mode": "server"}"#,
            r#""retry_budget": {"mode": "server", "ratio": -1}"#,
            "eastwest: invalid configuration: retry_budget.ratio",
        ),
        (
            "sidecar-client.yaml",
            r#""label_enrich": {},"#,
            r#""labels_enrich": {},"#,
            "eastwest: invalid configuration: labels_enrich: unknown field",
        ),
        (
            "sidecar-client-headers.yaml",
            r#""direction": "outbound","#,
            r#""direction": "outwards","#,
            "eastwest: invalid configuration: direction",
        ),
    ];
    for (index, (file, good, bad, message)) in cases.into_iter().enumerate() {
        let original = std::fs::read_to_string(static_dir().join(file)).unwrap();
        assert!(
            original.contains(good),
            "{file} no longer contains {good}; update this test"
        );
        let broken = original.replacen(good, bad, 1);
        let path = workspace_root().join(format!("target/broken-static-config-{index}.yaml"));
        std::fs::write(&path, broken).unwrap();
        for (version, envoy) in envoys() {
            let (ok, log) = validate(&envoy, &path);
            assert!(!ok, "Envoy {version} accepted {bad} in {file}");
            assert!(log.contains(message), "Envoy {version}, {file}: {log}");
        }
    }
}

#[test]
fn static_configs_carry_exactly_the_fragments_stats_tags_and_buckets() {
    let tags = fragment("stats-tags.yaml")["stats_tags"].clone();
    let buckets = fragment("histogram-buckets.yaml")["histogram_bucket_settings"].clone();
    assert_eq!(tags.as_array().unwrap().len(), ALL_TAGS.len());
    for config in STATIC_CONFIGS {
        let value = load(config);
        assert_eq!(
            value["stats_config"]["stats_tags"], tags,
            "{config}: stats_tags differ from envoy-configs/fragments/stats-tags.yaml"
        );
        let loads_telemetry = features(&value)
            .iter()
            .any(|(feature, _, _)| feature == "telemetry");
        if loads_telemetry {
            assert_eq!(
                value["stats_config"]["histogram_bucket_settings"], buckets,
                "{config}: histogram buckets differ from envoy-configs/fragments/histogram-buckets.yaml"
            );
        }
    }
}

#[test]
fn stats_tags_fragment_matches_the_tags_the_filters_emit() {
    let fragment =
        std::fs::read_to_string(workspace_root().join("envoy-configs/fragments/stats-tags.yaml"))
            .unwrap();
    for tag in ALL_TAGS {
        let line = format!("{{tag_name: {tag}, regex: '{}'}}", stats_tag_regex(tag));
        assert!(
            fragment.contains(&line),
            "missing {line} in stats-tags.yaml"
        );
    }
}

/// Every object in `value` that is an HTTP filter loading a module from `dist/`: the module
/// (`dist/<module>.wasm`), its `vm_config` and its parsed JSON configuration.
fn all_wasm_filters(value: &Value) -> Vec<(String, Value, Value)> {
    let mut found = Vec::new();
    walk(value, &mut |v| {
        let Some(config) = v.pointer("/typed_config/config") else {
            return;
        };
        let Some(module) = config
            .pointer("/vm_config/code/local/filename")
            .and_then(Value::as_str)
            .and_then(|file| file.strip_prefix("dist/")?.strip_suffix(".wasm"))
        else {
            return;
        };
        let json = config
            .pointer("/configuration/value")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let parsed: Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{module}: {e}: {json}"));
        found.push((module.to_string(), config["vm_config"].clone(), parsed));
    });
    found
}

/// The configurations of the HTTP filters in `value` that load `dist/<module>.wasm`.
fn wasm_filters(value: &Value, module: &str) -> Vec<Value> {
    all_wasm_filters(value)
        .into_iter()
        .filter(|(m, _, _)| m == module)
        .map(|(_, _, config)| config)
        .collect()
}

/// What runs each feature in `value`, wherever it runs: (feature, the module that runs it,
/// the configuration the feature gets, with eastwest.wasm's shared settings merged in).
fn features(value: &Value) -> Vec<(String, String, Value)> {
    all_wasm_filters(value)
        .into_iter()
        .flat_map(|(module, _, config)| {
            features_of_module(&module, &config)
                .into_iter()
                .map(move |(feature, config)| (feature.to_string(), module.clone(), config))
        })
        .collect()
}

fn walk(value: &Value, visit: &mut dyn FnMut(&Value)) {
    visit(value);
    match value {
        Value::Array(items) => items.iter().for_each(|item| walk(item, visit)),
        Value::Object(map) => map.values().for_each(|item| walk(item, visit)),
        _ => {}
    }
}

fn listener<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn hcm(listener: &Value) -> &Value {
    &listener["filter_chains"][0]["filters"][0]["typed_config"]
}

fn filter_names(filters: &Value) -> Vec<&str> {
    filters
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect()
}

/// The Wasm HTTP filters of a listener or cluster filter list: (module, vm_config, config).
fn wasm_filters_of_chain(filters: &Value) -> Vec<(String, Value, Value)> {
    all_wasm_filters(filters)
}

/// The telemetry `expected_dependencies` of the shipped sidecars.
fn expected_dependencies() -> Value {
    json!([
        {"source": "frontend", "destination": "checkout"},
        {"source": "checkout", "destination": "payments"},
        {"source": "checkout", "destination": "inventory"},
    ])
}

/// The retry budget of the shipped sidecars' callers, without its mode.
fn caller_budget(mode: &str) -> Value {
    json!({
        "mode": mode,
        "ratio": 0.2,
        "min_retries_per_second": 10,
        "ttl_seconds": 10,
        "destinations": {"payments": {"ratio": 0.1, "min_retries_per_second": 5}},
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

/// The places DESIGN.md §5 and §8 and the configs' comments promise: one `eastwest` filter
/// (dist/eastwest.wasm) then the router on both listeners, one VM for both; on the inbound
/// listener label-enrich, telemetry and retry-budget in `server` mode; on the outbound listener
/// label-enrich, telemetry and retry-budget in `client-headers` mode, or retry-budget's own
/// module in `client` mode as an upstream filter of every destination cluster; each feature with
/// exactly the settings the three separate filters had; attempt counts and jittered backoff on
/// every outbound route, and the shared access-log format.
#[test]
fn sidecars_place_the_filters_retries_and_access_logs_as_documented() {
    let access_log_format = format!(
        "{}\n",
        std::fs::read_to_string(
            workspace_root().join("envoy-configs/fragments/access-log-format.txt")
        )
        .unwrap()
        .trim_end_matches('\n')
    );
    let any = json!({"peer_trust": "any"});
    for (file, budget_on_clusters) in [
        ("sidecar-client-headers.yaml", false),
        ("sidecar-client.yaml", true),
    ] {
        let config = load(file);
        let inbound = hcm(listener(&config, "inbound"));
        let outbound = hcm(listener(&config, "outbound"));
        let mut listener_vms = Vec::new();
        for (name, listener_hcm) in [("inbound", inbound), ("outbound", outbound)] {
            assert_eq!(
                filter_names(&listener_hcm["http_filters"]),
                ["eastwest", "envoy.filters.http.router"],
                "{file} {name}: one eastwest.wasm filter, then the router"
            );
            let wasm = wasm_filters_of_chain(&listener_hcm["http_filters"]);
            assert_eq!(wasm.len(), 1, "{file} {name}");
            let (module, vm_config, _) = &wasm[0];
            assert_eq!(module, "eastwest", "{file} {name}");
            listener_vms.push(vm_config.clone());
        }
        assert_eq!(
            listener_vms[0], listener_vms[1],
            "{file}: both listeners share one VM (same vm_config)"
        );

        // Each feature with the settings the separate filters had.
        let inbound_features = features_of_module(
            "eastwest",
            &wasm_filters_of_chain(&inbound["http_filters"])[0].2,
        );
        let expected_inbound = BTreeMap::from([
            (
                "label-enrich",
                with(json!({"direction": "inbound"}), any.clone()),
            ),
            (
                "telemetry",
                with(
                    json!({"direction": "inbound", "expected_dependencies": expected_dependencies()}),
                    any.clone(),
                ),
            ),
            ("retry-budget", with(json!({"mode": "server"}), any.clone())),
        ]);
        assert_eq!(inbound_features, expected_inbound, "{file} inbound");
        let outbound_features = features_of_module(
            "eastwest",
            &wasm_filters_of_chain(&outbound["http_filters"])[0].2,
        );
        let mut expected_outbound = BTreeMap::from([
            (
                "label-enrich",
                with(json!({"direction": "outbound"}), any.clone()),
            ),
            (
                "telemetry",
                with(
                    json!({"direction": "outbound", "expected_dependencies": expected_dependencies()}),
                    any.clone(),
                ),
            ),
        ]);
        if !budget_on_clusters {
            // peer_trust reaches retry-budget from the top level; in `client-headers` mode it
            // has no effect (the budget is keyed by the upstream cluster).
            expected_outbound.insert(
                "retry-budget",
                with(caller_budget("client-headers"), any.clone()),
            );
        }
        assert_eq!(outbound_features, expected_outbound, "{file} outbound");

        // Where retry-budget runs, in which mode, in which module.
        let mut modes: Vec<(String, String)> = features(&config)
            .into_iter()
            .filter(|(feature, _, _)| feature == "retry-budget")
            .map(|(_, module, c)| (c["mode"].as_str().unwrap().to_string(), module))
            .collect();
        modes.sort();
        let destinations = outbound["route_config"]["virtual_hosts"]
            .as_array()
            .unwrap();
        assert!(!destinations.is_empty());
        if budget_on_clusters {
            // One upstream filter per destination cluster (a YAML alias repeats it), in
            // retry-budget's own module, plus the inbound listener's `server` mode.
            let mut expected =
                vec![("client".to_string(), "retry-budget".to_string()); destinations.len()];
            expected.push(("server".into(), "eastwest".into()));
            assert_eq!(modes, expected, "{file}");
        } else {
            assert_eq!(
                modes,
                [
                    ("client-headers".to_string(), "eastwest".to_string()),
                    ("server".into(), "eastwest".into())
                ],
                "{file}"
            );
        }
        for (name, listener_hcm) in [("inbound", inbound), ("outbound", outbound)] {
            assert_eq!(
                listener_hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]
                    ["inline_string"],
                access_log_format.as_str(),
                "{file} {name}: the access-log format differs from the fragment"
            );
        }
        for vhost in destinations {
            let route_cluster = vhost["routes"][0]["route"]["cluster"].as_str().unwrap();
            assert_eq!(
                vhost["include_request_attempt_count"], true,
                "{file} {route_cluster}"
            );
            assert_eq!(
                vhost["retry_policy"],
                json!({
                    "retry_on": "5xx,reset,connect-failure",
                    "num_retries": 2,
                    "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"}
                }),
                "{file} {route_cluster}"
            );
            let upstream_filters = cluster(&config, route_cluster)
                ["typed_extension_protocol_options"]
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
                .clone();
            if budget_on_clusters {
                assert_eq!(
                    filter_names(&upstream_filters),
                    ["eastwest.retry_budget", "envoy.filters.http.upstream_codec"],
                    "{file} cluster {route_cluster}"
                );
                let wasm = wasm_filters_of_chain(&upstream_filters);
                assert_eq!(wasm.len(), 1, "{file} cluster {route_cluster}");
                assert_eq!(wasm[0].0, "retry-budget", "{file} cluster {route_cluster}");
                assert_eq!(
                    wasm[0].2,
                    caller_budget("client"),
                    "{file} cluster {route_cluster}"
                );
            } else {
                assert!(upstream_filters.is_null(), "{file} cluster {route_cluster}");
            }
        }
    }
    // The minimal examples: exactly one eastwest filter each, the separate module they are
    // named after.
    for filter in FILTERS {
        let file = format!("minimal/{filter}.yaml");
        let config = load(&file);
        for module in MODULES {
            let count = wasm_filters(&config, module).len();
            assert_eq!(
                count,
                usize::from(module == filter),
                "{file} loads {module}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A complete sidecar pair on real Envoy.

/// A shipped sidecar bootstrap made runnable next to other processes: every listener and the
/// admin interface on a free 127.0.0.1 port, the application and peer clusters pointed at
/// `clusters` (name -> port on 127.0.0.1), and the Wasm files by absolute path (Envoy runs in
/// its own run directory).
fn runnable(mut config: Value, clusters: &BTreeMap<&str, u16>) -> (Value, BTreeMap<String, u16>) {
    let mut ports = BTreeMap::new();
    let admin = free_port();
    config["admin"]["address"]["socket_address"] =
        json!({"address": "127.0.0.1", "port_value": admin});
    ports.insert("admin".to_string(), admin);
    for listener in config["static_resources"]["listeners"]
        .as_array_mut()
        .unwrap()
    {
        let port = free_port();
        listener["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": port});
        ports.insert(listener["name"].as_str().unwrap().to_string(), port);
    }
    for cluster in config["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
    {
        let name = cluster["name"].as_str().unwrap().to_string();
        let port = *clusters
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no port for cluster {name}"));
        let endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array_mut()
            .unwrap();
        assert_eq!(endpoints.len(), 1, "cluster {name}");
        endpoints[0]["endpoint"]["address"]["socket_address"] =
            json!({"address": "127.0.0.1", "port_value": port});
    }
    let dist = workspace_root().join("dist");
    rewrite_strings(&mut config, &|s: &str| {
        s.strip_prefix("dist/")
            .map(|file| dist.join(file).display().to_string())
    });
    (config, ports)
}

fn rewrite_strings(value: &mut Value, rewrite: &dyn Fn(&str) -> Option<String>) {
    match value {
        Value::String(s) => {
            if let Some(new) = rewrite(s) {
                *s = new;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_strings(v, rewrite)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite_strings(v, rewrite)),
        _ => {}
    }
}

/// The node of the `payments` workload, in place of the shipped `checkout`.
fn as_payments(mut config: Value) -> Value {
    config["node"]["id"] = json!("sidecar~payments-5c8b.shop");
    config["node"]["cluster"] = json!("payments.shop");
    config["node"]["metadata"]["WORKLOAD_NAME"] = json!("payments-v1");
    config["node"]["metadata"]["LABELS"] = json!({"app": "payments", "team": "payments", "criticality": "critical", "environment": "production"});
    config
}

/// Samples of `name` in a Prometheus exposition: their labels and values.
fn samples(exposition: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key.to_string(), value.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `wanted`, once it reaches `at_least`
/// (waiting up to 10 s for the stats flush).
fn wait_for_sum(envoy: &Envoy, name: &str, wanted: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exposition = envoy.prometheus().unwrap();
        let sum: f64 = samples(&exposition, name)
            .iter()
            .filter(|(labels, _)| {
                wanted
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, value)| value)
            .sum();
        if sum >= at_least || Instant::now() > deadline {
            return sum;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The release of an Envoy binary, e.g. (1, 36) for 1.36.2.
fn envoy_release(envoy: &Path) -> (u32, u32) {
    let output = Command::new(envoy).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split("version:")
        .nth(1)
        .and_then(|build| build.split('/').nth(1))
        .and_then(|release| {
            let mut parts = release.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or_else(|| panic!("no release in {text}"))
}

/// Set in the child process that runs the sidecar pair on the oldest Envoy.
const PAIR_ON_OLDEST: &str = "EASTWEST_STATIC_PAIR_ON_OLDEST";

/// The same pair on the oldest supported Envoy: this test binary runs the test above again,
/// with `EASTWEST_ENVOY` naming the oldest Envoy (the harness starts `EASTWEST_ENVOY`).
#[test]
fn the_sidecar_pair_also_serves_on_the_oldest_envoy() {
    if std::env::var_os(PAIR_ON_OLDEST).is_some() {
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_checkout_and_a_payments_sidecar_serve_a_call_with_labelled_metrics_and_budgeted_retries",
            "--nocapture",
        ])
        .env("EASTWEST_ENVOY", envoy_oldest_binary().unwrap())
        .env(PAIR_ON_OLDEST, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.contains("1 passed"),
        "on Envoy {ENVOY_OLDEST_VERSION}:\n{text}"
    );
}

/// `checkout` runs sidecar-client.yaml (eastwest.wasm on its listeners, retry-budget's own
/// module as an upstream filter), `payments` runs sidecar-client-headers.yaml (eastwest.wasm
/// with retry-budget in `server` mode inbound); the test app stands behind payments. A call from checkout's application through both sidecars arrives with
/// checkout's labels in `baggage`, both sidecars count it with both ends' labels, and a
/// failing call is retried twice under the retry budget, on both sides.
///
/// Envoy 1.36 to 1.38 put the metrics of a Wasm filter running as an upstream filter in the
/// cluster's stats scope (docs/deploy/static-envoy.md, "Envoy versions"): there the `client`
/// mode's counters are `envoy_cluster_wasmcustom_eastwest_retry_budget_*` with an
/// `envoy_cluster_name` label, and the plain names are absent.
#[test]
fn a_checkout_and_a_payments_sidecar_serve_a_call_with_labelled_metrics_and_budgeted_retries() {
    let release = envoy_release(&envoy_binary().unwrap());
    let upstream_metrics_in_cluster_scope = release < (1, 39);
    require_filters();
    let app = TestApp::start().unwrap();
    let unused = free_port();

    let (payments_config, payments_ports) = runnable(
        as_payments(load("sidecar-client-headers.yaml")),
        &BTreeMap::from([
            ("local_app", app.port()),
            ("payments", unused),
            ("inventory", unused),
        ]),
    );
    let payments = Envoy::start(
        "static-sidecar-payments",
        payments_config,
        &EnvoyOptions::default(),
    )
    .unwrap();
    let (checkout_config, checkout_ports) = runnable(
        load("sidecar-client.yaml"),
        &BTreeMap::from([
            ("local_app", unused),
            ("payments", payments_ports["inbound"]),
            ("inventory", unused),
        ]),
    );
    let checkout = Envoy::start(
        "static-sidecar-checkout",
        checkout_config,
        &EnvoyOptions::default(),
    )
    .unwrap();
    let outbound = format!("http://127.0.0.1:{}/pay", checkout_ports["outbound"]);

    let response = http_request("GET", &outbound, &[("host", b"payments")], "").unwrap();
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let echo: Value = serde_json::from_slice(&response.body).unwrap();
    let baggage: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "baggage")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert!(
        baggage.iter().any(|b| b.contains("service.name=checkout")),
        "the application behind payments' sidecar sees checkout's labels: {baggage:?}"
    );
    assert!(
        !response
            .headers
            .iter()
            .any(|(name, _)| name == "x-eastwest-peer"),
        "checkout's sidecar removes x-eastwest-peer before its application sees it"
    );

    let pair = [
        ("source_service", "checkout"),
        ("source_namespace", "shop"),
        ("source_team", "orders"),
        ("destination_service", "payments"),
        ("destination_namespace", "shop"),
        ("destination_team", "payments"),
        ("criticality", "critical"),
        ("response_code", "200"),
    ];
    for (envoy, reporter) in [(&checkout, "source"), (&payments, "destination")] {
        let mut labels = pair.to_vec();
        labels.push(("reporter", reporter));
        let count = wait_for_sum(envoy, "eastwest_requests_total", &labels, 1.0);
        assert_eq!(
            count,
            1.0,
            "reporter={reporter}:\n{}",
            envoy.prometheus().unwrap()
        );
    }

    // A 503 from the application: checkout's route retries it twice (x-envoy-attempt-count
    // 2 and 3 reach payments), the budget admits both on both sides.
    let response = http_request(
        "GET",
        &outbound,
        &[("host", b"payments"), ("x-test-status", b"503")],
        "",
    )
    .unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(app.requests_seen(), 4, "one call, then 1 + 2 retries");
    let retries = wait_for_sum(
        &checkout,
        "eastwest_retry_attempts_total",
        &[("reporter", "source"), ("source_service", "checkout")],
        2.0,
    );
    assert_eq!(retries, 2.0);
    let (client_metric, client_labels) = if upstream_metrics_in_cluster_scope {
        (
            "envoy_cluster_wasmcustom_eastwest_retry_budget_admitted_total",
            vec![
                ("destination_service", "payments"),
                ("mode", "client"),
                ("envoy_cluster_name", "payments"),
            ],
        )
    } else {
        (
            "eastwest_retry_budget_admitted_total",
            vec![("destination_service", "payments"), ("mode", "client")],
        )
    };
    let admitted_by_client = wait_for_sum(&checkout, client_metric, &client_labels, 2.0);
    assert_eq!(
        admitted_by_client,
        2.0,
        "Envoy {release:?}: {client_metric}\n{}",
        checkout.prometheus().unwrap()
    );
    if upstream_metrics_in_cluster_scope {
        let exposition = checkout.prometheus().unwrap();
        assert!(
            samples(&exposition, "eastwest_retry_budget_admitted_total").is_empty(),
            "Envoy {release:?} now exposes the client mode's metrics under their own names: \
             update docs/deploy/static-envoy.md\n{exposition}"
        );
    }
    let admitted_by_server = wait_for_sum(
        &payments,
        "eastwest_retry_budget_admitted_total",
        &[
            ("source_service", "checkout"),
            ("destination_service", "payments"),
            ("mode", "server"),
        ],
        2.0,
    );
    assert_eq!(
        admitted_by_server,
        2.0,
        "{}",
        payments.prometheus().unwrap()
    );
    let failed = wait_for_sum(
        &checkout,
        "eastwest_requests_total",
        &[("reporter", "source"), ("response_code", "503")],
        1.0,
    );
    assert_eq!(
        failed, 1.0,
        "the caller counts the call once, not per attempt"
    );
}

#[test]
fn istio_settings_cover_every_tag_the_histogram_buckets_and_the_metrics() {
    let root = workspace_root();
    let istio =
        std::fs::read_to_string(root.join("envoy-configs/istio/telemetry-stats.yaml")).unwrap();
    // Istio's built-in extractors cover these names with the same encoding.
    let builtin = [
        "reporter",
        "source_namespace",
        "destination_service",
        "destination_namespace",
        "response_code",
        "request_protocol",
    ];
    let listed: Vec<&str> = istio
        .lines()
        .skip_while(|line| line.trim() != "extraStatTags:")
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- "))
        .collect();
    for tag in ALL_TAGS {
        assert!(
            builtin.contains(&tag) != listed.contains(&tag),
            "{tag}: listed {} times between extraStatTags and Istio's built-in tags",
            u8::from(builtin.contains(&tag)) + u8::from(listed.contains(&tag))
        );
    }
    assert!(
        istio.contains("- \".*eastwest_.*\""),
        "proxyStatsMatcher keeps the metrics"
    );
    let buckets = |text: &str| -> String {
        text.split("buckets: ")
            .nth(1)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let fragment =
        std::fs::read_to_string(root.join("envoy-configs/fragments/histogram-buckets.yaml"))
            .unwrap();
    assert!(
        istio.contains(&format!("{{\"wasmcustom\": {}}}", buckets(&fragment))),
        "the Istio bucket annotation matches the fragment"
    );
}
