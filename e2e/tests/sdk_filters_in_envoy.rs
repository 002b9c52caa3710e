//! The harness's SDK example filters (harness/sdk-filters/, built by `cargo xtask build` into
//! target/sdk-filters/) in real Envoy 1.40 and in the harness, with the same inputs: what the
//! application and the client see must be the same. The callout filter also checks flow
//! control: a request paused from its headers and resumed after an HTTP call, and a local reply
//! that never reaches the upstream.

use std::collections::BTreeMap;
use std::time::Duration;

use eastwest_e2e::{
    bootstrap, free_port, http_request, sdk_filter_wasm, wasm_filter, ClusterBuilder, Envoy,
    EnvoyOptions, ListenerBuilder, Node, Response, TestApp,
};
use eastwest_harness::{Harness, HttpAnswer, Message, Options, StreamResult};
use serde_json::{json, Value};

/// What a user can observe of one request, in Envoy or in the harness.
#[derive(Debug, PartialEq)]
struct Observed {
    status: u16,
    /// Values of the chosen request headers as the upstream application received them; `None`
    /// when the request never reached it.
    upstream_headers: Option<Vec<(String, Vec<String>)>>,
    /// Values of the chosen response headers as the client received them.
    response_headers: Vec<(String, Vec<String>)>,
    body: String,
}

fn harness_observed(
    result: &StreamResult,
    request_headers: &[&str],
    response_headers: &[&str],
) -> Observed {
    let response = result
        .downstream_response
        .as_ref()
        .expect("the harness answered the client");
    Observed {
        status: response
            .get_header(":status")
            .and_then(|status| status.parse().ok())
            .expect("a :status"),
        upstream_headers: result.upstream_request.as_ref().map(|request| {
            request_headers
                .iter()
                .map(|name| (name.to_string(), request.header_values(name)))
                .collect()
        }),
        response_headers: response_headers
            .iter()
            .map(|name| (name.to_string(), response.header_values(name)))
            .collect(),
        body: String::from_utf8_lossy(&response.body).into_owned(),
    }
}

/// `app_body`: the upstream's answer in the harness, to compare with the test app's JSON, which
/// the Envoy side replaces by the same text when the app was reached.
fn envoy_observed(
    response: &Response,
    app: &TestApp,
    request_headers: &[&str],
    response_headers: &[&str],
    app_body: &str,
) -> Observed {
    let reached = app.requests_seen() > 0;
    let upstream_headers = reached.then(|| {
        let seen: Value = response.json();
        let pairs = seen["headers"]
            .as_array()
            .expect("the test app lists headers");
        request_headers
            .iter()
            .map(|name| {
                let values = pairs
                    .iter()
                    .filter(|pair| pair[0].as_str() == Some(name))
                    .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
                    .collect();
                (name.to_string(), values)
            })
            .collect()
    });
    Observed {
        status: response.status,
        upstream_headers,
        response_headers: response_headers
            .iter()
            .map(|name| {
                let values = response
                    .header_all(name)
                    .iter()
                    .map(|value| String::from_utf8_lossy(value).into_owned())
                    .collect();
                (name.to_string(), values)
            })
            .collect(),
        body: if reached {
            app_body.to_string()
        } else {
            response.text()
        },
    }
}

/// One Envoy with `filter` on a listener routing to `app`, and further clusters.
fn envoy_with(
    name: &str,
    filter: &str,
    config: Value,
    app: &TestApp,
    clusters: Vec<Value>,
) -> (Envoy, u16) {
    let wasm = sdk_filter_wasm(filter).unwrap();
    let port = free_port();
    let listener = ListenerBuilder::new("sdk", port, "app")
        .http_filter(wasm_filter(filter, &wasm, config))
        .build();
    let mut all_clusters = vec![ClusterBuilder::new("app", app.port()).build()];
    all_clusters.extend(clusters);
    let envoy = Envoy::start(
        name,
        bootstrap(
            &Node::new("sdk-1", "sdk"),
            free_port(),
            vec![listener],
            all_clusters,
            &[],
        ),
        &EnvoyOptions {
            concurrency: 1,
            ..EnvoyOptions::default()
        },
    )
    .unwrap();
    (envoy, port)
}

fn harness_with(filter: &str, config: Value) -> Harness {
    let wasm = std::fs::read(sdk_filter_wasm(filter).unwrap()).unwrap();
    Harness::new(
        &wasm,
        Options {
            config: config.to_string().into_bytes(),
            ..Options::default()
        },
    )
    .unwrap()
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    let headers: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(name, value)| (*name, value.as_bytes()))
        .collect();
    http_request(
        "GET",
        &format!("http://127.0.0.1:{port}{path}"),
        &headers,
        "",
    )
    .expect("request through Envoy")
}

fn request_message(path: &str, headers: &[(&str, &str)]) -> Message {
    headers
        .iter()
        .fold(Message::get(path), |message, (name, value)| {
            message.header(name, value)
        })
}

#[test]
fn header_rewrite_agrees_with_envoy() {
    let request_headers = [
        ("x-request-replaced", "old-1"),
        ("x-request-replaced", "old-2"),
        ("x-request-removed", "secret"),
        ("x-kept", "yes"),
    ];
    let request_names = [
        "x-request-added",
        "x-request-replaced",
        "x-request-removed",
        "x-kept",
    ];
    let response_names = [
        "x-response-added",
        "x-response-replaced",
        "x-response-removed",
    ];
    let app_body = "ok";

    let mut h = harness_with("header-rewrite", json!({}));
    let upstream = Message::status(200)
        .header("x-response-replaced", "old")
        .header("x-response-removed", "secret")
        .body(app_body);
    let id = h.run(
        0,
        None,
        request_message("/", &request_headers),
        Some((upstream, 0)),
    );
    let in_harness = harness_observed(&h.result(id), &request_names, &response_names);

    let app = TestApp::start().unwrap();
    let (envoy, port) = envoy_with(
        "sdk-header-rewrite",
        "header-rewrite",
        json!({}),
        &app,
        vec![],
    );
    // The test app adds the response headers the harness's upstream answers with.
    let mut headers = request_headers.to_vec();
    headers.push(("x-test-response-header", "x-response-replaced=old"));
    headers.push(("x-test-response-header", "x-response-removed=secret"));
    let response = get(port, "/", &headers);
    let in_envoy = envoy_observed(&response, &app, &request_names, &response_names, app_body);

    assert_eq!(in_harness, in_envoy, "{}", envoy.log());
    let values = |list: &[(String, Vec<String>)], name: &str| -> Vec<String> {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let upstream = in_envoy.upstream_headers.expect("reached the app");
    assert_eq!(values(&upstream, "x-request-added"), ["sdk"]);
    assert_eq!(values(&upstream, "x-request-replaced"), ["new"]);
    assert!(values(&upstream, "x-request-removed").is_empty());
    assert_eq!(
        values(&in_envoy.response_headers, "x-response-replaced"),
        ["new"]
    );
    assert!(values(&in_envoy.response_headers, "x-response-removed").is_empty());
}

/// The callout filter with an `auth` cluster: in Envoy a second test app that answers with the
/// status in the forwarded `x-test-status` header (200 without it).
fn callout_agrees_with_envoy(
    name: &str,
    request_headers: &[(&str, &str)],
    auth_status: u16,
) -> Observed {
    let request_names = ["x-auth-status", "authorization"];
    let response_names = ["x-auth-status", "content-type"];
    let app_body = "ok";

    let mut h = harness_with("http-callout", json!({}));
    h.answer_http_calls(
        "auth",
        HttpAnswer {
            response: Message::status(auth_status),
            delay_ms: 5,
            reset: false,
        },
    );
    let upstream = Message::status(200).body(app_body);
    let id = h.run(
        0,
        None,
        request_message("/orders", request_headers),
        Some((upstream, 0)),
    );
    let result = h.result(id);
    assert_eq!(result.http_calls.len(), 1, "one callout in the harness");
    let mut in_harness = harness_observed(&result, &request_names, &response_names);
    // The test app answers JSON; the harness's upstream answered with no content type.
    if in_harness.upstream_headers.is_some() {
        in_harness.response_headers[1].1 = vec!["application/json".to_string()];
    }

    let app = TestApp::start().unwrap();
    let auth = TestApp::start().unwrap();
    let (envoy, port) = envoy_with(
        name,
        "http-callout",
        json!({}),
        &app,
        vec![ClusterBuilder::new("auth", auth.port()).build()],
    );
    let response = get(port, "/orders", request_headers);
    let in_envoy = envoy_observed(&response, &app, &request_names, &response_names, app_body);
    assert_eq!(auth.requests_seen(), 1, "one callout in Envoy");
    assert_eq!(in_harness, in_envoy, "{}", envoy.log());
    in_envoy
}

#[test]
fn pause_and_resume_after_a_callout_agree_with_envoy() {
    let observed =
        callout_agrees_with_envoy("sdk-callout-allowed", &[("authorization", "Bearer t")], 200);
    assert_eq!(observed.status, 200);
    let upstream = observed.upstream_headers.expect("resumed to the app");
    assert_eq!(
        upstream[0],
        ("x-auth-status".to_string(), vec!["200".to_string()])
    );
}

#[test]
fn local_reply_after_a_denied_callout_agrees_with_envoy() {
    let observed = callout_agrees_with_envoy(
        "sdk-callout-denied",
        &[("authorization", "Bearer t"), ("x-test-status", "403")],
        403,
    );
    assert_eq!(observed.status, 403);
    assert_eq!(observed.upstream_headers, None, "the app is never reached");
    assert_eq!(observed.body, "denied by the auth service\n");
    assert_eq!(
        observed.response_headers,
        [
            ("x-auth-status".to_string(), vec!["403".to_string()]),
            ("content-type".to_string(), vec!["text/plain".to_string()]),
        ]
    );
}

#[test]
fn ticks_log_and_count_in_envoy_as_in_the_harness() {
    // Envoy runs the plugin's root context on its main thread as well as on each worker, and
    // every one of them ticks: with one worker, two VMs tick.
    let mut h = harness_with("tick-counter", json!({}));
    h.advance(300);
    let mut harness_ticks: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for line in h.root_logs() {
        harness_ticks
            .entry(line.worker)
            .or_default()
            .push(line.message);
    }
    let three_ticks = ["tick 1", "tick 2", "tick 3"];
    let harness_ticks: Vec<Vec<String>> = harness_ticks.into_values().collect();
    assert_eq!(harness_ticks, [three_ticks, three_ticks]);
    assert_eq!(h.metric("sdk_ticks_total"), Some(6));

    let app = TestApp::start().unwrap();
    let (envoy, _port) = envoy_with("sdk-ticks", "tick-counter", json!({}), &app, vec![]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let envoy_ticks = loop {
        let by_thread = wasm_lines_by_thread(&envoy.log());
        let ticking: Vec<Vec<String>> = by_thread
            .into_values()
            .filter(|lines| lines.len() >= three_ticks.len())
            .map(|lines| lines[..three_ticks.len()].to_vec())
            .collect();
        if ticking.len() >= harness_ticks.len() || std::time::Instant::now() > deadline {
            break ticking;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(envoy_ticks, harness_ticks, "{}", envoy.log());
    // Envoy keeps wasm metrics under `wasmcustom.` and prints them without it, as the harness
    // does: compare the Prometheus lines. Every VM counts into the one counter.
    let harness_line = prometheus_sample(&h.prometheus(&[]).unwrap(), "sdk_ticks_total");
    assert_eq!(harness_line, Some(6));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = envoy.prometheus().unwrap();
        match prometheus_sample(&text, "sdk_ticks_total") {
            Some(ticks) if ticks >= 6 => break,
            found => assert!(
                std::time::Instant::now() < deadline,
                "sdk_ticks_total is {found:?} in Envoy:\n{text}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `wasm log` messages of an Envoy log by thread id (`[time][thread][level][logger] ...`).
fn wasm_lines_by_thread(log: &str) -> BTreeMap<String, Vec<String>> {
    let mut by_thread: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find("wasm log ") else {
            continue;
        };
        let rest = &line[at..];
        let (Some(thread), Some(colon)) = (line.split("][").nth(1), rest.find(": ")) else {
            continue;
        };
        by_thread
            .entry(thread.to_string())
            .or_default()
            .push(rest[colon + 2..].to_string());
    }
    by_thread
}

/// The value of an untagged sample in Prometheus text.
fn prometheus_sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix("{} ")?.parse().ok())
}

#[test]
fn wasip1_configured_header_and_its_stdout_agree_with_envoy() {
    let config = json!({"header": "X-Colour", "value": "blue"});
    let request_headers = [("x-colour", "red")];
    let names = ["x-colour"];
    let app_body = "ok";

    let mut h = harness_with("configured-header", config.clone());
    let startup: Vec<String> = h.root_logs().into_iter().map(|line| line.message).collect();
    // Once per VM: the worker's, and the main thread's two (the base VM and its clone).
    assert_eq!(startup, ["configured-header: x-colour=blue"; 3]);
    let upstream = Message::status(200).body(app_body);
    let id = h.run(
        0,
        None,
        request_message("/", &request_headers),
        Some((upstream, 0)),
    );
    let in_harness = harness_observed(&h.result(id), &names, &names);

    let app = TestApp::start().unwrap();
    let (envoy, port) = envoy_with("sdk-configured", "configured-header", config, &app, vec![]);
    envoy
        .wait_for_log(
            ": configured-header: x-colour=blue\n",
            Duration::from_secs(10),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let envoy_startup = loop {
        let lines: Vec<String> = wasm_lines_by_thread(&envoy.log())
            .into_values()
            .flatten()
            .collect();
        if lines.len() >= startup.len() || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(envoy_startup, startup, "{}", envoy.log());
    let response = get(port, "/", &request_headers);
    let in_envoy = envoy_observed(&response, &app, &names, &names, app_body);
    assert_eq!(in_harness, in_envoy, "{}", envoy.log());
    assert_eq!(
        in_envoy.response_headers,
        [("x-colour".to_string(), vec!["blue".to_string()])]
    );
}

#[test]
fn wasip1_bad_configuration_is_refused_with_its_stderr_line_in_envoy_as_in_the_harness() {
    let config = json!({"header": "x-colour"});
    let expected =
        "configured-header: invalid configuration: value: a non-empty string is required";
    let wasm = sdk_filter_wasm("configured-header").unwrap();
    let refused = Harness::new(
        &std::fs::read(&wasm).unwrap(),
        Options {
            config: config.to_string().into_bytes(),
            ..Options::default()
        },
    )
    .err()
    .expect("the harness refuses the configuration");
    assert!(refused.to_string().contains(expected), "{refused}");

    let port = free_port();
    let listener = ListenerBuilder::new("sdk", port, "app")
        .http_filter(wasm_filter("configured-header", &wasm, config))
        .build();
    let log = Envoy::start_expecting_failure(
        "sdk-configured-refused",
        bootstrap(
            &Node::new("sdk-1", "sdk"),
            free_port(),
            vec![listener],
            vec![ClusterBuilder::new("app", free_port()).build()],
            &[],
        ),
        &EnvoyOptions::default(),
    )
    .unwrap();
    assert!(log.contains(expected), "{log}");
}
