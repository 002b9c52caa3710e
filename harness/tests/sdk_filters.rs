//! Filters written the way proxy-wasm Rust SDK users write them (harness/sdk-filters/, built by
//! `cargo xtask build` into target/sdk-filters/) run in the harness as they do in Envoy; the
//! end-to-end test e2e/tests/sdk_filters_in_envoy.rs checks the same behaviour in Envoy 1.40.

use eastwest_harness::{Harness, HttpAnswer, Message, Options};
use serde_json::json;

fn sdk_filter(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../target/sdk-filters/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run `cargo xtask build`)"))
}

fn harness(name: &str, options: Options) -> Harness {
    Harness::new(&sdk_filter(name), options)
        .unwrap_or_else(|e| panic!("{name} does not start: {e}"))
}

fn auth_answer(response: Message) -> HttpAnswer {
    HttpAnswer {
        response,
        delay_ms: 30,
        reset: false,
    }
}

#[test]
fn header_rewrite_adds_replaces_and_removes_request_and_response_headers() {
    let mut h = harness("header-rewrite", Options::default());
    let request = Message::get("/")
        .header("x-request-replaced", "old-1")
        .header("x-request-replaced", "old-2")
        .header("x-request-removed", "secret")
        .header("x-kept", "yes");
    let upstream = Message::status(200)
        .header("x-response-replaced", "old")
        .header("x-response-removed", "secret")
        .body("ok");
    let id = h.run(0, None, request, Some((upstream, 0)));
    let result = h.result(id);
    let seen = result.upstream_request.expect("reaches the upstream");
    assert_eq!(seen.header_values("x-request-added"), ["sdk"]);
    assert_eq!(seen.header_values("x-request-replaced"), ["new"]);
    assert!(seen.header_values("x-request-removed").is_empty());
    assert_eq!(seen.header_values("x-kept"), ["yes"]);
    let response = result.downstream_response.expect("a response");
    assert_eq!(response.header_values("x-response-added"), ["sdk"]);
    assert_eq!(response.header_values("x-response-replaced"), ["new"]);
    assert!(response.header_values("x-response-removed").is_empty());
    assert_eq!(response.body, b"ok");
    assert!(h.traps.is_empty(), "{:?}", h.traps);
}

#[test]
fn http_callout_holds_the_request_until_the_answer_and_adds_its_status() {
    let mut h = harness("http-callout", Options::default());
    h.answer_http_calls("auth", auth_answer(Message::status(200).body("{}")));
    let id = h.start_stream(
        0,
        None,
        Message::get("/orders").header("authorization", "t"),
    );
    let result = h.result(id);
    assert!(result.upstream_request.is_none(), "paused for the callout");
    let call = &result.http_calls[0];
    assert_eq!(call.cluster, "auth");
    let call_headers = Message {
        headers: call.headers.clone(),
        ..Message::default()
    };
    assert_eq!(call_headers.get_header(":path"), Some("/auth/orders"));
    assert_eq!(call_headers.get_header("authorization"), Some("t"));

    h.advance(30);
    let seen = h
        .result(id)
        .upstream_request
        .expect("resumed by the answer");
    assert_eq!(seen.get_header("x-auth-status"), Some("200"));
    h.respond(id, Message::status(200));
    let result = h.result(id);
    assert!(result.complete);
    assert!(result.local_reply.is_none());
}

#[test]
fn http_callout_denial_is_a_local_reply_that_never_reaches_the_upstream() {
    let mut h = harness("http-callout", Options::default());
    h.answer_http_calls("auth", auth_answer(Message::status(403)));
    let id = h.run(0, None, Message::get("/orders"), None);
    let result = h.result(id);
    assert!(result.upstream_request.is_none());
    let reply = result.local_reply.expect("a local reply");
    assert_eq!(reply.status, 403);
    let response = result
        .downstream_response
        .expect("the client gets the reply");
    assert_eq!(response.get_header(":status"), Some("403"));
    assert_eq!(response.get_header("x-auth-status"), Some("403"));
    assert_eq!(response.get_header("content-type"), Some("text/plain"));
    assert_eq!(response.body, b"denied by the auth service\n");

    // A reset callout has no status at all: denied too.
    h.answer_http_calls(
        "auth",
        HttpAnswer {
            reset: true,
            ..auth_answer(Message::default())
        },
    );
    let id = h.run(0, None, Message::get("/orders"), None);
    let response = h.result(id).downstream_response.expect("a local reply");
    assert_eq!(response.get_header(":status"), Some("403"));
    assert_eq!(response.get_header("x-auth-status"), Some("none"));
}

#[test]
fn tick_counter_logs_and_counts_every_tick_on_every_worker_and_the_main_thread() {
    let mut h = harness(
        "tick-counter",
        Options {
            workers: 2,
            ..Options::default()
        },
    );
    h.advance(99);
    assert_eq!(
        h.metric("sdk_ticks_total"),
        Some(0),
        "defined, not yet ticked"
    );
    h.advance(251);
    let ticks: Vec<String> = h
        .root_logs()
        .into_iter()
        .filter(|line| line.level == "info")
        .map(|line| line.message)
        .collect();
    // Envoy ticks the root context of each worker and of the main thread.
    assert_eq!(
        ticks,
        [
            "tick 1", "tick 1", "tick 1", "tick 2", "tick 2", "tick 2", "tick 3", "tick 3",
            "tick 3"
        ]
    );
    assert_eq!(
        h.metric("sdk_ticks_total"),
        Some(9),
        "one registry for every VM"
    );
}

#[test]
fn wasip1_configured_header_reads_its_configuration_and_prints_to_the_log() {
    let mut h = harness(
        "configured-header",
        Options {
            config: json!({"header": "X-Colour", "value": "blue"})
                .to_string()
                .into_bytes(),
            ..Options::default()
        },
    );
    let printed: Vec<(String, String)> = h
        .root_logs()
        .into_iter()
        .map(|line| (line.level, line.message))
        .collect();
    let line = (
        "info".to_string(),
        "configured-header: x-colour=blue".to_string(),
    );
    assert_eq!(
        printed,
        [line.clone(), line.clone(), line],
        "stdout becomes an info line, once per VM configured (base, main thread, worker)"
    );
    let id = h.run(0, None, Message::get("/").header("x-colour", "red"), None);
    let result = h.result(id);
    let seen = result.upstream_request.expect("reaches the upstream");
    assert_eq!(seen.header_values("x-colour"), ["blue"]);
    let response = result.downstream_response.expect("a response");
    assert_eq!(response.header_values("x-colour"), ["blue"]);
}

#[test]
fn wasip1_configured_header_refuses_a_bad_configuration_on_stderr() {
    let error = Harness::new(
        &sdk_filter("configured-header"),
        Options {
            config: br#"{"header": "x-colour"}"#.to_vec(),
            ..Options::default()
        },
    )
    .err()
    .expect("the configuration is refused");
    assert!(
        error.to_string().contains(
            "configured-header: invalid configuration: value: a non-empty string is required"
        ),
        "{error}"
    );
}
