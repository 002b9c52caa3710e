//! One random, often hostile, stream: the request and its headers, the peer's certificate and
//! claims, the per-stream attributes Envoy would give, and the upstream's answer.
//!
//! Claims are generated so that the checker can tell a forged one from an honest one without
//! re-implementing the filters: every value of a claim the certificate does not back (no proven
//! identity, or a namespace or service account other than the proven ones) contains `forged`,
//! and a stream never mixes such claims with honest ones that could legitimately vouch for them
//! (an honest peer-metadata blob beside forged baggage).

use base64::Engine;
use eastwest_harness::Message;
use prost::Message as _;
use serde_json::{json, Value};

use crate::configs::{Direction, FuzzConfig, Trust, CONFIGURED_DESTINATIONS};
use crate::rng::Rng;

/// The substring every forged claim value carries (and nothing else the generator makes).
pub const FORGED: &str = "forged";

/// Baggage keys of the six labels (DESIGN.md §3).
pub const LABEL_KEYS: [&str; 6] = [
    "service.name",
    "k8s.namespace.name",
    "deployment.environment.name",
    "cloud.region",
    "eastwest.team",
    "service.criticality",
];

#[derive(Debug)]
pub struct StreamInput {
    pub worker: usize,
    pub direction: Direction,
    pub properties: Value,
    pub request: Message,
    pub response: Message,
    /// The namespace the peer's certificate proves (downstream inbound, upstream outbound).
    pub proven_namespace: Option<String>,
    /// Every `baggage` value of the request, as sent.
    pub baggage: Vec<Vec<u8>>,
    /// The one `x-envoy-peer-metadata` value, when it is the only one and agrees with the
    /// certificate (the only case in which it may go on).
    pub honest_blob: Option<String>,
}

struct Identity {
    uri: Option<Vec<u8>>,
    mtls: bool,
    namespace: Option<&'static str>,
    account: Option<&'static str>,
}

/// What a SPIFFE ID says: trust domain, namespace, service account.
type Spiffe = (&'static str, &'static str, &'static str);

/// A downstream or upstream certificate (or none), and what it proves under `trust_domain`.
fn identity(rng: &mut Rng, trust_domain: Option<&str>, workload: &'static str) -> Identity {
    let (uri, mtls, proven): (Option<Vec<u8>>, bool, Option<Spiffe>) = match rng.below(8) {
        0 | 1 => (None, false, None),
        2 => (None, true, None),
        3 | 4 => (
            Some(format!("spiffe://cluster.local/ns/shop/sa/{workload}").into_bytes()),
            true,
            Some(("cluster.local", "shop", workload)),
        ),
        5 => (
            Some(b"spiffe://cluster.local/ns/pay/sa/cart".to_vec()),
            true,
            Some(("cluster.local", "pay", "cart")),
        ),
        6 => (
            Some(b"spiffe://evil.example/ns/shop/sa/x".to_vec()),
            true,
            Some(("evil.example", "shop", "x")),
        ),
        _ => {
            let garbage: &[&[u8]] = &[
                b"spiffe://cluster.local/ns/shop",
                b"spiffe://cluster.local/ns//sa/x",
                b"https://cluster.local/ns/shop/sa/x",
                b"\xff\xfe/ns/shop/sa/x",
                b"",
            ];
            (Some(rng.pick(garbage).to_vec()), true, None)
        }
    };
    let proven = proven.filter(|(domain, _, _)| trust_domain.is_none_or(|d| d == *domain));
    Identity {
        uri,
        mtls,
        namespace: proven.map(|(_, ns, _)| ns),
        account: proven.map(|(_, _, account)| account),
    }
}

fn connection_properties(identity: &Identity) -> Value {
    let mut connection = json!({});
    if identity.mtls {
        connection["mtls"] = json!(true);
    }
    if let Some(uri) = &identity.uri {
        connection["uri_san_peer_certificate"] = bytes_value(uri);
    }
    connection
}

/// A property value: a string when it is UTF-8, else raw bytes.
fn bytes_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => json!({"$bytes": base64::engine::general_purpose::STANDARD.encode(bytes)}),
    }
}

/// A label value: honest ones look like real names, forged ones carry [`FORGED`], hostile ones
/// try the codecs (tag separators, percent escapes, non-ASCII, sizes).
fn value(rng: &mut Rng, forged: bool) -> String {
    let stem = if forged { FORGED } else { "svc" };
    match rng.below(12) {
        0 => format!("{stem}-{}", rng.below(100_000)),
        1 => format!("{stem}=.=x;.;{}", rng.below(10)),
        2 => format!("{stem}%20{}%2C", rng.below(10)),
        3 => format!("{stem}%zz"),
        4 => format!("{stem}-{}", "y".repeat(rng.below(400) as usize)),
        5 => format!("{stem}%E2%9C%93{}", rng.below(10)),
        6 => format!("{stem};p=1"),
        _ => format!("{stem}-{}", rng.below(8)),
    }
}

/// A member that is not a label: kept byte for byte by every filter.
fn other_member(rng: &mut Rng) -> Vec<u8> {
    match rng.below(14) {
        0 => format!("userid={}", rng.below(1000)).into_bytes(),
        1 => b"session=abc;prop=1;flag".to_vec(),
        2 => b" tenant = acme ".to_vec(),
        3 => format!("k{}=v%20x", rng.below(50)).into_bytes(),
        4 => b"\xff\xfe=\x80".to_vec(),
        5 => b"=novalue".to_vec(),
        6 => b"keyonly".to_vec(),
        7 => format!("big={}", "z".repeat(rng.below(3000) as usize)).into_bytes(),
        8 => b"service.namex=1".to_vec(),
        9 => b"xservice.name=1".to_vec(),
        10 => b"service=forgedlookalike".to_vec(),
        11 => b"a=b=c".to_vec(),
        12 => b"\t".to_vec(),
        _ => format!("m{}=%41", rng.below(10)).into_bytes(),
    }
}

/// Label members of one claim set: `namespace` (when claimed) and a few other labels.
fn label_members(rng: &mut Rng, namespace: Option<&str>, forged: bool) -> Vec<Vec<u8>> {
    let mut members = Vec::new();
    if let Some(namespace) = namespace {
        members.push(format!("k8s.namespace.name={namespace}").into_bytes());
    }
    for key in LABEL_KEYS {
        if key != "k8s.namespace.name" && rng.chance(50) {
            members.push(format!("{key}={}", value(rng, forged)).into_bytes());
        }
    }
    if rng.chance(5) && !members.is_empty() {
        // A repeated member.
        let again = members[rng.below(members.len() as u64) as usize].clone();
        members.push(again);
    }
    members
}

/// Istio's peer metadata: base64 of a protobuf Struct.
fn blob(namespace: Option<&str>, account: Option<&str>, app: &str) -> String {
    use prost_types::{value::Kind, Struct, Value as ProtoValue};
    let string = |value: &str| ProtoValue {
        kind: Some(Kind::StringValue(value.to_string())),
    };
    let mut fields = std::collections::BTreeMap::new();
    if let Some(namespace) = namespace {
        fields.insert("NAMESPACE".to_string(), string(namespace));
    }
    if let Some(account) = account {
        fields.insert("SERVICE_ACCOUNT".to_string(), string(account));
    }
    fields.insert("WORKLOAD_NAME".to_string(), string(&format!("{app}-v1")));
    let labels = Struct {
        fields: [("app".to_string(), string(app))].into_iter().collect(),
    };
    fields.insert(
        "LABELS".to_string(),
        ProtoValue {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    base64::engine::general_purpose::STANDARD.encode(Struct { fields }.encode_to_vec())
}

const FORGED_NAMESPACES: [&str; 3] = ["kube-system", "evil", "istio-system"];

fn push_raw(message: &mut Message, name: &str, value: &[u8]) {
    message
        .headers
        .push((name.as_bytes().to_vec(), value.to_vec()));
}

fn attempt_value(rng: &mut Rng) -> Vec<u8> {
    let values: &[&[u8]] = &[
        b"1",
        b"2",
        b"3",
        b"2",
        b"5",
        b"0",
        b"-1",
        b"abc",
        b"99999999999999999999",
        b"",
        b" 2",
        b"\xff",
        b"1e3",
    ];
    rng.pick(values).to_vec()
}

fn authority(rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0 | 1 => rng.pick(&CONFIGURED_DESTINATIONS).as_bytes().to_vec(),
        2 => b"payments.shop.svc.cluster.local:8080".to_vec(),
        3 => format!("flood-{}", rng.below(1_000_000)).into_bytes(),
        4 => format!("flood-{}.ns{}.svc", rng.below(100_000), rng.below(5)).into_bytes(),
        5 => b"".to_vec(),
        6 => b"\xff\xfe:80".to_vec(),
        7 => "h".repeat(rng.below(5000) as usize).into_bytes(),
        8 => b"overflow".to_vec(),
        _ => b"orders:8080".to_vec(),
    }
}

fn cluster_name(rng: &mut Rng) -> Option<Vec<u8>> {
    match rng.below(8) {
        0 => None,
        1 | 2 => Some(
            format!(
                "outbound|8080||{}.shop.svc.cluster.local",
                rng.pick(&CONFIGURED_DESTINATIONS)
            )
            .into_bytes(),
        ),
        3 => Some(
            format!(
                "outbound|80||flood-{}.ns{}.svc.cluster.local",
                rng.below(1_000_000),
                rng.below(20)
            )
            .into_bytes(),
        ),
        4 => Some(b"outbound|8080||orders.shop.svc.cluster.local".to_vec()),
        5 => Some(format!("plain-{}", rng.below(100)).into_bytes()),
        6 => Some(b"outbound|||\xff.svc".to_vec()),
        _ => Some(b"inbound|8080||".to_vec()),
    }
}

pub fn stream(rng: &mut Rng, config: &FuzzConfig, _index: u64) -> StreamInput {
    let worker = rng.below(config.workers as u64) as usize;
    let direction = match config.direction {
        Direction::Both => {
            if rng.chance(50) {
                Direction::Inbound
            } else {
                Direction::Outbound
            }
        }
        fixed => fixed,
    };
    let mut properties = json!({});
    if config.direction == Direction::Both {
        properties["xds"] =
            json!({"listener_direction": if direction == Direction::Inbound { 1 } else { 2 }});
    }
    let mut request = Message::get("/api");
    request
        .headers
        .retain(|(name, _)| name.as_slice() != b":authority");
    push_raw(&mut request, ":authority", &authority(rng));
    let mut response = Message::status(*rng.pick(&[200, 200, 200, 503, 500, 429, 404]));

    // The peer whose claims the filter judges: the caller inbound, the callee outbound.
    let (peer, other_end) = if direction == Direction::Inbound {
        let caller = identity(rng, config.trust_domain, "frontend");
        let downstream = connection_properties(&caller);
        properties["connection"] = downstream;
        (caller, None)
    } else {
        let callee = identity(rng, config.trust_domain, "orders");
        // The upstream certificate is reported only through its URI SAN.
        let upstream = match &callee.uri {
            Some(uri) => json!({"uri_san_peer_certificate": bytes_value(uri)}),
            None => json!({}),
        };
        (
            Identity {
                mtls: callee.uri.is_some(),
                ..callee
            },
            Some(upstream),
        )
    };
    let proven = peer.namespace;

    // Istio peer metadata (inbound claims; sent outbound too, where nothing reads it).
    let mut honest_blob = None;
    let blob_values: Vec<String> = match rng.below(10) {
        0..=4 => Vec::new(),
        5 | 6 => match proven {
            // Honest: the certificate's namespace, its account or none.
            Some(namespace) => {
                let account = if rng.chance(50) { peer.account } else { None };
                let honest = blob(Some(namespace), account, &value(rng, false));
                honest_blob = Some(honest.clone());
                vec![honest]
            }
            None => vec![blob(
                Some(*rng.pick(&["shop", "pay"])),
                None,
                &value(rng, true),
            )],
        },
        7 => {
            // Forged: another namespace, or the right one with another account.
            if rng.chance(50) || proven.is_none() {
                let namespace = if rng.chance(20) {
                    None
                } else {
                    Some(*rng.pick(&FORGED_NAMESPACES))
                };
                vec![blob(namespace, None, &value(rng, true))]
            } else {
                vec![blob(proven, Some("admin"), &value(rng, true))]
            }
        }
        8 => vec![match rng.below(3) {
            0 => "!!!not base64".to_string(),
            1 => base64::engine::general_purpose::STANDARD.encode([0xffu8, 0xff, 0x01, 0x02]),
            _ => "A".repeat(9000),
        }],
        _ => {
            // Several values: refused whatever they say.
            let honest_ns = proven.unwrap_or("shop");
            vec![
                blob(Some(honest_ns), None, &value(rng, true)),
                blob(Some(*rng.pick(&FORGED_NAMESPACES)), None, &value(rng, true)),
            ]
        }
    };
    if honest_blob.is_some() && config.trust == Trust::Any && proven.is_none() {
        honest_blob = None;
    }

    // Baggage: the label members of one claim set spread over 0..3 headers, with other members.
    let forged_claims = proven.is_none() || (honest_blob.is_none() && rng.chance(50));
    let namespace = if forged_claims {
        match rng.below(4) {
            0 => None,
            // Without a proven identity any namespace is a forgery, the "right" one too.
            1 if proven.is_none() => Some("shop"),
            _ => Some(*rng.pick(&FORGED_NAMESPACES)),
        }
    } else if rng.chance(80) {
        proven
    } else {
        None
    };
    let mut members: Vec<Vec<u8>> = Vec::new();
    if rng.chance(70) {
        members.extend(label_members(rng, namespace, forged_claims));
    }
    for _ in 0..rng.below(6) {
        members.push(other_member(rng));
    }
    if rng.chance(3) {
        for index in 0..70 {
            members.push(format!("many{index}=1").into_bytes());
        }
    }
    if rng.chance(3) {
        members.push(format!("huge={}", "x".repeat(8000 + rng.below(12000) as usize)).into_bytes());
    }
    // Shuffle lightly so label members are not always first.
    for index in (1..members.len()).rev() {
        let other = rng.below(index as u64 + 1) as usize;
        members.swap(index, other);
    }
    let headers = if members.is_empty() {
        0
    } else {
        1 + rng.below(3) as usize
    };
    let mut baggage: Vec<Vec<u8>> = vec![Vec::new(); headers];
    for (index, member) in members.into_iter().enumerate() {
        let header = &mut baggage[index % headers.max(1)];
        if !header.is_empty() {
            header.push(b',');
            if rng.chance(10) {
                header.push(b' ');
            }
        }
        header.extend_from_slice(&member);
    }
    if rng.chance(3) && !baggage.is_empty() {
        // Empty members and a trailing comma.
        baggage[0].extend_from_slice(b",,");
    }
    for value in &baggage {
        push_raw(&mut request, "baggage", value);
    }
    for value in &blob_values {
        push_raw(&mut request, "x-envoy-peer-metadata", value.as_bytes());
    }
    if rng.chance(20) {
        // The caller hands the app its own version of the trusted header.
        push_raw(
            &mut request,
            "x-eastwest-source",
            b"service.name=forged-src,k8s.namespace.name=kube-system",
        );
    }
    if rng.chance(10) {
        push_raw(&mut request, "x-eastwest-peer", b"service.name=forged-peer");
    }
    for name in ["x-envoy-attempt-count", "grpc-previous-rpc-attempts"] {
        let copies = match rng.below(10) {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        };
        for _ in 0..copies {
            let value = attempt_value(rng);
            push_raw(&mut request, name, &value);
        }
    }
    if rng.chance(15) {
        push_raw(&mut request, "content-type", b"application/grpc");
    }

    // The answer: the callee's claims (outbound), or the app's (inbound, where the sidecar
    // answers with its own).
    let peer_values = match rng.below(10) {
        0..=3 => 0,
        4..=8 => 1,
        _ => 2 + rng.below(2),
    };
    for _ in 0..peer_values {
        let forged = proven.is_none() || rng.chance(50) || peer_values > 1;
        let namespace = if forged {
            if rng.chance(30) {
                None
            } else {
                Some(*rng.pick(&FORGED_NAMESPACES))
            }
        } else {
            proven
        };
        let mut header: Vec<u8> = label_members(rng, namespace, forged).join(&b","[..]);
        if rng.chance(5) {
            header = b"service.name=%".to_vec();
        }
        if rng.chance(3) {
            header.extend(std::iter::repeat_n(b'p', 9000));
        }
        push_raw(&mut response, "x-eastwest-peer", &header);
    }
    if rng.chance(10) {
        push_raw(&mut response, "grpc-status", b"14");
    }

    // What Envoy knows at the end of the stream.
    if let Some(upstream) = other_end {
        properties["upstream"] = upstream;
        if let Some(cluster) = cluster_name(rng) {
            properties["xds"]["cluster_name"] = bytes_value(&cluster);
        }
    } else {
        properties["upstream"] = json!({});
    }
    if rng.chance(80) {
        properties["upstream"]["request_attempt_count"] =
            json!(*rng.pick(&[1, 1, 1, 2, 3, 0, -1, 1000]));
    }
    let code = *rng.pick(&[200, 200, 503, 500, 0, 429, 999]);
    properties["response"] =
        json!({"code": code, "flags": *rng.pick(&[0, 0, 0x10, 0x20, 0x8000, 0x7fff_ffff])});
    if rng.chance(20) {
        properties["response"]["grpc_status"] = json!(*rng.pick(&[0, 14, 4, 99]));
    }
    properties["request"] = json!({"duration": rng.below(10_000_000_000)});

    StreamInput {
        worker,
        direction,
        properties,
        request,
        response,
        proven_namespace: proven.map(str::to_string),
        baggage,
        honest_blob,
    }
}
