//! What only the one-module sidecar (dist/eastwest.wasm, DESIGN.md §8) has, in real Envoy:
//!
//! - all three features in one module behave exactly as the three separate modules chained
//!   (label-enrich, telemetry, retry-budget, as the shipped static sidecars run them): the same
//!   requests through a caller's sidecar (outbound) and a callee's sidecar (inbound), and
//!   straight to the callee's, give the same response and upstream headers, the same filter
//!   state (`wasm.eastwest.source` / `wasm.eastwest.destination` in the access logs), the same
//!   metrics (names and values, from Envoy's Prometheus text), the same retry-budget decisions
//!   and the same log lines;
//! - its configuration: an empty one is refused by Envoy.
//!
//! The per-feature behaviour tests (label_enrich.rs, telemetry.rs, retry_budget.rs) run
//! against eastwest.wasm with one section each; the harness tests its configuration errors
//! and shared settings (harness/tests/sidecar.rs).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use eastwest_common::metric_name::{stats_tag_regex, ALL_TAGS};
use eastwest_e2e::{
    bootstrap, dist_wasm, feature_filter, free_port, http2_request, http_request, wasm_filter,
    ClusterBuilder, Envoy, EnvoyOptions, Feature, ListenerBuilder, ModuleUnderTest, Node, Response,
    TestApp, TrafficDirection,
};
use serde_json::{json, Map, Value};

const CALLER_LABELS: &str = "service.name=frontend,k8s.namespace.name=shop,\
    deployment.environment.name=prod,cloud.region=eu-west-1,eastwest.team=web,\
    service.criticality=high";

/// Both ends' labels from filter state, the outcome, and what the retry budget said.
const ACCESS_LOG_FORMAT: &str = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% \
    attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% budget=%RESP(X-EASTWEST-RETRY-BUDGET)% \
    source=\"%FILTER_STATE(wasm.eastwest.source:PLAIN)%\" \
    destination=\"%FILTER_STATE(wasm.eastwest.destination:PLAIN)%\"";

/// How the features are loaded into each sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// label-enrich, telemetry and retry-budget as three filters, each its own module.
    Chain,
    /// One eastwest.wasm filter with the three sections.
    Sidecar,
}

/// The three features' configurations for one sidecar, and how the sidecar module gets them.
#[derive(Clone)]
struct Features {
    label_enrich: Value,
    telemetry: Value,
    retry_budget: Value,
    /// Settings the sidecar module gets once at the top level instead of in each section
    /// (the chain's modules each get them in their own configuration).
    shared_at_top: &'static [&'static str],
}

impl Features {
    fn each(&self) -> [(Feature, &Value); 3] {
        [
            (Feature::LabelEnrich, &self.label_enrich),
            (Feature::Telemetry, &self.telemetry),
            (Feature::RetryBudget, &self.retry_budget),
        ]
    }

    /// The sidecar module's configuration: one section per feature, with the settings of
    /// `shared_at_top` moved to the top level (they must agree across the sections that have
    /// them).
    fn sidecar_config(&self) -> Value {
        let mut top = Map::new();
        for (feature, config) in self.each() {
            let mut section = config.as_object().cloned().unwrap_or_default();
            for key in self.shared_at_top {
                if let Some(value) = section.remove(*key) {
                    let previous = top.insert(key.to_string(), value.clone());
                    assert!(
                        previous.is_none() || previous == Some(value),
                        "{key} differs between the sections"
                    );
                }
            }
            top.insert(feature.section().to_string(), Value::Object(section));
        }
        Value::Object(top)
    }

    fn filters(&self, stack: Stack) -> Result<Vec<Value>> {
        match stack {
            Stack::Chain => self
                .each()
                .into_iter()
                .map(|(feature, config)| {
                    feature_filter(ModuleUnderTest::Separate, feature, config.clone())
                })
                .collect(),
            Stack::Sidecar => Ok(vec![wasm_filter(
                "eastwest",
                &dist_wasm("eastwest")?,
                self.sidecar_config(),
            )]),
        }
    }
}

/// What the caller's and the callee's sidecars run in one scenario.
#[derive(Clone)]
struct Scenario {
    name: &'static str,
    outbound: Features,
    inbound: Features,
}

/// The calls every scenario makes.
const EXPECTED_DEPENDENCIES: &str = r#"[{"source": "frontend", "destination": "inventory"}]"#;

/// The shipped static sidecars' settings (envoy-configs/static/sidecar-client-headers.yaml)
/// with budgets small enough that the decisions are exact: the caller's `client-headers`
/// budget holds 2 retries (0.2/s over 10 s), the callee's `server` budget 1.
fn static_like(
    name: &'static str,
    trust: &str,
    shared_at_top: &'static [&'static str],
) -> Scenario {
    let expected: Value = serde_json::from_str(EXPECTED_DEPENDENCIES).unwrap();
    let trust = |mut config: Value| {
        config["peer_trust"] = json!(trust);
        config
    };
    Scenario {
        name,
        outbound: Features {
            label_enrich: trust(json!({"direction": "outbound"})),
            telemetry: trust(
                json!({"direction": "outbound", "expected_dependencies": expected.clone()}),
            ),
            retry_budget: trust(json!({
                "mode": "client-headers", "ratio": 0, "min_retries_per_second": 0.2,
                "ttl_seconds": 10,
            })),
            shared_at_top,
        },
        inbound: Features {
            label_enrich: trust(json!({"direction": "inbound"})),
            telemetry: trust(json!({"direction": "inbound", "expected_dependencies": expected})),
            retry_budget: trust(json!({
                "mode": "server", "ratio": 0, "min_retries_per_second": 0.1, "ttl_seconds": 10,
            })),
            shared_at_top,
        },
    }
}

/// A bootstrap with every eastwest stats tag and a 1 s stats flush (histograms reach the
/// Prometheus text at each flush).
fn sidecar_bootstrap(node: &Node, listener: Value, cluster: Value) -> Value {
    let tags: Vec<(String, String)> = ALL_TAGS
        .iter()
        .map(|tag| (tag.to_string(), stats_tag_regex(tag)))
        .collect();
    let tags: Vec<(&str, &str)> = tags.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
    let mut config = bootstrap(node, free_port(), vec![listener], vec![cluster], &tags);
    config["stats_flush_interval"] = json!("1s");
    config
}

/// frontend's sidecar (outbound, retries) → checkout's sidecar (inbound) → the test app.
struct Pair {
    app: TestApp,
    caller: Envoy,
    callee: Envoy,
    caller_port: u16,
    callee_port: u16,
    caller_log: PathBuf,
    callee_log: PathBuf,
}

impl Pair {
    fn start(scenario: &Scenario, stack: Stack) -> Result<Pair> {
        let name = format!("sc-{}-{stack:?}", scenario.name).to_lowercase();
        let app = TestApp::start()?;
        let (caller_port, callee_port) = (free_port(), free_port());
        let dir = eastwest_e2e::workspace_root()
            .join("target/e2e-runs")
            .join(format!("{name}-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (caller_log, callee_log) =
            (dir.join("caller-access.log"), dir.join("callee-access.log"));
        // One worker, so that every request sees the retry budget as the previous one left it
        // (workers publish their part of it once per slot): the decisions are exact. Debug:
        // every refusal, skipped input and budget denial is logged there.
        let options = EnvoyOptions {
            concurrency: 1,
            component_log_level: Some("wasm:debug".into()),
            ..EnvoyOptions::default()
        };

        let mut inbound = ListenerBuilder::new("inbound", callee_port, "app")
            .traffic_direction(TrafficDirection::Inbound)
            .access_log(&callee_log, ACCESS_LOG_FORMAT);
        for filter in scenario.inbound.filters(stack)? {
            inbound = inbound.http_filter(filter);
        }
        let mut outbound = ListenerBuilder::new("outbound", caller_port, "checkout")
            .traffic_direction(TrafficDirection::Outbound)
            .retry_policy(json!({
                "retry_on": "5xx,reset,connect-failure",
                "num_retries": 2,
                "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
            }))
            .virtual_host_field("include_request_attempt_count", json!(true))
            .access_log(&caller_log, ACCESS_LOG_FORMAT);
        for filter in scenario.outbound.filters(stack)? {
            outbound = outbound.http_filter(filter);
        }
        let callee_config = sidecar_bootstrap(
            &Node::shop_sidecar("checkout", "payments", "critical"),
            inbound.build(),
            ClusterBuilder::new("app", app.port()).http2(true).build(),
        );
        let caller_config = sidecar_bootstrap(
            &Node::shop_sidecar("frontend", "web", "high"),
            outbound.build(),
            ClusterBuilder::new("checkout", callee_port)
                .http2(true)
                .build(),
        );
        let mut envoys = Envoy::start_many(vec![
            (format!("{name}-callee"), callee_config, options.clone()),
            (format!("{name}-caller"), caller_config, options),
        ])?;
        let (caller, callee) = (envoys.pop().unwrap(), envoys.pop().unwrap());
        Ok(Pair {
            app,
            caller,
            callee,
            caller_port,
            callee_port,
            caller_log,
            callee_log,
        })
    }
}

/// Where a call goes in.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// The caller's application calls through its sidecar (outbound, then inbound).
    Caller,
    /// Straight to the callee's sidecar (inbound only), as a client outside the mesh would.
    Callee,
}

struct Call {
    path: &'static str,
    entry: Entry,
    headers: Vec<(&'static str, &'static [u8])>,
}

/// Every call of a scenario, in order. Budget decisions: the caller's budget (2 retries)
/// admits both retries of /fail-1, whose second retry the callee's budget (1 retry) sheds;
/// then the caller's budget is spent (/fail-2 goes out without retries), and the callee's
/// (a retry straight to it is shed).
fn calls() -> Vec<Call> {
    let call = |path, entry, headers: &[(&'static str, &'static [u8])]| Call {
        path,
        entry,
        headers: headers.to_vec(),
    };
    vec![
        call(
            "/baggage",
            Entry::Caller,
            &[
                (
                    "baggage",
                    b"userid=alice%20b;prop=1, session=x,service.name=forged",
                ),
                ("baggage", b"tenant=acme"),
            ],
        ),
        // The callee's application claims another identity; its sidecar overwrites it.
        call(
            "/app-claims",
            Entry::Caller,
            &[(
                "x-test-response-header",
                b"x-eastwest-peer=service.name=evil",
            )],
        ),
        call(
            "/malformed",
            Entry::Caller,
            &[("baggage", b"\xff\xfe=\x80,service.name=%,eastwest.team=%zz")],
        ),
        call("/fail-1", Entry::Caller, &[("x-test-status", b"503")]),
        call("/fail-2", Entry::Caller, &[("x-test-status", b"503")]),
        call("/ok-after", Entry::Caller, &[]),
        // Outside the mesh: claims in baggage and the source header, an Istio peer header that
        // is not base64.
        call(
            "/direct-claims",
            Entry::Callee,
            &[
                (
                    "baggage",
                    b"service.name=admin,k8s.namespace.name=shop,userid=7",
                ),
                ("x-eastwest-source", b"service.name=admin"),
            ],
        ),
        call(
            "/direct-peer-metadata",
            Entry::Callee,
            &[("x-envoy-peer-metadata", b"!!! not base64 !!!")],
        ),
        call(
            "/direct-retry",
            Entry::Callee,
            &[
                ("x-envoy-attempt-count", b"2"),
                ("baggage", b"service.name=frontend,k8s.namespace.name=shop"),
            ],
        ),
        // gRPC (HTTP/2 on every hop): a status in the trailers, and a retry the callee's spent
        // budget sheds as gRPC callers are told (UNAVAILABLE, no pushback).
        call(
            "/shop.Checkout/Pay",
            Entry::Caller,
            &[
                ("content-type", b"application/grpc"),
                ("te", b"trailers"),
                ("x-test-grpc-status", b"14"),
            ],
        ),
        call(
            "/shop.Checkout/Retry",
            Entry::Callee,
            &[
                ("content-type", b"application/grpc"),
                ("te", b"trailers"),
                ("x-test-grpc-status", b"0"),
                ("grpc-previous-rpc-attempts", b"1"),
                ("baggage", b"service.name=frontend,k8s.namespace.name=shop"),
            ],
        ),
        call(
            "/direct-first",
            Entry::Callee,
            &[("x-envoy-attempt-count", b"1")],
        ),
    ]
}

/// Headers that differ between any two runs (ids, times, ports): left out of comparisons.
const VOLATILE_HEADERS: [&str; 5] = [
    "date",
    "x-request-id",
    "x-envoy-upstream-service-time",
    "host",
    "content-length",
];

fn stable_headers<'a>(headers: impl Iterator<Item = (&'a str, String)>) -> Vec<String> {
    headers
        .filter(|(name, _)| !VOLATILE_HEADERS.contains(name))
        .map(|(name, value)| format!("{name}: {value}"))
        .collect()
}

/// What a client and the application saw of one call, one line each, ready to compare.
fn observe(call: &Call, response: &Response) -> Vec<String> {
    let mut seen = vec![format!(
        "{} {:?} -> {}",
        call.path, call.entry, response.status
    )];
    seen.extend(
        stable_headers(
            response
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value).into_owned())),
        )
        .into_iter()
        .map(|line| format!("  response {line}")),
    );
    // The application's echo (in a gRPC answer, its one length-prefixed message).
    let echo: Option<Value> = match response.body.as_slice() {
        [0, _, _, _, _, message @ ..] => serde_json::from_slice(message).ok(),
        body => serde_json::from_slice(body).ok(),
    };
    match echo {
        // What the sidecars forwarded to the application.
        Some(echo) if echo["headers"].is_array() => {
            let forwarded = echo["headers"].as_array().unwrap().iter().map(|pair| {
                (
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default().to_string(),
                )
            });
            seen.extend(
                stable_headers(forwarded)
                    .into_iter()
                    .map(|line| format!("  app saw {line}")),
            );
        }
        // A local reply, or a gRPC message.
        _ => seen.push(format!("  body {:?}", response.text())),
    }
    seen.extend(
        stable_headers(
            response
                .trailers
                .iter()
                .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value).into_owned())),
        )
        .into_iter()
        .map(|line| format!("  trailer {line}")),
    );
    seen
}

/// The sample lines of the eastwest metric families in Envoy's Prometheus text, sorted; the
/// values of histogram buckets and sums (durations) are left out, the counts are kept.
fn eastwest_metrics(envoy: &Envoy) -> Vec<String> {
    let text = envoy.prometheus().expect("admin /stats/prometheus");
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with("eastwest_") || line.starts_with("# TYPE eastwest_"))
        .map(|line| {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if name.ends_with("_bucket") || name.ends_with("_sum") {
                let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
                format!("{series} (duration)")
            } else {
                line.to_string()
            }
        })
        .collect();
    lines.sort();
    lines
}

/// The sum of the samples of `name` (all series).
fn total(metrics: &[String], name: &str) -> f64 {
    metrics
        .iter()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The eastwest log lines of a sidecar's Envoy, without time, thread, or the filter's
/// name, root id and VM id: `level: message`, each distinct line once (how often a once-per-VM
/// line appears depends on which worker took which connection).
fn eastwest_log_lines(envoy: &Envoy) -> BTreeSet<String> {
    envoy
        .log()
        .lines()
        .filter_map(|line| {
            let level = line.split("][").nth(2)?;
            let (_, message) = line.split_once("wasm log ")?;
            let (_, message) = message.split_once(": ")?;
            Some(format!("{level}: {message}"))
        })
        .collect()
}

/// The access log's lines once `count` have been written (10 s at most).
fn access_log(path: &std::path::Path, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything observable of one stack in one scenario.
#[derive(Debug, Default)]
struct Observed {
    calls: Vec<String>,
    caller_access_log: Vec<String>,
    callee_access_log: Vec<String>,
    caller_metrics: Vec<String>,
    callee_metrics: Vec<String>,
    caller_log: BTreeSet<String>,
    callee_log: BTreeSet<String>,
    /// Requests the application answered; the caller's router's attempts and retries.
    counts: Vec<String>,
}

fn run(pair: &Pair) -> Result<Observed> {
    let mut observed = Observed::default();
    let calls = calls();
    for call in &calls {
        let port = match call.entry {
            Entry::Caller => pair.caller_port,
            Entry::Callee => pair.callee_port,
        };
        let url = format!("http://127.0.0.1:{port}{}", call.path);
        let grpc = call
            .headers
            .contains(&("content-type", &b"application/grpc"[..]));
        let response = if grpc {
            // One empty length-prefixed message.
            http2_request("POST", &url, &call.headers, [0u8; 5])
        } else {
            http_request("GET", &url, &call.headers, "")
        }
        .with_context(|| format!("calling {}", call.path))?;
        observed.calls.extend(observe(call, &response));
    }
    let through_caller = calls
        .iter()
        .filter(|call| matches!(call.entry, Entry::Caller))
        .count();
    observed.caller_access_log = access_log(&pair.caller_log, through_caller);
    // Every attempt that reached the callee's sidecar, whatever became of it.
    let callee_requests = pair
        .caller
        .counter("cluster.checkout.upstream_rq_total")
        .unwrap_or(0) as usize
        + (calls.len() - through_caller);
    observed.callee_access_log = access_log(&pair.callee_log, callee_requests);
    // Metrics once every request is counted and the durations are flushed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        observed.caller_metrics = eastwest_metrics(&pair.caller);
        observed.callee_metrics = eastwest_metrics(&pair.callee);
        let complete = total(
            &observed.caller_metrics,
            "eastwest_request_duration_milliseconds_count",
        ) >= through_caller as f64
            && total(
                &observed.callee_metrics,
                "eastwest_request_duration_milliseconds_count",
            ) >= callee_requests as f64;
        if complete || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    observed.caller_log = eastwest_log_lines(&pair.caller);
    observed.callee_log = eastwest_log_lines(&pair.callee);
    observed.counts = vec![
        format!("app requests {}", pair.app.requests_seen()),
        format!(
            "caller upstream_rq_total {:?}",
            pair.caller.counter("cluster.checkout.upstream_rq_total")
        ),
        format!(
            "caller upstream_rq_retry {:?}",
            pair.caller.counter("cluster.checkout.upstream_rq_retry")
        ),
    ];
    Ok(observed)
}

/// Lines only one side has, in order, or `None` when both are equal.
fn difference(chain: &[String], sidecar: &[String]) -> Option<String> {
    if chain == sidecar {
        return None;
    }
    let mut out = String::new();
    let length = chain.len().max(sidecar.len());
    for index in 0..length {
        let (a, b) = (chain.get(index), sidecar.get(index));
        if a != b {
            out.push_str(&format!(
                "  line {index}:\n    chain:   {}\n    sidecar: {}\n",
                a.map_or("(none)", String::as_str),
                b.map_or("(none)", String::as_str)
            ));
        }
    }
    Some(out)
}

/// Runs `scenario` on the three modules chained and on eastwest.wasm (both pairs at once)
/// and asserts that everything observable is the same. Returns the chain's observations for
/// the scenario's own checks.
fn chain_and_sidecar_agree(scenario: &Scenario) -> Observed {
    let (chain, sidecar) = std::thread::scope(|scope| {
        let chain = scope.spawn(|| {
            let pair = Pair::start(scenario, Stack::Chain)?;
            run(&pair)
        });
        let sidecar = Pair::start(scenario, Stack::Sidecar).and_then(|pair| run(&pair));
        (chain.join().expect("the chain's thread"), sidecar)
    });
    let (chain, sidecar) = (chain.unwrap(), sidecar.unwrap());
    // For post-mortems: everything compared, per stack.
    for (stack, observed) in [(Stack::Chain, &chain), (Stack::Sidecar, &sidecar)] {
        let path = eastwest_e2e::workspace_root().join(format!(
            "target/e2e-runs/sc-{}-{stack:?}-observed-{}.txt",
            scenario.name,
            std::process::id()
        ));
        let _ = std::fs::write(path, format!("{observed:#?}"));
    }
    let set = |lines: &BTreeSet<String>| lines.iter().cloned().collect::<Vec<_>>();
    let comparisons = [
        (
            "responses and what the application saw",
            chain.calls.clone(),
            sidecar.calls.clone(),
        ),
        (
            "caller's access log (filter state)",
            chain.caller_access_log.clone(),
            sidecar.caller_access_log.clone(),
        ),
        (
            "callee's access log (filter state)",
            chain.callee_access_log.clone(),
            sidecar.callee_access_log.clone(),
        ),
        (
            "caller's eastwest metrics",
            chain.caller_metrics.clone(),
            sidecar.caller_metrics.clone(),
        ),
        (
            "callee's eastwest metrics",
            chain.callee_metrics.clone(),
            sidecar.callee_metrics.clone(),
        ),
        (
            "caller's eastwest log lines",
            set(&chain.caller_log),
            set(&sidecar.caller_log),
        ),
        (
            "callee's eastwest log lines",
            set(&chain.callee_log),
            set(&sidecar.callee_log),
        ),
        (
            "requests and retries",
            chain.counts.clone(),
            sidecar.counts.clone(),
        ),
    ];
    let differences: Vec<String> = comparisons
        .iter()
        .filter_map(|(what, a, b)| difference(a, b).map(|d| format!("{what}:\n{d}")))
        .collect();
    assert!(
        differences.is_empty(),
        "scenario {}: eastwest.wasm differs from the three modules chained:\n{}",
        scenario.name,
        differences.join("\n")
    );
    chain
}

/// The lines [`observe`] wrote for the call to `path`.
fn observed_call<'a>(observed: &'a Observed, path: &str) -> &'a [String] {
    let start = observed
        .calls
        .iter()
        .position(|line| line.starts_with(&format!("{path} ")))
        .unwrap_or_else(|| panic!("no call to {path}"));
    let length = observed.calls[start + 1..]
        .iter()
        .take_while(|line| line.starts_with("  "))
        .count();
    &observed.calls[start..=start + length]
}

/// Checks that the comparison compared something: the scenario did what it is meant to.
/// `inbound_trusts_claims`: the callee's label-enrich accepts the caller's claims.
fn assert_meaningful(observed: &Observed, inbound_trusts_claims: bool) {
    let calls = observed.calls.join("\n");
    let baggage = observed_call(observed, "/baggage").join("\n");
    if inbound_trusts_claims {
        assert!(
            baggage.contains(&format!("app saw x-eastwest-source: {CALLER_LABELS}")),
            "{baggage}"
        );
        assert!(
            baggage.contains(&format!(
                "app saw baggage: {CALLER_LABELS},userid=alice%20b;prop=1, session=x,tenant=acme"
            )),
            "{baggage}"
        );
    } else {
        assert!(!baggage.contains("app saw x-eastwest-source"), "{baggage}");
        assert!(
            baggage.contains("app saw baggage: userid=alice%20b;prop=1, session=x,tenant=acme"),
            "{baggage}"
        );
    }
    for path in ["/baggage", "/app-claims", "/fail-1", "/fail-2"] {
        let call = observed_call(observed, path).join("\n");
        assert!(!call.contains("response x-eastwest-peer"), "{call}");
    }
    for path in ["/fail-1", "/fail-2", "/direct-retry"] {
        let call = observed_call(observed, path).join("\n");
        assert!(
            call.contains("response x-eastwest-retry-budget: exhausted"),
            "{call}"
        );
    }
    let grpc = observed_call(observed, "/shop.Checkout/Pay").join("\n");
    assert!(grpc.contains("trailer grpc-status: 14"), "{grpc}");
    let shed = observed_call(observed, "/shop.Checkout/Retry").join("\n");
    assert!(shed.contains("response grpc-status: 14"), "{shed}");
    assert!(
        shed.contains("response grpc-retry-pushback-ms: -1"),
        "{shed}"
    );
    let fail_2 = observed_call(observed, "/fail-2").join("\n");
    assert!(
        fail_2.contains("app saw x-envoy-attempt-count: 1"),
        "the spent budget switched the retries off: {fail_2}\n{calls}"
    );
    for (metrics, reporter) in [
        (&observed.caller_metrics, "source"),
        (&observed.callee_metrics, "destination"),
    ] {
        let metrics = metrics.join("\n");
        assert!(
            metrics.contains(&format!("eastwest_requests_total{{reporter=\"{reporter}\"")),
            "{metrics}"
        );
        assert!(
            metrics.contains("eastwest_retry_budget_denied_total{"),
            "{metrics}"
        );
        assert!(
            metrics.contains("eastwest_unexpected_dependency_total{"),
            "{metrics}"
        );
    }
    let log = observed.caller_access_log.join("\n");
    assert!(
        log.contains(&format!("source=\"{CALLER_LABELS}\"")),
        "{log}"
    );
}

/// The shipped static sidecars' configuration (peer_trust `any`), each module's configuration
/// as the sidecar module's section.
#[test]
fn all_three_sections_behave_as_the_three_modules_chained() {
    let observed = chain_and_sidecar_agree(&static_like("sections", "any", &[]));
    assert_meaningful(&observed, true);
}

/// The same, with the shared settings (`direction`, `peer_trust`) given once at the top level
/// of the sidecar module's configuration.
#[test]
fn shared_settings_at_the_top_level_behave_as_the_three_modules_chained() {
    let observed =
        chain_and_sidecar_agree(&static_like("shared", "any", &["direction", "peer_trust"]));
    assert_meaningful(&observed, true);
}

/// Features that trust peers differently: label-enrich keeps the default (`mtls`, and there
/// is no mTLS here, so it refuses every claim) while telemetry and retry-budget accept claims.
/// In the chain each module reads what the previous one left of the request; the sidecar must
/// hand over exactly that.
#[test]
fn features_that_trust_peers_differently_behave_as_the_three_modules_chained() {
    let mut scenario = static_like("mixed-trust", "any", &[]);
    for features in [&mut scenario.outbound, &mut scenario.inbound] {
        features
            .label_enrich
            .as_object_mut()
            .unwrap()
            .remove("peer_trust");
    }
    let observed = chain_and_sidecar_agree(&scenario);
    assert_meaningful(&observed, false);
}

/// An empty configuration would turn nothing on: Envoy refuses it, whether the configuration
/// is `{}` or missing.
#[test]
fn an_empty_configuration_is_refused_by_envoy() {
    let wasm = dist_wasm("eastwest").unwrap();
    let with_config = wasm_filter("eastwest", &wasm, json!({}));
    let mut without_config = with_config.clone();
    without_config["typed_config"]["config"]
        .as_object_mut()
        .unwrap()
        .remove("configuration");
    let logs: Vec<String> = std::thread::scope(|scope| {
        let starts: Vec<_> = [
            ("empty-object", with_config),
            ("no-configuration", without_config),
        ]
        .into_iter()
        .map(|(name, filter)| {
            scope.spawn(move || {
                let listener = ListenerBuilder::new("outbound", free_port(), "app")
                    .http_filter(filter)
                    .build();
                Envoy::start_expecting_failure(
                    &format!("sc-{name}"),
                    bootstrap(
                        &Node::new("n", "c"),
                        free_port(),
                        vec![listener],
                        vec![ClusterBuilder::new("app", free_port()).build()],
                        &[],
                    ),
                    &EnvoyOptions::default(),
                )
                .unwrap()
            })
        })
        .collect();
        starts
            .into_iter()
            .map(|start| start.join().unwrap())
            .collect()
    });
    for log in logs {
        let wanted = "eastwest: invalid configuration: (root): no feature is on: add at least one \
            section (label_enrich, telemetry, retry_budget)";
        assert!(log.contains(wanted), "Envoy's log lacks {wanted:?}:\n{log}");
    }
}
