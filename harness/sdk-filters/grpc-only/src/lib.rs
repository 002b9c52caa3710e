//! A filter that admits only gRPC requests (`content-type: application/grpc...`), as a
//! gRPC-only backend's sidecar would: any other request gets a local
//! `415 Unsupported Media Type` with `x-grpc-only: refused` and never reaches the upstream.
//! Admitted requests are logged as `admitted <path>`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(GrpcOnly) });
}}

struct GrpcOnly;

impl Context for GrpcOnly {}

impl HttpContext for GrpcOnly {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let content_type = self
            .get_http_request_header("content-type")
            .unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if content_type.starts_with("application/grpc") {
            hostcalls::log(LogLevel::Info, &format!("admitted {path}")).ok();
            return Action::Continue;
        }
        hostcalls::log(
            LogLevel::Info,
            &format!("refused {path}: content-type {content_type:?}"),
        )
        .ok();
        self.send_http_response(
            415,
            vec![("x-grpc-only", "refused")],
            Some(b"only gRPC requests are served here\n"),
        );
        Action::Pause
    }
}
