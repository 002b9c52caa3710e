//! The label-enrich configuration (docs/filters/label-enrich.md is its reference).

use eastwest_common::baggage::DEFAULT_MAX_BAGGAGE_BYTES;
use eastwest_common::config::{ConfigError, PeerTrust};
use eastwest_common::labels::{LabelKeys, Labels, LocalLabels};
use eastwest_common::properties::Direction;
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
    pub local: Labels,
    pub label_keys: LabelKeys,
    pub peer_trust: PeerTrust,
    pub trust_domain: Option<String>,
    pub max_baggage_bytes: usize,
}

/// Bounds on `max_baggage_bytes`: below 256 no real baggage fits; above 64 KiB a header
/// exceeds every proxy's default limits anyway.
const MAX_BAGGAGE_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256..=65536;

impl Settings {
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        Settings::from_config(eastwest_common::config::parse(bytes)?)
    }

    fn from_config(config: Config) -> Result<Settings, ConfigError> {
        let local = config.local.to_labels()?;
        for (path, key) in [
            ("label_keys.environment", &config.label_keys.environment),
            ("label_keys.team", &config.label_keys.team),
            ("label_keys.criticality", &config.label_keys.criticality),
        ] {
            if key.is_empty() {
                return Err(ConfigError::new(path, "must not be empty"));
            }
        }
        if config
            .trust_domain
            .as_deref()
            .is_some_and(|domain| domain.is_empty() || domain.contains('/'))
        {
            return Err(ConfigError::new(
                "trust_domain",
                "must be a SPIFFE trust domain such as cluster.local",
            ));
        }
        let max_baggage_bytes = config
            .max_baggage_bytes
            .unwrap_or(DEFAULT_MAX_BAGGAGE_BYTES);
        if !MAX_BAGGAGE_BYTES_RANGE.contains(&max_baggage_bytes) {
            return Err(ConfigError::new(
                "max_baggage_bytes",
                format!("{max_baggage_bytes} is outside 256..=65536"),
            ));
        }
        Ok(Settings {
            direction: config.direction,
            local,
            label_keys: config.label_keys,
            peer_trust: config.peer_trust,
            trust_domain: config.trust_domain,
            max_baggage_bytes,
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
        assert_eq!(settings.peer_trust, PeerTrust::Mtls);
        assert_eq!(settings.max_baggage_bytes, 8192);
        assert_eq!(settings.label_keys, LabelKeys::default());
        assert!(settings.local.is_empty());
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
        assert_eq!(settings.local.get(Label::Team), Some("payments"));
        assert_eq!(settings.label_keys.team, "owner");
        assert_eq!(settings.label_keys.environment, "environment");
        assert_eq!(settings.peer_trust, PeerTrust::Any);
        assert_eq!(settings.trust_domain.as_deref(), Some("cluster.local"));
        assert_eq!(settings.max_baggage_bytes, 4096);
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
