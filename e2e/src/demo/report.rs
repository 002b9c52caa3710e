//! The HTML report of a run: one self-contained file (inline SVG and CSS, no script, nothing
//! fetched), with the service graph, the figures per pair and charts over time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use super::metrics::{PairStats, Snapshot};
use super::record::RunRecord;
use super::summary::summary_text;
use super::topology;

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const OK_COLOR: &str = "#2f7ed8";
const ERROR_COLOR: &str = "#d9534f";
const P95_COLOR: &str = "#2f7ed8";
const P99_COLOR: &str = "#8e44ad";
const ADMITTED_COLOR: &str = "#5cb85c";
const DENIED_COLOR: &str = "#d9534f";
const OUTAGE_FILL: &str = "#fbe3e4";

/// The whole report.
pub fn report_html(record: &RunRecord) -> String {
    let mut html = String::new();
    let total = record.mesh.budget_totals();
    let unexpected: f64 = record.mesh.pairs.values().map(|p| p.unexpected).sum();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>eastwest demo report</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }}
.lead {{ color: #555; }}
.tiles {{ display: flex; gap: 1em; flex-wrap: wrap; margin: 1.5em 0; }}
.tile {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 150px; }}
.tile b {{ display: block; font-size: 1.5em; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.92em; }}
th, td {{ text-align: left; padding: 0.35em 0.6em; border-bottom: 1px solid #eee; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
tr.unexpected td {{ color: {ERROR_COLOR}; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
svg text {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }}
</style></head><body>
<h1>eastwest demo: an east-west mesh under a payments outage</h1>
<p class="lead">Four services of a shop on 127.0.0.1, each behind its own Envoy sidecar running
<code>eastwest.wasm</code> (label-enrich, telemetry and retry-budget in one Wasm module), with mTLS
(SPIFFE identities) between the sidecars. {rate:.0} requests/s to {entry} for {elapsed:.0} s{outage}. Every figure below comes from
the sidecars' <code>/stats/prometheus</code> (<code>eastwest_*</code> metrics), except the
end-to-end traffic chart, which the traffic driver measured.</p>
<div class="tiles">
<div class="tile"><b>{requests}</b>requests to {entry}</div>
<div class="tile"><b>{error_ratio:.1}%</b>failed end to end</div>
<div class="tile"><b>{admitted:.0} / {denied:.0}</b>retries through / stopped by the budget</div>
<div class="tile"><b>{unexpected:.0}</b>requests on unexpected dependencies</div>
</div>
"#,
        rate = record.rate,
        entry = topology::ENTRY,
        elapsed = record.elapsed.as_secs_f64(),
        outage = match record.outage_start {
            Some(start) => format!(
                "; {} failed from {} to {}",
                topology::OUTAGE_SERVICE,
                super::summary::seconds(start),
                super::summary::seconds(record.outage_end.unwrap_or(record.elapsed))
            ),
            None => String::new(),
        },
        requests = record.driver.sent,
        error_ratio = record.driver.error_ratio() * 100.0,
        admitted = total.admitted,
        denied = total.denied,
    );
    if record.interrupted {
        html.push_str("<p><b>The run was cut short by Ctrl-C.</b></p>\n");
    }

    html.push_str("<h2>Service graph</h2>\n");
    html.push_str(&service_graph_svg(record));

    html.push_str("<h2>Calls per service pair</h2>\n<table>\n<tr><th>caller</th><th>callee</th><th>requests</th><th>errors</th><th>P95</th><th>P99</th><th>attempts per call</th><th></th></tr>\n");
    for ((source, destination), stats) in record.pairs() {
        let unexpected = topology::is_unexpected(source, destination, stats.unexpected);
        let _ = writeln!(
            html,
            "<tr{}><td>{}<br><small>team {}</small></td><td>{}<br><small>team {}</small></td><td class=n>{}</td><td class=n>{:.1}%</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td>{}</td></tr>",
            if unexpected { " class=unexpected" } else { "" },
            escape(source),
            escape(&stats.source_team),
            escape(destination),
            escape(&stats.destination_team),
            stats.requests,
            stats.error_ratio() * 100.0,
            fmt_ms(stats.quantile(0.95)),
            fmt_ms(stats.quantile(0.99)),
            if stats.requests > 0.0 {
                format!("{:.2}", stats.attempts_at_destination / stats.requests)
            } else {
                "-".into()
            },
            if unexpected { "unexpected dependency" } else { "" }
        );
    }
    html.push_str("</table>\n");

    let shade = record.outage_start.map(|start| {
        (
            start.as_secs_f64(),
            record.outage_end.unwrap_or(record.elapsed).as_secs_f64(),
        )
    });
    let x_max = record.elapsed.as_secs_f64().max(1.0);
    let intervals = intervals(record);

    html.push_str("<h2>Traffic and retries over time</h2>\n<div class=\"charts\">\n");
    let chart_samples = chart_samples(record);
    let driver_points: Vec<(f64, f64, f64)> = chart_samples
        .windows(2)
        .map(|pair| {
            let seconds = (pair[1].at - pair[0].at).as_secs_f64().max(1e-3);
            let delta = pair[1].driver.minus(&pair[0].driver);
            (
                pair[1].at.as_secs_f64(),
                delta.ok as f64 / seconds,
                delta.errors as f64 / seconds,
            )
        })
        .collect();
    html.push_str(&stacked_bars_svg(
        "End-to-end requests per second (traffic driver)",
        "req/s",
        &driver_points,
        ("answered", OK_COLOR),
        ("failed", ERROR_COLOR),
        x_max,
        shade,
    ));
    let retry_points: Vec<(f64, f64, f64)> = intervals
        .iter()
        .map(|(at, seconds, snapshot)| {
            let totals = snapshot.budget_totals();
            (*at, totals.admitted / seconds, totals.denied / seconds)
        })
        .collect();
    html.push_str(&stacked_bars_svg(
        "Retries per second, by the retry budget's decision",
        "retries/s",
        &retry_points,
        ("admitted", ADMITTED_COLOR),
        ("denied", DENIED_COLOR),
        x_max,
        shade,
    ));
    html.push_str("</div>\n");

    html.push_str("<h2>Latency per service pair (P95 and P99 of each interval, caller's sidecar)</h2>\n<div class=\"charts\">\n");
    for ((source, destination), stats) in record.pairs() {
        if stats.requests <= 0.0 {
            continue;
        }
        let key = (source.clone(), destination.clone());
        let series = |q: f64| -> Vec<(f64, Option<f64>)> {
            intervals
                .iter()
                .map(|(at, _, snapshot)| {
                    (*at, snapshot.pairs.get(&key).and_then(|p| p.quantile(q)))
                })
                .collect()
        };
        html.push_str(&line_chart_svg(
            &format!("{source} → {destination}"),
            "ms",
            &[
                ("P95", P95_COLOR, series(0.95)),
                ("P99", P99_COLOR, series(0.99)),
            ],
            x_max,
            shade,
        ));
    }
    html.push_str("</div>\n");

    let _ = write!(
        html,
        "<h2>Summary as printed</h2>\n<pre>{}</pre>\n<p class=\"lead\">Made by <code>cargo xtask demo</code>. The shaded band in the charts is the injected {} outage.</p>\n</body></html>\n",
        escape(&summary_text(record)),
        topology::OUTAGE_SERVICE
    );
    html
}

fn fmt_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

/// The samples the charts use: at least a second apart (the extra samples taken at the
/// outage's start and end would make intervals too short to mean anything), and the last.
fn chart_samples(record: &RunRecord) -> Vec<&super::record::Sample> {
    let mut kept: Vec<&super::record::Sample> = Vec::new();
    for (index, sample) in record.samples.iter().enumerate() {
        let last = index + 1 == record.samples.len();
        match kept.last() {
            Some(previous) if sample.at < previous.at + Duration::from_secs(1) => {
                if last && kept.len() > 1 {
                    kept.pop();
                    kept.push(sample);
                }
            }
            _ => kept.push(sample),
        }
    }
    kept
}

/// (end of interval in seconds, interval length in seconds, what happened in it).
fn intervals(record: &RunRecord) -> Vec<(f64, f64, Snapshot)> {
    let with_mesh: Vec<(f64, &Snapshot)> = chart_samples(record)
        .into_iter()
        .filter_map(|sample| Some((sample.at.as_secs_f64(), sample.mesh.as_ref()?)))
        .collect();
    with_mesh
        .windows(2)
        .filter(|pair| pair[1].0 > pair[0].0)
        .map(|pair| (pair[1].0, pair[1].0 - pair[0].0, pair[1].1.since(pair[0].1)))
        .collect()
}

const CHART_W: f64 = 480.0;
const CHART_H: f64 = 220.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// A "nice" upper bound for an axis (1, 2 or 5 times a power of ten).
fn nice_max(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if value <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn axis_label(value: f64) -> String {
    if value >= 10.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// The frame of a chart: title, axes, grid, the outage band, legend.
fn chart_frame(
    title: &str,
    unit: &str,
    x_max: f64,
    y_max: f64,
    shade: Option<(f64, f64)>,
    legend: &[(&str, &str)],
) -> String {
    let plot_w = CHART_W - LEFT - RIGHT;
    let plot_h = CHART_H - TOP - BOTTOM;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{CHART_W}\" height=\"{CHART_H}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" role=\"img\" aria-label=\"{}\">\n<text x=\"{LEFT}\" y=\"18\" font-size=\"13\" font-weight=\"600\">{}</text>\n",
        escape(title),
        escape(title)
    );
    if let Some((start, end)) = shade {
        let x0 = LEFT + plot_w * (start / x_max).clamp(0.0, 1.0);
        let x1 = LEFT + plot_w * (end / x_max).clamp(0.0, 1.0);
        let _ = writeln!(
            svg,
            "<rect x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"{OUTAGE_FILL}\"/>",
            (x1 - x0).max(0.0)
        );
    }
    for step in 0..=4 {
        let value = y_max * f64::from(step) / 4.0;
        let y = TOP + plot_h - plot_h * f64::from(step) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#666\">{}</text>",
            LEFT + plot_w,
            LEFT - 4.0,
            y + 3.0,
            axis_label(value)
        );
    }
    let x_step = nice_max(x_max / 6.0);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let px = LEFT + plot_w * x / x_max;
        let _ = writeln!(
            svg,
            "<text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#666\">{x:.0}s</text>",
            TOP + plot_h + 14.0
        );
        x += x_step;
    }
    let _ = writeln!(
        svg,
        "<text x=\"6\" y=\"{:.1}\" font-size=\"10\" fill=\"#666\" transform=\"rotate(-90 10 {:.1})\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(unit)
    );
    let mut lx = LEFT;
    let ly = CHART_H - 8.0;
    for (name, color) in legend {
        let _ = writeln!(
            svg,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"11\">{}</text>",
            ly - 9.0,
            lx + 14.0,
            escape(name)
        );
        lx += 24.0 + 7.0 * name.len() as f64;
    }
    if shade.is_some() {
        let _ = writeln!(
            svg,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{OUTAGE_FILL}\" stroke=\"#e0b4b4\"/><text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"11\">{} outage</text>",
            ly - 9.0,
            lx + 14.0,
            topology::OUTAGE_SERVICE
        );
    }
    svg
}

/// Two stacked series per point: `(x seconds, bottom, top)`, as bars ending at x.
fn stacked_bars_svg(
    title: &str,
    unit: &str,
    points: &[(f64, f64, f64)],
    bottom: (&str, &str),
    top: (&str, &str),
    x_max: f64,
    shade: Option<(f64, f64)>,
) -> String {
    let y_max = nice_max(points.iter().map(|(_, a, b)| a + b).fold(0.0, f64::max));
    let plot_w = CHART_W - LEFT - RIGHT;
    let plot_h = CHART_H - TOP - BOTTOM;
    let mut svg = chart_frame(title, unit, x_max, y_max, shade, &[bottom, top]);
    let mut previous_x = 0.0;
    for &(x, low, high) in points {
        let x0 = LEFT + plot_w * (previous_x / x_max).clamp(0.0, 1.0);
        let x1 = LEFT + plot_w * (x / x_max).clamp(0.0, 1.0);
        previous_x = x;
        let width = (x1 - x0 - 1.0).max(1.0);
        let low_h = plot_h * low / y_max;
        let high_h = plot_h * high / y_max;
        let base = TOP + plot_h;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{low_h:.1}\" fill=\"{}\"><title>{}: {low:.1}</title></rect><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{high_h:.1}\" fill=\"{}\"><title>{}: {high:.1}</title></rect>",
            x0 + 0.5,
            base - low_h,
            bottom.1,
            escape(bottom.0),
            x0 + 0.5,
            base - low_h - high_h,
            top.1,
            escape(top.0),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A line of a chart: name, colour, and `(x seconds, y)` points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, Option<f64>)>);

/// Lines over time; `None` values leave a gap.
fn line_chart_svg(
    title: &str,
    unit: &str,
    series: &[Series<'_>],
    x_max: f64,
    shade: Option<(f64, f64)>,
) -> String {
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|(_, _, points)| points.iter().filter_map(|(_, y)| *y))
            .fold(0.0, f64::max),
    );
    let plot_w = CHART_W - LEFT - RIGHT;
    let plot_h = CHART_H - TOP - BOTTOM;
    let legend: Vec<(&str, &str)> = series
        .iter()
        .map(|(name, color, _)| (*name, *color))
        .collect();
    let mut svg = chart_frame(title, unit, x_max, y_max, shade, &legend);
    for (name, color, points) in series {
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (x, y) in points {
            match y {
                Some(y) => segments.last_mut().expect("one segment").push((
                    LEFT + plot_w * (x / x_max).clamp(0.0, 1.0),
                    TOP + plot_h - plot_h * (y / y_max).clamp(0.0, 1.0),
                )),
                None => segments.push(Vec::new()),
            }
        }
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            let path: Vec<String> = segment
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"><title>{}</title></polyline>",
                path.join(" "),
                escape(name)
            );
            for (x, y) in segment {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"{color}\"/>"
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

const NODE_W: f64 = 165.0;
const NODE_H: f64 = 70.0;

/// The services as boxes in columns by distance from the entry, calls as arrows labelled
/// with their figures; unexpected calls dashed red.
fn service_graph_svg(record: &RunRecord) -> String {
    let pairs = record.pairs();
    // Every service of the topology, plus any other the metrics named.
    let mut services: Vec<String> = topology::SERVICES
        .iter()
        .map(|s| s.name.to_owned())
        .collect();
    for ((source, destination), _) in &pairs {
        for name in [source, destination] {
            if !services.contains(name) {
                services.push(name.clone());
            }
        }
    }
    let mut columns: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for service in &services {
        columns
            .entry(topology::depth(service))
            .or_default()
            .push(service.clone());
    }
    let column_count = columns.len().max(1) as f64;
    let rows = columns.values().map(Vec::len).max().unwrap_or(1) as f64;
    let width = 1100.0;
    // Room on the right for calls between services of the last column.
    let right_margin = 210.0;
    let height = (rows * (NODE_H + 90.0) + 40.0).max(260.0);
    let column_gap = (width - 20.0 - right_margin - NODE_W) / (column_count - 1.0).max(1.0);
    let mut position: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (index, (_, names)) in columns.iter().enumerate() {
        let x = 20.0 + column_gap * index as f64;
        let step = height / names.len() as f64;
        for (row, name) in names.iter().enumerate() {
            let y = step * row as f64 + (step - NODE_H) / 2.0;
            position.insert(name.clone(), (x, y));
        }
    }
    let team_of = |service: &str| -> String {
        for ((source, destination), stats) in &pairs {
            if source == service && !stats.source_team.is_empty() {
                return stats.source_team.clone();
            }
            if destination == service && !stats.destination_team.is_empty() {
                return stats.destination_team.clone();
            }
        }
        topology::service(service).map_or("unknown".into(), |s| s.team.to_owned())
    };

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100%\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"service graph\">\n<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker><marker id=\"arrow-red\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"{ERROR_COLOR}\"/></marker></defs>\n"
    );
    for ((source, destination), stats) in &pairs {
        let (Some(&(sx, sy)), Some(&(dx, dy))) = (position.get(source), position.get(destination))
        else {
            continue;
        };
        svg.push_str(&edge_svg(
            (sx, sy),
            (dx, dy),
            stats,
            topology::is_unexpected(source, destination, stats.unexpected),
        ));
    }
    for service in &services {
        let (x, y) = position[service];
        let spec = topology::service(service);
        let details = spec.map_or(String::new(), |s| {
            format!("{} · {}", s.criticality, s.region)
        });
        let entry = if service == topology::ENTRY {
            " (entry)"
        } else {
            ""
        };
        let outage = if service == topology::OUTAGE_SERVICE && record.outage_start.is_some() {
            " stroke-dasharray=\"0\" stroke=\"#d9534f\""
        } else {
            " stroke=\"#888\""
        };
        let _ = writeln!(
            svg,
            "<g><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=\"8\" fill=\"#f4f8fd\"{outage} stroke-width=\"1.5\"/>\
<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"15\" font-weight=\"600\">{}{entry}</text>\
<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">team {}</text>\
<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#666\">{}</text></g>",
            x + 10.0,
            y + 22.0,
            escape(service),
            x + 10.0,
            y + 41.0,
            escape(&team_of(service)),
            x + 10.0,
            y + 58.0,
            escape(&details),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn edge_svg(from: (f64, f64), to: (f64, f64), stats: &PairStats, unexpected: bool) -> String {
    let (color, marker, dash) = if unexpected {
        (ERROR_COLOR, "arrow-red", " stroke-dasharray=\"6 4\"")
    } else {
        ("#555", "arrow", "")
    };
    let mut lines = vec![
        format!(
            "{:.0} req · {:.1}% err",
            stats.requests,
            stats.error_ratio() * 100.0
        ),
        format!("p99 {}", fmt_ms(stats.quantile(0.99))),
    ];
    if unexpected {
        lines.push("unexpected".to_owned());
    }
    let (path, label_x, label_y, anchor) = if (from.0 - to.0).abs() < 1.0 {
        // Same column: a curve on the right-hand side, from one box to the other.
        let (x, y0, y1) = (from.0 + NODE_W, from.1 + NODE_H / 2.0, to.1 + NODE_H / 2.0);
        let bulge = x + 90.0;
        (
            format!("M {x:.1} {y0:.1} C {bulge:.1} {y0:.1}, {bulge:.1} {y1:.1}, {x:.1} {y1:.1}"),
            x + 76.0,
            (y0 + y1) / 2.0 - 6.0,
            "start",
        )
    } else {
        let (x0, y0) = (from.0 + NODE_W, from.1 + NODE_H / 2.0);
        let (x1, y1) = (to.0, to.1 + NODE_H / 2.0);
        let mid = (x0 + x1) / 2.0;
        (
            format!("M {x0:.1} {y0:.1} C {mid:.1} {y0:.1}, {mid:.1} {y1:.1}, {x1:.1} {y1:.1}"),
            mid,
            (y0 + y1) / 2.0 - 20.0,
            "middle",
        )
    };
    let mut svg = format!(
        "<path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{:.1}\"{dash} marker-end=\"url(#{marker})\"/>\n",
        1.5 + (stats.requests.max(1.0).log10()).min(4.0) * 0.5,
    );
    for (index, line) in lines.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{label_x:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"{anchor}\" fill=\"{color}\" stroke=\"#fff\" stroke-width=\"3\" paint-order=\"stroke\">{}</text>",
            label_y + 13.0 * index as f64,
            escape(line)
        );
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_axes_are_round() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(130.0), 200.0);
        assert_eq!(nice_max(40.0), 50.0);
    }
}
