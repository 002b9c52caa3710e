//! The demo shop: four services, who owns them, where they run, how slow they are, and whom
//! they call.

/// Every service runs in this Kubernetes-style namespace.
pub const NAMESPACE: &str = "shop";
/// The `environment` pod label of every service.
pub const ENVIRONMENT: &str = "prod";
/// The SPIFFE trust domain of the sidecars' certificates.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The service the traffic driver calls (the shop's edge).
pub const ENTRY: &str = "frontend";
/// The service whose outage starts the retry storm.
pub const OUTAGE_SERVICE: &str = "payments";

/// One service of the shop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceSpec {
    pub name: &'static str,
    /// The owning team (`team` pod label).
    pub team: &'static str,
    /// `critical`, `high`, `medium` or `low` (`criticality` pod label).
    pub criticality: &'static str,
    /// The node locality's region.
    pub region: &'static str,
    pub zone: &'static str,
    /// The service's own work per request, in the test app's delay-choices format
    /// (`LO-HI*WEIGHT,...`, milliseconds): see [`crate::app::DelayChoices`].
    pub work: &'static str,
    /// The calls it makes per request, through its sidecar.
    pub calls: &'static [CallSpec],
}

/// A call a service makes while handling a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallSpec {
    pub service: &'static str,
    pub path: &'static str,
    /// The share of requests that make this call (1.0: every request).
    pub probability: f64,
    /// Whether the service fails (503) when this call fails; optional calls are best effort.
    pub required: bool,
}

/// frontend → checkout → payments and inventory; inventory also calls payments now and then,
/// which is not in the expected dependencies (see [`EXPECTED_DEPENDENCIES`]).
pub const SERVICES: [ServiceSpec; 4] = [
    ServiceSpec {
        name: "frontend",
        team: "web",
        criticality: "high",
        region: "eu-west-1",
        zone: "eu-west-1a",
        work: "1-3*95,8-15*5",
        calls: &[CallSpec {
            service: "checkout",
            path: "/checkout",
            probability: 1.0,
            required: true,
        }],
    },
    ServiceSpec {
        name: "checkout",
        team: "orders",
        criticality: "critical",
        region: "eu-west-1",
        zone: "eu-west-1b",
        work: "2-4*95,10-20*5",
        calls: &[
            CallSpec {
                service: "payments",
                path: "/pay",
                probability: 1.0,
                required: true,
            },
            CallSpec {
                service: "inventory",
                path: "/reserve",
                probability: 1.0,
                required: true,
            },
        ],
    },
    ServiceSpec {
        name: "payments",
        team: "payments",
        criticality: "critical",
        region: "us-east-1",
        zone: "us-east-1a",
        // A card processor: slower, with a long tail.
        work: "8-14*90,30-60*8,120-250*2",
        calls: &[],
    },
    ServiceSpec {
        name: "inventory",
        team: "supply",
        criticality: "medium",
        region: "us-east-1",
        zone: "us-east-1b",
        work: "2-5*97,15-30*3",
        // A "hold stock until paid" check someone added without telling anyone.
        calls: &[CallSpec {
            service: "payments",
            path: "/holds",
            probability: 0.1,
            required: false,
        }],
    },
];

/// The service pairs the shop's architecture allows: the telemetry filter's
/// `expected_dependencies` on every inbound sidecar.
pub const EXPECTED_DEPENDENCIES: [(&str, &str); 3] = [
    ("frontend", "checkout"),
    ("checkout", "payments"),
    ("checkout", "inventory"),
];

pub fn service(name: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().find(|service| service.name == name)
}

/// The SPIFFE identity of a service's sidecar.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service}")
}

/// The name of the caller's outbound cluster toward `service`, as Istio names it; the
/// retry-budget filter derives the destination service and namespace from it.
pub fn outbound_cluster(service: &str) -> String {
    format!("outbound|80||{service}.{NAMESPACE}.svc.cluster.local")
}

/// Every pair a service calls in [`SERVICES`], expected or not.
pub fn designed_pairs() -> Vec<(&'static str, &'static str)> {
    SERVICES
        .iter()
        .flat_map(|service| {
            service
                .calls
                .iter()
                .map(|call| (service.name, call.service))
        })
        .collect()
}

pub fn is_expected(source: &str, destination: &str) -> bool {
    EXPECTED_DEPENDENCIES.contains(&(source, destination))
}

/// Whether a pair of the metrics is an unexpected dependency: telemetry counted it as one, or
/// both ends are shop services whose pair is not expected.
pub fn is_unexpected(source: &str, destination: &str, unexpected_count: f64) -> bool {
    unexpected_count > 0.0
        || (service(source).is_some()
            && service(destination).is_some()
            && !is_expected(source, destination))
}

/// Distance from [`ENTRY`] along the calls (0 for the entry), for ordering and drawing;
/// services that cannot be reached get `SERVICES.len()`.
pub fn depth(service: &str) -> usize {
    let mut depth = vec![(ENTRY, 0usize)];
    let mut frontier = vec![ENTRY];
    while let Some(current) = frontier.first().copied() {
        frontier.remove(0);
        let current_depth = depth
            .iter()
            .find(|(name, _)| *name == current)
            .map_or(0, |d| d.1);
        for call in self::service(current).map_or(&[][..], |s| s.calls) {
            if !depth.iter().any(|(name, _)| *name == call.service) {
                depth.push((call.service, current_depth + 1));
                frontier.push(call.service);
            }
        }
    }
    depth
        .iter()
        .find(|(name, _)| *name == service)
        .map_or(SERVICES.len(), |(_, d)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::DelayChoices;

    #[test]
    fn exactly_one_designed_call_is_unexpected() {
        let unexpected: Vec<_> = designed_pairs()
            .into_iter()
            .filter(|(source, destination)| !is_expected(source, destination))
            .collect();
        assert_eq!(unexpected, [("inventory", "payments")]);
        for (source, destination) in EXPECTED_DEPENDENCIES {
            assert!(designed_pairs().contains(&(source, destination)));
        }
    }

    #[test]
    fn services_are_well_formed() {
        for service in SERVICES {
            DelayChoices::parse(service.work).unwrap();
            assert!(["critical", "high", "medium", "low"].contains(&service.criticality));
            for call in service.calls {
                assert!(self::service(call.service).is_some(), "{call:?}");
            }
        }
        let regions: std::collections::BTreeSet<_> = SERVICES.iter().map(|s| s.region).collect();
        assert_eq!(regions.len(), 2);
    }

    #[test]
    fn depth_follows_the_calls() {
        assert_eq!(depth("frontend"), 0);
        assert_eq!(depth("checkout"), 1);
        assert_eq!(depth("payments"), 2);
        assert_eq!(depth("inventory"), 2);
        assert_eq!(depth("nobody"), 4);
        assert_eq!(
            outbound_cluster("payments"),
            "outbound|80||payments.shop.svc.cluster.local"
        );
    }
}
