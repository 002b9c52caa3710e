//! The configuration of `dist/eastwest.wasm` read the way the module reads it
//! (docs/filters/sidecar.md, `filters/sidecar/src/config.rs`): one optional section per
//! feature, each exactly that feature's own configuration, and the settings the features share
//! given once at the top level, which reach every section that takes them (a section's own
//! value wins). The shipped-configuration tests use it to check that a feature configured in
//! `eastwest.wasm` gets exactly the settings it had as its own module.
//!
//! Included with `#[path]` by the tests that read shipped configurations.

// Each test binary uses part of this file.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The features: (section in eastwest.wasm's configuration, the feature's own module).
pub const FEATURES: [(&str, &str); 3] = [
    ("label_enrich", "label-enrich"),
    ("telemetry", "telemetry"),
    ("retry_budget", "retry-budget"),
];

/// The shared top-level settings and the sections that take each (retry-budget has no
/// `direction`: its `mode` says where it runs).
pub const SHARED: [(&str, &[&str]); 6] = [
    ("direction", &["label_enrich", "telemetry"]),
    ("local", &["label_enrich", "telemetry", "retry_budget"]),
    ("label_keys", &["label_enrich", "telemetry", "retry_budget"]),
    ("peer_trust", &["label_enrich", "telemetry", "retry_budget"]),
    (
        "trust_domain",
        &["label_enrich", "telemetry", "retry_budget"],
    ),
    (
        "max_baggage_bytes",
        &["label_enrich", "telemetry", "retry_budget"],
    ),
];

/// The section of a feature given by its module name (`label-enrich` -> `label_enrich`).
pub fn section_of(module: &str) -> &'static str {
    FEATURES
        .iter()
        .find(|(_, m)| *m == module)
        .map(|(section, _)| *section)
        .unwrap_or_else(|| panic!("{module} is not a feature"))
}

/// Each feature that eastwest.wasm's `config` turns on, by the feature's module name, with the
/// configuration the feature gets: its section plus the shared top-level settings it takes.
/// Panics on a top-level key that is neither a section nor a shared setting (the module
/// refuses those) and on a section that is not an object.
pub fn feature_configs(config: &Value) -> BTreeMap<&'static str, Value> {
    let top = config
        .as_object()
        .unwrap_or_else(|| panic!("eastwest.wasm's configuration is not an object: {config}"));
    for key in top.keys() {
        assert!(
            FEATURES.iter().any(|(section, _)| section == key)
                || SHARED.iter().any(|(shared, _)| shared == key),
            "{key}: neither a feature section nor a shared setting of eastwest.wasm"
        );
    }
    let mut features = BTreeMap::new();
    for (section, module) in FEATURES {
        let Some(own) = top.get(section) else {
            continue;
        };
        let mut merged: Map<String, Value> = own
            .as_object()
            .unwrap_or_else(|| panic!("section {section} is not an object: {own}"))
            .clone();
        for (key, sections) in SHARED {
            if let Some(value) = top.get(key) {
                if sections.contains(&section) && !merged.contains_key(key) {
                    merged.insert(key.to_string(), value.clone());
                }
            }
        }
        features.insert(module, Value::Object(merged));
    }
    features
}

/// The same, for a filter that loads `module`: eastwest.wasm's features, or the one feature of
/// a feature's own module with its configuration as it stands.
pub fn features_of_module(module: &str, config: &Value) -> BTreeMap<&'static str, Value> {
    if module == "eastwest" {
        return feature_configs(config);
    }
    let (_, feature) = FEATURES
        .iter()
        .find(|(_, m)| *m == module)
        .unwrap_or_else(|| panic!("unknown module {module}"));
    BTreeMap::from([(*feature, config.clone())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shared_settings_reach_the_sections_that_take_them_and_a_sections_own_wins() {
        let features = feature_configs(&json!({
            "direction": "outbound",
            "peer_trust": "any",
            "label_enrich": {"peer_trust": "mtls"},
            "retry_budget": {"mode": "client-headers"},
        }));
        assert_eq!(
            features,
            BTreeMap::from([
                (
                    "label-enrich",
                    json!({"direction": "outbound", "peer_trust": "mtls"})
                ),
                (
                    "retry-budget",
                    json!({"mode": "client-headers", "peer_trust": "any"})
                ),
            ])
        );
        assert_eq!(
            features_of_module("telemetry", &json!({"max_series": 5})),
            BTreeMap::from([("telemetry", json!({"max_series": 5}))])
        );
    }

    /// The list above is the module's own (`filters/sidecar/src/config.rs`, `SHARED`), so that
    /// these tests read a configuration as the module does.
    #[test]
    fn the_shared_settings_are_the_modules() {
        let source = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../filters/sidecar/src/config.rs"),
        )
        .unwrap();
        let block = source
            .split("const SHARED")
            .nth(1)
            .and_then(|rest| rest.split("];").next())
            .expect("filters/sidecar/src/config.rs defines SHARED");
        let mut found = Vec::new();
        for line in block
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("(\""))
        {
            let (key, sections) = line
                .trim_start_matches("(\"")
                .split_once("\", &")
                .unwrap_or_else(|| panic!("unexpected line in SHARED: {line}"));
            let sections = sections.trim_end_matches("),");
            let sections: Vec<String> = if sections == "SECTIONS" {
                FEATURES.iter().map(|(s, _)| s.to_string()).collect()
            } else {
                sections
                    .trim_matches(['[', ']'])
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .collect()
            };
            found.push((key.to_string(), sections));
        }
        let ours: Vec<(String, Vec<String>)> = SHARED
            .iter()
            .map(|(key, sections)| {
                (
                    key.to_string(),
                    sections.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(found, ours);
    }
}
