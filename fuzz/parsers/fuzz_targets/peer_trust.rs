//! The caller's resolution (baggage, peer metadata, certificate) under each `peer_trust`: what
//! the certificate proves is never overridden, and `none` accepts no claim.
//!
//! Input: one byte of mode, then newline-separated fields: the certificate's URI SAN, the
//! peer-metadata values (`|`-separated, base64 of the bytes given), the baggage values.
#![no_main]

use base64::Engine;
use eastwest_common::config::PeerTrust;
use eastwest_common::labels::{LabelKeys, LocalLabels};
use eastwest_common::resolve::{inbound_decision, LabelSettings};
use eastwest_common::trust::{PeerIdentity, SpiffeId};
use eastwest_common::Label;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let trust = match mode % 3 {
        0 => PeerTrust::Mtls,
        1 => PeerTrust::Any,
        _ => PeerTrust::None,
    };
    let mut fields = rest.splitn(3, |b| *b == b'\n');
    let uri = fields.next().unwrap_or_default();
    let blobs: Vec<String> = fields
        .next()
        .unwrap_or_default()
        .split(|b| *b == b'|')
        .filter(|b| !b.is_empty())
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .collect();
    let blobs: Vec<&[u8]> = blobs.iter().map(|b| b.as_bytes()).collect();
    let baggage: Vec<&[u8]> = fields
        .next()
        .unwrap_or_default()
        .split(|b| *b == b'\n')
        .collect();
    let settings = LabelSettings::new(
        &LocalLabels::default(),
        LabelKeys::default(),
        trust,
        None,
        None,
    )
    .expect("valid settings");
    let spiffe = SpiffeId::parse(uri);
    let identity = PeerIdentity {
        mtls: mode & 0x80 != 0,
        spiffe: spiffe.clone(),
    };
    let decision = inbound_decision(&settings, &baggage, &blobs, &identity);
    let proven = spiffe
        .filter(|_| identity.mtls)
        .map(|id| id.namespace)
        .filter(|ns| {
            eastwest_common::labels::validate_value(Label::Namespace, ns.as_bytes()).is_ok()
        });
    let namespace = decision.source.get(Label::Namespace);
    if proven.is_some() {
        assert_eq!(
            namespace,
            proven.as_deref(),
            "a claim overrode the certificate"
        );
    }
    if trust == PeerTrust::Mtls && proven.is_none() {
        assert!(
            decision.source.is_empty(),
            "mtls accepted claims without a certificate"
        );
    }
    if trust == PeerTrust::None {
        let mut claimed = decision.source.clone();
        claimed.set(Label::Namespace, "x");
        let mut only = eastwest_common::Labels::default();
        only.set(Label::Namespace, "x");
        assert_eq!(claimed, only, "peer_trust none accepted a claim");
    }
    if blobs.len() > 1 {
        assert!(decision.remove_peer_metadata);
    }
});
