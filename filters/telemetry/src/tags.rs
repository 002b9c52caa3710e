//! The tags of DESIGN.md §4 and the metrics that carry them.

use eastwest_common::labels::{Label, Labels};
use serde::Deserialize;

/// A metric tag (a Prometheus label once Envoy's `stats_tags` extract it).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    Reporter,
    SourceService,
    SourceNamespace,
    SourceTeam,
    SourceRegion,
    DestinationService,
    DestinationNamespace,
    DestinationTeam,
    DestinationRegion,
    Environment,
    Criticality,
    ResponseCode,
    RequestProtocol,
    GrpcStatus,
}

impl Tag {
    pub const ALL: [Tag; 14] = [
        Tag::Reporter,
        Tag::SourceService,
        Tag::SourceNamespace,
        Tag::SourceTeam,
        Tag::SourceRegion,
        Tag::DestinationService,
        Tag::DestinationNamespace,
        Tag::DestinationTeam,
        Tag::DestinationRegion,
        Tag::Environment,
        Tag::Criticality,
        Tag::ResponseCode,
        Tag::RequestProtocol,
        Tag::GrpcStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tag::Reporter => "reporter",
            Tag::SourceService => "source_service",
            Tag::SourceNamespace => "source_namespace",
            Tag::SourceTeam => "source_team",
            Tag::SourceRegion => "source_region",
            Tag::DestinationService => "destination_service",
            Tag::DestinationNamespace => "destination_namespace",
            Tag::DestinationTeam => "destination_team",
            Tag::DestinationRegion => "destination_region",
            Tag::Environment => "environment",
            Tag::Criticality => "criticality",
            Tag::ResponseCode => "response_code",
            Tag::RequestProtocol => "request_protocol",
            Tag::GrpcStatus => "grpc_status",
        }
    }

    /// Tags whose value is a workload label: a function of the workload, so they do not
    /// multiply series beyond the service pairs.
    pub fn is_workload_label(self) -> bool {
        !matches!(
            self,
            Tag::Reporter | Tag::ResponseCode | Tag::RequestProtocol | Tag::GrpcStatus
        )
    }
}

/// Which side reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The caller's sidecar.
    Source,
    /// The callee's sidecar.
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Everything a request's metrics are tagged with.
#[derive(Clone, Debug)]
pub struct RequestTags<'a> {
    pub reporter: Reporter,
    pub source: &'a Labels,
    pub destination: &'a Labels,
    pub response_code: &'a str,
    pub grpc: bool,
    pub grpc_status: &'a str,
}

impl RequestTags<'_> {
    pub fn value(&self, tag: Tag) -> &str {
        match tag {
            Tag::Reporter => self.reporter.as_str(),
            Tag::SourceService => self.source.get_or_unknown(Label::Service),
            Tag::SourceNamespace => self.source.get_or_unknown(Label::Namespace),
            Tag::SourceTeam => self.source.get_or_unknown(Label::Team),
            Tag::SourceRegion => self.source.get_or_unknown(Label::Region),
            Tag::DestinationService => self.destination.get_or_unknown(Label::Service),
            Tag::DestinationNamespace => self.destination.get_or_unknown(Label::Namespace),
            Tag::DestinationTeam => self.destination.get_or_unknown(Label::Team),
            Tag::DestinationRegion => self.destination.get_or_unknown(Label::Region),
            Tag::Environment => self.destination.get_or_unknown(Label::Environment),
            Tag::Criticality => self.destination.get_or_unknown(Label::Criticality),
            Tag::ResponseCode => self.response_code,
            Tag::RequestProtocol => {
                if self.grpc {
                    "grpc"
                } else {
                    "http"
                }
            }
            Tag::GrpcStatus => self.grpc_status,
        }
    }
}

/// The metrics the filter emits (DESIGN.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Requests,
    Duration,
    UpstreamFailures,
    RetryAttempts,
    UnexpectedDependency,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Requests,
        Metric::Duration,
        Metric::UpstreamFailures,
        Metric::RetryAttempts,
        Metric::UnexpectedDependency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Requests => "eastwest_requests_total",
            Metric::Duration => "eastwest_request_duration_milliseconds",
            Metric::UpstreamFailures => "eastwest_upstream_failures_total",
            Metric::RetryAttempts => "eastwest_retry_attempts_total",
            Metric::UnexpectedDependency => "eastwest_unexpected_dependency_total",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The tags this metric carries, given the configured request dimensions: requests and
    /// duration carry the dimensions; the others carry the dimensions that describe the
    /// workloads (and reporter), as a failure, a retry or an unexpected call is about the pair.
    pub fn tags(self, dimensions: &[Tag]) -> Vec<Tag> {
        match self {
            Metric::Requests | Metric::Duration => dimensions.to_vec(),
            Metric::UpstreamFailures | Metric::UnexpectedDependency => dimensions
                .iter()
                .copied()
                .filter(|tag| *tag == Tag::Reporter || tag.is_workload_label())
                .collect(),
            // Retry intensity is about the calling service.
            Metric::RetryAttempts => dimensions
                .iter()
                .copied()
                .filter(|tag| {
                    matches!(
                        tag,
                        Tag::Reporter
                            | Tag::SourceService
                            | Tag::SourceNamespace
                            | Tag::SourceTeam
                            | Tag::DestinationService
                            | Tag::DestinationNamespace
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn values_come_from_the_right_end() {
        let mut source = Labels::default();
        source.set(Label::Service, "frontend");
        let mut destination = Labels::default();
        destination.set(Label::Service, "checkout");
        destination.set(Label::Criticality, "high");
        let tags = RequestTags {
            reporter: Reporter::Source,
            source: &source,
            destination: &destination,
            response_code: "503",
            grpc: false,
            grpc_status: "-",
        };
        assert_eq!(tags.value(Tag::SourceService), "frontend");
        assert_eq!(tags.value(Tag::DestinationService), "checkout");
        assert_eq!(tags.value(Tag::Criticality), "high");
        assert_eq!(tags.value(Tag::SourceTeam), "unknown");
        assert_eq!(tags.value(Tag::RequestProtocol), "http");
        assert_eq!(tags.value(Tag::Reporter), "source");
    }

    #[test]
    fn every_tag_is_in_the_shipped_list() {
        for tag in Tag::ALL {
            assert!(
                eastwest_common::metric_name::ALL_TAGS.contains(&tag.name()),
                "{}",
                tag.name()
            );
        }
    }

    #[test]
    fn pair_metrics_drop_request_outcome_tags() {
        let tags = Metric::UpstreamFailures.tags(&Tag::ALL);
        assert!(!tags.contains(&Tag::ResponseCode));
        assert!(tags.contains(&Tag::DestinationTeam));
        let retries = Metric::RetryAttempts.tags(&Tag::ALL);
        assert!(retries.contains(&Tag::SourceService));
        assert!(!retries.contains(&Tag::DestinationTeam));
        assert_eq!(Metric::Requests.tags(&Tag::ALL).len(), Tag::ALL.len());
    }
}
