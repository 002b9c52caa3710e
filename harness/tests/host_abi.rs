//! The host's ABI behaviour, checked with tiny hand-written modules: each reports the statuses
//! it gets back as log lines ("0" is Ok, "1" NotFound, "2" BadArgument, "8" CasMismatch, ...).

use eastwest_harness::{Harness, HttpAnswer, Message, Options};

/// A proxy-wasm module: imports, memory, a bump allocator, `$report` (logs a number) and `body`.
fn module(body: &str) -> String {
    format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $record (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_period (param i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func $report (param $v i32)
    (if (i32.lt_u (local.get $v) (i32.const 10))
      (then
        (i32.store8 (i32.const 200) (i32.add (i32.const 48) (local.get $v)))
        (drop (call $log (i32.const 2) (i32.const 200) (i32.const 1))))
      (else
        (i32.store8 (i32.const 200) (i32.add (i32.const 48) (i32.div_u (local.get $v) (i32.const 10))))
        (i32.store8 (i32.const 201) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
        (drop (call $log (i32.const 2) (i32.const 200) (i32.const 2))))))
  ;; Logs the bytes the host returned at pointer/size slots 300/304.
  (func $report_value
    (drop (call $log (i32.const 2) (i32.load (i32.const 300)) (i32.load (i32.const 304)))))
  (data (i32.const 1000) "key")
  (data (i32.const 1010) "v1v2v3")
  (data (i32.const 1020) "c")
  (data (i32.const 1021) "h")
  (data (i32.const 1022) "g")
  (data (i32.const 1030) "auth")
  (data (i32.const 1040) "denied")
  (data (i32.const 1050) "my.key")
  (data (i32.const 1060) "val")
  ;; pairs: :path=/ :method=GET :authority=auth
  (data (i32.const 1100) "\03\00\00\00\05\00\00\00\01\00\00\00\07\00\00\00\03\00\00\00\0a\00\00\00\04\00\00\00:path\00/\00:method\00GET\00:authority\00auth\00")
  (data (i32.const 1200) "x-probe")
  {body}
)"#
    )
}

fn harness(body: &str, options: Options) -> Harness {
    Harness::new(module(body).as_bytes(), options).unwrap()
}

fn messages(h: &Harness) -> Vec<String> {
    h.logs().into_iter().map(|l| l.message).collect()
}

#[test]
fn shared_data_has_one_global_cas_counter_and_cas_zero_writes_unconditionally() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $report (call $get_shared (i32.const 1000) (i32.const 3) (i32.const 300) (i32.const 304) (i32.const 308)))
    (call $report (call $set_shared (i32.const 1000) (i32.const 3) (i32.const 1010) (i32.const 2) (i32.const 0)))
    (call $report (call $get_shared (i32.const 1000) (i32.const 3) (i32.const 300) (i32.const 304) (i32.const 308)))
    (call $report_value)
    (call $report (i32.load (i32.const 308)))
    (call $report (call $set_shared (i32.const 1000) (i32.const 3) (i32.const 1012) (i32.const 2) (i32.const 99)))
    (call $report (call $set_shared (i32.const 1000) (i32.const 3) (i32.const 1012) (i32.const 2) (i32.load (i32.const 308))))
    (call $report (call $set_shared (i32.const 1000) (i32.const 3) (i32.const 1014) (i32.const 2) (i32.const 0)))
    (i32.const 0))
"#;
    let mut h = harness(
        body,
        Options {
            workers: 2,
            ..Options::default()
        },
    );
    h.run(0, None, Message::get("/"), None);
    assert_eq!(messages(&h), ["1", "0", "0", "v1", "1", "8", "0", "0"]);
    // The second worker's VM shares the store: the key exists, versions go on from 3.
    h.run(1, None, Message::get("/"), None);
    assert_eq!(
        &messages(&h)[8..],
        ["0", "0", "0", "v1", "4", "8", "0", "0"]
    );
    assert_eq!(h.shared_data()["key"], (b"v3".to_vec(), 6));
}

#[test]
fn metrics_follow_envoys_semantics() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $report (call $define (i32.const 0) (i32.const 1020) (i32.const 1) (i32.const 400)))
    (call $report (i32.load (i32.const 400)))
    (call $report (call $increment (i32.load (i32.const 400)) (i64.const 0)))
    (call $report (call $increment (i32.load (i32.const 400)) (i64.const -1)))
    (call $report (call $increment (i32.load (i32.const 400)) (i64.const 5)))
    (call $report (call $record (i32.load (i32.const 400)) (i64.const 3)))
    (call $report (call $get_metric (i32.load (i32.const 400)) (i32.const 410)))
    (call $report (i32.load (i32.const 410)))
    (call $report (call $define (i32.const 2) (i32.const 1021) (i32.const 1) (i32.const 420)))
    (call $report (i32.load (i32.const 420)))
    (call $report (call $get_metric (i32.load (i32.const 420)) (i32.const 410)))
    (call $report (call $record (i32.load (i32.const 420)) (i64.const 7)))
    (call $report (call $define (i32.const 1) (i32.const 1022) (i32.const 1) (i32.const 430)))
    (call $report (i32.load (i32.const 430)))
    (call $report (call $increment (i32.load (i32.const 430)) (i64.const 5)))
    (call $report (call $increment (i32.load (i32.const 430)) (i64.const -2)))
    (call $report (call $get_metric (i32.load (i32.const 430)) (i32.const 410)))
    (call $report (i32.load (i32.const 410)))
    (call $report (call $increment (i32.const 44) (i64.const 1)))
    (call $report (call $define (i32.const 3) (i32.const 1020) (i32.const 1) (i32.const 440)))
    (i32.const 0))
"#;
    let mut h = harness(body, Options::default());
    h.run(0, None, Message::get("/"), None);
    assert_eq!(
        messages(&h),
        [
            "0", "4", "2", "2", "0", "0", "0", "8", "0", "6", "2", "0", "0", "5", "0", "0", "0",
            "3", "1", "2"
        ]
    );
    assert_eq!(h.metric("c"), Some(8));
    assert_eq!(h.metric("g"), Some(3));
    let text = h.prometheus(&[]).unwrap();
    assert!(
        text.contains("# TYPE h histogram\nh_bucket{le=\"0.5\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("h_bucket{le=\"10\"} 1\n"), "{text}");
    assert!(text.contains("h_sum{} 7\nh_count{} 1\n"), "{text}");
}

#[test]
fn pause_for_an_http_call_resumes_when_the_answer_arrives() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; unknown cluster, then the known one
    (call $report (call $http_call (i32.const 1000) (i32.const 3) (i32.const 1100) (i32.const 64) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 500)))
    (call $report (call $http_call (i32.const 1030) (i32.const 4) (i32.const 1100) (i32.const 64) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 500)))
    (call $report (i32.load (i32.const 500)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $h i32) (param $b i32) (param $t i32)
    (call $report (local.get $ctx))
    (call $report (local.get $token))
    (call $report (local.get $h))
    (call $report (call $effective (i32.const 77)))
    (call $report (call $effective (i32.const 2)))
    (call $report (call $set_property (i32.const 1050) (i32.const 6) (i32.const 1060) (i32.const 3)))
    (call $report (call $get_property (i32.const 1050) (i32.const 6) (i32.const 300) (i32.const 304)))
    (call $report_value)
    (call $report (call $continue (i32.const 0))))
"#;
    let mut h = harness(body, Options::default());
    h.answer_http_calls(
        "auth",
        HttpAnswer {
            response: Message::status(200).body("yes"),
            delay_ms: 40,
            reset: false,
        },
    );
    let id = h.start_stream(0, None, Message::get("/"));
    assert!(h.result(id).upstream_request.is_none(), "paused");
    assert_eq!(h.result(id).http_calls.len(), 1);
    assert_eq!(h.result(id).http_calls[0].cluster, "auth");
    h.advance(39);
    assert!(
        h.result(id).upstream_request.is_none(),
        "still paused at 39 ms"
    );
    h.advance(1);
    assert!(h.result(id).upstream_request.is_some(), "resumed at 40 ms");
    h.respond(id, Message::status(204));
    let result = h.result(id);
    assert!(result.complete);
    assert_eq!(
        result.downstream_response.unwrap().get_header(":status"),
        Some("204")
    );
    // The answer goes to the root context (1), token 1, one header; then the effective context.
    assert_eq!(
        messages(&h),
        ["2", "0", "1", "1", "1", "1", "2", "0", "0", "0", "val", "0"]
    );
}

#[test]
fn a_local_reply_ends_the_stream_without_reaching_the_upstream() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $report (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 1040) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $report (i32.const 42))
    (i32.const 0))
"#;
    let mut h = harness(body, Options::default());
    let id = h.run(0, None, Message::get("/"), None);
    let result = h.result(id);
    assert!(result.upstream_request.is_none());
    let reply = result.local_reply.unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"denied");
    let response = result.downstream_response.unwrap();
    assert_eq!(response.get_header(":status"), Some("403"));
    assert_eq!(
        messages(&h),
        ["0", "42"],
        "the filter sees its own local reply's headers"
    );
}

#[test]
fn a_trap_fails_closed_with_a_backtrace_or_open_when_asked() {
    let body = r#"
  (func $boom (unreachable))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $boom)
    (i32.const 0))
"#;
    let mut h = harness(body, Options::default());
    for _ in 0..2 {
        let id = h.run(0, None, Message::get("/"), None);
        let result = h.result(id);
        assert!(result.upstream_request.is_none());
        assert_eq!(result.local_reply.unwrap().status, 503);
    }
    assert_eq!(h.traps.len(), 1);
    assert!(
        h.traps[0].message.contains("wasm backtrace"),
        "{}",
        h.traps[0].message
    );
    assert!(
        h.traps[0].message.contains("unreachable"),
        "{}",
        h.traps[0].message
    );
    assert!(h.worker_failed(0));

    let mut open = harness(
        body,
        Options {
            fail_open: true,
            ..Options::default()
        },
    );
    for _ in 0..2 {
        let id = open.run(0, None, Message::get("/"), None);
        let result = open.result(id);
        assert!(result.upstream_request.is_some());
        assert!(result.local_reply.is_none());
    }
}

#[test]
fn ticks_fire_as_virtual_time_passes() {
    let body = r#"
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (call $report (call $tick_period (i32.const 100)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param $ctx i32)
    (call $report (local.get $ctx)))
"#;
    let mut h = harness(
        body,
        Options {
            workers: 2,
            ..Options::default()
        },
    );
    h.advance(99);
    // Configured in four VMs, as Envoy does: the base VM, the main thread's, each worker's.
    assert_eq!(messages(&h), ["0", "0", "0", "0"]);
    h.advance(251);
    assert_eq!(
        messages(&h).len(),
        4 + 3 * 3,
        "three ticks on each worker and on the main thread (not on the base VM)"
    );
}

#[test]
fn unknown_foreign_functions_and_properties_are_not_found() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $report (call $foreign (i32.const 1000) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 300) (i32.const 304)))
    (call $report (call $get_property (i32.const 1000) (i32.const 3) (i32.const 300) (i32.const 304)))
    (call $report (call $get_header (i32.const 0) (i32.const 1200) (i32.const 7) (i32.const 300) (i32.const 304)))
    (call $report (call $get_header (i32.const 8) (i32.const 1200) (i32.const 7) (i32.const 300) (i32.const 304)))
    (call $report (call $get_header (i32.const 2) (i32.const 1200) (i32.const 7) (i32.const 300) (i32.const 304)))
    (i32.const 0))
"#;
    let mut h = harness(body, Options::default());
    h.run(0, None, Message::get("/"), None);
    // Response headers do not exist yet during the request: Envoy answers BadArgument.
    assert_eq!(messages(&h), ["1", "1", "1", "2", "2"]);
}

#[test]
fn instruction_counts_are_deterministic() {
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $report (i32.const 1))
    (i32.const 0))
"#;
    let mut h = harness(body, Options::default());
    let a = h.run(0, None, Message::get("/"), None);
    let b = h.run(0, None, Message::get("/"), None);
    assert!(h.result(a).instructions > 0);
    assert_eq!(h.result(a).instructions, h.result(b).instructions);
}

#[test]
fn unknown_imports_and_bad_modules_are_named() {
    let module = r#"(module
  (import "env" "proxy_teleport" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#;
    let error = Harness::new(module.as_bytes(), Options::default())
        .err()
        .unwrap();
    assert!(error.0.contains("proxy_teleport"), "{error}");
    let error = Harness::new(b"not wasm", Options::default()).err().unwrap();
    assert!(error.0.contains("bad module"), "{error}");
}

#[test]
fn wasi_stdout_environment_and_clock_follow_the_vm() {
    let module = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 4096))
  (data (i32.const 100) "hello from stdout\n")
  (func (export "_initialize")
    ;; iovec at 0: ptr 100, len 18
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 18))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $env_sizes (i32.const 16) (i32.const 20)))
    (drop (call $env_get (i32.const 300) (i32.const 400)))
    ;; print the first variable on stderr
    (i32.store (i32.const 0) (i32.load (i32.const 300)))
    (i32.store (i32.const 4) (i32.sub (i32.load (i32.const 20)) (i32.const 1)))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 500)))
    (drop (call $now (i32.const 508)))
    (if (i64.ne (i64.load (i32.const 500)) (i64.load (i32.const 508))) (then unreachable))))"#;
    let h = Harness::new(
        module.as_bytes(),
        Options {
            env: vec![("POD".into(), "cart-0".into())],
            ..Options::default()
        },
    )
    .unwrap();
    let logs = h.logs();
    assert_eq!(logs[0].level, "info");
    assert_eq!(logs[0].message, "hello from stdout");
    assert_eq!(logs[1].level, "error");
    assert_eq!(logs[1].message, "POD=cart-0");
    assert!(h.traps.is_empty());
}
