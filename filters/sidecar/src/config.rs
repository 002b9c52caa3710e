//! The sidecar module's configuration (docs/filters/sidecar.md is its reference): one optional
//! section per feature, each exactly that feature's own configuration, plus the settings the
//! features share given once at the top level (a section's own value wins).
//!
//! ```json
//! {"peer_trust": "mtls", "label_enrich": {}, "telemetry": {}, "retry_budget": {"mode": "client-headers"}}
//! ```

use eastwest_common::config::ConfigError;
use serde_json::{Map, Value};

/// The feature sections, by their key.
pub const SECTIONS: [&str; 3] = ["label_enrich", "telemetry", "retry_budget"];

/// Settings that may be given once at the top level, and the sections that take each (a
/// section that does not know a setting does not get it: retry-budget has no `direction`).
const SHARED: [(&str, &[&str]); 6] = [
    ("direction", &["label_enrich", "telemetry"]),
    ("local", &SECTIONS),
    ("label_keys", &SECTIONS),
    ("peer_trust", &SECTIONS),
    ("trust_domain", &SECTIONS),
    ("max_baggage_bytes", &SECTIONS),
];

/// The validated configuration: the settings of each feature that is on.
#[derive(Debug)]
pub struct Settings {
    pub label_enrich: Option<eastwest_label_enrich::config::Settings>,
    pub telemetry: Option<eastwest_telemetry::config::Settings>,
    pub retry_budget: Option<eastwest_retry_budget::config::Settings>,
}

/// A section's configuration with the top-level settings it takes merged in, and which keys
/// came from the top level (so that an error in one names the path the user wrote).
fn section_json(
    section: &str,
    own: &Map<String, Value>,
    top: &Map<String, Value>,
) -> (Vec<u8>, Vec<&'static str>) {
    let mut merged = own.clone();
    let mut inherited = Vec::new();
    for (key, sections) in SHARED {
        if let Some(value) = top.get(key) {
            if sections.contains(&section) && !merged.contains_key(key) {
                merged.insert(key.to_string(), value.clone());
                inherited.push(key);
            }
        }
    }
    let bytes = serde_json::to_vec(&Value::Object(merged)).unwrap_or_default();
    (bytes, inherited)
}

/// Parses one section with its feature's own parser; errors name the path as the user wrote
/// it: `<section>.<field>`, or `<field>` for a setting given at the top level.
fn parse_section<T>(
    section: &str,
    value: &Value,
    top: &Map<String, Value>,
    parse: impl FnOnce(&[u8]) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let Value::Object(own) = value else {
        return Err(ConfigError::new(
            section,
            "must be an object: the feature's own configuration ({} for its defaults)",
        ));
    };
    let (bytes, inherited) = section_json(section, own, top);
    parse(&bytes).map_err(|error| {
        let first = error.path.split(['.', '[']).next().unwrap_or_default();
        let path = if inherited.contains(&first) {
            error.path
        } else if error.path == "(root)" {
            section.to_string()
        } else {
            format!("{section}.{}", error.path)
        };
        ConfigError::new(path, error.reason)
    })
}

impl Settings {
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(bytes).map_err(|error| {
                let message = error.to_string();
                let message = match message.rfind(" at line ") {
                    Some(index) => message[..index].to_string(),
                    None => message,
                };
                ConfigError::new("(root)", message)
            })?
        };
        let Value::Object(top) = value else {
            return Err(ConfigError::new("(root)", "must be a JSON object"));
        };
        for key in top.keys() {
            let known =
                SECTIONS.contains(&key.as_str()) || SHARED.iter().any(|(shared, _)| shared == key);
            if !known {
                return Err(ConfigError::new(
                    key.as_str(),
                    format!(
                        "unknown field, expected a feature section ({}) or a shared setting ({})",
                        SECTIONS.join(", "),
                        SHARED.map(|(key, _)| key).join(", ")
                    ),
                ));
            }
        }
        let settings = Settings {
            label_enrich: top
                .get("label_enrich")
                .map(|value| {
                    parse_section(
                        "label_enrich",
                        value,
                        &top,
                        eastwest_label_enrich::config::Settings::parse,
                    )
                })
                .transpose()?,
            telemetry: top
                .get("telemetry")
                .map(|value| {
                    parse_section(
                        "telemetry",
                        value,
                        &top,
                        eastwest_telemetry::config::Settings::parse,
                    )
                })
                .transpose()?,
            retry_budget: top
                .get("retry_budget")
                .map(|value| {
                    parse_section(
                        "retry_budget",
                        value,
                        &top,
                        eastwest_retry_budget::config::Settings::parse,
                    )
                })
                .transpose()?,
        };
        if settings.label_enrich.is_none()
            && settings.telemetry.is_none()
            && settings.retry_budget.is_none()
        {
            return Err(ConfigError::new(
                "(root)",
                format!(
                    "no feature is on: add at least one section ({}); {{}} in a section means \
                     that feature's defaults",
                    SECTIONS.join(", ")
                ),
            ));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eastwest_common::config::PeerTrust;
    use eastwest_common::properties::Direction;
    use eastwest_common::Label;
    use eastwest_retry_budget::config::Mode;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_section_turns_its_feature_on_with_that_features_defaults() {
        let settings = Settings::parse(br#"{"telemetry": {}}"#).unwrap();
        assert!(settings.label_enrich.is_none());
        assert!(settings.retry_budget.is_none());
        let telemetry = settings.telemetry.unwrap();
        assert_eq!(telemetry.max_series, 1000);
        assert_eq!(telemetry.labels.peer_trust, PeerTrust::Mtls);
    }

    #[test]
    fn an_empty_configuration_is_refused() {
        for empty in [&b""[..], b"{}", b"  "] {
            let error = Settings::parse(empty).unwrap_err();
            assert_eq!(error.path, "(root)");
            assert!(error
                .reason
                .contains("label_enrich, telemetry, retry_budget"));
        }
    }

    #[test]
    fn shared_settings_reach_every_section_that_takes_them_and_a_sections_own_wins() {
        let settings = Settings::parse(
            br#"{"direction": "outbound", "peer_trust": "any", "local": {"team": "web"},
                 "label_enrich": {"peer_trust": "none"}, "telemetry": {},
                 "retry_budget": {"mode": "client-headers"}}"#,
        )
        .unwrap();
        let label_enrich = settings.label_enrich.unwrap();
        assert_eq!(label_enrich.labels.peer_trust, PeerTrust::None);
        assert_eq!(label_enrich.direction, Some(Direction::Outbound));
        assert_eq!(label_enrich.labels.local.get(Label::Team), Some("web"));
        let telemetry = settings.telemetry.unwrap();
        assert_eq!(telemetry.labels.peer_trust, PeerTrust::Any);
        assert_eq!(telemetry.direction, Some(Direction::Outbound));
        let retry_budget = settings.retry_budget.unwrap();
        assert_eq!(retry_budget.mode, Mode::ClientHeaders);
        assert_eq!(retry_budget.labels.peer_trust, PeerTrust::Any);
        assert_eq!(retry_budget.labels.local.get(Label::Team), Some("web"));
    }

    #[test]
    fn errors_name_the_path_as_written() {
        let error = Settings::parse(br#"{"telemetry": {"max_series": 0}}"#).unwrap_err();
        assert_eq!(error.path, "telemetry.max_series");
        let error = Settings::parse(br#"{"retry_budget": {"destinations": {"p": {"ratio": -1}}}}"#)
            .unwrap_err();
        assert_eq!(error.path, "retry_budget.destinations.p.ratio");
        let error = Settings::parse(br#"{"local": {"criticality": "urgent"}, "telemetry": {}}"#)
            .unwrap_err();
        assert_eq!(
            error.path, "local.criticality",
            "a top-level setting keeps its path"
        );
        let error = Settings::parse(br#"{"label_enrich": {"bogus": 1}}"#).unwrap_err();
        assert!(error.path.starts_with("label_enrich"), "{error}");
        assert!(error.reason.contains("bogus"), "{error}");
        let error = Settings::parse(br#"{"telemetry": []}"#).unwrap_err();
        assert_eq!(error.path, "telemetry");
        let error = Settings::parse(br#"{"labels_enrich": {}}"#).unwrap_err();
        assert_eq!(error.path, "labels_enrich");
        let error = Settings::parse(br#"{"telemetry": {}"#).unwrap_err();
        assert_eq!(error.path, "(root)");
    }
}
