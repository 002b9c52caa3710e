//! What the demo reads from the sidecars: the `eastwest_*` series of each Envoy's
//! `/stats/prometheus`, folded into per-pair figures, and PromQL's `histogram_quantile`.

use std::collections::BTreeMap;

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Parses the Prometheus text format (comments and malformed lines are skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ')?;
        return Some(Sample {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            value: parse_value(value)?,
        });
    };
    let mut labels = BTreeMap::new();
    let mut rest = &line[open + 1..];
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some(Sample {
                name: line[..open].to_owned(),
                labels,
                value: parse_value(after)?,
            });
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (index, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    escaped => value.push(escaped),
                },
                '"' => break index + 1,
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after[end..];
    }
}

fn parse_value(text: &str) -> Option<f64> {
    let value = text.split_whitespace().next()?;
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => value.parse().ok(),
    }
}

/// PromQL's `histogram_quantile(q, ...)` over one histogram's cumulative buckets
/// (`(le, count)`, any order): linear interpolation inside the bucket holding the rank; the
/// `+Inf` bucket answers its lower bound. `None` when the histogram is empty.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let (lower_le, lower_count) = lower;
            if count == lower_count {
                return Some(le);
            }
            return Some(lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count));
        }
        lower = (le, count);
    }
    None
}

/// A service pair as a reporter tagged it.
pub type Pair = (String, String);

/// Cumulative figures of one service pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairStats {
    pub source_team: String,
    pub destination_team: String,
    pub source_region: String,
    pub destination_region: String,
    /// Requests as the caller's sidecar saw them (`reporter="source"`, after retries).
    pub requests: f64,
    /// Of those, answered 5xx or not answered at all (response code 0).
    pub errors: f64,
    /// Attempts that reached the callee's sidecar (`reporter="destination"`).
    pub attempts_at_destination: f64,
    /// Attempts beyond the first, counted by the caller (`eastwest_retry_attempts_total`).
    pub retries: f64,
    /// Calls outside `expected_dependencies` (`eastwest_unexpected_dependency_total`).
    pub unexpected: f64,
    /// Cumulative duration buckets of `reporter="source"`, keyed by `le` (its bits: for
    /// non-negative numbers, bit order is numeric order).
    pub buckets: BTreeMap<u64, f64>,
}

impl PairStats {
    pub fn error_ratio(&self) -> f64 {
        if self.requests > 0.0 {
            self.errors / self.requests
        } else {
            0.0
        }
    }

    pub fn bucket_list(&self) -> Vec<(f64, f64)> {
        self.buckets
            .iter()
            .map(|(le, count)| (f64::from_bits(*le), *count))
            .collect()
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        histogram_quantile(q, &self.bucket_list())
    }
}

/// Retry-budget decisions toward one destination in one mode.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetStats {
    pub admitted: f64,
    pub denied: f64,
}

/// Everything the demo reads from all sidecars at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub pairs: BTreeMap<Pair, PairStats>,
    /// Keyed by (destination service, mode).
    pub budgets: BTreeMap<(String, String), BudgetStats>,
}

impl Snapshot {
    /// Folds the samples of every sidecar's exposition into one snapshot.
    pub fn from_samples<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for sample in samples {
            if !sample.value.is_finite() {
                continue;
            }
            let pair = || {
                (
                    sample.label("source_service").to_owned(),
                    sample.label("destination_service").to_owned(),
                )
            };
            let reporter = sample.label("reporter");
            match sample.name.as_str() {
                "eastwest_requests_total" => {
                    let stats = snapshot.pair_mut(pair(), sample);
                    if reporter == "source" {
                        stats.requests += sample.value;
                        if is_error(sample.label("response_code")) {
                            stats.errors += sample.value;
                        }
                    } else if reporter == "destination" {
                        stats.attempts_at_destination += sample.value;
                    }
                }
                "eastwest_request_duration_milliseconds_bucket" if reporter == "source" => {
                    let Ok(le) = parse_le(sample.label("le")) else {
                        continue;
                    };
                    *snapshot
                        .pair_mut(pair(), sample)
                        .buckets
                        .entry(le.to_bits())
                        .or_default() += sample.value;
                }
                "eastwest_retry_attempts_total" => {
                    snapshot.pair_mut(pair(), sample).retries += sample.value;
                }
                "eastwest_unexpected_dependency_total" => {
                    snapshot.pair_mut(pair(), sample).unexpected += sample.value;
                }
                "eastwest_retry_budget_admitted_total" | "eastwest_retry_budget_denied_total" => {
                    let key = (
                        sample.label("destination_service").to_owned(),
                        sample.label("mode").to_owned(),
                    );
                    let budget = snapshot.budgets.entry(key).or_default();
                    if sample.name.ends_with("admitted_total") {
                        budget.admitted += sample.value;
                    } else {
                        budget.denied += sample.value;
                    }
                }
                _ => {}
            }
        }
        snapshot
    }

    fn pair_mut(&mut self, pair: Pair, sample: &Sample) -> &mut PairStats {
        let stats = self.pairs.entry(pair).or_default();
        for (field, label) in [
            (&mut stats.source_team, "source_team"),
            (&mut stats.destination_team, "destination_team"),
            (&mut stats.source_region, "source_region"),
            (&mut stats.destination_region, "destination_region"),
        ] {
            let value = sample.label(label);
            if field.is_empty() && !value.is_empty() {
                *field = value.to_owned();
            }
        }
        stats
    }

    /// Retries over every destination, counted once: `admitted` went through (admitted by the
    /// caller's budget and not shed by the callee's), `denied` were stopped by either. A retry
    /// admitted on the caller's sidecar (`client`, `client-headers`) also shows up in the
    /// callee's (`server`), so the modes are not simply added up.
    pub fn budget_totals(&self) -> BudgetStats {
        let mut caller = BudgetStats::default();
        let mut callee = BudgetStats::default();
        for ((_, mode), budget) in &self.budgets {
            let side = if mode == "server" {
                &mut callee
            } else {
                &mut caller
            };
            side.admitted += budget.admitted;
            side.denied += budget.denied;
        }
        if caller == BudgetStats::default() {
            return callee;
        }
        BudgetStats {
            admitted: (caller.admitted - callee.denied).max(0.0),
            denied: caller.denied + callee.denied,
        }
    }

    /// What happened between `earlier` and `self` (counters and buckets subtracted; series
    /// that went down, as after a restart, count from zero).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let delta = |now: f64, before: f64| if now >= before { now - before } else { now };
        let pairs = self
            .pairs
            .iter()
            .map(|(pair, now)| {
                let before = earlier.pairs.get(pair).cloned().unwrap_or_default();
                let stats = PairStats {
                    requests: delta(now.requests, before.requests),
                    errors: delta(now.errors, before.errors),
                    attempts_at_destination: delta(
                        now.attempts_at_destination,
                        before.attempts_at_destination,
                    ),
                    retries: delta(now.retries, before.retries),
                    unexpected: delta(now.unexpected, before.unexpected),
                    buckets: now
                        .buckets
                        .iter()
                        .map(|(le, count)| {
                            (
                                *le,
                                delta(*count, before.buckets.get(le).copied().unwrap_or(0.0)),
                            )
                        })
                        .collect(),
                    ..now.clone()
                };
                (pair.clone(), stats)
            })
            .collect();
        let budgets = self
            .budgets
            .iter()
            .map(|(key, now)| {
                let before = earlier.budgets.get(key).copied().unwrap_or_default();
                let stats = BudgetStats {
                    admitted: delta(now.admitted, before.admitted),
                    denied: delta(now.denied, before.denied),
                };
                (key.clone(), stats)
            })
            .collect();
        Snapshot { pairs, budgets }
    }
}

/// 5xx, or no response at all (Envoy's response code 0).
pub fn is_error(response_code: &str) -> bool {
    match response_code.parse::<u16>() {
        Ok(code) => code == 0 || code >= 500,
        Err(_) => false,
    }
}

fn parse_le(text: &str) -> Result<f64, std::num::ParseFloatError> {
    if text == "+Inf" {
        Ok(f64::INFINITY)
    } else {
        text.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_parse_with_escapes_and_without_labels() {
        let samples = parse_exposition(
            "# TYPE eastwest_requests_total counter\n\
             eastwest_requests_total{reporter=\"source\",source_service=\"a\\\"b\",le=\"+Inf\"} 12\n\
             envoy_server_live 1\n\
             broken{x=\"1\" 3\n\
             eastwest_x{} 2.5\n",
        );
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0].label("source_service"), "a\"b");
        assert_eq!(samples[0].label("le"), "+Inf");
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(samples[1].name, "envoy_server_live");
        assert_eq!(samples[2].value, 2.5);
    }

    #[test]
    fn histogram_quantile_interpolates_as_promql_does() {
        // 100 observations: 50 in (0,10], 40 in (10,20], 10 in (20,40].
        let buckets = [
            (10.0, 50.0),
            (20.0, 90.0),
            (40.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(10.0));
        assert_eq!(histogram_quantile(0.7, &buckets), Some(15.0));
        assert_eq!(histogram_quantile(0.95, &buckets), Some(30.0));
        assert_eq!(histogram_quantile(0.99, &buckets), Some(38.0));
        // Ranks in the +Inf bucket answer the highest finite bound, as Prometheus does.
        let tail = [(10.0, 5.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.9, &tail), Some(10.0));
        assert_eq!(histogram_quantile(0.9, &[(10.0, 0.0)]), None);
        assert_eq!(histogram_quantile(0.9, &[]), None);
    }

    fn exposition() -> String {
        let pair = "source_service=\"checkout\",source_team=\"orders\",destination_service=\"payments\",destination_team=\"payments\"";
        format!(
            "eastwest_requests_total{{reporter=\"source\",{pair},response_code=\"200\"}} 90\n\
             eastwest_requests_total{{reporter=\"source\",{pair},response_code=\"503\"}} 8\n\
             eastwest_requests_total{{reporter=\"source\",{pair},response_code=\"0\"}} 2\n\
             eastwest_requests_total{{reporter=\"destination\",{pair},response_code=\"200\"}} 130\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"source\",{pair},response_code=\"200\",le=\"10\"}} 80\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"source\",{pair},response_code=\"200\",le=\"+Inf\"}} 90\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"source\",{pair},response_code=\"503\",le=\"10\"}} 10\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"source\",{pair},response_code=\"503\",le=\"+Inf\"}} 10\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"destination\",{pair},le=\"10\"}} 1\n\
             eastwest_retry_attempts_total{{reporter=\"source\",{pair}}} 30\n\
             eastwest_retry_budget_admitted_total{{destination_service=\"payments\",destination_namespace=\"shop\",mode=\"client\"}} 20\n\
             eastwest_retry_budget_denied_total{{destination_service=\"payments\",destination_namespace=\"shop\",mode=\"client\"}} 10\n\
             eastwest_unexpected_dependency_total{{reporter=\"destination\",source_service=\"inventory\",source_team=\"supply\",destination_service=\"payments\",destination_team=\"payments\"}} 4\n"
        )
    }

    #[test]
    fn snapshots_fold_reporters_codes_and_buckets_per_pair() {
        let samples = parse_exposition(&exposition());
        let snapshot = Snapshot::from_samples(&samples);
        let pay = &snapshot.pairs[&("checkout".to_owned(), "payments".to_owned())];
        assert_eq!(pay.requests, 100.0);
        assert_eq!(pay.errors, 10.0);
        assert!((pay.error_ratio() - 0.1).abs() < 1e-9);
        assert_eq!(pay.attempts_at_destination, 130.0);
        assert_eq!(pay.retries, 30.0);
        assert_eq!(pay.source_team, "orders");
        assert_eq!(pay.bucket_list(), [(10.0, 90.0), (f64::INFINITY, 100.0)]);
        assert_eq!(pay.quantile(0.5), Some(5.0 * 50.0 / 45.0));
        let unexpected = &snapshot.pairs[&("inventory".to_owned(), "payments".to_owned())];
        assert_eq!(
            (unexpected.unexpected, unexpected.source_team.as_str()),
            (4.0, "supply")
        );
        assert_eq!(
            snapshot.budgets[&("payments".to_owned(), "client".to_owned())],
            BudgetStats {
                admitted: 20.0,
                denied: 10.0
            }
        );
    }

    #[test]
    fn intervals_subtract_counters_and_buckets() {
        let samples = parse_exposition(&exposition());
        let later = Snapshot::from_samples(&samples);
        let earlier_text = exposition()
            .replace("} 90\n", "} 45\n")
            .replace("} 20\n", "} 5\n");
        let earlier = Snapshot::from_samples(&parse_exposition(&earlier_text));
        let interval = later.since(&earlier);
        let pay = &interval.pairs[&("checkout".to_owned(), "payments".to_owned())];
        assert_eq!(pay.requests, 45.0);
        // The 45 new 200s all took more than 10 ms.
        assert_eq!(pay.bucket_list(), [(10.0, 0.0), (f64::INFINITY, 45.0)]);
        assert_eq!(interval.budget_totals().admitted, 15.0);
        assert_eq!(interval.budget_totals().denied, 0.0);
        assert!(is_error("503") && is_error("0") && !is_error("404") && !is_error("x"));
    }

    #[test]
    fn retries_admitted_by_the_caller_and_seen_by_the_callee_count_once() {
        let text = "eastwest_retry_budget_admitted_total{destination_service=\"p\",mode=\"client-headers\"} 40\n\
                    eastwest_retry_budget_denied_total{destination_service=\"p\",mode=\"client-headers\"} 100\n\
                    eastwest_retry_budget_admitted_total{destination_service=\"p\",mode=\"server\"} 35\n\
                    eastwest_retry_budget_denied_total{destination_service=\"p\",mode=\"server\"} 5\n";
        let snapshot = Snapshot::from_samples(&parse_exposition(text));
        assert_eq!(
            snapshot.budget_totals(),
            BudgetStats {
                admitted: 35.0,
                denied: 105.0
            }
        );
        let server_only = Snapshot::from_samples(&parse_exposition(
            &text
                .replace("client-headers", "x")
                .replace("mode=\"x\"", "mode=\"server\""),
        ));
        assert_eq!(server_only.budget_totals().denied, 105.0);
    }
}
