//! The Istio manifests in envoy-configs/istio/: every document of every file is recognised and
//! checked, so a typo cannot wait for a cluster to find it.
//!
//! - WasmPlugin: validated against the CRD's openAPIV3Schema (e2e/testdata/istio/, a copy of
//!   Istio's generated CRD) as the Kubernetes API server validates it with strict field
//!   validation (kubectl's default), plus the checks the API server does outside the schema
//!   (apiVersion, kind, metadata). The OpenAPI v3 schema is turned into JSON Schema: unknown
//!   fields are refused wherever the schema does not preserve them, `nullable` becomes a `null`
//!   type, `format: int32` a range. The Kubernetes extensions are checked here by hand: each
//!   CEL rule (`x-kubernetes-validations`) of this CRD has a Rust equivalent, and a rule this
//!   test does not know fails the test; `x-kubernetes-list-type: map` lists must not repeat
//!   their keys. Then each plugin's `pluginConfig`, rendered to JSON as Istio renders it, is
//!   given to the filter's own `on_configure` in the harness: a key or value the filter refuses
//!   fails the test. And the url, order, direction and fail strategy follow the project's
//!   contracts (`cargo xtask package`'s image names, label-enrich first).
//! - EnvoyFilter (retry-budget in `client` mode): its cluster patch, merged into a cluster the
//!   way Istio merges it, is loaded by real Envoy (`--mode validate`, which builds the upstream
//!   filter chain and runs the module's `on_configure`).
//! - IstioOperator, the Helm-values snippet and the example Deployment: the same mesh settings
//!   everywhere, covering what the filters need.
//!
//! A mutation test shows the validator refuses broken manifests, so it cannot pass everything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use eastwest_e2e::{dist_wasm, envoy_binary, envoy_oldest_binary, workspace_root};
use eastwest_harness::{Harness, Options};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};

const CRD: &str = include_str!("../testdata/istio/wasmplugin-crd.yaml");
/// The filters, in the order they must run on each side of a call.
const FILTERS: [&str; 3] = ["label-enrich", "telemetry", "retry-budget"];

/// One YAML document of a file in envoy-configs/istio/.
struct Doc {
    place: String,
    value: Value,
}

fn manifests() -> Vec<Doc> {
    let dir = workspace_root().join("envoy-configs/istio");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{name} document {}: {e}", index + 1));
            if value.is_null() {
                continue;
            }
            let value = serde_json::to_value(value)
                .unwrap_or_else(|e| panic!("{name} document {}: {e}", index + 1));
            docs.push(Doc {
                place: format!("{name} (document {})", index + 1),
                value,
            });
        }
    }
    docs
}

fn yaml(text: &str) -> Value {
    serde_json::to_value(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// The CRD as a validator

struct CrdValidator {
    schema: jsonschema::Validator,
    /// The CRD's openAPIV3Schema as written, for the Kubernetes extensions.
    openapi: Value,
}

/// A CEL rule of the CRD and its Rust equivalent. Values of the wrong type pass here: the
/// schema reports them.
type CelCheck = fn(&Value) -> bool;

fn cel_rule(rule: &str) -> Option<CelCheck> {
    let normalized = rule.split_whitespace().collect::<Vec<_>>().join(" ");
    let check: CelCheck = match normalized.as_str() {
        r#"!self.contains("*")"# => |v| v.as_str().is_none_or(|s| !s.contains('*')),
        r#"self.all(key, !key.contains("*"))"# => {
            |v| v.as_object().is_none_or(|m| m.keys().all(|k| !k.contains('*')))
        }
        "self.all(key, key.size() != 0)" => {
            |v| v.as_object().is_none_or(|m| m.keys().all(|k| !k.is_empty()))
        }
        "self.size() == 0" => |v| v.as_str().is_none_or(str::is_empty),
        r#"(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)"# => |v| {
            v.get("valueFrom").and_then(Value::as_str).unwrap_or("") != "HOST"
                || v.get("value").is_none()
        },
        "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            |v| {
                ["selector", "targetRef", "targetRefs"]
                    .iter()
                    .filter(|key| v.get(**key).is_some())
                    .count()
                    <= 1
            }
        }
        r#"isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) && url("http://" + self).getScheme() in ["", "http", "https", "oci", "file"])"# => {
            |v| v.as_str().is_none_or(url_scheme_allowed)
        }
        _ => return None,
    };
    Some(check)
}

/// The url rule: a string that parses as an absolute URL must have one of the schemes; one that
/// does not is read as `http://<url>`, whose scheme is http. Like Go's url parser, anything
/// before the first `:` that is a valid scheme counts as the scheme (so `host:5000/x`, without
/// `oci://`, is refused, as Istio's rule refuses it).
fn url_scheme_allowed(url: &str) -> bool {
    let scheme = url
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .filter(|scheme| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
    match scheme {
        Some(scheme) => {
            ["http", "https", "oci", "file"].contains(&scheme.to_ascii_lowercase().as_str())
        }
        None => true,
    }
}

/// OpenAPI v3 (structural schema) to JSON Schema draft 7, as strict field validation reads it.
fn to_json_schema(node: &Value) -> Value {
    let Value::Object(map) = node else {
        return node.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        match key.as_str() {
            "properties" => {
                let properties = value
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(name, schema)| (name.clone(), to_json_schema(schema)))
                    .collect();
                out.insert(key.clone(), Value::Object(properties));
            }
            "items" | "additionalProperties" if value.is_object() => {
                out.insert(key.clone(), to_json_schema(value));
            }
            // Checked by `kubernetes_extensions`; `nullable` is folded into `type` below.
            "nullable" => {}
            key if key.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if map.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(Value::String(kind)) = out.get("type").cloned() {
            out.insert("type".into(), json!([kind, "null"]));
        }
    }
    if map.get("format") == Some(&json!("int32")) {
        out.entry("minimum").or_insert(json!(i32::MIN));
        out.entry("maximum").or_insert(json!(i32::MAX));
    }
    let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.get("type") == Some(&json!("object"))
        && !preserves
        && !map.contains_key("additionalProperties")
    {
        // A structural schema prunes unknown fields; strict field validation refuses them.
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

/// What the API server checks before the CRD schema: the object's type and ObjectMeta.
fn object_meta_schema() -> Value {
    let dns_subdomain = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    let dns_label = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
    json!({
        "type": "object",
        "required": ["name"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "maxLength": 253, "pattern": dns_subdomain},
            "namespace": {"type": "string", "maxLength": 63, "pattern": dns_label},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
}

fn crd_validator() -> CrdValidator {
    let crd = yaml(CRD);
    let version = &crd["spec"]["versions"][0];
    let api_version = format!(
        "{}/{}",
        crd["spec"]["group"].as_str().unwrap(),
        version["name"].as_str().unwrap()
    );
    assert_eq!(api_version, "extensions.istio.io/v1alpha1");
    let openapi = version["schema"]["openAPIV3Schema"].clone();
    assert!(openapi.is_object(), "no openAPIV3Schema in the CRD");
    let unknown = unknown_cel_rules(&openapi);
    assert!(
        unknown.is_empty(),
        "the CRD has CEL rules this test does not implement: {unknown:?}"
    );
    let mut schema = to_json_schema(&openapi);
    let properties = schema["properties"].as_object_mut().unwrap();
    properties.insert("apiVersion".into(), json!({"const": api_version}));
    properties.insert(
        "kind".into(),
        json!({"const": crd["spec"]["names"]["kind"]}),
    );
    properties.insert("metadata".into(), object_meta_schema());
    schema["required"] = json!(["apiVersion", "kind", "metadata", "spec"]);
    let schema = jsonschema::draft7::new(&schema).expect("the converted schema compiles");
    CrdValidator { schema, openapi }
}

fn unknown_cel_rules(schema: &Value) -> Vec<String> {
    let mut unknown = Vec::new();
    match schema {
        Value::Object(map) => {
            for rule in map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let text = rule["rule"].as_str().unwrap_or_default();
                if cel_rule(text).is_none() {
                    unknown.push(text.to_owned());
                }
            }
            for value in map.values() {
                unknown.extend(unknown_cel_rules(value));
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|v| unknown.extend(unknown_cel_rules(v))),
        _ => {}
    }
    unknown
}

/// CEL rules and list-map keys, walked along the object.
fn kubernetes_extensions(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or_default();
        let check = cel_rule(text).expect("unknown rules are refused when loading the CRD");
        if !check(value) {
            errors.push(format!(
                "{path}: {}",
                rule["message"].as_str().unwrap_or(text)
            ));
        }
    }
    if schema.get("x-kubernetes-list-type") == Some(&json!("map")) {
        let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
            .as_array()
            .map(|keys| keys.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        for item in value.as_array().into_iter().flatten() {
            let key: Vec<String> = keys.iter().map(|k| item[*k].to_string()).collect();
            if !seen.insert(key.clone()) {
                errors.push(format!("{path}: duplicate entries for key {key:?}"));
            }
        }
    }
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                let child = format!("{path}/{name}");
                if let Some(field_schema) = schema.get("properties").and_then(|p| p.get(name)) {
                    kubernetes_extensions(field_schema, field, &child, errors);
                } else if let Some(extra) =
                    schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    kubernetes_extensions(extra, field, &child, errors);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    kubernetes_extensions(item_schema, item, &format!("{path}/{index}"), errors);
                }
            }
        }
        _ => {}
    }
}

impl CrdValidator {
    /// Every reason the API server would refuse the object (empty: accepted).
    fn errors(&self, object: &Value) -> Vec<String> {
        let mut errors: Vec<String> = self
            .schema
            .iter_errors(object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        kubernetes_extensions(&self.openapi, object, "", &mut errors);
        errors
    }
}

// ---------------------------------------------------------------------------------------
// The filters

/// The filter a WasmPlugin loads, from its url `oci://<registry>/<filter>:<tag>`.
fn filter_of(plugin: &Value) -> String {
    let url = plugin["spec"]["url"].as_str().unwrap_or_default();
    let repository = url.rsplit('/').next().unwrap_or_default();
    repository.split(':').next().unwrap_or_default().to_owned()
}

fn mode_of(plugin: &Value) -> &str {
    plugin["spec"]["match"][0]["mode"]
        .as_str()
        .unwrap_or("CLIENT_AND_SERVER")
}

/// `pluginConfig` as the filter receives it: Istio stores it as a google.protobuf.Struct,
/// whose numbers are doubles, and hands the plugin its JSON text.
fn as_struct_json(value: &Value) -> Value {
    match value {
        Value::Number(n) => {
            let f = n.as_f64().unwrap();
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                json!(f as i64)
            } else {
                json!(f)
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(as_struct_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), as_struct_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// An Istio sidecar's node as the filters read it, on the given side.
fn sidecar_properties(outbound: bool) -> Value {
    json!({"xds": {
        "listener_direction": if outbound { 2 } else { 1 },
        "node": {
            "id": "sidecar~10.8.0.12~checkout-7d9f-x2v.shop~shop.svc.cluster.local",
            "cluster": "checkout.shop",
            "metadata": {
                "NAMESPACE": "shop",
                "WORKLOAD_NAME": "checkout",
                "LABELS": {
                    "app": "checkout",
                    "service.istio.io/canonical-name": "checkout",
                    "team": "orders",
                    "criticality": "high",
                    "environment": "production",
                    "eastwest": "enabled",
                },
            },
            "locality": {"region": "eu-west-1", "zone": "eu-west-1a"},
        },
    }})
}

/// Loads the filter with this configuration and runs its `on_configure`.
fn configure(filter: &str, config: &Value, outbound: bool) -> Result<(), String> {
    let wasm = std::fs::read(dist_wasm(filter).unwrap()).unwrap();
    Harness::new(
        &wasm,
        Options {
            config: config.to_string().into_bytes(),
            properties: sidecar_properties(outbound),
            workers: 1,
            ..Options::default()
        },
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

/// The registry prefix `cargo xtask package` prints and the manifests use.
fn package_registry() -> String {
    let source = std::fs::read_to_string(workspace_root().join("xtask/src/package.rs")).unwrap();
    let line = source
        .lines()
        .find(|line| line.contains("const DEFAULT_REGISTRY: &str = "))
        .expect("xtask/src/package.rs defines DEFAULT_REGISTRY");
    line.split('"').nth(1).unwrap().to_owned()
}

fn phase_rank(plugin: &Value) -> u8 {
    // Istio's sidecar chain: AUTHN plugins, authn, AUTHZ plugins, RBAC, STATS plugins, then
    // the plugins without a phase.
    match plugin["spec"]["phase"]
        .as_str()
        .unwrap_or("UNSPECIFIED_PHASE")
    {
        "AUTHN" => 0,
        "AUTHZ" => 1,
        "STATS" => 2,
        _ => 3,
    }
}

fn kind_of(doc: &Doc) -> (&str, &str) {
    (
        doc.value["apiVersion"].as_str().unwrap_or(""),
        doc.value["kind"].as_str().unwrap_or(""),
    )
}

fn wasm_plugins(docs: &[Doc]) -> Vec<&Doc> {
    docs.iter()
        .filter(|doc| kind_of(doc) == ("extensions.istio.io/v1alpha1", "WasmPlugin"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_document_is_a_kind_this_test_checks() {
    let docs = manifests();
    for doc in &docs {
        match kind_of(doc) {
            ("extensions.istio.io/v1alpha1", "WasmPlugin")
            | ("networking.istio.io/v1alpha3", "EnvoyFilter")
            | ("install.istio.io/v1alpha1", "IstioOperator")
            | ("apps/v1", "Deployment") => {}
            ("", "") => {
                let keys: Vec<&String> = doc.value.as_object().unwrap().keys().collect();
                assert_eq!(
                    keys,
                    ["meshConfig"],
                    "{}: a document without apiVersion/kind must be a Helm-values snippet \
                     with only `meshConfig`",
                    doc.place
                );
            }
            other => panic!(
                "{}: {other:?} is not checked by e2e/tests/istio_manifests.rs; add a check",
                doc.place
            ),
        }
    }
}

#[test]
fn wasm_plugins_are_valid_against_the_crd() {
    let validator = crd_validator();
    let docs = manifests();
    let plugins = wasm_plugins(&docs);
    assert_eq!(
        plugins.len(),
        6,
        "two WasmPlugins (CLIENT, SERVER) per filter"
    );
    for doc in plugins {
        let errors = validator.errors(&doc.value);
        assert!(
            errors.is_empty(),
            "{}: the API server would refuse it:\n{}",
            doc.place,
            errors.join("\n")
        );
    }
}

#[test]
fn each_plugin_config_is_accepted_by_its_filter() {
    let docs = manifests();
    for doc in wasm_plugins(&docs) {
        let filter = filter_of(&doc.value);
        assert!(
            FILTERS.contains(&filter.as_str()),
            "{}: unknown filter {filter:?}",
            doc.place
        );
        let config = as_struct_json(&doc.value["spec"]["pluginConfig"]);
        let outbound = mode_of(&doc.value) == "CLIENT";
        configure(&filter, &config, outbound)
            .unwrap_or_else(|e| panic!("{}: {filter} refuses its pluginConfig: {e}", doc.place));
    }
}

#[test]
fn a_typo_in_a_plugin_config_is_refused_by_the_filter() {
    let docs = manifests();
    for doc in wasm_plugins(&docs) {
        let filter = filter_of(&doc.value);
        let outbound = mode_of(&doc.value) == "CLIENT";
        let config = as_struct_json(&doc.value["spec"]["pluginConfig"]);
        let mut unknown_key = config.clone();
        unknown_key["peer_trsut"] = json!("mtls");
        let error = configure(&filter, &unknown_key, outbound).unwrap_err();
        assert!(
            error.contains("invalid configuration"),
            "{}: {error}",
            doc.place
        );
        let mut bad_value = config.clone();
        bad_value["peer_trust"] = json!("mTLS");
        let error = configure(&filter, &bad_value, outbound).unwrap_err();
        assert!(error.contains("peer_trust"), "{}: {error}", doc.place);
        let (field, wrong) = if filter == "retry-budget" {
            ("mode", "client_headers")
        } else {
            ("direction", "out")
        };
        let mut bad_enum = config.clone();
        bad_enum[field] = json!(wrong);
        let error = configure(&filter, &bad_enum, outbound).unwrap_err();
        assert!(error.contains(field), "{}: {error}", doc.place);
    }
}

#[test]
fn plugins_use_the_packaged_images_the_right_side_and_fail_open() {
    let registry = package_registry();
    let version = env!("CARGO_PKG_VERSION");
    let docs = manifests();
    let mut seen = BTreeSet::new();
    for doc in wasm_plugins(&docs) {
        let spec = &doc.value["spec"];
        let filter = filter_of(&doc.value);
        let mode = mode_of(&doc.value);
        assert_eq!(
            spec["url"],
            format!("oci://{registry}/{filter}:{version}"),
            "{}: the url `cargo xtask package` prints for {filter}",
            doc.place
        );
        assert_eq!(spec["pluginName"], filter.as_str(), "{}", doc.place);
        assert_eq!(spec["failStrategy"], "FAIL_OPEN", "{}", doc.place);
        assert_eq!(spec["type"], "HTTP", "{}", doc.place);
        assert!(
            spec["imagePullPolicy"].is_string(),
            "{}: imagePullPolicy",
            doc.place
        );
        assert!(
            spec["selector"]["matchLabels"].is_object(),
            "{}: selector",
            doc.place
        );
        assert_eq!(
            spec["match"].as_array().map(Vec::len),
            Some(1),
            "{}: one side",
            doc.place
        );
        let config = &spec["pluginConfig"];
        let expected = match (filter.as_str(), mode) {
            ("retry-budget", "CLIENT") => ("mode", "client-headers"),
            ("retry-budget", "SERVER") => ("mode", "server"),
            (_, "CLIENT") => ("direction", "outbound"),
            (_, "SERVER") => ("direction", "inbound"),
            (_, other) => panic!("{}: match mode {other}", doc.place),
        };
        assert_eq!(config[expected.0], expected.1, "{}: {mode} side", doc.place);
        assert!(
            seen.insert((filter, mode.to_owned())),
            "{}: a second {mode} plugin",
            doc.place
        );
    }
    for filter in FILTERS {
        for mode in ["CLIENT", "SERVER"] {
            assert!(
                seen.contains(&(filter.to_owned(), mode.to_owned())),
                "no {mode} {filter}"
            );
        }
    }
}

#[test]
fn label_enrich_runs_first_then_telemetry_then_retry_budget() {
    let docs = manifests();
    for mode in ["CLIENT", "SERVER"] {
        let mut plugins: Vec<&Value> = wasm_plugins(&docs)
            .into_iter()
            .map(|doc| &doc.value)
            .filter(|plugin| mode_of(plugin) == mode)
            .collect();
        // Istio's order: by phase, then by priority, higher first (ties by name: avoided).
        plugins.sort_by_key(|plugin| {
            (
                phase_rank(plugin),
                -plugin["spec"]["priority"].as_i64().unwrap_or(0),
            )
        });
        let order: Vec<String> = plugins.iter().map(|plugin| filter_of(plugin)).collect();
        assert_eq!(order, FILTERS, "{mode} side");
        let keys: BTreeSet<_> = plugins
            .iter()
            .map(|p| (phase_rank(p), p["spec"]["priority"].as_i64().unwrap_or(0)))
            .collect();
        assert_eq!(
            keys.len(),
            plugins.len(),
            "{mode}: no two plugins tie on phase and priority"
        );
    }
}

/// The validator is not a rubber stamp: each broken variant of a shipped plugin is refused,
/// for the reason the API server would give.
#[test]
fn the_validator_refuses_broken_manifests() {
    let validator = crd_validator();
    let docs = manifests();
    let original = wasm_plugins(&docs)[0].value.clone();
    assert_eq!(validator.errors(&original), Vec::<String>::new());

    type Mutation = (&'static str, fn(&mut Value), &'static str);
    let mutations: [Mutation; 16] = [
        (
            "a failStrategy that does not exist",
            |p| p["spec"]["failStrategy"] = json!("FAIL_SOMETIMES"),
            "/spec/failStrategy",
        ),
        (
            "a phase that does not exist",
            |p| p["spec"]["phase"] = json!("EARLY"),
            "/spec/phase",
        ),
        (
            "an unknown field",
            |p| p["spec"]["priorty"] = json!(10),
            "priorty",
        ),
        (
            "an unknown field in match",
            |p| p["spec"]["match"][0]["side"] = json!("CLIENT"),
            "side",
        ),
        (
            "a match mode that does not exist",
            |p| p["spec"]["match"][0]["mode"] = json!("BOTH"),
            "/spec/match/0/mode",
        ),
        (
            "a priority that is a string",
            |p| p["spec"]["priority"] = json!("10"),
            "/spec/priority",
        ),
        (
            "a priority beyond int32",
            |p| p["spec"]["priority"] = json!(2_147_483_648_i64),
            "/spec/priority",
        ),
        (
            "no url",
            |p| {
                p["spec"].as_object_mut().unwrap().remove("url");
            },
            "url",
        ),
        (
            "an ftp url",
            |p| p["spec"]["url"] = json!("ftp://registry.example.com/x.wasm"),
            "url must have schema",
        ),
        (
            "a sha256 that is not hex",
            |p| p["spec"]["sha256"] = json!("sha256:abc"),
            "/spec/sha256",
        ),
        (
            "selector and targetRefs together",
            |p| p["spec"]["targetRefs"] = json!([{"kind": "Service", "name": "checkout"}]),
            "only one of targetRefs or selector",
        ),
        (
            "a wildcard label value",
            |p| p["spec"]["selector"]["matchLabels"]["app"] = json!("*"),
            "wildcard not allowed",
        ),
        (
            "a port listed twice",
            |p| p["spec"]["match"][0]["ports"] = json!([{"number": 8080}, {"number": 8080}]),
            "duplicate entries",
        ),
        (
            "a name Kubernetes refuses",
            |p| p["metadata"]["name"] = json!("Eastwest_Plugin"),
            "/metadata/name",
        ),
        (
            "the wrong kind",
            |p| p["kind"] = json!("WasmPlugins"),
            "/kind",
        ),
        (
            "a misspelled metadata field",
            |p| p["metadata"]["namespcae"] = json!("istio-system"),
            "namespcae",
        ),
    ];
    for (what, mutate, expected) in mutations {
        let mut broken = original.clone();
        mutate(&mut broken);
        let errors = validator.errors(&broken);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{what}: expected an error mentioning {expected:?}, got {errors:?}"
        );
    }
    // And what the schema allows stays allowed: a null priority (nullable), any pluginConfig
    // (preserved unknown fields), a digest-pinned url and sha256.
    let mut fine = original.clone();
    fine["spec"]["priority"] = Value::Null;
    fine["spec"]["pluginConfig"]["anything"] = json!({"nested": [1, 2]});
    fine["spec"]["sha256"] = json!("0".repeat(64));
    fine["spec"]["url"] = json!(format!(
        "oci://registry.example.com/eastwest/x@sha256:{}",
        "0".repeat(64)
    ));
    assert_eq!(validator.errors(&fine), Vec::<String>::new());
}

#[test]
fn mesh_settings_agree_everywhere_and_cover_the_label_keys() {
    let docs = manifests();
    let find =
        |what: &dyn Fn(&Doc) -> bool| -> Vec<&Doc> { docs.iter().filter(|d| what(d)).collect() };
    let operators = find(&|d| kind_of(d).1 == "IstioOperator");
    let values = find(&|d| kind_of(d) == ("", ""));
    let deployments = find(&|d| kind_of(d).1 == "Deployment");
    assert_eq!(
        (operators.len(), values.len(), deployments.len()),
        (1, 1, 1)
    );
    let mesh = &operators[0].value["spec"]["meshConfig"];
    assert_eq!(
        mesh, &values[0].value["meshConfig"],
        "the IstioOperator's meshConfig and telemetry-stats.yaml's differ"
    );
    let annotation = deployments[0].value["spec"]["template"]["metadata"]["annotations"]
        ["proxy.istio.io/config"]
        .as_str()
        .unwrap();
    assert_eq!(
        &yaml(annotation),
        &mesh["defaultConfig"],
        "the pod annotation differs"
    );
    assert_eq!(
        mesh["defaultConfig"]["proxyStatsMatcher"]["inclusionRegexps"],
        json!([".*eastwest_.*"])
    );

    // Metadata exchange carries the pod labels label-enrich reads.
    let env = &operators[0].value["spec"]["values"]["pilot"]["env"];
    let listed: BTreeSet<&str> = env["PILOT_MX_ADDITIONAL_LABELS"]
        .as_str()
        .expect("PILOT_MX_ADDITIONAL_LABELS")
        .split(',')
        .map(str::trim)
        .collect();
    for doc in wasm_plugins(&docs) {
        for (_, pod_label) in doc.value["spec"]["pluginConfig"]["label_keys"]
            .as_object()
            .into_iter()
            .flatten()
        {
            assert!(
                listed.contains(pod_label.as_str().unwrap()),
                "{}: pod label {pod_label} is not in PILOT_MX_ADDITIONAL_LABELS",
                doc.place
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The EnvoyFilter in real Envoy

fn envoy_filters(docs: &[Doc]) -> Vec<&Doc> {
    docs.iter()
        .filter(|doc| kind_of(doc) == ("networking.istio.io/v1alpha3", "EnvoyFilter"))
        .collect()
}

/// Istio's MERGE of a Cluster patch: messages merge field by field, lists append, and a map
/// entry (typed_extension_protocol_options) is replaced whole (istio pkg/proto/merge).
fn istio_merge(dst: &mut Value, src: &Value, in_map: bool) {
    match (dst, src) {
        (Value::Object(dst), Value::Object(src)) => {
            for (key, value) in src {
                if in_map {
                    dst.insert(key.clone(), value.clone());
                } else if let Some(existing) = dst.get_mut(key) {
                    istio_merge(existing, value, key == "typed_extension_protocol_options");
                } else {
                    dst.insert(key.clone(), value.clone());
                }
            }
        }
        (Value::Array(dst), Value::Array(src)) => dst.extend(src.iter().cloned()),
        (dst, src) => *dst = src.clone(),
    }
}

const CLUSTER_NAME: &str = "outbound|8080||payments.shop.svc.cluster.local";

/// An outbound cluster roughly as Istio generates it, with the patch merged in, behind an
/// outbound listener whose virtual host sets include_request_attempt_count and Istio's default
/// retry policy. The module path is replaced by the built one.
fn patched_bootstrap(patch_value: &Value) -> Value {
    let mut cluster = json!({
        "name": CLUSTER_NAME,
        "type": "STATIC",
        "connect_timeout": "10s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "3600s"},
                "explicit_http_config": {"http_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": CLUSTER_NAME,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18080}}}}]}],
        },
    });
    istio_merge(&mut cluster, patch_value, false);
    let options = &mut cluster["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(
        options.get("explicit_http_config").is_none(),
        "the merge replaced Istio's protocol options, as Istio's does"
    );
    let code = &mut options["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"];
    let filename = code["local"]["filename"]
        .as_str()
        .expect("a local module path")
        .to_owned();
    assert!(filename.ends_with("/retry-budget.wasm"), "{filename}");
    code["local"]["filename"] = json!(dist_wasm("retry-budget").unwrap().display().to_string());
    json!({
        "node": {
            "id": "sidecar~10.8.0.12~checkout-7d9f-x2v.shop~shop.svc.cluster.local",
            "cluster": "checkout.shop",
            "metadata": {"NAMESPACE": "shop", "WORKLOAD_NAME": "checkout", "LABELS": {"app": "checkout"}},
        },
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_8080",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18081}},
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "route_config": {"name": "8080", "virtual_hosts": [{
                            "name": "payments.shop.svc.cluster.local:8080",
                            "domains": ["*"],
                            "include_request_attempt_count": true,
                            "routes": [{"match": {"prefix": "/"}, "route": {
                                "cluster": CLUSTER_NAME,
                                "retry_policy": {
                                    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                                    "num_retries": 2,
                                    "retriable_status_codes": [503],
                                },
                            }}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [cluster],
        },
    })
}

fn validate_in_envoy(envoy: &Path, bootstrap: &Value, name: &str) -> (bool, String) {
    let dir = workspace_root().join("target/e2e-runs/istio-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
    let (ok, log) = eastwest_e2e::envoy::validate_config(envoy, &path, &workspace_root());
    (ok, format!("{}:\n{log}", path.display()))
}

fn cluster_patches(docs: &[Doc]) -> Vec<(String, Value)> {
    let mut patches = Vec::new();
    for doc in envoy_filters(docs) {
        for (index, patch) in doc.value["spec"]["configPatches"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let place = format!("{} patch {}", doc.place, index + 1);
            assert_eq!(patch["applyTo"], "CLUSTER", "{place}");
            assert_eq!(patch["match"]["context"], "SIDECAR_OUTBOUND", "{place}");
            assert_eq!(patch["patch"]["operation"], "MERGE", "{place}");
            patches.push((place, patch["patch"]["value"].clone()));
        }
    }
    assert!(!patches.is_empty(), "no EnvoyFilter cluster patch");
    patches
}

#[test]
fn the_client_mode_envoy_filter_patch_loads_in_envoy() {
    let docs = manifests();
    for (place, value) in cluster_patches(&docs) {
        let options = &value["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let filters = options["http_filters"].as_array().expect("http_filters");
        assert_eq!(filters.len(), 2, "{place}: [retry-budget, upstream codec]");
        assert_eq!(
            filters[1]["typed_config"]["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
            "{place}: the upstream codec comes last"
        );
        let config = &filters[0]["typed_config"]["config"];
        let plugin_config: Value =
            serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(plugin_config["mode"], "client", "{place}");
        configure("retry-budget", &plugin_config, true).unwrap_or_else(|e| panic!("{place}: {e}"));

        let bootstrap = patched_bootstrap(&value);
        for envoy in [envoy_binary().unwrap(), envoy_oldest_binary().unwrap()] {
            let (ok, log) = validate_in_envoy(&envoy, &bootstrap, "retry-budget-client");
            assert!(
                ok,
                "{place}: {} refuses the patched cluster: {log}",
                envoy.display()
            );
        }
    }
}

#[test]
fn envoy_refuses_the_patch_with_a_bad_budget_configuration() {
    let docs = manifests();
    let (place, mut value) = cluster_patches(&docs).remove(0);
    let config = &mut value["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]
        ["typed_config"]["config"]["configuration"]["value"];
    let text = config.as_str().unwrap().to_owned();
    let broken = text.replacen(r#""mode": "client""#, r#""mode": "sometimes""#, 1);
    assert_ne!(
        broken, text,
        "{place}: the configuration changed; update this test"
    );
    *config = json!(broken);
    let (ok, log) = validate_in_envoy(
        &envoy_binary().unwrap(),
        &patched_bootstrap(&value),
        "retry-budget-client-broken",
    );
    assert!(!ok, "{place}: a bad mode must be refused by Envoy: {log}");
    assert!(
        log.contains("eastwest-retry-budget: invalid configuration: mode"),
        "{place}: {log}"
    );
}
