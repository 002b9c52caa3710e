//! How a filter resolves the labels of both ends of a call (DESIGN.md §3), without host calls:
//! the settings every filter shares (`local`, `label_keys`, `peer_trust`, `trust_domain`,
//! `max_baggage_bytes`), the caller's claims on an inbound request, the destination's claims on
//! an outbound response, and the input problems they count. label-enrich applies the results to
//! the request; the other filters use them when label-enrich did not run before them.

use crate::baggage::{self, Claims, DEFAULT_MAX_BAGGAGE_BYTES};
use crate::config::{ConfigError, PeerTrust};
use crate::labels::{LabelKeys, Labels, LocalLabels};
use crate::peer::peer_metadata as decode_peer_metadata;
use crate::trust::{self, PeerIdentity, Refusal};

/// Response header carrying the destination's labels back to the caller's sidecar.
pub const PEER_HEADER: &str = "x-eastwest-peer";
/// Request header through which the callee's application reads the trusted caller labels.
pub const SOURCE_HEADER: &str = "x-eastwest-source";
/// Filter-state keys (Envoy stores them as `wasm.eastwest.source`, `wasm.eastwest.destination`).
pub const SOURCE_STATE_KEY: &str = "eastwest.source";
pub const DESTINATION_STATE_KEY: &str = "eastwest.destination";

/// The label settings every filter shares, validated.
#[derive(Debug, Clone)]
pub struct LabelSettings {
    /// This workload's labels from the configuration (`local`), overriding the node's.
    pub local: Labels,
    pub label_keys: LabelKeys,
    pub peer_trust: PeerTrust,
    pub trust_domain: Option<String>,
    pub max_baggage_bytes: usize,
}

/// Bounds on `max_baggage_bytes`: below 256 no real baggage fits; above 64 KiB a header
/// exceeds every proxy's default limits anyway.
const MAX_BAGGAGE_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256..=65536;

impl LabelSettings {
    /// Validates the shared fields as a filter's configuration holds them; errors name the
    /// field.
    pub fn new(
        local: &LocalLabels,
        label_keys: LabelKeys,
        peer_trust: PeerTrust,
        trust_domain: Option<String>,
        max_baggage_bytes: Option<usize>,
    ) -> Result<LabelSettings, ConfigError> {
        let local = local.to_labels()?;
        for (path, key) in [
            ("label_keys.environment", &label_keys.environment),
            ("label_keys.team", &label_keys.team),
            ("label_keys.criticality", &label_keys.criticality),
        ] {
            if key.is_empty() {
                return Err(ConfigError::new(path, "must not be empty"));
            }
        }
        if trust_domain
            .as_deref()
            .is_some_and(|domain| domain.is_empty() || domain.contains('/'))
        {
            return Err(ConfigError::new(
                "trust_domain",
                "must be a SPIFFE trust domain such as cluster.local",
            ));
        }
        let max_baggage_bytes = max_baggage_bytes.unwrap_or(DEFAULT_MAX_BAGGAGE_BYTES);
        if !MAX_BAGGAGE_BYTES_RANGE.contains(&max_baggage_bytes) {
            return Err(ConfigError::new(
                "max_baggage_bytes",
                format!("{max_baggage_bytes} is outside 256..=65536"),
            ));
        }
        Ok(LabelSettings {
            local,
            label_keys,
            peer_trust,
            trust_domain,
            max_baggage_bytes,
        })
    }
}

/// Input problems that are skipped and counted (the `reason` tag of each filter's
/// `..._malformed_total` counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Baggage over `max_baggage_bytes` or 64 members: no label read from it.
    BaggageOversized,
    /// A label member whose value is badly encoded, invalid or repeated.
    BaggageMember,
    /// `x-envoy-peer-metadata` that is not base64 of a protobuf Struct, holds invalid values or
    /// came in several values.
    PeerMetadata,
    /// An `x-eastwest-peer` response header that is oversized, holds invalid members or came in
    /// several values.
    PeerHeader,
    /// Node metadata that cannot be decoded or holds invalid values.
    NodeMetadata,
    /// No `direction` configured and the listener reports none.
    DirectionUnknown,
    /// A host call failed (the request goes on unchanged).
    HostCall,
}

impl Problem {
    pub const ALL: [Problem; 7] = [
        Problem::BaggageOversized,
        Problem::BaggageMember,
        Problem::PeerMetadata,
        Problem::PeerHeader,
        Problem::NodeMetadata,
        Problem::DirectionUnknown,
        Problem::HostCall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Problem::BaggageOversized => "baggage_oversized",
            Problem::BaggageMember => "baggage_member",
            Problem::PeerMetadata => "peer_metadata",
            Problem::PeerHeader => "peer_header",
            Problem::NodeMetadata => "node_metadata",
            Problem::DirectionUnknown => "direction_unknown",
            Problem::HostCall => "host_call",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Problems seen while handling one request (a count per kind).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Problems([u32; Problem::ALL.len()]);

impl Problems {
    pub fn add(&mut self, problem: Problem, count: u32) {
        self.0[problem.index()] = self.0[problem.index()].saturating_add(count);
    }

    pub fn count(&self, problem: Problem) -> u32 {
        self.0[problem.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = (Problem, u32)> + '_ {
        Problem::ALL
            .into_iter()
            .map(|p| (p, self.count(p)))
            .filter(|(_, n)| *n > 0)
    }

    fn add_claims(&mut self, claims: &Claims) {
        if claims.oversized {
            self.add(Problem::BaggageOversized, 1);
        }
        self.add(Problem::BaggageMember, claims.malformed_members);
    }
}

/// What the inbound sidecar does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundRequest {
    /// The caller's labels after trust: what the application and the filter state see.
    pub source: Labels,
    /// Claims were made and refused.
    pub refused: Option<Refusal>,
    /// `Some(new value)` when the baggage must be rewritten (`Some(None)`: removed).
    pub rewrite_baggage: Option<Option<Vec<u8>>>,
    /// The Istio peer-metadata header must be removed (its claims were not used).
    pub remove_peer_metadata: bool,
    pub problems: Problems,
}

/// What resolving the caller decides, which depends only on its claims (the label members of
/// the baggage, not the other members), Istio's peer metadata and the certificate: the part a
/// filter can keep for the next request with the same claims ([`claims_key`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundDecision {
    pub source: Labels,
    pub refused: Option<Refusal>,
    /// `Some(members)` when the baggage's label members must be replaced by `members` (empty:
    /// removed); the other members stay as they are.
    pub rewrite_members: Option<String>,
    pub remove_peer_metadata: bool,
    pub problems: Problems,
}

impl InboundDecision {
    /// The request's outcome: the decision applied to this request's baggage.
    pub fn apply(&self, baggage_headers: &[&[u8]]) -> InboundRequest {
        InboundRequest {
            source: self.source.clone(),
            refused: self.refused,
            rewrite_baggage: self
                .rewrite_members
                .as_ref()
                .map(|members| baggage::replace_label_members(baggage_headers, members)),
            remove_peer_metadata: self.remove_peer_metadata,
            problems: self.problems.clone(),
        }
    }
}

/// What [`inbound_decision`] reads of the baggage: every label member as it came (raw) and
/// whether the baggage is over the limits (then no claim is read). Equal keys (with the same
/// peer metadata and certificate) give equal decisions, whatever the other members are.
pub fn claims_key<'a>(baggage_headers: &[&'a [u8]], max_bytes: usize) -> (Vec<&'a [u8]>, bool) {
    let total: usize = baggage_headers.iter().map(|header| header.len()).sum();
    let labels = baggage_headers
        .iter()
        .flat_map(|header| baggage::label_members(header))
        .map(|member| member.raw)
        .collect();
    (
        labels,
        total > max_bytes || baggage::too_many_members(baggage_headers),
    )
}

/// Resolves the caller of an inbound request from its claims (`baggage`, then Istio's
/// `x-envoy-peer-metadata`, every value of each) and what its certificate proves.
pub fn inbound_request(
    settings: &LabelSettings,
    baggage_headers: &[&[u8]],
    peer_metadata: &[&[u8]],
    identity: &PeerIdentity,
) -> InboundRequest {
    inbound_decision(settings, baggage_headers, peer_metadata, identity).apply(baggage_headers)
}

/// The labels of Istio peer metadata (every value of the header) that may join the baggage's
/// claims, or why none may: several values, undecodable, or an identity that contradicts the
/// certificate ([`trust::peer_metadata_refusal`]).
fn peer_metadata_claims(
    settings: &LabelSettings,
    values: &[&[u8]],
    identity: &PeerIdentity,
    problems: &mut Problems,
) -> (Option<Labels>, Option<Refusal>) {
    let header = match values {
        [] => return (None, None),
        [header] => header,
        _ => {
            problems.add(Problem::PeerMetadata, 1);
            return (None, Some(Refusal::RepeatedHeader));
        }
    };
    let Ok(metadata) = decode_peer_metadata(header, &settings.label_keys) else {
        problems.add(Problem::PeerMetadata, 1);
        return (None, None);
    };
    problems.add(Problem::PeerMetadata, metadata.resolved.invalid_values);
    match trust::peer_metadata_refusal(
        metadata.namespace.as_deref(),
        metadata.service_account.as_deref(),
        settings.peer_trust,
        identity,
        settings.trust_domain.as_deref(),
    ) {
        Some(refusal) => (None, Some(refusal)),
        None => (Some(metadata.resolved.labels), None),
    }
}

/// The decision of [`inbound_request`], without applying it to the baggage.
pub fn inbound_decision(
    settings: &LabelSettings,
    baggage_headers: &[&[u8]],
    peer_metadata: &[&[u8]],
    identity: &PeerIdentity,
) -> InboundDecision {
    let mut problems = Problems::default();
    let claims = baggage::read_claims(baggage_headers, settings.max_baggage_bytes);
    problems.add_claims(&claims);
    let mut claimed = claims.labels.clone();
    let (metadata_labels, metadata_refused) =
        peer_metadata_claims(settings, peer_metadata, identity, &mut problems);
    if let Some(labels) = &metadata_labels {
        claimed.fill_from(labels);
    }
    let decision = trust::decide(
        &claimed,
        settings.peer_trust,
        identity,
        settings.trust_domain.as_deref(),
    );
    let accepted = decision.refused.is_none() && !claimed.is_empty();
    // Label members stay in the baggage only as the accepted, well-formed values; anything else
    // (refused, oversized, malformed) is removed so that no unverified label reaches the app.
    let clean = accepted && !claims.oversized && claims.malformed_members == 0;
    let rewrite_members = if claims.present && !clean {
        Some(if accepted && !claims.oversized {
            claims.labels.to_baggage_members()
        } else {
            String::new()
        })
    } else {
        None
    };
    // The peer metadata goes on only when its claims were used: later filters and the app
    // must never read a blob that was refused or that the certificate contradicts.
    let metadata_used = accepted && metadata_labels.is_some_and(|labels| !labels.is_empty());
    InboundDecision {
        source: decision.labels,
        refused: decision.refused.or(metadata_refused),
        rewrite_members,
        remove_peer_metadata: !peer_metadata.is_empty() && !metadata_used,
        problems,
    }
}

/// What the outbound sidecar learns from a response's `x-eastwest-peer` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundResponse {
    pub destination: Labels,
    pub refused: Option<Refusal>,
    pub problems: Problems,
}

/// Resolves the destination of an outbound request from the callee sidecar's claims and what
/// the upstream certificate proves; a service or namespace still unknown then comes from the
/// upstream cluster the request was routed to (`cluster`, read only when needed): the
/// caller's own routing, which also names a callee that never answered (a connection failure,
/// a local reply) instead of `unknown`. `peer_header` holds every value of the header: several
/// are refused (none is used).
pub fn outbound_response(
    settings: &LabelSettings,
    peer_header: &[&[u8]],
    identity: &PeerIdentity,
    cluster: impl FnOnce() -> Option<Vec<u8>>,
) -> OutboundResponse {
    let mut problems = Problems::default();
    let mut repeated = None;
    let claimed = match peer_header {
        [] => Labels::default(),
        [header] => {
            let claims = baggage::read_claims(&[header], settings.max_baggage_bytes);
            if claims.oversized || claims.malformed_members > 0 {
                problems.add(Problem::PeerHeader, 1);
            }
            claims.labels
        }
        _ => {
            problems.add(Problem::PeerHeader, 1);
            repeated = Some(Refusal::RepeatedHeader);
            Labels::default()
        }
    };
    let decision = trust::decide(
        &claimed,
        settings.peer_trust,
        identity,
        settings.trust_domain.as_deref(),
    );
    let mut destination = decision.labels;
    if !destination.is_set(crate::Label::Service) || !destination.is_set(crate::Label::Namespace) {
        if let Some(routed) =
            cluster().and_then(|name| crate::cluster::destination_from_cluster(&name))
        {
            for (label, value) in [
                (crate::Label::Service, &routed.service),
                (crate::Label::Namespace, &routed.namespace),
            ] {
                if !destination.is_set(label) && value != crate::labels::UNKNOWN {
                    let _ = destination.set_checked(label, value.as_bytes());
                }
            }
        }
    }
    OutboundResponse {
        destination,
        refused: decision.refused.or(repeated),
        problems,
    }
}

/// Labels published in filter state by label-enrich (all six members, `unknown` where not
/// known) read back; malformed members are skipped.
pub fn labels_from_state(value: &[u8]) -> Labels {
    let mut labels = Labels::default();
    for member in baggage::members(value) {
        let Some(label) = crate::Label::from_baggage_key(member.key) else {
            continue;
        };
        if let Some(decoded) = member.value.and_then(baggage::percent_decode) {
            if decoded != crate::labels::UNKNOWN.as_bytes() && !labels.is_set(label) {
                let _ = labels.set_checked(label, &decoded);
            }
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::SpiffeId;
    use crate::Label;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn settings(trust: &str) -> LabelSettings {
        let peer_trust = match trust {
            "mtls" => PeerTrust::Mtls,
            "any" => PeerTrust::Any,
            _ => PeerTrust::None,
        };
        LabelSettings::new(
            &LocalLabels::default(),
            LabelKeys::default(),
            peer_trust,
            None,
            None,
        )
        .unwrap()
    }

    fn mtls(namespace: &str) -> PeerIdentity {
        PeerIdentity {
            mtls: true,
            spiffe: SpiffeId::parse(
                format!("spiffe://cluster.local/ns/{namespace}/sa/x").as_bytes(),
            ),
        }
    }

    const CALLER: &[u8] =
        b"userid=42,service.name=frontend,k8s.namespace.name=shop,eastwest.team=web";

    #[test]
    fn filter_state_round_trips_and_unknown_stays_unset() {
        let mut labels = Labels::default();
        labels.set(Label::Service, "check out");
        labels.set(Label::Team, "payments");
        let read = labels_from_state(labels.to_complete_members().as_bytes());
        assert_eq!(read, labels);
        assert!(labels_from_state(b"\xff,=,service.name=%zz").is_empty());
    }

    #[test]
    fn trusted_clean_claims_pass_untouched() {
        let outcome = inbound_request(&settings("mtls"), &[CALLER], &[], &mtls("shop"));
        assert_eq!(outcome.refused, None);
        assert_eq!(outcome.source.get(Label::Service), Some("frontend"));
        assert_eq!(outcome.source.get(Label::Team), Some("web"));
        assert_eq!(outcome.rewrite_baggage, None);
        assert_eq!(outcome.problems, Problems::default());
    }

    #[test]
    fn forged_claims_without_mtls_are_stripped() {
        let forged: &[u8] = b"userid=42,service.name=admin";
        let outcome = inbound_request(&settings("mtls"), &[forged], &[], &PeerIdentity::default());
        assert_eq!(outcome.refused, Some(Refusal::NoMtls));
        assert!(outcome.source.is_empty());
        assert_eq!(outcome.rewrite_baggage, Some(Some(b"userid=42".to_vec())));
    }

    #[test]
    fn namespace_mismatch_keeps_only_the_proven_namespace() {
        let outcome = inbound_request(&settings("mtls"), &[CALLER], &[], &mtls("other"));
        assert_eq!(outcome.refused, Some(Refusal::NamespaceMismatch));
        assert_eq!(outcome.source.get(Label::Namespace), Some("other"));
        assert_eq!(outcome.source.get(Label::Service), None);
        assert_eq!(outcome.rewrite_baggage, Some(Some(b"userid=42".to_vec())));
    }

    #[test]
    fn malformed_members_are_dropped_from_accepted_claims() {
        let outcome = inbound_request(
            &settings("any"),
            &[b"service.name=frontend,eastwest.team=%zz,a=1"],
            &[],
            &PeerIdentity::default(),
        );
        assert_eq!(outcome.problems.count(Problem::BaggageMember), 1);
        assert_eq!(outcome.source.get(Label::Service), Some("frontend"));
        assert_eq!(
            outcome.rewrite_baggage,
            Some(Some(b"service.name=frontend,a=1".to_vec()))
        );
    }

    #[test]
    fn oversized_baggage_is_counted_and_its_label_members_removed() {
        let mut big = b"service.name=admin,".to_vec();
        big.extend(std::iter::repeat_n(b'x', 9000));
        let outcome = inbound_request(&settings("any"), &[&big], &[], &PeerIdentity::default());
        assert_eq!(outcome.problems.count(Problem::BaggageOversized), 1);
        assert!(outcome.source.is_empty());
        let rewritten = outcome.rewrite_baggage.unwrap().unwrap();
        assert!(!rewritten.starts_with(b"service.name"));
        assert_eq!(rewritten.len(), 9000);
    }

    #[test]
    fn istio_peer_metadata_fills_gaps_and_garbage_is_counted() {
        let outcome = inbound_request(
            &settings("any"),
            &[],
            &[b"%%%garbage"],
            &PeerIdentity::default(),
        );
        assert_eq!(outcome.problems.count(Problem::PeerMetadata), 1);
        assert!(outcome.source.is_empty());
        assert!(outcome.remove_peer_metadata);
    }

    fn peer_metadata(namespace: &str, app: &str, account: Option<&str>) -> String {
        use base64::Engine;
        use prost::Message;
        let mut metadata = crate::properties::tests::istio_metadata(
            namespace,
            &format!("{app}-v1"),
            &[("app", app)],
        );
        if let Some(account) = account {
            metadata.fields.insert(
                "SERVICE_ACCOUNT".into(),
                crate::properties::tests::string_value(account),
            );
        }
        base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec())
    }

    #[test]
    fn peer_metadata_that_contradicts_the_certificate_is_refused_and_removed() {
        // The case: baggage claims the proven namespace, the blob another one.
        let blob = peer_metadata("kube-system", "admin", None);
        let baggage: &[u8] = b"k8s.namespace.name=shop";
        let outcome = inbound_request(
            &settings("mtls"),
            &[baggage],
            &[blob.as_bytes()],
            &mtls("shop"),
        );
        assert_eq!(outcome.refused, Some(Refusal::PeerMetadataMismatch));
        assert_eq!(outcome.source.get(Label::Service), None);
        assert_eq!(outcome.source.get(Label::Namespace), Some("shop"));
        assert!(outcome.remove_peer_metadata);
        // A service account other than the certificate's, under `any` too.
        let other_account = peer_metadata("shop", "admin", Some("admin"));
        let outcome = inbound_request(
            &settings("any"),
            &[],
            &[other_account.as_bytes()],
            &mtls("shop"),
        );
        assert_eq!(outcome.refused, Some(Refusal::PeerMetadataMismatch));
        assert_eq!(outcome.source.get(Label::Service), None);
        assert!(outcome.remove_peer_metadata);
        // The certificate's own namespace and account: used, and left on the request.
        let honest = peer_metadata("shop", "frontend", Some("x"));
        let outcome = inbound_request(&settings("mtls"), &[], &[honest.as_bytes()], &mtls("shop"));
        assert_eq!(outcome.refused, None);
        assert_eq!(outcome.source.get(Label::Service), Some("frontend"));
        assert!(!outcome.remove_peer_metadata);
    }

    #[test]
    fn several_peer_metadata_values_are_refused_and_removed() {
        let honest = peer_metadata("shop", "frontend", None);
        let forged = peer_metadata("shop", "admin", None);
        let outcome = inbound_request(
            &settings("mtls"),
            &[],
            &[honest.as_bytes(), forged.as_bytes()],
            &mtls("shop"),
        );
        assert_eq!(outcome.refused, Some(Refusal::RepeatedHeader));
        assert_eq!(outcome.problems.count(Problem::PeerMetadata), 1);
        assert_eq!(outcome.source.get(Label::Service), None);
        assert!(outcome.remove_peer_metadata);
    }

    #[test]
    fn unused_peer_metadata_is_removed() {
        // Refused baggage claims: the blob's labels were not used either.
        let blob = peer_metadata("shop", "frontend", None);
        let outcome = inbound_request(
            &settings("mtls"),
            &[b"k8s.namespace.name=kube-system"],
            &[blob.as_bytes()],
            &mtls("shop"),
        );
        assert_eq!(outcome.refused, Some(Refusal::NamespaceMismatch));
        assert!(outcome.remove_peer_metadata);
        let outcome = inbound_request(
            &settings("mtls"),
            &[],
            &[blob.as_bytes()],
            &PeerIdentity::default(),
        );
        assert_eq!(outcome.refused, Some(Refusal::NoMtls));
        assert!(outcome.remove_peer_metadata);
    }

    #[test]
    fn several_peer_header_values_are_refused() {
        let header: &[u8] = b"service.name=payments,k8s.namespace.name=shop";
        let forged: &[u8] = b"service.name=admin,k8s.namespace.name=shop";
        let outcome = outbound_response(
            &settings("any"),
            &[header, forged],
            &mtls("shop"),
            no_cluster,
        );
        assert_eq!(outcome.refused, Some(Refusal::RepeatedHeader));
        assert_eq!(outcome.problems.count(Problem::PeerHeader), 1);
        assert_eq!(outcome.destination.get(Label::Service), None);
        assert_eq!(outcome.destination.get(Label::Namespace), Some("shop"));
    }

    #[test]
    fn destination_claims_follow_the_same_trust() {
        let header: &[u8] =
            b"service.name=payments,k8s.namespace.name=shop,service.criticality=critical";
        let accepted = outbound_response(&settings("mtls"), &[header], &mtls("shop"), no_cluster);
        assert_eq!(accepted.destination.get(Label::Service), Some("payments"));
        assert_eq!(
            accepted.destination.get(Label::Criticality),
            Some("critical")
        );
        let refused = outbound_response(
            &settings("mtls"),
            &[header],
            &PeerIdentity::default(),
            no_cluster,
        );
        assert_eq!(refused.refused, Some(Refusal::NoMtls));
        assert!(refused.destination.is_empty());
        let broken = outbound_response(
            &settings("any"),
            &[b"service.name=%"],
            &PeerIdentity::default(),
            no_cluster,
        );
        assert_eq!(broken.problems.count(Problem::PeerHeader), 1);
        let absent = outbound_response(&settings("any"), &[], &PeerIdentity::default(), no_cluster);
        assert!(absent.destination.is_empty());
        assert_eq!(absent.refused, None);
    }

    fn no_cluster() -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn the_routed_cluster_names_a_destination_that_did_not_answer() {
        let istio = || Some(b"outbound|8080||payments.shop.svc.cluster.local".to_vec());
        let silent = outbound_response(&settings("mtls"), &[], &PeerIdentity::default(), istio);
        assert_eq!(silent.destination.get(Label::Service), Some("payments"));
        assert_eq!(silent.destination.get(Label::Namespace), Some("shop"));
        assert_eq!(silent.destination.get(Label::Team), None);
        // What the certificate proves wins over the cluster's name; the cluster fills the rest.
        let proven = outbound_response(&settings("mtls"), &[], &mtls("payments-ns"), istio);
        assert_eq!(
            proven.destination.get(Label::Namespace),
            Some("payments-ns")
        );
        assert_eq!(proven.destination.get(Label::Service), Some("payments"));
        // Trusted claims win too, and a plain cluster name gives no namespace.
        let header: &[u8] = b"service.name=pay-v2,k8s.namespace.name=shop";
        let claimed =
            outbound_response(&settings("any"), &[header], &PeerIdentity::default(), istio);
        assert_eq!(claimed.destination.get(Label::Service), Some("pay-v2"));
        let plain = outbound_response(&settings("any"), &[], &PeerIdentity::default(), || {
            Some(b"payments".to_vec())
        });
        assert_eq!(plain.destination.get(Label::Service), Some("payments"));
        assert_eq!(plain.destination.get(Label::Namespace), None);
    }

    #[test]
    fn decisions_depend_on_the_claims_not_on_the_other_members() {
        let with = |other: &str| {
            let baggage = format!("{other},service.name=cart,k8s.namespace.name=shop");
            let headers = [baggage.as_bytes()];
            let key: Vec<Vec<u8>> = claims_key(&headers, 8192)
                .0
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect();
            let decision = inbound_decision(&settings("mtls"), &headers, &[], &mtls("shop"));
            (key, decision)
        };
        let (key_a, decision_a) = with("userid=7");
        let (key_b, decision_b) = with("userid=8,session=x;p=1");
        assert_eq!(key_a, key_b);
        assert_eq!(decision_a, decision_b);
        // A refused claim: the decision says which members go, each request's baggage keeps
        // its own other members.
        let forged = [&b"userid=9,service.name=admin,k8s.namespace.name=kube-system"[..]];
        let decision = inbound_decision(&settings("mtls"), &forged, &[], &PeerIdentity::default());
        assert_eq!(decision.rewrite_members.as_deref(), Some(""));
        assert_eq!(
            decision.apply(&forged).rewrite_baggage,
            Some(Some(b"userid=9".to_vec()))
        );
        // Over the limits: no claim is read, and that is part of the key.
        let big = format!("a={},service.name=cart", "x".repeat(9000));
        assert!(claims_key(&[big.as_bytes()], 8192).1);
    }
}
