//! The docker-compose stack (`e2e/compose/`), checked without Docker: `docker-compose config`
//! accepts it, every file it mounts exists, every Envoy configuration it mounts validates with
//! the oldest and the newest supported Envoy (with the files laid out as the containers see
//! them), every sidecar runs `dist/eastwest.wasm` on its listeners with the features the docs
//! describe (and retry-budget's own module where it runs as an upstream filter), Prometheus' configuration passes `promtool check config` and scrapes every sidecar,
//! Grafana's provisioning points at them, and every dashboard query names only metrics and
//! labels that the filters and the recording rules produce.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use eastwest_common::metric_name::ALL_TAGS;
use eastwest_e2e::prometheus::promtool;
use eastwest_e2e::{
    dist_wasm, envoy_binary, envoy_oldest_binary, workspace_root, ENVOY_OLDEST_VERSION,
    ENVOY_VERSION,
};
use serde_json::{json, Value};

#[path = "support/sidecar_config.rs"]
mod sidecar_config;

fn compose_dir() -> PathBuf {
    workspace_root().join("e2e/compose")
}

fn compose_file() -> PathBuf {
    compose_dir().join("docker-compose.yaml")
}

/// `docker-compose` from the Debian package of that name (`cargo xtask test` installs it).
fn docker_compose() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("docker-compose"))
                .find(|candidate| candidate.is_file())
        })
        .expect(
            "docker-compose not found on PATH: these tests check e2e/compose/docker-compose.yaml \
             with it. Install the Debian package `docker-compose` (`apt-get install \
             docker-compose`; `cargo xtask test` does this)",
        )
}

fn run(command: &mut Command) -> (bool, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The compose file as docker-compose understands it (`docker-compose config`: extension
/// fields merged, relative paths made absolute).
fn normalized_compose() -> Value {
    let (ok, text) = run(Command::new(docker_compose())
        .arg("-f")
        .arg(compose_file())
        .arg("config"));
    assert!(ok, "docker-compose config failed:\n{text}");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("services")
}

/// A bind mount: the host path and the path inside the container.
#[derive(Debug, Clone)]
struct Mount {
    source: PathBuf,
    target: String,
}

fn mounts(service: &Value) -> Vec<Mount> {
    let Some(volumes) = service["volumes"].as_array() else {
        return Vec::new();
    };
    volumes
        .iter()
        .map(|volume| match volume {
            // docker-compose 1.x: "source:target[:mode]".
            Value::String(short) => {
                let parts: Vec<&str> = short.split(':').collect();
                assert!(parts.len() >= 2, "not a bind mount: {short}");
                Mount {
                    source: PathBuf::from(parts[0]),
                    target: parts[1].to_string(),
                }
            }
            // Compose v2: {type: bind, source, target, read_only}.
            Value::Object(long) => {
                assert_eq!(long["type"], "bind", "{volume}");
                Mount {
                    source: PathBuf::from(long["source"].as_str().unwrap()),
                    target: long["target"].as_str().unwrap().to_string(),
                }
            }
            other => panic!("unexpected volume {other}"),
        })
        .collect()
}

fn command_args(service: &Value) -> Vec<String> {
    service["command"]
        .as_array()
        .map(|args| {
            args.iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The container's view of its mounts: a temporary directory with every mounted file copied to
/// `<dir>/<target>`.
fn container_root(service_name: &str, service: &Value) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix(&format!("compose-{service_name}-"))
        .tempdir()
        .unwrap();
    for mount in mounts(service) {
        let inside = root.path().join(mount.target.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(&mount.source, &inside).unwrap_or_else(|e| {
            panic!(
                "{service_name}: cannot copy {} to {}: {e}",
                mount.source.display(),
                inside.display()
            )
        });
    }
    root
}

fn image(service: &Value) -> &str {
    service["image"].as_str().unwrap_or_default()
}

fn is_envoy(service: &Value) -> bool {
    image(service).starts_with("envoyproxy/envoy:")
}

/// The path after `flag` in the service's command (`-c /etc/envoy/envoy.yaml`) or of
/// `flag=value`.
fn command_value(service: &Value, flag: &str) -> Option<String> {
    let args = command_args(service);
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

fn mount_for(service_name: &str, service: &Value, target: &str) -> Mount {
    mounts(service)
        .into_iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("{service_name}: nothing is mounted at {target}"))
}

#[test]
fn docker_compose_accepts_the_stack() {
    let (ok, text) = run(Command::new(docker_compose())
        .arg("-f")
        .arg(compose_file())
        .args(["config", "-q"]));
    assert!(ok, "docker-compose config -q:\n{text}");
    // And refuses a broken one, so the check above means something.
    let broken = std::fs::read_to_string(compose_file()).unwrap().replacen(
        "    volumes:\n",
        "    volumez:\n",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker-compose.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, text) = run(Command::new(docker_compose())
        .arg("-f")
        .arg(&path)
        .args(["config", "-q"]));
    assert!(!ok, "docker-compose accepted an unknown key:\n{text}");
}

#[test]
fn every_mounted_file_exists_and_every_compose_file_is_used() {
    let compose = normalized_compose();
    let root = workspace_root();
    let dist = root.join("dist");
    let mut mounted = BTreeSet::new();
    for (name, service) in services(&compose) {
        for mount in mounts(service) {
            assert!(
                mount.source.starts_with(&root),
                "{name} mounts {} from outside the repository",
                mount.source.display()
            );
            if let Ok(wasm) = mount.source.strip_prefix(&dist) {
                // Built by `cargo xtask build`.
                let filter = wasm.to_string_lossy();
                dist_wasm(filter.strip_suffix(".wasm").expect("a .wasm file")).unwrap();
            }
            assert!(
                mount.source.is_file(),
                "{name} mounts {}, which is not a file in the repository",
                mount.source.display()
            );
            mounted.insert(mount.source.clone());
        }
    }
    // Every configuration file of the stack is mounted somewhere: none is dead.
    for dir in ["envoy", "prometheus", "grafana", "app"] {
        let mut pending = vec![compose_dir().join(dir)];
        while let Some(current) = pending.pop() {
            for entry in std::fs::read_dir(&current).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    // Python's bytecode cache, if someone ran the app locally.
                    if !path.ends_with("__pycache__") {
                        pending.push(path);
                    }
                } else {
                    assert!(
                        mounted.contains(&path),
                        "{} is not mounted by any service",
                        path.display()
                    );
                }
            }
        }
    }
}

/// Each sidecar's configuration, laid out as its container sees it (the config at the `-c`
/// path, the filters at their mount targets), validates with both Envoy versions. Validation
/// builds the STRICT_DNS clusters without resolving the compose service names.
#[test]
fn every_mounted_envoy_config_validates_on_the_oldest_and_the_newest_envoy() {
    let compose = normalized_compose();
    let envoys = [
        (ENVOY_VERSION, envoy_binary().unwrap()),
        (ENVOY_OLDEST_VERSION, envoy_oldest_binary().unwrap()),
    ];
    let mut validated = 0;
    for (name, service) in services(&compose) {
        if !is_envoy(service) {
            continue;
        }
        assert_eq!(
            image(service),
            format!("envoyproxy/envoy:v{ENVOY_VERSION}"),
            "{name}: the image matches the Envoy the project tests"
        );
        let config_path = command_value(service, "-c")
            .unwrap_or_else(|| panic!("{name}: no `-c <config>` in the command"));
        let config = mount_for(name, service, &config_path);
        let root = container_root(name, service);
        let mut text = std::fs::read_to_string(&config.source).unwrap();
        let mut targets: Vec<String> = mounts(service).into_iter().map(|m| m.target).collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for target in &targets {
            text = text.replace(
                target.as_str(),
                &root
                    .path()
                    .join(target.trim_start_matches('/'))
                    .display()
                    .to_string(),
            );
        }
        let local_config = root.path().join("validate.yaml");
        std::fs::write(&local_config, &text).unwrap();
        for (version, envoy) in &envoys {
            let (ok, log) = eastwest_e2e::envoy::validate_config(envoy, &local_config, root.path());
            assert!(
                ok,
                "{name}'s {} does not validate on Envoy {version}:\n{log}",
                config.source.display()
            );
        }
        validated += 1;
    }
    assert_eq!(validated, 4, "one sidecar per shop service");
}

/// Every Wasm HTTP filter under `value`: the module file it loads (its path in the container)
/// and its parsed JSON configuration.
fn wasm_filters(value: &Value) -> Vec<(String, Value)> {
    let mut found = Vec::new();
    let mut pending = vec![value];
    while let Some(current) = pending.pop() {
        if let Some(config) = current.pointer("/typed_config/config") {
            if let Some(file) = config
                .pointer("/vm_config/code/local/filename")
                .and_then(Value::as_str)
            {
                let text = config
                    .pointer("/configuration/value")
                    .and_then(Value::as_str)
                    .unwrap_or("{}");
                let parsed =
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}: {text}"));
                found.push((file.to_string(), parsed));
            }
        }
        match current {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.values()),
            _ => {}
        }
    }
    found
}

fn load_yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What docs/deploy/docker-compose.md describes: every sidecar runs dist/eastwest.wasm, one
/// filter per listener (then the router), one VM for both listeners; inbound label-enrich,
/// telemetry and retry-budget in `server` mode; outbound (frontend and checkout) label-enrich
/// and telemetry, plus retry-budget in `client-headers` mode in eastwest.wasm (frontend) or in
/// `client` mode in its own module as an upstream filter of every destination cluster
/// (checkout, with a tight budget toward payments); one expected_dependencies list and
/// `peer_trust: any` everywhere; and the modules mounted into a sidecar are exactly the ones its
/// configuration loads.
#[test]
fn every_sidecar_runs_eastwest_wasm_with_the_documented_features() {
    let compose = normalized_compose();
    let mut dependency_lists = BTreeSet::new();
    let mut budget_modes = BTreeSet::new();
    let mut sidecars = 0;
    for (name, service) in services(&compose) {
        if !is_envoy(service) {
            continue;
        }
        sidecars += 1;
        let config_path = command_value(service, "-c").unwrap();
        let config = load_yaml(&mount_for(name, service, &config_path).source);
        let listeners = config["static_resources"]["listeners"].as_array().unwrap();
        let mut vms = BTreeSet::new();
        for listener in listeners {
            let listener_name = listener["name"].as_str().unwrap();
            let filters =
                &listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
            let names: Vec<&str> = filters
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["eastwest", "envoy.filters.http.router"],
                "{name} {listener_name}"
            );
            vms.insert(filters[0]["typed_config"]["config"]["vm_config"].to_string());
            let wasm = wasm_filters(filters);
            assert_eq!(wasm.len(), 1, "{name} {listener_name}");
            let (file, eastwest) = &wasm[0];
            assert_eq!(
                file, "/etc/envoy/wasm/eastwest.wasm",
                "{name} {listener_name}"
            );
            let features = sidecar_config::feature_configs(eastwest);
            let direction = match listener["traffic_direction"].as_str() {
                Some("INBOUND") => "inbound",
                Some("OUTBOUND") => "outbound",
                other => panic!("{name} {listener_name}: traffic_direction {other:?}"),
            };
            for feature in ["label-enrich", "telemetry"] {
                let config = features
                    .get(feature)
                    .unwrap_or_else(|| panic!("{name} {listener_name}: no {feature}"));
                assert_eq!(
                    config["direction"], direction,
                    "{name} {listener_name} {feature}"
                );
                assert_eq!(
                    config["peer_trust"], "any",
                    "{name} {listener_name} {feature}"
                );
            }
            dependency_lists.insert(features["telemetry"]["expected_dependencies"].to_string());
            let budget = features.get("retry-budget");
            match (direction, name.as_str()) {
                ("inbound", _) => {
                    assert_eq!(
                        budget,
                        Some(&json!({"mode": "server", "peer_trust": "any"})),
                        "{name} {listener_name}"
                    );
                }
                ("outbound", "frontend") => {
                    assert_eq!(
                        budget.map(|b| &b["mode"]),
                        Some(&json!("client-headers")),
                        "{name} {listener_name}"
                    );
                }
                ("outbound", "checkout") => {
                    assert_eq!(budget, None, "{name}: retry-budget runs on the clusters");
                }
                other => panic!("{name}: an unexpected listener {other:?}"),
            }
            if let Some(budget) = budget {
                budget_modes.insert((budget["mode"].as_str().unwrap().to_owned(), "eastwest"));
            }
        }
        assert_eq!(vms.len(), 1, "{name}: both listeners share one VM");
        let mut loaded: BTreeSet<String> = wasm_filters(&config)
            .into_iter()
            .map(|(file, _)| file)
            .collect();
        for cluster in config["static_resources"]["clusters"].as_array().unwrap() {
            let cluster_name = cluster["name"].as_str().unwrap();
            let upstream = wasm_filters(&cluster["typed_extension_protocol_options"]);
            if name == "checkout" && cluster_name != "local_app" {
                assert_eq!(upstream.len(), 1, "{name} cluster {cluster_name}");
                let (file, budget) = &upstream[0];
                assert_eq!(file, "/etc/envoy/wasm/retry-budget.wasm");
                assert_eq!(
                    budget,
                    &json!({"mode": "client", "destinations": {"payments": {"ratio": 0.1, "min_retries_per_second": 1}}}),
                    "{name} cluster {cluster_name}"
                );
                budget_modes.insert(("client".to_owned(), "retry-budget"));
            } else {
                assert!(upstream.is_empty(), "{name} cluster {cluster_name}");
            }
        }
        let mounted: BTreeSet<String> = mounts(service)
            .into_iter()
            .map(|m| m.target)
            .filter(|target| target.ends_with(".wasm"))
            .collect();
        loaded.retain(|file| file.ends_with(".wasm"));
        assert_eq!(
            mounted, loaded,
            "{name}: the modules mounted are the ones its configuration loads"
        );
    }
    assert_eq!(sidecars, 4);
    assert_eq!(
        dependency_lists.len(),
        1,
        "one expected_dependencies list in every sidecar: {dependency_lists:?}"
    );
    assert_eq!(
        budget_modes,
        BTreeSet::from([
            ("client".to_owned(), "retry-budget"),
            ("client-headers".to_owned(), "eastwest"),
            ("server".to_owned(), "eastwest"),
        ]),
        "the dashboard shows every mode"
    );
}

fn envoy_admin_port(config: &Path) -> u64 {
    let value: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    value["admin"]["address"]["socket_address"]["port_value"]
        .as_u64()
        .unwrap()
}

#[test]
fn prometheus_scrapes_every_sidecar_and_loads_the_shipped_rules() {
    let compose = normalized_compose();
    let services = services(&compose);
    let mut sidecars = BTreeSet::new();
    for (name, service) in services {
        if is_envoy(service) {
            let config = mount_for(name, service, &command_value(service, "-c").unwrap());
            sidecars.insert(format!("{name}:{}", envoy_admin_port(&config.source)));
        }
    }
    let (name, prometheus) = services
        .iter()
        .find(|(_, s)| image(s).starts_with("prom/prometheus:"))
        .expect("a prom/prometheus service");
    let config_path = command_value(prometheus, "--config.file").expect("--config.file");
    let root = container_root(name, prometheus);
    let inside = root.path().join(config_path.trim_start_matches('/'));
    let (ok, text) = run(Command::new(promtool().unwrap())
        .args(["check", "config"])
        .arg(&inside));
    assert!(ok, "promtool check config:\n{text}");
    assert!(
        text.contains("eastwest-rules.yaml") && text.contains("rules found"),
        "the shipped rules are loaded: {text}"
    );
    let rules = mount_for(name, prometheus, "/etc/prometheus/eastwest-rules.yaml");
    assert_eq!(
        rules.source,
        workspace_root().join("envoy-configs/prometheus/eastwest-rules.yaml")
    );

    let config: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&inside).unwrap()).unwrap();
    let mut scraped = BTreeSet::new();
    for job in config["scrape_configs"].as_array().unwrap() {
        assert_eq!(job["metrics_path"], "/stats/prometheus", "{job}");
        for group in job["static_configs"].as_array().unwrap() {
            for target in group["targets"].as_array().unwrap() {
                scraped.insert(target.as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(
        scraped, sidecars,
        "Prometheus scrapes exactly the sidecars' admin ports"
    );
}

#[test]
fn grafana_is_provisioned_with_the_stacks_prometheus_and_the_dashboard() {
    let compose = normalized_compose();
    let services = services(&compose);
    let (name, grafana) = services
        .iter()
        .find(|(_, s)| image(s).starts_with("grafana/grafana"))
        .expect("a grafana service");
    let root = container_root(name, grafana);
    let provisioning = root.path().join("etc/grafana/provisioning");
    let yaml = |path: PathBuf| -> Value {
        serde_yaml_ng::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap()
    };

    let datasources = yaml(provisioning.join("datasources/prometheus.yaml"));
    let datasource = &datasources["datasources"][0];
    assert_eq!(datasource["type"], "prometheus");
    let url = datasource["url"].as_str().unwrap();
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split(':').next())
        .unwrap();
    assert!(
        services
            .get(host)
            .is_some_and(|s| image(s).starts_with("prom/prometheus:")),
        "the data source {url} is the stack's Prometheus"
    );
    let uid = datasource["uid"].as_str().unwrap();

    let providers = yaml(provisioning.join("dashboards/eastwest.yaml"));
    let dashboards_dir = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dashboards: Vec<PathBuf> =
        std::fs::read_dir(root.path().join(dashboards_dir.trim_start_matches('/')))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    assert_eq!(dashboards.len(), 1, "{dashboards:?}");
    let home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    assert!(
        root.path().join(home.trim_start_matches('/')).is_file(),
        "the home dashboard {home} is mounted"
    );

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboards[0]).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], uid, "{title}");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], uid, "{title}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboard queries.

fn dashboard() -> Value {
    let path = compose_dir().join("grafana/dashboards/eastwest.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (panel title, query) for every query of the dashboard.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = variable["query"]
                .as_str()
                .or_else(|| variable["query"]["query"].as_str())
                .unwrap();
            queries.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    queries
}

/// The metrics the filters emit (the `## eastwest_...` sections of docs/metrics.md, a
/// histogram's `_bucket`, `_sum` and `_count`) and the series the recording rules record.
fn known_metrics() -> BTreeSet<String> {
    let root = workspace_root();
    let docs = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut metrics = BTreeSet::new();
    for heading in docs.lines().filter_map(|l| l.strip_prefix("## ")) {
        for name in heading.split(", ") {
            let name = name.trim();
            if !name.starts_with("eastwest_") {
                continue;
            }
            if name.ends_with("_total") {
                metrics.insert(name.to_string());
            } else {
                for suffix in ["_bucket", "_sum", "_count"] {
                    metrics.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(
        metrics.contains("eastwest_requests_total")
            && metrics.contains("eastwest_request_duration_milliseconds_bucket")
            && metrics.contains("eastwest_retry_budget_denied_total"),
        "docs/metrics.md no longer lists the metrics under `## <name>` headings: {metrics:?}"
    );
    let rules =
        std::fs::read_to_string(root.join("envoy-configs/prometheus/eastwest-rules.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(record) = line.trim().strip_prefix("- record: ") {
            metrics.insert(record.trim().to_string());
        }
    }
    metrics
}

fn known_labels() -> BTreeSet<String> {
    ALL_TAGS
        .iter()
        .copied()
        .chain(["le", "job", "instance"])
        .map(str::to_owned)
        .collect()
}

/// Grafana's interval variables, replaced as Grafana does before the query reaches Prometheus.
fn expand_grafana_variables(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "15m")
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number,
    Punct(String),
}

fn tokenize(query: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = query.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    value.push(ch);
                }
                i += 1;
            }
            if i >= chars.len() {
                return Err(format!("unterminated string in {query}"));
            }
            i += 1;
            tokens.push(Token::Str(value));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            tokens.push(Token::Number);
        } else if c.is_ascii_alphabetic() || c == '_' {
            // Metric names (recorded series have colons), label names, functions, keywords.
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["!=", "=~", "!~", "==", ">=", "<="].contains(&two.as_str()) {
                tokens.push(Token::Punct(two));
                i += 2;
            } else if "{}()[],=<>+-*/^%@:".contains(c) {
                tokens.push(Token::Punct(c.to_string()));
                i += 1;
            } else {
                return Err(format!("unexpected {c:?} in {query}"));
            }
        }
    }
    Ok(tokens)
}

const KEYWORDS: [&str; 16] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// What a query refers to.
struct QueryNames {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    /// Labels the query creates with `label_replace` or `label_join`.
    created: BTreeSet<String>,
}

/// The metric names and label names a PromQL query refers to. Labels that `label_replace` or
/// `label_join` create (their second argument) count as known within the query; the labels
/// those functions read are reported.
fn names_in_query(query: &str) -> Result<QueryNames, String> {
    let tokens = tokenize(&expand_grafana_variables(query))?;
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut created = BTreeSet::new();
    let punct = |i: usize, p: &str| matches!(tokens.get(i), Some(Token::Punct(q)) if q == p);
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word)
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                    && punct(i + 1, "(") =>
            {
                let mut j = i + 2;
                while !punct(j, ")") {
                    match tokens.get(j) {
                        Some(Token::Ident(label)) => {
                            labels.insert(label.clone());
                        }
                        Some(Token::Punct(p)) if p == "," => {}
                        other => {
                            return Err(format!("unexpected {other:?} in a label list of {query}"))
                        }
                    }
                    j += 1;
                }
                i = j;
            }
            Token::Ident(function)
                if punct(i + 1, "(")
                    && ["label_replace", "label_join"].contains(&function.as_str()) =>
            {
                // Arguments at depth 1: (v, "dst", "replacement"|"separator", "src"...).
                let mut depth = 0;
                let mut argument = 0;
                let mut j = i + 1;
                loop {
                    match tokens.get(j) {
                        Some(Token::Punct(p)) if p == "(" || p == "{" || p == "[" => depth += 1,
                        Some(Token::Punct(p)) if p == ")" || p == "}" || p == "]" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Some(Token::Punct(p)) if p == "," && depth == 1 => argument += 1,
                        Some(Token::Str(value)) if depth == 1 => match argument {
                            1 => {
                                created.insert(value.clone());
                            }
                            2 => {}
                            4 if function == "label_replace" => {}
                            _ => {
                                labels.insert(value.clone());
                            }
                        },
                        None => return Err(format!("unbalanced {function}( in {query}")),
                        _ => {}
                    }
                    j += 1;
                }
            }
            // A function or an aggregation (`sum(`, `sum by (...) (`).
            Token::Ident(_)
                if punct(i + 1, "(")
                    || matches!(tokens.get(i + 1), Some(Token::Ident(w)) if w == "by" || w == "without") =>
                {}
            Token::Ident(word)
                if punct(i + 1, "=")
                    || punct(i + 1, "!=")
                    || punct(i + 1, "=~")
                    || punct(i + 1, "!~") =>
            {
                labels.insert(word.clone());
            }
            Token::Ident(word) if !KEYWORDS.contains(&word.as_str()) => {
                metrics.insert(word.clone());
            }
            _ => {}
        }
        i += 1;
    }
    Ok(QueryNames {
        metrics,
        labels,
        created,
    })
}

/// What is wrong with a query: unknown metrics and labels, or a parse error.
fn query_problems(
    query: &str,
    metrics: &BTreeSet<String>,
    labels: &BTreeSet<String>,
) -> Vec<String> {
    let QueryNames {
        metrics: used_metrics,
        labels: used_labels,
        created,
    } = match names_in_query(query) {
        Ok(names) => names,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if used_metrics.is_empty() {
        problems.push("names no metric".to_string());
    }
    for metric in used_metrics.difference(metrics) {
        problems.push(format!("unknown metric {metric}"));
    }
    for label in &used_labels {
        if !labels.contains(label) && !created.contains(label) {
            problems.push(format!("unknown label {label}"));
        }
    }
    problems
}

/// promtool parses each query (as the expression of a recording rule).
fn promtool_parses(queries: &[String]) -> (bool, String) {
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (index, query) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "  - record: dashboard:query{index}\n    expr: {}\n",
            serde_json::to_string(&expand_grafana_variables(query)).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, rules).unwrap();
    run(Command::new(promtool().unwrap())
        .args(["check", "rules"])
        .arg(&path))
}

#[test]
fn every_dashboard_query_parses_and_names_only_emitted_metrics_and_labels() {
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let (metrics, labels) = (known_metrics(), known_labels());
    for (title, query) in &queries {
        let problems = query_problems(query, &metrics, &labels);
        assert!(problems.is_empty(), "{title}: {problems:?} in\n{query}");
    }
    let exprs: Vec<String> = queries.iter().map(|(_, q)| q.clone()).collect();
    let (ok, text) = promtool_parses(&exprs);
    assert!(ok, "promtool refuses a dashboard query:\n{text}");

    // What the dashboard promises to show.
    let all: String = exprs.join("\n");
    for needle in [
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
        "eastwest_request_duration_milliseconds_bucket",
        "response_code=~\"5..\"",
        "eastwest_retry_attempts_total",
        "eastwest_upstream_failures_total",
        "eastwest_retry_budget_denied_total",
        "eastwest_unexpected_dependency_total",
    ] {
        assert!(all.contains(needle), "no dashboard query uses {needle}");
    }
    let types: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"nodeGraph"), "a service map: {types:?}");
}

/// The check above catches a misspelled metric or label anywhere a query can name one, and
/// promtool catches what does not parse.
#[test]
fn a_misspelled_metric_or_label_in_a_dashboard_query_is_caught() {
    let (metrics, labels) = (known_metrics(), known_labels());
    let queries: Vec<String> = dashboard_queries(&dashboard())
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    let mutations = [
        (
            "eastwest_requests_total",
            "eastwest_request_total",
            "unknown metric eastwest_request_total",
        ),
        (
            "eastwest_request_duration_milliseconds_bucket",
            "eastwest_request_duration_ms_bucket",
            "unknown metric eastwest_request_duration_ms_bucket",
        ),
        (
            "eastwest_pair:requests:rate5m",
            "eastwest_pair:request:rate5m",
            "unknown metric eastwest_pair:request:rate5m",
        ),
        ("reporter=", "reportr=", "unknown label reportr"),
        (
            "response_code=~",
            "status_code=~",
            "unknown label status_code",
        ),
        (
            "by (source_service",
            "by (source_svc",
            "unknown label source_svc",
        ),
        ("(le, ", "(bucket, ", "unknown label bucket"),
        (
            "\"source_service\", \"destination_service\"",
            "\"source_service\", \"dest_service\"",
            "unknown label dest_service",
        ),
    ];
    for (from, to, expected) in mutations {
        let originals: Vec<&String> = queries.iter().filter(|q| q.contains(from)).collect();
        assert!(!originals.is_empty(), "no dashboard query contains {from}");
        for original in originals {
            let mutated = original.replacen(from, to, 1);
            let problems = query_problems(&mutated, &metrics, &labels);
            assert!(
                problems.iter().any(|p| p == expected),
                "{from} -> {to} not caught ({problems:?}) in\n{mutated}"
            );
        }
    }
    let (ok, _) =
        promtool_parses(
            &["sum by (source_service) (rate(eastwest_requests_total[1m])".to_string()],
        );
    assert!(!ok, "promtool refuses an unbalanced query");
    let (ok, text) = promtool_parses(&[
        "histogram_quantil(0.99, eastwest_request_duration_milliseconds_bucket)".to_string(),
    ]);
    assert!(!ok, "promtool refuses an unknown function: {text}");
}

/// The demo's application parses (it runs on the python image, not in these tests).
#[test]
fn the_demo_application_compiles() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = run(Command::new("python3")
        .args(["-c", "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)"])
        .arg(compose_dir().join("app/shop.py"))
        .arg(dir.path().join("shop.pyc")));
    assert!(ok, "{text}");
}
