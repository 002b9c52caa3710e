//! The summary printed at the end of a run: a service map with owning teams and figures per
//! pair, the retry budget's decisions, and the unexpected dependencies.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::record::RunRecord;
use super::topology;

fn team(team: &str) -> &str {
    if team.is_empty() {
        "unknown"
    } else {
        team
    }
}

/// `frontend (team web)`.
pub fn endpoint(service: &str, team_name: &str) -> String {
    format!("{service} (team {})", team(team_name))
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(value) if value >= 100.0 => format!("{value:.0} ms"),
        Some(value) => format!("{value:.1} ms"),
        None => "-".into(),
    }
}

fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

/// `20 s`, or `6.7 s` when not a whole number of seconds.
pub fn seconds(duration: std::time::Duration) -> String {
    let value = duration.as_secs_f64();
    if (value - value.round()).abs() < 0.05 {
        format!("{value:.0} s")
    } else {
        format!("{value:.1} s")
    }
}

/// The whole summary, ready to print.
pub fn summary_text(record: &RunRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Traffic: {} requests to {} in {} ({:.0}/s){}",
        record.driver.sent,
        topology::ENTRY,
        seconds(record.elapsed),
        record.rate,
        if record.interrupted {
            ", cut short by Ctrl-C"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  {} answered, {} failed ({}); end-to-end p95 {}, p99 {}",
        record.driver.ok,
        record.driver.errors,
        percent(record.driver.error_ratio()),
        ms(record.driver_p95_ms),
        ms(record.driver_p99_ms)
    );
    if let Some(start) = record.outage_start {
        let end = record.outage_end.unwrap_or(record.elapsed);
        let before = record.driver_between(std::time::Duration::ZERO, start);
        let during = record.driver_between(start, end);
        let mut line = format!(
            "  {} failing from {} to {}: errors {} before, {} during",
            topology::OUTAGE_SERVICE,
            seconds(start),
            seconds(end),
            percent(before.error_ratio()),
            percent(during.error_ratio()),
        );
        if record.outage_end.is_some() {
            let after = record.driver_between(end, record.elapsed);
            let _ = write!(line, ", {} after", percent(after.error_ratio()));
        }
        let _ = writeln!(out, "{line}");
    }

    let pairs = record.pairs();
    let _ = writeln!(
        out,
        "\nService map (as each caller's sidecar saw its calls, after retries):"
    );
    if pairs.is_empty() {
        let _ = writeln!(out, "  no calls were recorded");
    }
    let labels: Vec<String> = pairs
        .iter()
        .map(|((source, destination), stats)| {
            format!(
                "{} → {}",
                endpoint(source, &stats.source_team),
                endpoint(destination, &stats.destination_team)
            )
        })
        .collect();
    let width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for (label, ((source, destination), stats)) in labels.iter().zip(&pairs) {
        let pad = width - label.chars().count();
        let flag = if topology::is_unexpected(source, destination, stats.unexpected) {
            "  UNEXPECTED"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {label}{:pad$}  {:>6} req  {:>6} err  p95 {:>8}  p99 {:>8}{flag}",
            "",
            stats.requests,
            percent(stats.error_ratio()),
            ms(stats.quantile(0.95)),
            ms(stats.quantile(0.99)),
        );
    }

    let _ = writeln!(
        out,
        "\nRetries toward each service (retry-budget decisions per mode: client and \
         client-headers on the callers' sidecars, server on the callee's):"
    );
    let mut destinations: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for ((_, destination), stats) in &pairs {
        let entry = destinations.entry(destination.as_str()).or_default();
        entry.0 += stats.requests;
        entry.1 += stats.attempts_at_destination;
    }
    for (destination, _) in record.mesh.budgets.keys() {
        destinations.entry(destination.as_str()).or_default();
    }
    let mut destinations: Vec<_> = destinations.into_iter().collect();
    destinations.sort_by_key(|(name, _)| (topology::depth(name), name.to_string()));
    let mut modes: Vec<&str> = record
        .mesh
        .budgets
        .keys()
        .map(|(_, mode)| mode.as_str())
        .collect();
    modes.sort_by_key(|mode| (*mode == "server", mode.to_string()));
    modes.dedup();
    let name_width = destinations.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (destination, (calls, attempts)) in &destinations {
        let mut line = format!("  → {destination:name_width$}");
        for mode in &modes {
            let budget = record
                .mesh
                .budgets
                .get(&(destination.to_string(), mode.to_string()))
                .copied()
                .unwrap_or_default();
            let _ = write!(
                line,
                "  {mode}: {:>5} admitted {:>5} denied",
                budget.admitted, budget.denied
            );
        }
        if *calls > 0.0 {
            let _ = write!(line, "  | {:.2} attempts per call", attempts / calls);
        }
        let _ = writeln!(out, "{line}");
    }
    let total = record.mesh.budget_totals();
    let _ = writeln!(
        out,
        "  in all: {} retries went through, {} were stopped by a retry budget (the route \
         policy allows 2 per call)",
        total.admitted, total.denied
    );

    let _ = writeln!(
        out,
        "\nUnexpected dependencies (calls outside expected_dependencies):"
    );
    let unexpected: Vec<_> = pairs
        .iter()
        .filter(|(_, stats)| stats.unexpected > 0.0)
        .collect();
    if unexpected.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for ((source, destination), stats) in unexpected {
        let _ = writeln!(
            out,
            "  {} → {}: {} requests (counted by the {destination} sidecar)",
            endpoint(source, &stats.source_team),
            endpoint(destination, &stats.destination_team),
            stats.unexpected
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::driver::DriverCounts;
    use crate::demo::metrics::{parse_exposition, Snapshot};
    use crate::demo::record::Sample;
    use std::time::Duration;

    #[test]
    fn the_summary_names_pairs_teams_budgets_and_unexpected_calls() {
        let pair = |s: &str, st: &str, d: &str, dt: &str| {
            format!("source_service=\"{s}\",source_team=\"{st}\",destination_service=\"{d}\",destination_team=\"{dt}\"")
        };
        let fc = pair("frontend", "web", "checkout", "orders");
        let ip = pair("inventory", "supply", "payments", "payments");
        let text = format!(
            "eastwest_requests_total{{reporter=\"source\",{fc},response_code=\"200\"}} 90\n\
             eastwest_requests_total{{reporter=\"source\",{fc},response_code=\"503\"}} 10\n\
             eastwest_request_duration_milliseconds_bucket{{reporter=\"source\",{fc},le=\"10\"}} 100\n\
             eastwest_requests_total{{reporter=\"source\",{ip},response_code=\"200\"}} 7\n\
             eastwest_unexpected_dependency_total{{reporter=\"destination\",{ip}}} 7\n\
             eastwest_retry_budget_denied_total{{destination_service=\"checkout\",mode=\"client\"}} 12\n"
        );
        let samples = parse_exposition(&text);
        let driver = DriverCounts {
            sent: 100,
            ok: 90,
            errors: 10,
        };
        let record = RunRecord {
            planned: Duration::from_secs(30),
            elapsed: Duration::from_secs(30),
            rate: 50.0,
            outage_start: Some(Duration::from_secs(10)),
            outage_end: Some(Duration::from_secs(20)),
            samples: vec![
                Sample {
                    at: Duration::from_secs(10),
                    driver: DriverCounts {
                        sent: 40,
                        ok: 40,
                        errors: 0,
                    },
                    mesh: None,
                },
                Sample {
                    at: Duration::from_secs(20),
                    driver: DriverCounts {
                        sent: 70,
                        ok: 60,
                        errors: 10,
                    },
                    mesh: None,
                },
            ],
            mesh: Snapshot::from_samples(&samples),
            driver,
            driver_p95_ms: Some(12.0),
            driver_p99_ms: Some(140.0),
            interrupted: false,
        };
        let text = summary_text(&record);
        assert!(
            text.contains("frontend (team web) → checkout (team orders)"),
            "{text}"
        );
        assert!(text.contains("10.0% err"), "{text}");
        assert!(
            text.contains("errors 0.0% before, 33.3% during, 0.0% after"),
            "{text}"
        );
        assert!(
            text.contains("client:     0 admitted    12 denied"),
            "{text}"
        );
        assert!(
            text.contains("inventory (team supply) → payments (team payments): 7 requests (counted by the payments sidecar)"),
            "{text}"
        );
        let map_line = text
            .lines()
            .find(|l| l.contains("inventory (team supply) →"))
            .unwrap();
        assert!(map_line.ends_with("UNEXPECTED"), "{map_line}");
    }
}
