//! The label-enrich configuration (docs/filters/label-enrich.md is its reference).

use eastwest_common::config::{ConfigError, PeerTrust};
use eastwest_common::labels::{LabelKeys, LocalLabels};
use eastwest_common::properties::Direction;
use eastwest_common::resolve::LabelSettings;
use serde::Deserialize;

/// The configuration as users write it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `outbound` or `inbound`; absent: the direction of the listener, as Envoy reports it.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Labels of this workload that override what the node metadata says.
    #[serde(default)]
    pub local: LocalLabels,
    /// Which pod labels hold environment, team and criticality.
    #[serde(default)]
    pub label_keys: LabelKeys,
    /// Whose label claims to accept: `mtls` (default), `any`, `none`.
    #[serde(default)]
    pub peer_trust: PeerTrust,
    /// When set, only SPIFFE IDs of this trust domain prove anything.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Baggage larger than this (all `baggage` headers together) is forwarded but no label is
    /// read from it. Default 8192, the W3C limit.
    #[serde(default)]
    pub max_baggage_bytes: Option<usize>,
}

/// The validated configuration the filter runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub direction: Option<Direction>,
    pub labels: LabelSettings,
}

impl Settings {
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let config: Config = eastwest_common::config::parse(bytes)?;
        Ok(Settings {
            direction: config.direction,
            labels: LabelSettings::new(
                &config.local,
                config.label_keys,
                config.peer_trust,
                config.trust_domain,
                config.max_baggage_bytes,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eastwest_common::Label;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn empty_configuration_means_defaults() {
        let settings = Settings::parse(b"").unwrap();
        assert_eq!(settings.direction, None);
        assert_eq!(settings.labels.peer_trust, PeerTrust::Mtls);
        assert_eq!(settings.labels.max_baggage_bytes, 8192);
        assert_eq!(settings.labels.label_keys, LabelKeys::default());
        assert!(settings.labels.local.is_empty());
    }

    #[test]
    fn full_configuration_parses() {
        let settings = Settings::parse(
            br#"{"direction": "inbound", "local": {"team": "payments", "criticality": "critical"},
                 "label_keys": {"team": "owner"}, "peer_trust": "any",
                 "trust_domain": "cluster.local", "max_baggage_bytes": 4096}"#,
        )
        .unwrap();
        assert_eq!(settings.direction, Some(Direction::Inbound));
        assert_eq!(settings.labels.local.get(Label::Team), Some("payments"));
        assert_eq!(settings.labels.label_keys.team, "owner");
        assert_eq!(settings.labels.label_keys.environment, "environment");
        assert_eq!(settings.labels.peer_trust, PeerTrust::Any);
        assert_eq!(
            settings.labels.trust_domain.as_deref(),
            Some("cluster.local")
        );
        assert_eq!(settings.labels.max_baggage_bytes, 4096);
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"directoin": "inbound"}"#, "directoin"),
            (br#"{"direction": "sideways"}"#, "direction"),
            (
                br#"{"local": {"criticality": "urgent"}}"#,
                "local.criticality",
            ),
            (br#"{"local": {"team": 7}}"#, "local.team"),
            (br#"{"label_keys": {"team": ""}}"#, "label_keys.team"),
            (br#"{"peer_trust": true}"#, "peer_trust"),
            (br#"{"trust_domain": "a/b"}"#, "trust_domain"),
            (br#"{"max_baggage_bytes": 10}"#, "max_baggage_bytes"),
        ];
        for (input, path) in cases {
            let error = Settings::parse(input).unwrap_err();
            assert_eq!(error.path, path, "{}", String::from_utf8_lossy(input));
        }
    }
}
