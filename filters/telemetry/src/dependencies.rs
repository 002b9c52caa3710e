//! `expected_dependencies`: which service pairs may call each other; `*` matches any service.

use serde::Deserialize;

/// One allowed edge of the service graph.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub source: String,
    pub destination: String,
}

fn matches(pattern: &str, service: &str) -> bool {
    pattern == "*" || pattern == service
}

/// Whether a call from `source` to `destination` is allowed by `expected`.
pub fn is_expected(expected: &[Dependency], source: &str, destination: &str) -> bool {
    expected
        .iter()
        .any(|edge| matches(&edge.source, source) && matches(&edge.destination, destination))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn edge(source: &str, destination: &str) -> Dependency {
        Dependency {
            source: source.into(),
            destination: destination.into(),
        }
    }

    #[test]
    fn exact_and_wildcard_edges() {
        let expected = [
            edge("frontend", "checkout"),
            edge("*", "inventory"),
            edge("checkout", "*"),
        ];
        assert!(is_expected(&expected, "frontend", "checkout"));
        assert!(is_expected(&expected, "anyone", "inventory"));
        assert!(is_expected(&expected, "checkout", "payments"));
        assert!(!is_expected(&expected, "frontend", "payments"));
        assert!(!is_expected(&[], "a", "b"));
    }
}
