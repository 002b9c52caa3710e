//! Tags encoded in metric names the way Istio encodes them (DESIGN.md §4):
//! `tag1=.=value1;.;tag2=.=value2;.;metric_name`. Envoy's `stats_tags` regexes
//! `(<tag>=\.=(.*?);\.;)` turn them back into Prometheus labels.

/// Every tag an eastwest filter puts in metric names (DESIGN.md §4 plus the filters' own
/// `failure`, `metric`, `reason`, `peer` and the retry budget's `mode`): the shipped `stats_tags` and Istio settings must
/// cover exactly these.
pub const ALL_TAGS: [&str; 19] = [
    "reporter",
    "source_service",
    "source_namespace",
    "source_team",
    "source_region",
    "destination_service",
    "destination_namespace",
    "destination_team",
    "destination_region",
    "environment",
    "criticality",
    "response_code",
    "request_protocol",
    "grpc_status",
    "failure",
    "metric",
    "reason",
    "peer",
    "mode",
];

/// Appends a tag value so that it can never contain the `=.=` or `;.;` delimiters: `=` and `;`
/// become `_`, and an empty value becomes `unknown`.
pub fn push_sanitized_value(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push_str(crate::labels::UNKNOWN);
        return;
    }
    out.extend(value.chars().map(|c| match c {
        '=' | ';' => '_',
        c if c.is_control() => '_',
        c => c,
    }));
}

/// The full metric name for a set of tags, in the order given.
pub fn tagged_name(tags: &[(&str, &str)], name: &str) -> String {
    let mut out = String::with_capacity(
        name.len()
            + tags
                .iter()
                .map(|(t, v)| t.len() + v.len() + 6)
                .sum::<usize>(),
    );
    for (tag, value) in tags {
        out.push_str(tag);
        out.push_str("=.=");
        push_sanitized_value(&mut out, value);
        out.push_str(";.;");
    }
    out.push_str(name);
    out
}

/// The Envoy `stats_tags` regex that extracts `tag` from a tagged name.
pub fn stats_tag_regex(tag: &str) -> String {
    format!(r"({tag}=\.=(.*?);\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn encodes_tags_in_order() {
        assert_eq!(
            tagged_name(&[("reason", "baggage_oversized")], "eastwest_x_total"),
            "reason=.=baggage_oversized;.;eastwest_x_total"
        );
        assert_eq!(tagged_name(&[], "m"), "m");
    }

    #[test]
    fn values_cannot_forge_delimiters() {
        let name = tagged_name(&[("a", "x=.=y;.;z"), ("b", "")], "m");
        assert_eq!(name, "a=.=x_._y_._z;.;b=.=unknown;.;m");
        assert_eq!(name.matches("=.=").count(), 2);
        assert_eq!(name.matches(";.;").count(), 2);
    }

    #[test]
    fn regex_matches_envoy_convention() {
        assert_eq!(stats_tag_regex("reporter"), r"(reporter=\.=(.*?);\.;)");
    }
}
