//! Stream flow as Envoy drives it, checked with a small hand-written module that logs every
//! callback with its arguments: pauses with bodies, buffering and the buffer limit, local
//! replies, chains, and gRPC calls. `e2e/tests/harness_vs_envoy_flow.rs` compares the same
//! behaviours with real Envoy.

use eastwest_harness::{GrpcAnswer, Harness, Message, Options, Plugin};

/// What the module's callbacks return and do; `name` prefixes its log lines.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    name: &'static str,
    request_headers: i32,
    request_body: i32,
    response_headers: i32,
    response_body: i32,
    /// Pause the request only until the body's end of stream, then continue.
    request_body_until_end: bool,
    response_body_until_end: bool,
    /// Send a local 403 (`x-reply: <name>`, body `no`) from request headers.
    reply_in_request_headers: bool,
    /// Resume the request from a tick.
    resume_on_tick: bool,
}

fn module(b: Behaviour) -> String {
    let name = b.name;
    let until = |flag: bool, paused: i32| {
        if flag {
            "(if (result i32) (local.get 2) (then (i32.const 0)) (else (i32.const 1)))".to_string()
        } else {
            format!("(i32.const {paused})")
        }
    };
    let reply = if b.reply_in_request_headers {
        "(drop (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 1500) (i32.const 2) (i32.const 1400) (i32.const 33) (i32.const -1)))"
    } else {
        ""
    };
    let tick = if b.resume_on_tick {
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32)
      (drop (call $tick_period (i32.const 10))) (i32.const 1))
    (func (export "proxy_on_tick") (param i32)
      (drop (call $effective (i32.const 2)))
      (drop (call $continue (i32.const 0))))"#
    } else {
        ""
    };
    format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_period (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (data (i32.const 1000) "{name} ")
  ;; x-reply: <name> as a header map (one pair), then the body "no".
  (data (i32.const 1400) "\01\00\00\00\07\00\00\00\01\00\00\00x-reply\00{name}\00")
  (data (i32.const 1500) "no")
  ;; Logs "<name> <label> <a> <b>" with decimal numbers.
  (func $digits (param $at i32) (param $v i32) (result i32)
    (local $start i32) (local $end i32) (local $t i32)
    (local.set $start (local.get $at))
    (loop $more
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $at (i32.add (local.get $at) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $more (local.get $v)))
    (local.set $end (i32.sub (local.get $at) (i32.const 1)))
    (block $done (loop $swap
      (br_if $done (i32.ge_u (local.get $start) (local.get $end)))
      (local.set $t (i32.load8_u (local.get $start)))
      (i32.store8 (local.get $start) (i32.load8_u (local.get $end)))
      (i32.store8 (local.get $end) (local.get $t))
      (local.set $start (i32.add (local.get $start) (i32.const 1)))
      (local.set $end (i32.sub (local.get $end) (i32.const 1)))
      (br $swap)))
    (local.get $at))
  (func $say (param $label i32) (param $len i32) (param $a i32) (param $b i32)
    (local $at i32)
    (memory.copy (i32.const 2000) (i32.const 1000) (i32.const {prefix}))
    (memory.copy (i32.const {after_prefix}) (local.get $label) (local.get $len))
    (local.set $at (i32.add (i32.const {after_prefix}) (local.get $len)))
    (i32.store8 (local.get $at) (i32.const 32))
    (local.set $at (call $digits (i32.add (local.get $at) (i32.const 1)) (local.get $a)))
    (i32.store8 (local.get $at) (i32.const 32))
    (local.set $at (call $digits (i32.add (local.get $at) (i32.const 1)) (local.get $b)))
    (drop (call $log (i32.const 2) (i32.const 2000) (i32.sub (local.get $at) (i32.const 2000)))))
  (data (i32.const 1100) "request_headers")
  (data (i32.const 1120) "request_body")
  (data (i32.const 1140) "response_headers")
  (data (i32.const 1160) "response_body")
  (data (i32.const 1180) "log")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $say (i32.const 1100) (i32.const 15) (local.get 1) (local.get 2))
    {reply}
    (i32.const {rh}))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $say (i32.const 1120) (i32.const 12) (local.get 1) (local.get 2))
    {rb})
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $say (i32.const 1140) (i32.const 16) (local.get 1) (local.get 2))
    (i32.const {sh}))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (call $say (i32.const 1160) (i32.const 13) (local.get 1) (local.get 2))
    {sb})
  (func (export "proxy_on_log") (param i32)
    (call $say (i32.const 1180) (i32.const 3) (i32.const 0) (i32.const 0)))
  {tick}
)"#,
        prefix = name.len() + 1,
        after_prefix = 2000 + name.len() + 1,
        rh = b.request_headers,
        rb = until(b.request_body_until_end, b.request_body),
        sh = b.response_headers,
        sb = until(b.response_body_until_end, b.response_body),
    )
}

fn harness(behaviour: Behaviour, options: Options) -> Harness {
    Harness::new(module(behaviour).as_bytes(), options).unwrap()
}

fn lines(h: &Harness, id: usize) -> Vec<String> {
    h.result(id).logs.into_iter().map(|l| l.message).collect()
}

fn post(body: &[u8]) -> Message {
    Message::new(&[
        (":authority", "app"),
        (":path", "/"),
        (":method", "POST"),
        (":scheme", "http"),
    ])
    .body(body.to_vec())
}

#[test]
fn a_pause_from_request_headers_holds_the_body_until_the_filter_continues() {
    let mut h = harness(
        Behaviour {
            name: "f",
            request_headers: 1,
            resume_on_tick: true,
            ..Behaviour::default()
        },
        Options::default(),
    );
    let id = h.start_stream(0, None, post(b"hello world"));
    assert_eq!(lines(&h, id), ["f request_headers 4 0"], "the body waits");
    assert!(h.result(id).upstream_request.is_none());
    h.advance(10);
    let result = h.result(id);
    assert_eq!(
        lines(&h, id),
        ["f request_headers 4 0", "f request_body 11 1"],
        "the whole body in one call after the resume"
    );
    assert_eq!(result.upstream_request.unwrap().body, b"hello world");
}

#[test]
fn a_buffering_filter_sees_everything_buffered_and_lets_it_go_at_the_end() {
    let mut h = harness(
        Behaviour {
            name: "f",
            request_body_until_end: true,
            ..Behaviour::default()
        },
        Options {
            body_chunk_bytes: 4,
            ..Options::default()
        },
    );
    let id = h.run(0, None, post(b"0123456789"), None);
    assert_eq!(
        lines(&h, id)[..4],
        [
            "f request_headers 4 0",
            "f request_body 4 0",
            "f request_body 8 0",
            "f request_body 10 1"
        ]
    );
    assert_eq!(h.result(id).upstream_request.unwrap().body, b"0123456789");
}

#[test]
fn a_request_body_buffered_past_the_limit_gets_413() {
    let mut h = harness(
        Behaviour {
            name: "f",
            request_body_until_end: true,
            ..Behaviour::default()
        },
        Options {
            buffer_limit_bytes: 1000,
            body_chunk_bytes: 600,
            ..Options::default()
        },
    );
    let id = h.run(0, None, post(&[b'x'; 2000]), None);
    let result = h.result(id);
    let reply = result.local_reply.expect("a local reply");
    assert_eq!(
        (reply.status, reply.details.as_str()),
        (413, "request_payload_too_large")
    );
    let response = result.downstream_response.unwrap();
    assert_eq!(response.body, b"Payload Too Large");
    assert_eq!(
        response.headers,
        Message::new(&[
            (":status", "413"),
            ("content-length", "17"),
            ("content-type", "text/plain")
        ])
        .headers
    );
    assert!(
        result.upstream_request.is_none(),
        "the application never got a whole request"
    );
    assert!(lines(&h, id).contains(&"f response_headers 3 0".to_string()));
}

#[test]
fn a_response_body_buffered_past_the_limit_resets_the_stream() {
    let mut h = harness(
        Behaviour {
            name: "f",
            response_body_until_end: true,
            ..Behaviour::default()
        },
        Options {
            buffer_limit_bytes: 1000,
            body_chunk_bytes: 600,
            ..Options::default()
        },
    );
    let upstream = Message::status(200).body(vec![b'y'; 2000]);
    let id = h.run(0, None, Message::get("/"), Some((upstream, 0)));
    let result = h.result(id);
    assert_eq!(
        result.downstream_reset.as_deref(),
        Some("response_payload_too_large")
    );
    assert!(result.downstream_response.is_none());
    assert!(result.complete);
}

#[test]
fn a_response_paused_in_its_headers_is_not_limited() {
    let mut h = harness(
        Behaviour {
            name: "f",
            response_headers: 1,
            ..Behaviour::default()
        },
        Options {
            buffer_limit_bytes: 1000,
            body_chunk_bytes: 600,
            ..Options::default()
        },
    );
    let upstream = Message::status(200).body(vec![b'y'; 2000]);
    let id = h.run(0, None, Message::get("/"), Some((upstream, 0)));
    let result = h.result(id);
    assert_eq!(result.downstream_reset, None);
    assert!(!result.complete, "held until the filter continues");
}

#[test]
fn a_local_reply_has_the_filters_headers_first_and_is_a_trailers_only_grpc_reply_for_grpc() {
    let behaviour = Behaviour {
        name: "f",
        reply_in_request_headers: true,
        ..Behaviour::default()
    };
    let mut h = harness(behaviour, Options::default());
    let id = h.run(0, None, post(b"body"), None);
    let result = h.result(id);
    assert!(result.upstream_request.is_none());
    let response = result.downstream_response.unwrap();
    assert_eq!(
        response.headers,
        Message::new(&[
            (":status", "403"),
            ("x-reply", "f"),
            ("content-length", "2"),
            ("content-type", "text/plain")
        ])
        .headers
    );
    assert_eq!(response.body, b"no");
    assert_eq!(
        lines(&h, id),
        [
            "f request_headers 4 0",
            "f response_headers 4 0",
            "f response_body 2 1",
            "f log 0 0"
        ],
        "the reply passes the filter's own response callbacks; the request body never reaches it"
    );

    let grpc = post(b"\0\0\0\0\0").header("content-type", "application/grpc");
    let id = h.run(0, None, grpc, None);
    let response = h.result(id).downstream_response.unwrap();
    assert_eq!(
        response.headers,
        Message::new(&[
            (":status", "200"),
            ("x-reply", "f"),
            ("content-type", "application/grpc"),
            ("grpc-status", "7"),
            ("grpc-message", "no")
        ])
        .headers
    );
    assert!(response.body.is_empty());
}

#[test]
fn a_chain_runs_request_callbacks_in_order_and_response_callbacks_in_reverse() {
    let first = Behaviour {
        name: "a",
        ..Behaviour::default()
    };
    let second = Behaviour {
        name: "b",
        ..Behaviour::default()
    };
    let mut h = Harness::chain(
        vec![
            Plugin::new(module(first), ""),
            Plugin::new(module(second), ""),
        ],
        Options::default(),
    )
    .unwrap();
    let upstream = Message::status(200).body("ok");
    let id = h.run(0, None, post(b"abc"), Some((upstream, 0)));
    assert_eq!(
        lines(&h, id),
        [
            "a request_headers 4 0",
            "b request_headers 4 0",
            "a request_body 3 1",
            "b request_body 3 1",
            "b response_headers 1 0",
            "a response_headers 1 0",
            "b response_body 2 1",
            "a response_body 2 1",
            "a log 0 0",
            "b log 0 0"
        ]
    );
}

#[test]
fn a_local_reply_in_a_chain_skips_the_later_filters_but_each_gets_on_log() {
    let first = Behaviour {
        name: "a",
        reply_in_request_headers: true,
        ..Behaviour::default()
    };
    let second = Behaviour {
        name: "b",
        ..Behaviour::default()
    };
    let mut h = Harness::chain(
        vec![
            Plugin::new(module(first), ""),
            Plugin::new(module(second), ""),
        ],
        Options::default(),
    )
    .unwrap();
    let id = h.run(0, None, Message::get("/"), None);
    assert_eq!(
        lines(&h, id),
        [
            "a request_headers 4 1",
            "a response_headers 4 0",
            "a response_body 2 1",
            "a log 0 0",
            "b log 0 0"
        ]
    );
    assert!(h.result(id).upstream_request.is_none());
}

/// A module that makes a gRPC call from request headers (service given as a cluster name) and
/// logs what comes back: `receive <size>` and the message, or `close <status>` and the message.
const GRPC_CALLER: &str = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_status" (func $status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $stream (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (data (i32.const 1000) "authz")
  (data (i32.const 1010) "eastwest.Authz")
  (data (i32.const 1030) "Check")
  (data (i32.const 1040) "ping")
  (data (i32.const 1050) "sent")
  (data (i32.const 1060) "not sent")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $stream (local.get 0))
    (if (i32.eqz (call $call (i32.const 1000) (i32.const 5) (i32.const 1010) (i32.const 14)
          (i32.const 1030) (i32.const 5) (i32.const 0) (i32.const 0) (i32.const 1040) (i32.const 4)
          (i32.const 100) (i32.const 300)))
      (then (drop (call $log (i32.const 2) (i32.const 1050) (i32.const 4))))
      (else (drop (call $log (i32.const 2) (i32.const 1060) (i32.const 8)))))
    (i32.const 1))
  ;; As the SDKs do: switch to the stream that made the call, then act.
  (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
    (drop (call $effective (global.get $stream)))
    (drop (call $buffer (i32.const 5) (i32.const 0) (local.get 2) (i32.const 310) (i32.const 314)))
    (drop (call $log (i32.const 2) (i32.load (i32.const 310)) (i32.load (i32.const 314))))
    (drop (call $continue (i32.const 0))))
  (func (export "proxy_on_grpc_close") (param i32 i32 i32)
    (drop (call $effective (global.get $stream)))
    (drop (call $status (i32.const 320) (i32.const 324) (i32.const 328)))
    (drop (call $log (i32.const 3) (i32.load (i32.const 324)) (i32.load (i32.const 328)))))
)"#;

#[test]
fn a_grpc_call_is_answered_by_its_declared_cluster() {
    let mut h = Harness::new(GRPC_CALLER.as_bytes(), Options::default()).unwrap();
    h.answer_grpc_calls(
        "authz",
        GrpcAnswer {
            messages: vec![b"allow".to_vec()],
            delay_ms: 5,
            ..GrpcAnswer::default()
        },
    );
    let id = h.run(0, None, Message::get("/"), None);
    let result = h.result(id);
    assert_eq!(lines(&h, id), ["sent", "allow"]);
    let call = &result.grpc_calls[0];
    assert_eq!(
        (
            call.cluster.as_str(),
            call.service.as_str(),
            call.method.as_str()
        ),
        ("authz", "eastwest.Authz", "Check")
    );
    assert_eq!(call.messages, [b"ping".to_vec()]);
    assert_eq!(call.timeout_ms, 100);
    assert!(
        result.upstream_request.is_some(),
        "resumed after the answer"
    );

    // An error status closes the call with the status and Envoy's message.
    h.answer_grpc_calls(
        "authz",
        GrpcAnswer {
            status: 7,
            status_message: "denied".into(),
            ..GrpcAnswer::default()
        },
    );
    let id = h.run(0, None, Message::get("/"), None);
    let logs = h.result(id).logs;
    assert_eq!(logs[1].level, "warn");
    assert_eq!(logs[1].message, "denied{via_upstream}");

    // Later than its timeout: UNAVAILABLE, as Envoy's async client answers.
    h.answer_grpc_calls(
        "authz",
        GrpcAnswer {
            delay_ms: 500,
            ..GrpcAnswer::default()
        },
    );
    let id = h.run(0, None, Message::get("/"), None);
    assert_eq!(
        lines(&h, id),
        ["sent", "upstream request timeout{response_timeout}"]
    );
}

#[test]
fn a_grpc_call_to_an_unknown_cluster_is_refused_at_once() {
    let mut h = Harness::new(GRPC_CALLER.as_bytes(), Options::default()).unwrap();
    let id = h.run(0, None, Message::get("/"), None);
    assert_eq!(lines(&h, id), ["not sent"]);
    assert!(h.result(id).grpc_calls.is_empty());
}
