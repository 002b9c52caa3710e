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
//!   given to the module's own `on_configure` in the harness: a key or value the module refuses
//!   fails the test. And the url, order, direction and fail strategy follow the project's
//!   contracts (`cargo xtask package`'s image names, label-enrich first).
//! - The default, `eastwest.yaml`: one plugin per side loading `dist/eastwest.wasm` with the
//!   three features; the alternative, `separate-modules/`: one plugin per side and feature. Both
//!   are checked alike, and each feature gets the same settings from either.
//! - EnvoyFilter (retry-budget in `client` mode): its cluster patch, merged into a cluster the
//!   way Istio merges it, is loaded by real Envoy (`--mode validate`, which builds the upstream
//!   filter chain and runs the module's `on_configure`).
//! - IstioOperator, the Helm-values snippet and the example Deployment: the same mesh settings
//!   everywhere, covering what the filters need.
//!
//! A mutation test shows the validator refuses broken manifests, so it cannot pass everything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use eastwest_e2e::{dist_wasm, envoy_binary, envoy_oldest_binary, workspace_root};
use eastwest_harness::{Harness, Options};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};

#[path = "support/sidecar_config.rs"]
mod sidecar_config;
use sidecar_config::features_of_module;

const CRD: &str = include_str!("../testdata/istio/wasmplugin-crd.yaml");
/// The features, in the order they must run on each side of a call.
const FILTERS: [&str; 3] = ["label-enrich", "telemetry", "retry-budget"];
/// The modules a WasmPlugin may load: the one-module sidecar and the separate ones.
const MODULES: [&str; 4] = ["eastwest", "label-enrich", "telemetry", "retry-budget"];
/// The subdirectory of envoy-configs/istio/ with the separate modules' plugins, the
/// alternative to the default `eastwest.yaml` at the top.
const SEPARATE: &str = "separate-modules";

/// One YAML document of a file in envoy-configs/istio/.
struct Doc {
    place: String,
    /// The subdirectory of envoy-configs/istio/ holding the file: "" (the default set) or
    /// [`SEPARATE`].
    set: String,
    value: Value,
}

fn manifests() -> Vec<Doc> {
    let root = workspace_root().join("envoy-configs/istio");
    let mut docs = Vec::new();
    let mut subdirs = Vec::new();
    for set in ["", SEPARATE] {
        let dir = root.join(set);
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                subdirs.push(path.file_name().unwrap().to_string_lossy().into_owned());
            } else if path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                files.push(path);
            }
        }
        files.sort();
        assert!(!files.is_empty(), "no manifests in {}", dir.display());
        docs.extend(documents(&files, set));
    }
    assert_eq!(
        subdirs,
        [SEPARATE],
        "the subdirectories of envoy-configs/istio/ are the ones this test reads"
    );
    docs
}

fn documents(files: &[PathBuf], set: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let name = if set.is_empty() {
            name
        } else {
            format!("{set}/{name}")
        };
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
                set: set.to_owned(),
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

/// The module a WasmPlugin loads, from its url `oci://<registry>/<module>:<tag>`.
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

/// Loads `dist/<module>.wasm` with this configuration and runs its `on_configure`.
fn configure(module: &str, config: &Value, outbound: bool) -> Result<(), String> {
    let wasm = std::fs::read(dist_wasm(module).unwrap()).unwrap();
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

/// The WasmPlugins of one set: "" (the default, eastwest.yaml) or [`SEPARATE`].
fn plugins_of_set<'a>(docs: &'a [Doc], set: &str) -> Vec<&'a Doc> {
    wasm_plugins(docs)
        .into_iter()
        .filter(|doc| doc.set == set)
        .collect()
}

/// Each feature a plugin runs, with the configuration the feature gets (eastwest.wasm's shared
/// settings merged into its sections), as Istio hands it over.
fn plugin_features(plugin: &Value) -> BTreeMap<&'static str, Value> {
    let config = as_struct_json(&plugin["spec"]["pluginConfig"]);
    features_of_module(&filter_of(plugin), &config)
}

/// Istio's order of a sidecar's plugins on one side: by phase, then by priority, higher first
/// (ties by name: the tests refuse them).
fn in_istio_order(mut plugins: Vec<&Value>) -> Vec<&Value> {
    plugins.sort_by_key(|plugin| {
        (
            phase_rank(plugin),
            -plugin["spec"]["priority"].as_i64().unwrap_or(0),
        )
    });
    plugins
}

/// The features of a set's plugins on one side, in the order they run: the plugins in Istio's
/// order, eastwest.wasm's features in the order of the separate modules' chain
/// (docs/filters/sidecar.md, "Order inside the filter").
fn features_in_order(docs: &[Doc], set: &str, mode: &str) -> Vec<&'static str> {
    let plugins = plugins_of_set(docs, set)
        .into_iter()
        .map(|doc| &doc.value)
        .filter(|plugin| mode_of(plugin) == mode)
        .collect();
    in_istio_order(plugins)
        .into_iter()
        .flat_map(|plugin| {
            let features = plugin_features(plugin);
            FILTERS
                .into_iter()
                .filter(move |feature| features.contains_key(feature))
        })
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
    assert_eq!(
        plugins_of_set(&docs, "").len(),
        2,
        "the default: two WasmPlugins (CLIENT, SERVER) loading eastwest.wasm"
    );
    assert_eq!(
        plugins_of_set(&docs, SEPARATE).len(),
        6,
        "{SEPARATE}/: two WasmPlugins (CLIENT, SERVER) per filter"
    );
    for doc in wasm_plugins(&docs) {
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
fn each_plugin_config_is_accepted_by_its_module() {
    let docs = manifests();
    for doc in wasm_plugins(&docs) {
        let module = filter_of(&doc.value);
        assert!(
            MODULES.contains(&module.as_str()),
            "{}: unknown module {module:?}",
            doc.place
        );
        let config = as_struct_json(&doc.value["spec"]["pluginConfig"]);
        let outbound = mode_of(&doc.value) == "CLIENT";
        configure(&module, &config, outbound)
            .unwrap_or_else(|e| panic!("{}: {module} refuses its pluginConfig: {e}", doc.place));
        if module == "eastwest" {
            // Each feature alone (its section and the shared settings), as a user who removes
            // the other sections has it; the CLIENT plugin without `retry_budget` is the one
            // that goes with the client-mode EnvoyFilter.
            for (section, _) in sidecar_config::FEATURES {
                let mut alone = config.clone();
                let top = alone.as_object_mut().unwrap();
                top.retain(|key, _| {
                    key == section
                        || !sidecar_config::FEATURES
                            .iter()
                            .any(|(other, _)| other == key)
                });
                configure(&module, &alone, outbound).unwrap_or_else(|e| {
                    panic!("{}: {module} refuses only {section}: {e}", doc.place)
                });
                let mut without = config.clone();
                without.as_object_mut().unwrap().remove(section);
                configure(&module, &without, outbound).unwrap_or_else(|e| {
                    panic!("{}: {module} refuses it without {section}: {e}", doc.place)
                });
            }
        }
    }
}

#[test]
fn a_typo_in_a_plugin_config_is_refused_by_the_module() {
    let docs = manifests();
    for doc in wasm_plugins(&docs) {
        let module = filter_of(&doc.value);
        let outbound = mode_of(&doc.value) == "CLIENT";
        let config = as_struct_json(&doc.value["spec"]["pluginConfig"]);
        let refused = |broken: &Value, expected: &str| {
            let error = configure(&module, broken, outbound).unwrap_err();
            assert!(
                error.contains(expected),
                "{}: expected {expected:?} in {error}",
                doc.place
            );
        };
        let prefix = format!("eastwest-{module}: invalid configuration: ");
        let prefix = if module == "eastwest" {
            "eastwest: invalid configuration: "
        } else {
            prefix.as_str()
        };
        let mut unknown_key = config.clone();
        unknown_key["peer_trsut"] = json!("mtls");
        refused(&unknown_key, &format!("{prefix}peer_trsut"));
        let mut bad_value = config.clone();
        bad_value["peer_trust"] = json!("mTLS");
        refused(&bad_value, &format!("{prefix}peer_trust"));
        if module == "eastwest" {
            let mut bad_direction = config.clone();
            bad_direction["direction"] = json!("out");
            refused(&bad_direction, &format!("{prefix}direction"));
            let mut bad_mode = config.clone();
            bad_mode["retry_budget"]["mode"] = json!("client_headers");
            refused(&bad_mode, &format!("{prefix}retry_budget.mode"));
            let mut typo_in_section = config.clone();
            typo_in_section["telemetry"]["max_seris"] = json!(1000);
            refused(&typo_in_section, &format!("{prefix}telemetry.max_seris"));
            let mut misspelt_section = config.clone();
            let section = misspelt_section
                .as_object_mut()
                .unwrap()
                .remove("label_enrich")
                .unwrap();
            misspelt_section["labels_enrich"] = section;
            refused(&misspelt_section, &format!("{prefix}labels_enrich"));
        } else {
            let (field, wrong) = if module == "retry-budget" {
                ("mode", "client_headers")
            } else {
                ("direction", "out")
            };
            let mut bad_enum = config.clone();
            bad_enum[field] = json!(wrong);
            refused(&bad_enum, &format!("{prefix}{field}"));
        }
    }
}

#[test]
fn plugins_use_the_packaged_images_the_right_side_and_fail_open() {
    let registry = package_registry();
    let version = env!("CARGO_PKG_VERSION");
    let docs = manifests();
    for set in ["", SEPARATE] {
        let mut seen = BTreeSet::new();
        for doc in plugins_of_set(&docs, set) {
            let spec = &doc.value["spec"];
            let module = filter_of(&doc.value);
            let mode = mode_of(&doc.value);
            assert_eq!(
                module == "eastwest",
                set.is_empty(),
                "{}: the default set loads eastwest.wasm, {SEPARATE}/ the separate modules",
                doc.place
            );
            assert_eq!(
                spec["url"],
                format!("oci://{registry}/{module}:{version}"),
                "{}: the url `cargo xtask package` prints for {module}",
                doc.place
            );
            assert_eq!(spec["pluginName"], module.as_str(), "{}", doc.place);
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
            let (direction, budget_mode) = match mode {
                "CLIENT" => ("outbound", "client-headers"),
                "SERVER" => ("inbound", "server"),
                other => panic!("{}: match mode {other}", doc.place),
            };
            for (feature, config) in plugin_features(&doc.value) {
                let expected = if feature == "retry-budget" {
                    ("mode", budget_mode)
                } else {
                    ("direction", direction)
                };
                assert_eq!(
                    config[expected.0], expected.1,
                    "{}: {feature} on the {mode} side",
                    doc.place
                );
                assert!(
                    seen.insert((feature, mode.to_owned())),
                    "{}: {feature} a second time on the {mode} side",
                    doc.place
                );
            }
        }
        for feature in FILTERS {
            for mode in ["CLIENT", "SERVER"] {
                assert!(
                    seen.contains(&(feature, mode.to_owned())),
                    "{set:?}: no {feature} on the {mode} side"
                );
            }
        }
    }
}

#[test]
fn label_enrich_runs_first_then_telemetry_then_retry_budget() {
    let docs = manifests();
    for set in ["", SEPARATE] {
        for mode in ["CLIENT", "SERVER"] {
            assert_eq!(
                features_in_order(&docs, set, mode),
                FILTERS,
                "{set:?} {mode} side"
            );
            let plugins: Vec<&Value> = plugins_of_set(&docs, set)
                .into_iter()
                .map(|doc| &doc.value)
                .filter(|plugin| mode_of(plugin) == mode)
                .collect();
            let keys: BTreeSet<_> = plugins
                .iter()
                .map(|p| (phase_rank(p), p["spec"]["priority"].as_i64().unwrap_or(0)))
                .collect();
            assert_eq!(
                keys.len(),
                plugins.len(),
                "{set:?} {mode}: no two plugins tie on phase and priority"
            );
            // label-enrich runs ahead of Istio's authn and RBAC filters, so the requests they
            // reject are labelled too.
            for plugin in plugins {
                if plugin_features(plugin).contains_key("label-enrich") {
                    assert_eq!(
                        plugin["spec"]["phase"], "AUTHN",
                        "{set:?} {mode}: the plugin running label-enrich"
                    );
                }
            }
        }
    }
    // The default runs one filter per side.
    for mode in ["CLIENT", "SERVER"] {
        let count = plugins_of_set(&docs, "")
            .iter()
            .filter(|doc| mode_of(&doc.value) == mode)
            .count();
        assert_eq!(
            count, 1,
            "the default: one eastwest.wasm plugin on the {mode} side"
        );
    }
}

/// The default and the alternative configure every feature alike: on each side, the
/// configuration a feature gets from eastwest.yaml's sections and shared settings is the
/// separate module's `pluginConfig`, except settings one of them leaves at the documented
/// default; and the plugins select, match and fail the same way.
#[test]
fn eastwest_plugins_configure_each_feature_as_the_separate_plugins_do() {
    // Shared settings given once in eastwest.yaml that a separate plugin may leave at their
    // default (DESIGN.md §3: the pod labels named environment, team and criticality).
    let defaults = json!({
        "label_keys": {"environment": "environment", "team": "team", "criticality": "criticality"},
    });
    let docs = manifests();
    for mode in ["CLIENT", "SERVER"] {
        let side = |set: &str| -> Vec<&Value> {
            plugins_of_set(&docs, set)
                .into_iter()
                .map(|doc| &doc.value)
                .filter(|plugin| mode_of(plugin) == mode)
                .collect()
        };
        let eastwest = side("");
        assert_eq!(eastwest.len(), 1, "{mode}");
        let combined = plugin_features(eastwest[0]);
        let separate = side(SEPARATE);
        let mut separate_features = BTreeMap::new();
        for plugin in &separate {
            separate_features.extend(plugin_features(plugin));
            for field in [
                "selector",
                "match",
                "failStrategy",
                "imagePullPolicy",
                "type",
            ] {
                assert_eq!(
                    plugin["spec"][field], eastwest[0]["spec"][field],
                    "{mode}: {field} of {} and eastwest-{}",
                    plugin["metadata"]["name"], eastwest[0]["metadata"]["name"]
                );
            }
        }
        assert_eq!(
            combined.keys().collect::<Vec<_>>(),
            separate_features.keys().collect::<Vec<_>>(),
            "{mode}: the same features"
        );
        for (feature, config) in &combined {
            let other = &separate_features[feature];
            let keys: BTreeSet<&String> = config
                .as_object()
                .unwrap()
                .keys()
                .chain(other.as_object().unwrap().keys())
                .collect();
            for key in keys {
                let (a, b) = (config.get(key.as_str()), other.get(key.as_str()));
                let default = defaults.get(key.as_str());
                let same = a == b || (a.is_none() && b == default) || (b.is_none() && a == default);
                assert!(
                    same,
                    "{mode} {feature}.{key}: {a:?} from eastwest.yaml, {b:?} from {SEPARATE}/"
                );
            }
        }
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
        for (feature, config) in plugin_features(&doc.value) {
            for (_, pod_label) in config["label_keys"].as_object().into_iter().flatten() {
                assert!(
                    listed.contains(pod_label.as_str().unwrap()),
                    "{} ({feature}): pod label {pod_label} is not in PILOT_MX_ADDITIONAL_LABELS",
                    doc.place
                );
            }
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
