//! The destination of an outbound request from the upstream cluster it was routed to: what
//! the caller's own configuration says, known even when the callee never answers (a
//! connection failure, a reply Envoy or a filter made locally). Istio names its outbound
//! clusters `outbound|<port>|<subset>|<service>.<namespace>.svc.<domain>`.

/// Longest cluster or host name taken as a service name; longer ones are ignored.
const MAX_NAME_BYTES: usize = 253;

/// The destination of an outbound request as its upstream cluster names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub service: String,
    /// Known when the cluster name says it (Istio); else `unknown`.
    pub namespace: String,
}

fn valid_name(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_BYTES
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'~'));
    ok.then_some(text)
}

/// The destination service of an upstream cluster: Istio names outbound clusters
/// `outbound|<port>|<subset>|<service>.<namespace>.svc.<domain>`; any other cluster name is
/// taken as the service itself. `None` when the name is not usable as a label.
pub fn destination_from_cluster(cluster: &[u8]) -> Option<Destination> {
    let name = valid_name(cluster).or_else(|| {
        // Istio's names contain `|`, which valid_name refuses on purpose for plain names.
        let text = std::str::from_utf8(cluster).ok()?;
        text.starts_with("outbound|").then_some(text)
    })?;
    if let Some(rest) = name.strip_prefix("outbound|") {
        let host = rest.rsplit('|').next()?;
        return destination_from_host(host.as_bytes());
    }
    label_sized(name)?;
    Some(Destination {
        service: name.to_string(),
        namespace: crate::labels::UNKNOWN.to_string(),
    })
}

/// A name longer than a label value may be is not one (found by `fuzz/parsers`' cluster_names:
/// it would have become a budget and a metric tag no label could hold).
fn label_sized(name: &str) -> Option<&str> {
    (name.len() <= crate::labels::MAX_LABEL_VALUE_BYTES).then_some(name)
}

/// The destination service of a host name (`:authority` without the port, or the host of an
/// Istio cluster): `<service>.<namespace>.svc...` gives both, any other host is the service.
pub fn destination_from_host(authority: &[u8]) -> Option<Destination> {
    let host = valid_name(authority)?;
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let mut labels = host.split('.');
    let first = labels.next().filter(|label| !label.is_empty())?;
    let second = labels.next();
    let third = labels.next();
    let (service, namespace) = match (second, third) {
        (Some(namespace), Some("svc")) if !namespace.is_empty() => (first, namespace),
        _ => (host, crate::labels::UNKNOWN),
    };
    Some(Destination {
        service: label_sized(service)?.to_string(),
        namespace: label_sized(namespace)?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_a_label_value_are_not_destinations() {
        let long = "u".repeat(crate::labels::MAX_LABEL_VALUE_BYTES + 1);
        assert_eq!(destination_from_host(long.as_bytes()), None);
        assert_eq!(destination_from_cluster(long.as_bytes()), None);
        let istio = format!("outbound|80||{long}.shop.svc.cluster.local");
        assert_eq!(destination_from_cluster(istio.as_bytes()), None);
        let fits = "u".repeat(crate::labels::MAX_LABEL_VALUE_BYTES);
        assert!(destination_from_host(fits.as_bytes()).is_some());
    }
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn destinations_from_istio_and_plain_cluster_names() {
        assert_eq!(
            destination_from_cluster(b"outbound|8080||payments.shop.svc.cluster.local"),
            Some(Destination {
                service: "payments".into(),
                namespace: "shop".into()
            })
        );
        assert_eq!(
            destination_from_cluster(b"outbound|443|v2|api.example.com"),
            Some(Destination {
                service: "api.example.com".into(),
                namespace: "unknown".into()
            })
        );
        assert_eq!(
            destination_from_cluster(b"payments"),
            Some(Destination {
                service: "payments".into(),
                namespace: "unknown".into()
            })
        );
        assert_eq!(destination_from_cluster(b""), None);
        assert_eq!(destination_from_cluster(b"pay ments"), None);
        assert_eq!(destination_from_cluster(b"a|b"), None);
        assert_eq!(destination_from_cluster(b"\xffpay"), None);
        assert_eq!(destination_from_cluster(&[b'a'; 300]), None);
    }

    #[test]
    fn destinations_from_authorities() {
        assert_eq!(
            destination_from_host(b"checkout.shop.svc.cluster.local:8080"),
            Some(Destination {
                service: "checkout".into(),
                namespace: "shop".into()
            })
        );
        assert_eq!(
            destination_from_host(b"checkout:8080").map(|d| d.service),
            Some("checkout".into())
        );
        assert_eq!(destination_from_host(b":8080"), None);
        assert_eq!(destination_from_host(b"evil/../x"), None);
    }
}
