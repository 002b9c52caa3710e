//! Proves the harness against real Envoy: proxying, process lifetime, failure reporting,
//! mTLS with SPIFFE certificates, Wasm loading. Needs Envoy (EASTWEST_ENVOY or
//! `cargo xtask test`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use eastwest_e2e::client::{http_request_with, RequestOptions};
use eastwest_e2e::{
    bootstrap, free_port, http2_request, http_request, wasm_filter, ClusterBuilder, Envoy,
    EnvoyOptions, ListenerBuilder, Node, TestApp, TestCa, TrafficDirection,
};
use serde_json::{json, Value};

/// The `[name, value]` pairs the test app reports for header `name`.
fn echoed_header_values(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("headers array")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_owned())
        .collect()
}

fn plain_proxy(name: &str, app: &TestApp) -> (Envoy, u16) {
    let (admin, listen) = (free_port(), free_port());
    let config = bootstrap(
        &Node::new("proxy-1", "proxy"),
        admin,
        vec![ListenerBuilder::new("outbound", listen, "app")
            .traffic_direction(TrafficDirection::Outbound)
            .route_field("timeout", json!("1s"))
            .build()],
        vec![ClusterBuilder::new("app", app.port()).build()],
        &[],
    );
    let envoy = Envoy::start(name, config, &EnvoyOptions::default()).unwrap();
    (envoy, listen)
}

#[test]
fn test_app_echoes_requests_and_obeys_control_headers() {
    let app = TestApp::start().unwrap();
    let url = format!("http://127.0.0.1:{}/echo?q=1", app.port());
    let response = http_request(
        "POST",
        &url,
        &[
            ("x-dup", b"one"),
            ("x-dup", b"two"),
            ("x-test-status", b"418"),
            ("x-test-response-header", b"x-from-app=yes"),
            ("x-test-response-header", b"x-from-app=again"),
        ],
        "payload",
    )
    .unwrap();
    assert_eq!(response.status, 418);
    assert_eq!(
        response.header_all("x-from-app"),
        [&b"yes"[..], &b"again"[..]]
    );
    let echo = response.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?q=1");
    assert_eq!(echo["body"], "payload");
    assert_eq!(echoed_header_values(&echo, "x-dup"), ["one", "two"]);

    let bad = http_request("GET", &url, &[("x-test-status", b"nope")], "").unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("x-test-status"), "{}", bad.text());

    let reset = http_request("GET", &url, &[("x-test-reset", b"1")], "");
    assert!(reset.is_err(), "expected a reset, got {reset:?}");

    let h2 = http2_request("GET", &url, &[], "").unwrap();
    assert_eq!(h2.status, 200);
    assert_eq!(app.requests_seen(), 4);

    // gRPC: grpc-status in the trailers after one length-prefixed message (the echo)...
    let grpc = http2_request("POST", &url, &[("x-test-grpc-status", b"14")], "").unwrap();
    assert_eq!(grpc.status, 200);
    assert_eq!(
        grpc.header_str("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(grpc.header_str("grpc-status"), None);
    assert_eq!(grpc.trailer_str("grpc-status").as_deref(), Some("14"));
    assert_eq!(
        grpc.trailer_str("grpc-message").as_deref(),
        Some(eastwest_e2e::app::GRPC_MESSAGE)
    );
    assert_eq!(grpc.body[0], 0, "uncompressed");
    let length = u32::from_be_bytes(grpc.body[1..5].try_into().unwrap()) as usize;
    assert_eq!(length, grpc.body.len() - 5);
    let echo: Value = serde_json::from_slice(&grpc.body[5..]).unwrap();
    assert_eq!(echo["method"], "POST");
    // ... or trailers-only: in the headers, no body.
    let only = http2_request(
        "POST",
        &url,
        &[
            ("x-test-grpc-status", b"7"),
            ("x-test-grpc-trailers-only", b"1"),
        ],
        "",
    )
    .unwrap();
    assert_eq!(only.status, 200);
    assert_eq!(only.header_str("grpc-status").as_deref(), Some("7"));
    assert!(only.header_str("grpc-message").is_some());
    assert!(only.body.is_empty() && only.trailers.is_empty());
    let bad = http_request("GET", &url, &[("x-test-grpc-trailers-only", b"1")], "").unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(app.requests_seen(), 7);

    // Once dropped, the app is down at once (tests of upstream failures rely on it).
    let port = app.port();
    drop(app);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn plain_proxy_round_trips_and_the_app_sees_the_headers() {
    let app = TestApp::start().unwrap();
    let (envoy, listen) = plain_proxy("plain-proxy", &app);
    let url = format!("http://127.0.0.1:{listen}/hello?x=1");

    let response = http_request(
        "GET",
        &url,
        &[
            ("x-custom", b"value"),
            ("x-dup", b"first"),
            ("x-dup", b"second"),
            // obs-text (not UTF-8) must survive the client and Envoy.
            ("x-obs-text", b"caf\xe9"),
            ("x-test-response-header", b"x-app-set=1"),
        ],
        "",
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-app-set"), Some(&b"1"[..]));
    assert_eq!(response.header_str("server").as_deref(), Some("envoy"));
    let echo = response.json();
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echoed_header_values(&echo, "x-custom"), ["value"]);
    assert_eq!(echoed_header_values(&echo, "x-dup"), ["first", "second"]);
    assert_eq!(echoed_header_values(&echo, "x-obs-text"), ["caf\u{fffd}"]);
    assert_eq!(echoed_header_values(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed_header_values(&echo, "x-request-id").len(), 1);
    assert_eq!(app.requests_seen(), 1);

    // HTTP/2 (h2c) from the client works through the same listener (codec AUTO).
    assert_eq!(http2_request("GET", &url, &[], "").unwrap().status, 200);

    // Failures of the app reach the client as Envoy reports them.
    let reset = http_request("GET", &url, &[("x-test-reset", b"1")], "").unwrap();
    assert_eq!(reset.status, 503, "{}", reset.text());
    let slow = http_request("GET", &url, &[("x-test-delay-ms", b"1500")], "").unwrap();
    assert_eq!(slow.status, 504, "route timeout is 1s");

    assert_eq!(envoy.counter("cluster.app.upstream_rq_200"), Some(2));
    assert!(envoy.stats().unwrap()["cluster.app.upstream_cx_total"] >= 1);
    assert!(envoy
        .prometheus()
        .unwrap()
        .contains("envoy_cluster_upstream_rq"));
    assert!(envoy.log().contains("starting main dispatch loop"));
    assert!(envoy.run_dir().join("bootstrap.json").is_file());
}

#[test]
fn drop_stops_and_reaps_envoy() {
    let app = TestApp::start().unwrap();
    let (envoy, listen) = plain_proxy("drop-kills", &app);
    let pid = envoy.pid();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    drop(envoy);
    // Reaped, not a zombie: the pid is gone entirely.
    assert!(
        !proc_dir.exists(),
        "Envoy pid {pid} still exists after drop"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", listen)).is_err());
}

#[test]
fn a_broken_bootstrap_fails_with_envoys_log() {
    let mut config = bootstrap(
        &Node::new("broken", "broken"),
        free_port(),
        vec![],
        vec![ClusterBuilder::new("app", 1)
            .field("no_such_field", json!(true))
            .build()],
        &[],
    );
    let error = Envoy::start("broken-bootstrap", config.clone(), &EnvoyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("did not start"), "{error}");
    assert!(error.contains("no_such_field"), "{error}");
    assert!(error.contains("last 60 lines of envoy.log"), "{error}");

    let log =
        Envoy::start_expecting_failure("broken-bootstrap", config.clone(), &Default::default())
            .unwrap();
    assert!(log.contains("no_such_field"), "{log}");

    // A valid bootstrap is not a failure.
    config["static_resources"]["clusters"] = json!([]);
    let error = Envoy::start_expecting_failure("valid-bootstrap", config, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("became ready"), "{error}");
}

#[test]
fn mtls_with_spiffe_certificates_and_clients_without_one_are_refused() {
    let ca = TestCa::new("cluster.local").unwrap();
    let client_cert = ca.issue_workload("frontend", "web").unwrap();
    let server_cert = ca.issue_workload("payments", "api").unwrap();
    assert_eq!(
        client_cert.spiffe_id,
        "spiffe://cluster.local/ns/frontend/sa/web"
    );
    let app = TestApp::start().unwrap();

    // The callee's sidecar: inbound mTLS listener, forwards the peer identity as XFCC.
    let inbound_port = free_port();
    let server = Envoy::start(
        "mtls-server",
        bootstrap(
            &Node::istio_sidecar("api", "payments", &[("app", "api")]),
            free_port(),
            vec![ListenerBuilder::new("inbound", inbound_port, "app")
                .traffic_direction(TrafficDirection::Inbound)
                .downstream_tls(&server_cert)
                .hcm_field("forward_client_cert_details", json!("SANITIZE_SET"))
                .hcm_field("set_current_client_cert_details", json!({"uri": true}))
                .build()],
            vec![ClusterBuilder::new("app", app.port()).build()],
            &[],
        ),
        &EnvoyOptions::default(),
    )
    .unwrap();

    // The caller's sidecar: one outbound listener presenting the client certificate (and
    // checking the server's SPIFFE id), one originating TLS without a client certificate.
    let (with_cert, without_cert) = (free_port(), free_port());
    let client = Envoy::start(
        "mtls-client",
        bootstrap(
            &Node::istio_sidecar("web", "frontend", &[("app", "web")]),
            free_port(),
            vec![
                ListenerBuilder::new("outbound", with_cert, "payments-mtls")
                    .traffic_direction(TrafficDirection::Outbound)
                    .build(),
                ListenerBuilder::new("outbound-no-cert", without_cert, "payments-no-cert")
                    .traffic_direction(TrafficDirection::Outbound)
                    .build(),
            ],
            vec![
                ClusterBuilder::new("payments-mtls", inbound_port)
                    .upstream_tls(&client_cert, Some("api.payments.svc.cluster.local"))
                    .expect_server_uri_san(&server_cert.spiffe_id)
                    .build(),
                ClusterBuilder::new("payments-no-cert", inbound_port)
                    .upstream_tls_without_client_cert(ca.ca_path(), None)
                    .build(),
            ],
            &[],
        ),
        &EnvoyOptions::default(),
    )
    .unwrap();

    let response = http_request("GET", &format!("http://127.0.0.1:{with_cert}/"), &[], "").unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let xfcc = echoed_header_values(&response.json(), "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1);
    assert!(
        xfcc[0].contains("URI=spiffe://cluster.local/ns/frontend/sa/web"),
        "{xfcc:?}"
    );
    assert_eq!(app.requests_seen(), 1);

    let refused =
        http_request("GET", &format!("http://127.0.0.1:{without_cert}/"), &[], "").unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        app.requests_seen(),
        1,
        "the app must not see the refused call"
    );
    assert!(
        server
            .stats()
            .unwrap()
            .iter()
            .any(|(name, &value)| name.ends_with("ssl.fail_verify_no_cert") && value >= 1),
        "the server should count a handshake without a client certificate"
    );
    assert!(
        client
            .counter("cluster.payments-mtls.ssl.handshake")
            .unwrap()
            >= 1
    );
}

/// A minimal proxy-wasm module (ABI 0.2.1) that logs on configure and adds
/// `x-e2e-wasm: hello` to every request; `proxy_on_configure` returns `configure_result`.
fn smoke_wasm(dir: &Path, configure_result: u32) -> PathBuf {
    let wat = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "x-e2e-wasm")
  (data (i32.const 32) "hello")
  (data (i32.const 48) "e2e smoke filter configured")
  (func (export "proxy_abi_version_0_2_1"))
  BUMP_ALLOCATOR
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $log (i32.const 2) (i32.const 48) (i32.const 27)))
    (i32.const CONFIGURE_RESULT))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_header
      (i32.const 0) (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 5)))
    (i32.const 0))
)"#
    .replace("CONFIGURE_RESULT", &configure_result.to_string())
    .replace("BUMP_ALLOCATOR", eastwest_e2e::wat_modules::BUMP_ALLOCATOR);
    let path = dir.join(format!("smoke-{configure_result}.wasm"));
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path
}

#[test]
fn wasm_filters_load_on_v8_and_a_refused_configuration_stops_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start().unwrap();
    let build = |wasm: &Path, listen: u16| {
        bootstrap(
            &Node::new("wasm", "wasm"),
            free_port(),
            vec![ListenerBuilder::new("outbound", listen, "app")
                .traffic_direction(TrafficDirection::Outbound)
                .http_filter(wasm_filter(
                    "e2e-smoke",
                    wasm,
                    json!({"direction": "outbound"}),
                ))
                .build()],
            vec![ClusterBuilder::new("app", app.port()).http2(true).build()],
            &[],
        )
    };

    let listen = free_port();
    let options = EnvoyOptions {
        component_log_level: Some("wasm:debug".into()),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start(
        "wasm-smoke",
        build(&smoke_wasm(dir.path(), 1), listen),
        &options,
    )
    .unwrap();
    let response = http_request_with(
        &RequestOptions::default(),
        "GET",
        &format!("http://127.0.0.1:{listen}/"),
        &[],
        "",
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let echo = response.json();
    assert_eq!(echoed_header_values(&echo, "x-e2e-wasm"), ["hello"]);
    envoy
        .wait_for_log("e2e smoke filter configured", Duration::from_secs(5))
        .unwrap();
    drop(envoy);

    let log = Envoy::start_expecting_failure(
        "wasm-refused",
        build(&smoke_wasm(dir.path(), 0), free_port()),
        &options,
    )
    .unwrap();
    assert!(log.contains("e2e smoke filter configured"), "{log}");
}

#[test]
fn envoy_outlives_the_thread_that_started_it() {
    // PR_SET_PDEATHSIG fires when the *thread* that forked the child exits; the harness forks
    // from a long-lived thread so handles can be shared between test threads.
    let app = TestApp::start().unwrap();
    let (mut envoy, listen) = std::thread::scope(|scope| {
        scope
            .spawn(|| plain_proxy("thread-started", &app))
            .join()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        envoy.is_running(),
        "Envoy died with the thread that started it"
    );
    let response = http_request("GET", &format!("http://127.0.0.1:{listen}/"), &[], "").unwrap();
    assert_eq!(response.status, 200);
}

const HELPER_ENV: &str = "EASTWEST_E2E_ORPHAN_HELPER";

/// Run by `envoy_dies_with_a_killed_test_process` in a child test process: starts Envoy,
/// reports its pid and waits to be killed.
#[test]
#[ignore = "helper process for envoy_dies_with_a_killed_test_process"]
fn orphan_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let app = TestApp::start().unwrap();
    let (envoy, _) = plain_proxy("orphan-helper", &app);
    println!("ENVOY_PID={}", envoy.pid());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn envoy_dies_with_a_killed_test_process() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["orphan_helper", "--exact", "--ignored", "--nocapture"])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(helper.stdout.take().unwrap());
    let envoy_pid: u32 = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.strip_prefix("ENVOY_PID=")
                .map(|pid| pid.parse().unwrap())
        })
        .expect("the helper did not report an Envoy pid");
    assert!(process_alive(envoy_pid));
    helper.kill().unwrap(); // SIGKILL: no Drop runs in the helper
    helper.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while process_alive(envoy_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "Envoy {envoy_pid} survived its killed parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Alive and not a zombie (an orphan is reaped by init, which may take a moment).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
    }
}
