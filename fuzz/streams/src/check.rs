//! The properties every stream must keep (docs/fuzzing.md), checked from what the harness saw:
//! the request that reached the upstream, the response the client got, metrics, shared data.

use eastwest_harness::{Harness, Message, StreamResult};

use crate::configs::{Direction, FuzzConfig, Mode, Trust};
use crate::generate::{StreamInput, FORGED, LABEL_KEYS};

/// This workload's labels as every VM resolves them from its node (configs::properties).
const OWN_MEMBERS: [&str; 6] = [
    "service.name=checkout",
    "k8s.namespace.name=shop",
    "deployment.environment.name=prod",
    "cloud.region=eu-west-1",
    "eastwest.team=payments",
    "service.criticality=high",
];

/// Tags a metric name may carry (DESIGN.md §4 and the filters' own counters).
const TAGS: [&str; 19] = [
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
    "mode",
    "reason",
    "peer",
    "metric",
];

/// Telemetry's series metrics (the ones `max_series` bounds).
const SERIES_METRICS: [&str; 5] = [
    "eastwest_requests_total",
    "eastwest_request_duration_milliseconds",
    "eastwest_upstream_failures_total",
    "eastwest_retry_attempts_total",
    "eastwest_unexpected_dependency_total",
];

fn values(message: &Message, name: &str) -> Vec<Vec<u8>> {
    message
        .headers
        .iter()
        .filter(|(key, _)| key.as_slice() == name.as_bytes())
        .map(|(_, value)| value.clone())
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
}

/// `%XX` decoded (malformed escapes kept as they are): what a reader of the value sees.
fn percent_decoded(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut index = 0;
    while index < value.len() {
        if value[index] == b'%' && index + 2 < value.len() {
            let hex = std::str::from_utf8(&value[index + 1..index + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(byte) = hex {
                out.push(byte);
                index += 3;
                continue;
            }
        }
        out.push(value[index]);
        index += 1;
    }
    out
}

/// The members of baggage values, as written (split on `,`), without the empty ones.
fn members(headers: &[Vec<u8>]) -> Vec<Vec<u8>> {
    headers
        .iter()
        .flat_map(|header| header.split(|b| *b == b','))
        .filter(|member| !member.trim_ascii().is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The key of a member: up to `=` or `;`, without surrounding whitespace.
fn member_key(member: &[u8]) -> &[u8] {
    let end = member
        .iter()
        .position(|b| *b == b'=' || *b == b';')
        .unwrap_or(member.len());
    member[..end].trim_ascii()
}

fn is_label_member(member: &[u8]) -> bool {
    let key = member_key(member);
    LABEL_KEYS.iter().any(|label| label.as_bytes() == key)
}

fn member_value(member: &[u8]) -> &[u8] {
    let value = match member.iter().position(|b| *b == b'=') {
        Some(at) => &member[at + 1..],
        None => &[],
    };
    let end = value.iter().position(|b| *b == b';').unwrap_or(value.len());
    value[..end].trim_ascii()
}

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() > 300 {
        format!("{}... ({} bytes)", &text[..300], bytes.len())
    } else {
        text.into_owned()
    }
}

/// Under `mtls` (and `none`), a caller's labels that reach the app, the filter state or the
/// next hop: no forged value, no namespace but the proven one (`none`: nothing but it).
fn check_trusted_labels(
    what: &str,
    labels: &[Vec<u8>],
    trust: Trust,
    proven: Option<&str>,
) -> Result<(), String> {
    for member in labels {
        let value = percent_decoded(member_value(member));
        if contains(&value, FORGED) {
            return Err(format!("a forged claim reached {what}: {}", show(member)));
        }
        let key = member_key(member);
        if key == b"k8s.namespace.name" && Some(value.as_slice()) != proven.map(str::as_bytes) {
            return Err(format!(
                "{what} names namespace {} but the certificate proves {proven:?}",
                show(&value)
            ));
        }
        if trust == Trust::None && key != b"k8s.namespace.name" {
            return Err(format!(
                "peer_trust none, yet a claim reached {what}: {}",
                show(member)
            ));
        }
    }
    Ok(())
}

pub fn stream(
    config: &FuzzConfig,
    h: &Harness,
    input: &StreamInput,
    result: &StreamResult,
) -> Result<(), String> {
    if let Some(trap) = h.traps.first() {
        return Err(format!(
            "trap in {} on worker {}: {}",
            trap.callback, trap.worker, trap.message
        ));
    }
    // Never blocks traffic because of its own trouble: the only local reply is a denied retry.
    if let Some(reply) = &result.local_reply {
        // 503, or 200 with a gRPC status for a gRPC request.
        let denial = matches!(config.retry_budget, Some((Mode::Client | Mode::Server, _)))
            && (reply.status == 503 || reply.status == 200)
            && reply.details == "retry_budget_exhausted"
            && reply
                .headers
                .iter()
                .any(|(k, v)| k == b"x-eastwest-retry-budget" && v == b"exhausted");
        if !denial {
            return Err(format!(
                "the request was answered locally ({} {:?}) by a filter that may not",
                reply.status, reply.details
            ));
        }
        return Ok(());
    }
    let Some(upstream) = &result.upstream_request else {
        return Err("the request never reached the upstream, and no local reply".into());
    };
    let Some(downstream) = &result.downstream_response else {
        return Err("the client got no response".into());
    };
    let forwarded_baggage = values(upstream, "baggage");
    if !config.label_enrich {
        // Nothing but label-enrich touches baggage.
        if forwarded_baggage != input.baggage {
            return Err(format!(
                "baggage changed by a filter without label-enrich: {:?} -> {:?}",
                input.baggage.iter().map(|b| show(b)).collect::<Vec<_>>(),
                forwarded_baggage
                    .iter()
                    .map(|b| show(b))
                    .collect::<Vec<_>>()
            ));
        }
        return Ok(());
    }
    // Other baggage members are kept byte for byte, in order.
    let others = |headers: &[Vec<u8>]| -> Vec<Vec<u8>> {
        members(headers)
            .into_iter()
            .filter(|member| !is_label_member(member))
            .collect()
    };
    let (sent, forwarded) = (others(&input.baggage), others(&forwarded_baggage));
    if sent != forwarded {
        return Err(format!(
            "other baggage members changed: {:?} -> {:?}",
            sent.iter().map(|m| show(m)).collect::<Vec<_>>(),
            forwarded.iter().map(|m| show(m)).collect::<Vec<_>>()
        ));
    }
    let forwarded_labels: Vec<Vec<u8>> = members(&forwarded_baggage)
        .into_iter()
        .filter(|member| is_label_member(member))
        .collect();
    let peer_headers = values(downstream, "x-eastwest-peer");
    match input.direction {
        Direction::Outbound => {
            // The next hop gets this workload's labels, whatever the app claimed.
            let mut labels: Vec<&[u8]> = forwarded_labels.iter().map(Vec::as_slice).collect();
            labels.sort();
            let mut own: Vec<&[u8]> = OWN_MEMBERS.iter().map(|m| m.as_bytes()).collect();
            own.sort();
            if labels != own {
                return Err(format!(
                    "outbound baggage label members are not this workload's: {:?}",
                    forwarded_labels.iter().map(|m| show(m)).collect::<Vec<_>>()
                ));
            }
            if !peer_headers.is_empty() {
                return Err(format!(
                    "x-eastwest-peer reached the caller's app: {:?}",
                    peer_headers.iter().map(|v| show(v)).collect::<Vec<_>>()
                ));
            }
        }
        Direction::Inbound | Direction::Both => {
            let source = values(upstream, "x-eastwest-source");
            if source.len() > 1 {
                return Err(format!(
                    "{} x-eastwest-source values reached the app",
                    source.len()
                ));
            }
            if peer_headers.len() != 1 || peer_headers[0] != OWN_MEMBERS.join(",").as_bytes() {
                return Err(format!(
                    "the caller's sidecar gets x-eastwest-peer {:?}, not this workload's labels",
                    peer_headers.iter().map(|v| show(v)).collect::<Vec<_>>()
                ));
            }
            if config.trust != Trust::Any {
                let proven = input.proven_namespace.as_deref();
                check_trusted_labels("x-eastwest-source", &members(&source), config.trust, proven)?;
                check_trusted_labels(
                    "the forwarded baggage",
                    &forwarded_labels,
                    config.trust,
                    proven,
                )?;
                let blobs = values(upstream, "x-envoy-peer-metadata");
                let honest = input
                    .honest_blob
                    .as_ref()
                    .filter(|_| config.trust == Trust::Mtls);
                let allowed = match (blobs.as_slice(), honest) {
                    ([], _) => true,
                    ([one], Some(honest)) => one == honest.as_bytes(),
                    _ => false,
                };
                if !allowed {
                    return Err(format!(
                        "x-envoy-peer-metadata went on although its claims were not used: {:?}",
                        blobs.iter().map(|v| show(v)).collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The per-VM caps: series, budgets, shared-data keys; metric names well formed (no tag
/// injected through a value); under `mtls` and `none` no forged value in any metric name or
/// shared-data key.
pub fn bounds(config: &FuzzConfig, h: &Harness) -> Result<(), String> {
    let metrics = h.metrics();
    let trusted = config.trust != Trust::Any;
    let mut series = 0;
    let mut budgets = Vec::new();
    for metric in &metrics {
        let name = metric.name.as_str();
        let parts: Vec<&str> = name.split(";.;").collect();
        let Some((base, tags)) = parts.split_last() else {
            continue;
        };
        for tag in tags {
            let Some((tag_name, _)) = tag.split_once("=.=") else {
                return Err(format!("metric name with a malformed tag: {name:?}"));
            };
            if tag.matches("=.=").count() != 1 || !TAGS.contains(&tag_name) {
                return Err(format!("metric name with an injected tag: {name:?}"));
            }
        }
        if trusted && contains(name.as_bytes(), FORGED) {
            return Err(format!("a forged claim reached a metric label: {name:?}"));
        }
        if SERIES_METRICS.contains(base) {
            series += 1;
        }
        if *base == "eastwest_retry_budget_admitted_total" {
            budgets.push(name);
        }
    }
    if let Some(cap) = config.max_telemetry_series() {
        if series > cap {
            return Err(format!("{series} telemetry series, over the cap of {cap}"));
        }
    }
    if let Some(cap) = config.max_budget_series() {
        if budgets.len() > cap {
            return Err(format!(
                "{} retry budgets, over the cap of {cap}: {budgets:?}",
                budgets.len()
            ));
        }
    }
    if let Some(cap) = config.max_budget_keys() {
        let keys = h.shared_data();
        if keys.len() > cap {
            return Err(format!(
                "{} shared-data keys, over the cap of {cap}",
                keys.len()
            ));
        }
        if trusted {
            if let Some(key) = keys.keys().find(|key| contains(key.as_bytes(), FORGED)) {
                return Err(format!("a forged claim reached a shared-data key: {key:?}"));
            }
        }
    } else if !h.shared_data().is_empty() {
        return Err("shared data written by a module without retry-budget".into());
    }
    Ok(())
}
