//! Configuration parsing with errors that name the field (DESIGN.md §6).

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A refused configuration: the field path (`local.team`, `peer_trust`, ...) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The line the filter logs before refusing the configuration.
    pub fn log_line(&self, filter: &str) -> String {
        format!(
            "eastwest-{filter}: invalid configuration: {}: {}",
            self.path, self.reason
        )
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Parses a filter configuration. Empty input (or only whitespace) means the defaults.
pub fn parse<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = inner.to_string();
        let message = strip_position(&message);
        // serde_path_to_error prints the root as "." and an unparsable position as "?".
        let path = if path == "." || path == "?" {
            "(root)".into()
        } else {
            path
        };
        ConfigError::new(path, message)
    })?;
    deserializer
        .end()
        .map_err(|error| ConfigError::new("(root)", strip_position(&error.to_string())))?;
    Ok(parsed)
}

/// serde_json appends " at line L column C"; the field path says more to a user.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(index) => &message[..index],
        None => message,
    }
}

/// Peer-trust modes of DESIGN.md §3.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeerTrust {
    /// Claims are accepted only from an mTLS peer whose SPIFFE namespace equals the claim's.
    #[default]
    Mtls,
    /// Claims are accepted from anyone (development setups without mTLS).
    Any,
    /// Claims are never accepted.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        team: Option<String>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        local: Inner,
        #[serde(default)]
        peer_trust: PeerTrust,
        #[serde(default)]
        limit: u32,
    }

    #[test]
    fn empty_means_defaults() {
        assert_eq!(parse::<Sample>(b"").unwrap(), Sample::default());
        assert_eq!(parse::<Sample>(b"  \n").unwrap(), Sample::default());
        assert_eq!(parse::<Sample>(b"{}").unwrap(), Sample::default());
    }

    #[test]
    fn errors_name_the_field() {
        let error = parse::<Sample>(br#"{"local": {"tema": "x"}}"#).unwrap_err();
        assert_eq!(error.path, "local.tema");
        assert!(error.reason.starts_with("unknown field `tema`"), "{error}");

        let error = parse::<Sample>(br#"{"bogus": 1}"#).unwrap_err();
        assert_eq!(error.path, "bogus");

        let error = parse::<Sample>(br#"{"limit": "ten"}"#).unwrap_err();
        assert_eq!(error.path, "limit");
        assert!(error.reason.contains("expected u32"), "{error}");

        let error = parse::<Sample>(br#"{"peer_trust": "sometimes"}"#).unwrap_err();
        assert_eq!(error.path, "peer_trust");
        assert!(error.reason.contains("mtls"), "{error}");

        let error = parse::<Sample>(b"{not json").unwrap_err();
        assert_eq!(error.path, "(root)");

        assert_eq!(
            error.log_line("label-enrich"),
            format!(
                "eastwest-label-enrich: invalid configuration: (root): {}",
                error.reason
            )
        );
    }
}
