//! The telemetry configuration (docs/filters/telemetry.md is its reference).

use eastwest_common::config::{ConfigError, PeerTrust};
use eastwest_common::labels::{LabelKeys, LocalLabels};
use eastwest_common::properties::Direction;
use eastwest_common::resolve::LabelSettings;
use serde::Deserialize;

use crate::dependencies::Dependency;
use crate::tags::Tag;

/// Distinct series per VM before new ones fold into `overflow`.
pub const DEFAULT_MAX_SERIES: usize = 1000;
const MAX_SERIES_LIMIT: usize = 100_000;

/// The configuration as users write it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `outbound` (reports as `source`) or `inbound` (reports as `destination`); absent: the
    /// listener's direction as Envoy reports it.
    #[serde(default)]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub local: LocalLabels,
    #[serde(default)]
    pub label_keys: LabelKeys,
    #[serde(default)]
    pub peer_trust: PeerTrust,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub max_baggage_bytes: Option<usize>,
    /// The tags of `eastwest_requests_total` and the duration histogram (the other metrics
    /// carry the subset that describes the pair). Default: all tags.
    #[serde(default)]
    pub dimensions: Option<Vec<Tag>>,
    /// Distinct series per VM before new ones fold into `overflow`. Default 1000.
    #[serde(default)]
    pub max_series: Option<usize>,
    /// Allowed service pairs; a call outside them counts in
    /// `eastwest_unexpected_dependency_total`. Absent: the check is off.
    #[serde(default)]
    pub expected_dependencies: Option<Vec<Dependency>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub direction: Option<Direction>,
    pub labels: LabelSettings,
    pub dimensions: Vec<Tag>,
    pub max_series: usize,
    pub expected_dependencies: Option<Vec<Dependency>>,
}

impl Settings {
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let config: Config = eastwest_common::config::parse(bytes)?;
        let labels = LabelSettings::new(
            &config.local,
            config.label_keys,
            config.peer_trust,
            config.trust_domain,
            config.max_baggage_bytes,
        )?;
        let dimensions = config.dimensions.unwrap_or_else(|| Tag::ALL.to_vec());
        for (index, tag) in dimensions.iter().enumerate() {
            if dimensions[..index].contains(tag) {
                return Err(ConfigError::new(
                    format!("dimensions[{index}]"),
                    format!("{} is listed twice", tag.name()),
                ));
            }
        }
        if !dimensions.contains(&Tag::Reporter) {
            return Err(ConfigError::new(
                "dimensions",
                "must include reporter: without it the caller's and the callee's reports of one request add up",
            ));
        }
        let max_series = config.max_series.unwrap_or(DEFAULT_MAX_SERIES);
        if !(1..=MAX_SERIES_LIMIT).contains(&max_series) {
            return Err(ConfigError::new(
                "max_series",
                format!("{max_series} is outside 1..={MAX_SERIES_LIMIT}"),
            ));
        }
        if let Some(expected) = &config.expected_dependencies {
            for (index, edge) in expected.iter().enumerate() {
                for (field, value) in [("source", &edge.source), ("destination", &edge.destination)]
                {
                    if value.is_empty() {
                        return Err(ConfigError::new(
                            format!("expected_dependencies[{index}].{field}"),
                            "must be a service name or *",
                        ));
                    }
                }
            }
        }
        Ok(Settings {
            direction: config.direction,
            labels,
            dimensions,
            max_series,
            expected_dependencies: config.expected_dependencies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn defaults() {
        let settings = Settings::parse(b"").unwrap();
        assert_eq!(settings.dimensions, Tag::ALL.to_vec());
        assert_eq!(settings.max_series, DEFAULT_MAX_SERIES);
        assert!(settings.expected_dependencies.is_none());
        assert_eq!(settings.labels.peer_trust, PeerTrust::Mtls);
    }

    #[test]
    fn full_configuration() {
        let settings = Settings::parse(
            br#"{"direction": "outbound", "dimensions": ["reporter", "source_service", "destination_service"],
                 "max_series": 50, "peer_trust": "any",
                 "expected_dependencies": [{"source": "frontend", "destination": "*"}]}"#,
        )
        .unwrap();
        assert_eq!(settings.direction, Some(Direction::Outbound));
        assert_eq!(settings.dimensions.len(), 3);
        assert_eq!(settings.max_series, 50);
        assert_eq!(settings.expected_dependencies.unwrap().len(), 1);
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let cases: [(&[u8], &str); 7] = [
            (
                br#"{"dimensions": ["reporter", "pod_name"]}"#,
                "dimensions[1]",
            ),
            (
                br#"{"dimensions": ["reporter", "reporter"]}"#,
                "dimensions[1]",
            ),
            (br#"{"dimensions": ["source_service"]}"#, "dimensions"),
            (br#"{"max_series": 0}"#, "max_series"),
            (br#"{"max_series": -1}"#, "max_series"),
            (
                br#"{"expected_dependencies": [{"source": "", "destination": "b"}]}"#,
                "expected_dependencies[0].source",
            ),
            (
                br#"{"expected_dependencies": [{"source": "a", "dest": "b"}]}"#,
                "expected_dependencies[0].dest",
            ),
        ];
        for (input, path) in cases {
            let error = Settings::parse(input).unwrap_err();
            assert_eq!(
                error.path,
                path,
                "{}: {error}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
