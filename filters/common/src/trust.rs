//! Peer trust (DESIGN.md §3): which of a peer's claimed labels are accepted, given what its
//! mTLS certificate proves.

use crate::config::PeerTrust;
use crate::labels::{Label, Labels};

/// A SPIFFE ID of the Istio shape `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Parses a URI SAN; `None` for anything that is not exactly the Istio shape.
    pub fn parse(uri: &[u8]) -> Option<SpiffeId> {
        let uri = std::str::from_utf8(uri).ok()?;
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next()?;
        let (ns_key, namespace, sa_key, account) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || ns_key != "ns" || sa_key != "sa" {
            return None;
        }
        if [trust_domain, namespace, account]
            .iter()
            .any(|part| part.is_empty())
        {
            return None;
        }
        Some(SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: account.into(),
        })
    }
}

/// What the connection proves about the peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer presented a certificate that the proxy verified.
    pub mtls: bool,
    /// The first URI SAN of that certificate, when it is a SPIFFE ID.
    pub spiffe: Option<SpiffeId>,
}

/// Why claims were refused (a metric tag, so kept to a few fixed values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `peer_trust: none`.
    TrustNone,
    /// `peer_trust: mtls` and the peer did not use mTLS.
    NoMtls,
    /// mTLS, but no SPIFFE ID in the certificate.
    NoSpiffeId,
    /// The SPIFFE ID's trust domain is not the configured one.
    TrustDomain,
    /// The claimed namespace differs from (or is missing next to) the certificate's.
    NamespaceMismatch,
    /// Istio peer metadata whose `NAMESPACE` or `SERVICE_ACCOUNT` differs from the
    /// certificate's (or, under `mtls`, names no namespace).
    PeerMetadataMismatch,
    /// The claims came in several values of a header that carries one (`x-envoy-peer-metadata`,
    /// `x-eastwest-peer`): which one the next hop would read is not defined, so none is used.
    RepeatedHeader,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::TrustNone,
        Refusal::NoMtls,
        Refusal::NoSpiffeId,
        Refusal::TrustDomain,
        Refusal::NamespaceMismatch,
        Refusal::PeerMetadataMismatch,
        Refusal::RepeatedHeader,
    ];

    /// Position in [`Refusal::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TrustNone => "trust_none",
            Refusal::NoMtls => "no_mtls",
            Refusal::NoSpiffeId => "no_spiffe_id",
            Refusal::TrustDomain => "trust_domain",
            Refusal::NamespaceMismatch => "namespace_mismatch",
            Refusal::PeerMetadataMismatch => "peer_metadata_mismatch",
            Refusal::RepeatedHeader => "repeated_header",
        }
    }
}

/// The peer's labels after applying trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub labels: Labels,
    /// `Some` when the peer claimed labels and they were refused.
    pub refused: Option<Refusal>,
}

/// The SPIFFE ID the connection proves: presented over mTLS and in the configured trust domain.
fn proven_spiffe<'a>(
    identity: &'a PeerIdentity,
    trust_domain: Option<&str>,
) -> Option<&'a SpiffeId> {
    identity
        .spiffe
        .as_ref()
        .filter(|_| identity.mtls)
        .filter(|id| trust_domain.is_none_or(|domain| domain == id.trust_domain))
}

/// Whether Istio peer metadata may be used at all, judged on its own before its labels join the
/// baggage's claims: the identity it states (`NAMESPACE`, `SERVICE_ACCOUNT`, as raw strings) must
/// not contradict the certificate, in every mode; under `mtls` it must also come from an mTLS
/// peer with a SPIFFE ID of the trust domain and name that ID's namespace.
pub fn peer_metadata_refusal(
    namespace: Option<&str>,
    service_account: Option<&str>,
    mode: PeerTrust,
    identity: &PeerIdentity,
    trust_domain: Option<&str>,
) -> Option<Refusal> {
    if mode == PeerTrust::None {
        return Some(Refusal::TrustNone);
    }
    if mode == PeerTrust::Mtls {
        if !identity.mtls {
            return Some(Refusal::NoMtls);
        }
        let Some(id) = identity.spiffe.as_ref() else {
            return Some(Refusal::NoSpiffeId);
        };
        if trust_domain.is_some_and(|domain| domain != id.trust_domain) {
            return Some(Refusal::TrustDomain);
        }
    }
    let id = proven_spiffe(identity, trust_domain)?;
    let namespace_contradicts = match namespace {
        Some(namespace) => namespace != id.namespace,
        None => mode == PeerTrust::Mtls,
    };
    let account_contradicts = service_account.is_some_and(|account| account != id.service_account);
    (namespace_contradicts || account_contradicts).then_some(Refusal::PeerMetadataMismatch)
}

/// Applies `peer_trust` to a peer's claims. A claim never overrides what the certificate
/// proves: a claimed namespace that differs from the certificate's refuses the claims in every
/// mode. Refused claims leave only what the certificate proves (its namespace).
pub fn decide(
    claims: &Labels,
    mode: PeerTrust,
    identity: &PeerIdentity,
    trust_domain: Option<&str>,
) -> Decision {
    let proven_spiffe = proven_spiffe(identity, trust_domain);
    let mut proven = Labels::default();
    if let Some(id) = proven_spiffe {
        if crate::labels::validate_value(Label::Namespace, id.namespace.as_bytes()).is_ok() {
            proven.set(Label::Namespace, id.namespace.clone());
        }
    }
    if claims.is_empty() {
        return Decision {
            labels: proven,
            refused: None,
        };
    }
    let refusal = match mode {
        PeerTrust::None => Some(Refusal::TrustNone),
        PeerTrust::Any => proven_spiffe
            .filter(|id| {
                claims
                    .get(Label::Namespace)
                    .is_some_and(|ns| ns != id.namespace)
            })
            .map(|_| Refusal::NamespaceMismatch),
        PeerTrust::Mtls => {
            if !identity.mtls {
                Some(Refusal::NoMtls)
            } else if let Some(id) = identity.spiffe.as_ref() {
                if trust_domain.is_some_and(|domain| domain != id.trust_domain) {
                    Some(Refusal::TrustDomain)
                } else if claims.get(Label::Namespace) != Some(id.namespace.as_str()) {
                    Some(Refusal::NamespaceMismatch)
                } else {
                    None
                }
            } else {
                Some(Refusal::NoSpiffeId)
            }
        }
    };
    match refusal {
        Some(refusal) => Decision {
            labels: proven,
            refused: Some(refusal),
        },
        None => {
            let mut labels = claims.clone();
            labels.fill_from(&proven);
            Decision {
                labels,
                refused: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn claims(service: &str, namespace: Option<&str>) -> Labels {
        let mut labels = Labels::default();
        labels.set(Label::Service, service);
        if let Some(namespace) = namespace {
            labels.set(Label::Namespace, namespace);
        }
        labels
    }

    fn mtls_identity(uri: &str) -> PeerIdentity {
        PeerIdentity {
            mtls: true,
            spiffe: SpiffeId::parse(uri.as_bytes()),
        }
    }

    #[test]
    fn parses_only_the_istio_spiffe_shape() {
        let id = SpiffeId::parse(b"spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "frontend");
        for bad in [
            &b"spiffe://cluster.local/ns/shop"[..],
            b"spiffe://cluster.local/ns/shop/sa/x/extra",
            b"https://cluster.local/ns/shop/sa/x",
            b"spiffe://cluster.local/namespace/shop/sa/x",
            b"spiffe:///ns/shop/sa/x",
            b"spiffe://d/ns//sa/x",
            b"\xff",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mtls_mode_accepts_only_matching_namespace() {
        let identity = mtls_identity("spiffe://cluster.local/ns/shop/sa/frontend");
        let accepted = decide(
            &claims("frontend", Some("shop")),
            PeerTrust::Mtls,
            &identity,
            None,
        );
        assert_eq!(accepted.refused, None);
        assert_eq!(accepted.labels.get(Label::Service), Some("frontend"));

        let refused = decide(
            &claims("admin", Some("kube-system")),
            PeerTrust::Mtls,
            &identity,
            None,
        );
        assert_eq!(refused.refused, Some(Refusal::NamespaceMismatch));
        assert_eq!(refused.labels.get(Label::Service), None);
        assert_eq!(refused.labels.get(Label::Namespace), Some("shop"));

        let no_namespace = decide(&claims("frontend", None), PeerTrust::Mtls, &identity, None);
        assert_eq!(no_namespace.refused, Some(Refusal::NamespaceMismatch));
    }

    #[test]
    fn mtls_mode_refuses_without_mtls_or_spiffe_or_in_another_domain() {
        let claimed = claims("admin", Some("shop"));
        let plain = PeerIdentity::default();
        assert_eq!(
            decide(&claimed, PeerTrust::Mtls, &plain, None).refused,
            Some(Refusal::NoMtls)
        );
        let no_spiffe = PeerIdentity {
            mtls: true,
            spiffe: None,
        };
        assert_eq!(
            decide(&claimed, PeerTrust::Mtls, &no_spiffe, None).refused,
            Some(Refusal::NoSpiffeId)
        );
        let other_domain = mtls_identity("spiffe://evil.example/ns/shop/sa/x");
        let decision = decide(
            &claimed,
            PeerTrust::Mtls,
            &other_domain,
            Some("cluster.local"),
        );
        assert_eq!(decision.refused, Some(Refusal::TrustDomain));
        assert!(
            decision.labels.is_empty(),
            "a foreign domain proves nothing"
        );
    }

    #[test]
    fn any_mode_accepts_claims_but_never_against_the_certificate() {
        let plain = PeerIdentity::default();
        let decision = decide(&claims("admin", None), PeerTrust::Any, &plain, None);
        assert_eq!(decision.refused, None);
        assert_eq!(decision.labels.get(Label::Service), Some("admin"));

        let identity = mtls_identity("spiffe://cluster.local/ns/shop/sa/frontend");
        let mismatch = decide(
            &claims("admin", Some("other")),
            PeerTrust::Any,
            &identity,
            None,
        );
        assert_eq!(mismatch.refused, Some(Refusal::NamespaceMismatch));
        let filled = decide(&claims("frontend", None), PeerTrust::Any, &identity, None);
        assert_eq!(filled.labels.get(Label::Namespace), Some("shop"));
    }

    #[test]
    fn peer_metadata_must_not_contradict_the_certificate() {
        let identity = mtls_identity("spiffe://cluster.local/ns/shop/sa/frontend");
        let refusal = |namespace, account, mode| {
            peer_metadata_refusal(namespace, account, mode, &identity, None)
        };
        assert_eq!(
            refusal(Some("shop"), Some("frontend"), PeerTrust::Mtls),
            None
        );
        assert_eq!(refusal(Some("shop"), None, PeerTrust::Mtls), None);
        for mode in [PeerTrust::Mtls, PeerTrust::Any] {
            assert_eq!(
                refusal(Some("kube-system"), None, mode),
                Some(Refusal::PeerMetadataMismatch)
            );
            assert_eq!(
                refusal(Some("shop"), Some("admin"), mode),
                Some(Refusal::PeerMetadataMismatch)
            );
        }
        // Under `mtls` the blob must name the proven namespace; `any` lets it leave it out.
        assert_eq!(
            refusal(None, None, PeerTrust::Mtls),
            Some(Refusal::PeerMetadataMismatch)
        );
        assert_eq!(refusal(None, None, PeerTrust::Any), None);
        assert_eq!(
            refusal(Some("shop"), None, PeerTrust::None),
            Some(Refusal::TrustNone)
        );
        let plain = PeerIdentity::default();
        assert_eq!(
            peer_metadata_refusal(Some("shop"), None, PeerTrust::Mtls, &plain, None),
            Some(Refusal::NoMtls)
        );
        assert_eq!(
            peer_metadata_refusal(Some("kube-system"), None, PeerTrust::Any, &plain, None),
            None,
            "without a certificate nothing is contradicted"
        );
        let no_spiffe = PeerIdentity {
            mtls: true,
            spiffe: None,
        };
        assert_eq!(
            peer_metadata_refusal(Some("shop"), None, PeerTrust::Mtls, &no_spiffe, None),
            Some(Refusal::NoSpiffeId)
        );
        assert_eq!(
            peer_metadata_refusal(
                Some("shop"),
                None,
                PeerTrust::Mtls,
                &identity,
                Some("other.domain")
            ),
            Some(Refusal::TrustDomain)
        );
    }

    #[test]
    fn none_mode_refuses_everything_and_no_claims_refuse_nothing() {
        let identity = mtls_identity("spiffe://cluster.local/ns/shop/sa/frontend");
        let decision = decide(
            &claims("frontend", Some("shop")),
            PeerTrust::None,
            &identity,
            None,
        );
        assert_eq!(decision.refused, Some(Refusal::TrustNone));
        assert_eq!(decision.labels.get(Label::Namespace), Some("shop"));
        let nothing = decide(
            &Labels::default(),
            PeerTrust::Mtls,
            &PeerIdentity::default(),
            None,
        );
        assert_eq!(nothing.refused, None);
        assert!(nothing.labels.is_empty());
    }
}
