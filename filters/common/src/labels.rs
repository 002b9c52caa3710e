//! The ownership label model of DESIGN.md §3: six labels, how they travel as baggage members,
//! and what a valid value is.

use serde::Deserialize;

/// The value a label takes when nothing resolves it.
pub const UNKNOWN: &str = "unknown";

/// Longest label value accepted, in bytes. Kubernetes names and label values are at most 63
/// (DNS-1123 labels) or 253 (subdomains) bytes; 128 keeps forged values from bloating headers
/// and metric names while fitting every real service name we know of.
pub const MAX_LABEL_VALUE_BYTES: usize = 128;

/// One ownership label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Label {
    Service,
    Namespace,
    Environment,
    Region,
    Team,
    Criticality,
}

impl Label {
    pub const ALL: [Label; 6] = [
        Label::Service,
        Label::Namespace,
        Label::Environment,
        Label::Region,
        Label::Team,
        Label::Criticality,
    ];

    /// The label's name in configuration and documentation.
    pub fn name(self) -> &'static str {
        match self {
            Label::Service => "service",
            Label::Namespace => "namespace",
            Label::Environment => "environment",
            Label::Region => "region",
            Label::Team => "team",
            Label::Criticality => "criticality",
        }
    }

    /// The W3C baggage key the label travels under (OpenTelemetry semantic conventions where
    /// one exists).
    pub fn baggage_key(self) -> &'static str {
        match self {
            Label::Service => "service.name",
            Label::Namespace => "k8s.namespace.name",
            Label::Environment => "deployment.environment.name",
            Label::Region => "cloud.region",
            Label::Team => "eastwest.team",
            Label::Criticality => "service.criticality",
        }
    }

    pub fn from_baggage_key(key: &[u8]) -> Option<Label> {
        // Most members of a real baggage are not labels: their length already says so.
        let candidates: &[Label] = match key.len() {
            12 => &[Label::Service, Label::Region],
            13 => &[Label::Team],
            18 => &[Label::Namespace],
            19 => &[Label::Criticality],
            27 => &[Label::Environment],
            _ => return None,
        };
        candidates
            .iter()
            .copied()
            .find(|label| crate::bytes::equal(label.baggage_key().as_bytes(), key))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The allowed values of `criticality`, as OpenTelemetry's `service.criticality`.
pub const CRITICALITIES: [&str; 4] = ["critical", "high", "medium", "low"];

/// Why a label value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidValue {
    Empty,
    TooLong,
    NotUtf8,
    ControlCharacter,
    UnknownCriticality,
}

impl std::fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = match self {
            InvalidValue::Empty => "must not be empty",
            InvalidValue::TooLong => "is longer than 128 bytes",
            InvalidValue::NotUtf8 => "is not valid UTF-8",
            InvalidValue::ControlCharacter => "contains a control character",
            InvalidValue::UnknownCriticality => "must be one of critical, high, medium, low",
        };
        f.write_str(reason)
    }
}

/// Checks a label value from any source (configuration, node metadata, a peer's claim).
pub fn validate_value(label: Label, value: &[u8]) -> Result<&str, InvalidValue> {
    if value.is_empty() {
        return Err(InvalidValue::Empty);
    }
    if value.len() > MAX_LABEL_VALUE_BYTES {
        return Err(InvalidValue::TooLong);
    }
    let text = std::str::from_utf8(value).map_err(|_| InvalidValue::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(InvalidValue::ControlCharacter);
    }
    if label == Label::Criticality && !CRITICALITIES.contains(&text) {
        return Err(InvalidValue::UnknownCriticality);
    }
    Ok(text)
}

/// A set of resolved labels; a missing label is `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    values: [Option<String>; 6],
}

impl Labels {
    pub fn get(&self, label: Label) -> Option<&str> {
        self.values[label.index()].as_deref()
    }

    pub fn get_or_unknown(&self, label: Label) -> &str {
        self.get(label).unwrap_or(UNKNOWN)
    }

    /// Sets a label that the caller has already validated.
    pub fn set(&mut self, label: Label, value: impl Into<String>) {
        self.values[label.index()] = Some(value.into());
    }

    /// Validates and sets; returns the reason when the value is refused (the label is left as
    /// it was).
    pub fn set_checked(&mut self, label: Label, value: &[u8]) -> Result<(), InvalidValue> {
        let text = validate_value(label, value)?;
        self.set(label, text);
        Ok(())
    }

    pub fn is_set(&self, label: Label) -> bool {
        self.values[label.index()].is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// Fills every label still missing from `other`: "first non-empty wins" when sources are
    /// applied in priority order.
    pub fn fill_from(&mut self, other: &Labels) {
        for (mine, theirs) in self.values.iter_mut().zip(other.values.iter()) {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
    }

    /// The labels that are set, as compact W3C baggage members (`key=value,key=value`, values
    /// percent-encoded), in the order of [`Label::ALL`]. Empty when no label is set.
    pub fn to_baggage_members(&self) -> String {
        let mut out = String::new();
        for label in Label::ALL {
            if let Some(value) = self.get(label) {
                crate::baggage::push_member(&mut out, label.baggage_key(), value);
            }
        }
        out
    }

    /// All six labels as baggage members, `unknown` for the ones not set: the form published in
    /// filter state, so that access logs always print six fields.
    pub fn to_complete_members(&self) -> String {
        let mut out = String::new();
        for label in Label::ALL {
            crate::baggage::push_member(&mut out, label.baggage_key(), self.get_or_unknown(label));
        }
        out
    }
}

/// Which pod labels (Istio node metadata `LABELS`) hold environment, team and criticality.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LabelKeys {
    pub environment: String,
    pub team: String,
    pub criticality: String,
}

impl Default for LabelKeys {
    fn default() -> Self {
        LabelKeys {
            environment: "environment".into(),
            team: "team".into(),
            criticality: "criticality".into(),
        }
    }
}

impl LabelKeys {
    pub fn key_for(&self, label: Label) -> Option<&str> {
        match label {
            Label::Environment => Some(&self.environment),
            Label::Team => Some(&self.team),
            Label::Criticality => Some(&self.criticality),
            _ => None,
        }
    }
}

/// The `local` configuration object: labels that override what the node says.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalLabels {
    pub service: Option<String>,
    pub namespace: Option<String>,
    pub environment: Option<String>,
    pub region: Option<String>,
    pub team: Option<String>,
    pub criticality: Option<String>,
}

impl LocalLabels {
    /// Validates every value; the error names the field (`local.<label>`).
    pub fn to_labels(&self) -> Result<Labels, crate::config::ConfigError> {
        let mut labels = Labels::default();
        let fields = [
            (Label::Service, &self.service),
            (Label::Namespace, &self.namespace),
            (Label::Environment, &self.environment),
            (Label::Region, &self.region),
            (Label::Team, &self.team),
            (Label::Criticality, &self.criticality),
        ];
        for (label, value) in fields {
            if let Some(value) = value {
                labels
                    .set_checked(label, value.as_bytes())
                    .map_err(|reason| {
                        crate::config::ConfigError::new(
                            format!("local.{}", label.name()),
                            format!("{value:?} {reason}"),
                        )
                    })?;
            }
        }
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn baggage_key_lengths_are_the_ones_from_baggage_key_checks() {
        for label in Label::ALL {
            assert!(
                [12, 13, 18, 19, 27].contains(&label.baggage_key().len()),
                "{}",
                label.baggage_key()
            );
        }
    }

    #[test]
    fn baggage_keys_round_trip() {
        for label in Label::ALL {
            assert_eq!(
                Label::from_baggage_key(label.baggage_key().as_bytes()),
                Some(label)
            );
        }
        assert_eq!(Label::from_baggage_key(b"service"), None);
    }

    #[test]
    fn validation_refuses_bad_values() {
        assert_eq!(validate_value(Label::Team, b""), Err(InvalidValue::Empty));
        assert_eq!(
            validate_value(Label::Team, &[b'a'; 129]),
            Err(InvalidValue::TooLong)
        );
        assert!(validate_value(Label::Team, &[b'a'; 128]).is_ok());
        assert_eq!(
            validate_value(Label::Team, b"\xff\xfe"),
            Err(InvalidValue::NotUtf8)
        );
        assert_eq!(
            validate_value(Label::Team, b"a\nb"),
            Err(InvalidValue::ControlCharacter)
        );
        assert_eq!(
            validate_value(Label::Criticality, b"urgent"),
            Err(InvalidValue::UnknownCriticality)
        );
        assert_eq!(validate_value(Label::Criticality, b"high"), Ok("high"));
        assert_eq!(
            validate_value(Label::Team, "équipe".as_bytes()),
            Ok("équipe")
        );
    }

    #[test]
    fn fill_from_keeps_first_non_empty() {
        let mut first = Labels::default();
        first.set(Label::Team, "payments");
        let mut second = Labels::default();
        second.set(Label::Team, "other");
        second.set(Label::Service, "checkout");
        first.fill_from(&second);
        assert_eq!(first.get(Label::Team), Some("payments"));
        assert_eq!(first.get(Label::Service), Some("checkout"));
        assert_eq!(first.get_or_unknown(Label::Region), UNKNOWN);
    }

    #[test]
    fn members_encode_set_labels_only_and_complete_form_has_all() {
        let mut labels = Labels::default();
        labels.set(Label::Service, "check out");
        labels.set(Label::Team, "pay,ments");
        assert_eq!(
            labels.to_baggage_members(),
            "service.name=check%20out,eastwest.team=pay%2Cments"
        );
        assert_eq!(
            labels.to_complete_members(),
            "service.name=check%20out,k8s.namespace.name=unknown,deployment.environment.name=unknown,\
             cloud.region=unknown,eastwest.team=pay%2Cments,service.criticality=unknown"
        );
        assert_eq!(Labels::default().to_baggage_members(), "");
    }

    #[test]
    fn local_labels_name_the_bad_field() {
        let local = LocalLabels {
            criticality: Some("urgent".into()),
            ..Default::default()
        };
        let error = local.to_labels().unwrap_err();
        assert_eq!(error.path, "local.criticality");
        assert!(error.reason.contains("critical, high, medium, low"));
    }
}
