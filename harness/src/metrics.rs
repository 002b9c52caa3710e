//! The metrics registry: wasm custom metrics shared by every VM of the plugin (one Envoy stats
//! scope), with Envoy's semantics and its Prometheus text rendering, including tag extraction by
//! `stats_tags` regexes.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;

/// Envoy's default histogram buckets.
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug, Default)]
pub struct MetricData {
    pub value: i64,
    pub samples: Vec<u64>,
}

/// One metric as reported: counters and gauges carry `value`; histograms `count`, `sum`, `samples`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricSnapshot {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: MetricKind,
    pub value: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<u64>>,
}

#[derive(Default)]
pub struct Registry {
    metrics: BTreeMap<(String, u8), (MetricKind, MetricData)>,
}

fn kind_key(kind: MetricKind) -> u8 {
    kind as u8
}

impl Registry {
    pub fn define(&mut self, kind: MetricKind, name: &str) {
        self.metrics
            .entry((name.to_string(), kind_key(kind)))
            .or_insert((kind, MetricData::default()));
    }

    pub fn get_mut(&mut self, kind: MetricKind, name: &str) -> Option<&mut MetricData> {
        self.metrics
            .get_mut(&(name.to_string(), kind_key(kind)))
            .map(|(_, data)| data)
    }

    pub fn snapshot(&self) -> Vec<MetricSnapshot> {
        self.metrics
            .iter()
            .map(|((name, _), (kind, data))| MetricSnapshot {
                name: name.clone(),
                kind: *kind,
                value: match kind {
                    MetricKind::Histogram => data.samples.len() as i64,
                    _ => data.value,
                },
                samples: (*kind == MetricKind::Histogram).then(|| data.samples.clone()),
            })
            .collect()
    }

    /// Value of a counter or gauge by name (0 if undefined).
    pub fn value(&self, name: &str) -> Option<i64> {
        self.metrics
            .iter()
            .find(|((candidate, _), (kind, _))| candidate == name && *kind != MetricKind::Histogram)
            .map(|(_, (_, data))| data.value)
    }
}

/// A compiled `stats_tags` entry: `tag_name` and a `regex` whose first capture group is removed
/// from the name and whose second (or first, when there is one) is the tag value.
pub struct TagExtractor {
    pub name: String,
    pub regex: Regex,
}

impl TagExtractor {
    pub fn new(name: &str, regex: &str) -> Result<TagExtractor, regex::Error> {
        Ok(TagExtractor {
            name: name.to_string(),
            regex: Regex::new(regex)?,
        })
    }
}

/// Applies the extractors in order, as Envoy's tag producer does.
pub fn extract_tags(name: &str, extractors: &[TagExtractor]) -> (String, Vec<(String, String)>) {
    let mut name = name.to_string();
    let mut tags = Vec::new();
    for extractor in extractors {
        let Some(captures) = extractor.regex.captures(&name) else {
            continue;
        };
        let Some(remove) = captures.get(1) else {
            continue;
        };
        let value = captures.get(2).unwrap_or(remove).as_str().to_string();
        let (start, end) = (remove.start(), remove.end());
        tags.push((extractor.name.clone(), value));
        name.replace_range(start..end, "");
    }
    (name, tags)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn labels(tags: &[(String, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = tags
        .iter()
        .map(|(key, value)| format!("{}=\"{}\"", sanitize(key), escape_label(value)))
        .collect();
    if let Some((key, value)) = extra {
        parts.push(format!("{key}=\"{value}\""));
    }
    // Envoy prints the braces even without labels: `name{} 3`.
    format!("{{{}}}", parts.join(","))
}

fn format_bound(bound: f64) -> String {
    if bound.fract() == 0.0 {
        format!("{}", bound as u64)
    } else {
        format!("{bound}")
    }
}

/// Envoy's `/stats/prometheus` text for the wasm custom metrics (which Envoy prints without the
/// `envoy_` prefix), grouped by extracted name with one `# TYPE` line each.
pub fn render_prometheus(snapshot: &[MetricSnapshot], extractors: &[TagExtractor]) -> String {
    type Series<'a> = Vec<(Vec<(String, String)>, &'a MetricSnapshot)>;
    let mut groups: BTreeMap<String, (MetricKind, Series)> = BTreeMap::new();
    for metric in snapshot {
        let (name, tags) = extract_tags(&metric.name, extractors);
        groups
            .entry(sanitize(&name))
            .or_insert((metric.kind, Vec::new()))
            .1
            .push((tags, metric));
    }
    let mut out = String::new();
    for (name, (kind, series)) in groups {
        let type_name = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        out.push_str(&format!("# TYPE {name} {type_name}\n"));
        for (tags, metric) in series {
            match kind {
                MetricKind::Histogram => {
                    let samples = metric.samples.clone().unwrap_or_default();
                    for bound in DEFAULT_BUCKETS {
                        let count = samples.iter().filter(|s| (**s as f64) <= bound).count();
                        out.push_str(&format!(
                            "{name}_bucket{} {count}\n",
                            labels(&tags, Some(("le", format_bound(bound))))
                        ));
                    }
                    out.push_str(&format!(
                        "{name}_bucket{} {}\n",
                        labels(&tags, Some(("le", "+Inf".into()))),
                        samples.len()
                    ));
                    let sum: u64 = samples.iter().sum();
                    out.push_str(&format!("{name}_sum{} {sum}\n", labels(&tags, None)));
                    out.push_str(&format!(
                        "{name}_count{} {}\n",
                        labels(&tags, None),
                        samples.len()
                    ));
                }
                _ => out.push_str(&format!("{name}{} {}\n", labels(&tags, None), metric.value)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_istio_style_tags() {
        let extractors = vec![
            TagExtractor::new("reporter", r"(reporter=\.=(.*?);\.;)").unwrap(),
            TagExtractor::new("source_service", r"(source_service=\.=(.*?);\.;)").unwrap(),
        ];
        let snapshot = vec![MetricSnapshot {
            name: "reporter=.=source;.;source_service=.=cart;.;eastwest_requests_total".into(),
            kind: MetricKind::Counter,
            value: 3,
            samples: None,
        }];
        let text = render_prometheus(&snapshot, &extractors);
        assert_eq!(
            text,
            "# TYPE eastwest_requests_total counter\neastwest_requests_total{reporter=\"source\",source_service=\"cart\"} 3\n"
        );
    }
}
