//! The shipped Envoy configurations load in a real Envoy and agree with the filters' code.

use std::process::Command;

use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_e2e::{dist_wasm, envoy_binary, workspace_root};

/// `envoy --mode validate` builds every listener and filter (and runs the Wasm filters'
/// `on_configure`) without serving traffic.
fn validate(config: &str) -> (bool, String) {
    let output = Command::new(envoy_binary().unwrap())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
            config,
        ])
        .current_dir(workspace_root())
        .output()
        .expect("run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn static_sidecar_bootstraps_validate() {
    dist_wasm("label-enrich").unwrap();
    let dir = workspace_root().join("envoy-configs/static");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            let (ok, log) = validate(&path.display().to_string());
            assert!(ok, "{} does not validate:\n{log}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1, "no bootstrap found in {}", dir.display());
}

#[test]
fn a_broken_filter_configuration_fails_validation() {
    dist_wasm("label-enrich").unwrap();
    let original = std::fs::read_to_string(
        workspace_root().join("envoy-configs/static/label-enrich-sidecar.yaml"),
    )
    .unwrap();
    let broken = original.replacen(
        r#"{"direction": "inbound", "peer_trust": "mtls"}"#,
        r#"{"direction": "inbound", "peer_trust": "sometimes"}"#,
        1,
    );
    assert_ne!(
        broken, original,
        "the sample configuration changed; update this test"
    );
    let path = workspace_root().join("target/broken-label-enrich-sidecar.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, log) = validate(&path.display().to_string());
    assert!(!ok, "a bad peer_trust must be refused");
    assert!(
        log.contains(
            "eastwest-label-enrich: invalid configuration: peer_trust: unknown variant `sometimes`"
        ),
        "{log}"
    );
}

#[test]
fn stats_tags_fragment_matches_the_tags_the_filters_emit() {
    let fragment =
        std::fs::read_to_string(workspace_root().join("envoy-configs/fragments/stats-tags.yaml"))
            .unwrap();
    for tag in ALL_TAGS {
        let line = format!("{{tag_name: {tag}, regex: '{}'}}", stats_tag_regex(tag));
        assert!(
            fragment.contains(&line),
            "missing {line} in stats-tags.yaml"
        );
    }
}

#[test]
fn istio_settings_cover_every_tag_the_histogram_buckets_and_the_metrics() {
    let root = workspace_root();
    let istio =
        std::fs::read_to_string(root.join("envoy-configs/istio/telemetry-stats.yaml")).unwrap();
    // Istio's built-in extractors cover these names with the same encoding.
    let builtin = [
        "reporter",
        "source_namespace",
        "destination_service",
        "destination_namespace",
        "response_code",
        "request_protocol",
    ];
    let listed: Vec<&str> = istio
        .lines()
        .skip_while(|line| line.trim() != "extraStatTags:")
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- "))
        .collect();
    for tag in ALL_TAGS {
        assert!(
            builtin.contains(&tag) != listed.contains(&tag),
            "{tag}: listed {} times between extraStatTags and Istio's built-in tags",
            u8::from(builtin.contains(&tag)) + u8::from(listed.contains(&tag))
        );
    }
    assert!(
        istio.contains("- \".*eastwest_.*\""),
        "proxyStatsMatcher keeps the metrics"
    );
    let buckets = |text: &str| -> String {
        text.split("buckets: ")
            .nth(1)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let fragment =
        std::fs::read_to_string(root.join("envoy-configs/fragments/histogram-buckets.yaml"))
            .unwrap();
    assert!(
        istio.contains(&format!("{{\"wasmcustom\": {}}}", buckets(&fragment))),
        "the Istio bucket annotation matches the fragment"
    );
}
