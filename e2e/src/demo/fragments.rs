//! The shipped bootstrap fragments (`envoy-configs/fragments/`), read the way the demo's
//! sidecars use them, so that the demo runs exactly what users paste into their bootstraps.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::paths::workspace_root;

/// `stats_config.stats_tags` of `stats-tags.yaml`: `(tag_name, regex)` pairs.
pub fn stats_tags() -> Result<Vec<(String, String)>> {
    parse_stats_tags(&read("stats-tags.yaml")?)
}

/// `stats_config.histogram_bucket_settings` of `histogram-buckets.yaml`, as bootstrap JSON.
pub fn histogram_bucket_settings() -> Result<Value> {
    parse_histogram_buckets(&read("histogram-buckets.yaml")?)
}

/// The access-log format of `access-log-format.txt` (one line).
pub fn access_log_format() -> Result<String> {
    Ok(read("access-log-format.txt")?.trim_end().to_owned())
}

fn read(name: &str) -> Result<String> {
    let path = workspace_root().join("envoy-configs/fragments").join(name);
    read_path(&path)
}

fn read_path(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Lines of the form `- {tag_name: NAME, regex: 'REGEX'}`.
fn parse_stats_tags(text: &str) -> Result<Vec<(String, String)>> {
    let tags: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("- {tag_name: ")?;
            let (name, rest) = rest.split_once(", regex: '")?;
            let regex = rest.strip_suffix("'}")?;
            // YAML single quotes escape a quote by doubling it.
            Some((name.trim().to_owned(), regex.replace("''", "'")))
        })
        .collect();
    if tags.is_empty() {
        bail!("no `- {{tag_name: ..., regex: '...'}}` lines in the stats_tags fragment");
    }
    Ok(tags)
}

/// The `regex: '...'` and `buckets: [...]` of the single bucket setting.
fn parse_histogram_buckets(text: &str) -> Result<Value> {
    let regex = text
        .lines()
        .find_map(|line| line.split("regex: '").nth(1)?.split('\'').next())
        .context("no `regex: '...'` in the histogram buckets fragment")?;
    let buckets_line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("buckets: "))
        .context("no `buckets: [...]` line in the histogram buckets fragment")?;
    let buckets: Vec<f64> =
        serde_json::from_str(buckets_line).context("the buckets are not a list of numbers")?;
    Ok(json!([{"match": {"safe_regex": {"regex": regex}}, "buckets": buckets}]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_fragments_parse() {
        let tags = stats_tags().unwrap();
        for tag in ["reporter", "source_team", "destination_team", "mode"] {
            let (_, regex) = tags.iter().find(|(name, _)| name == tag).unwrap();
            assert_eq!(regex, &format!(r"({tag}=\.=(.*?);\.;)"));
        }
        let buckets = histogram_bucket_settings().unwrap();
        let list = buckets[0]["buckets"].as_array().unwrap();
        assert!(list.len() > 100, "{buckets}");
        assert!(buckets[0]["match"]["safe_regex"]["regex"]
            .as_str()
            .unwrap()
            .contains("eastwest_request_duration_milliseconds"));
        assert!(access_log_format()
            .unwrap()
            .contains("wasm.eastwest.source"));
    }

    #[test]
    fn malformed_fragments_are_refused() {
        assert!(parse_stats_tags("stats_tags:\n").is_err());
        assert!(parse_histogram_buckets("buckets: [1, 2]\n").is_err());
        assert!(parse_histogram_buckets("regex: 'x'\nbuckets: [1, oops]\n").is_err());
    }
}
