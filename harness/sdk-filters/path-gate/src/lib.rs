//! A path gate, as SDK users write one: requests under `/private/` get a local 404 at once;
//! requests under `/review/` are read to the end of their body first (the body callback
//! returns `Pause` until the end of the stream) and refused with a local 403 when the body
//! contains `deny`; everything else passes. Each decision is logged.
//!
//! The headers of a `/review/` request are not held: the router may open the upstream request
//! before the body is judged, as it does in Envoy.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(PathGate { review: false })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

struct PathGate {
    review: bool,
}

impl Context for PathGate {}

impl HttpContext for PathGate {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with("/private/") {
            info(&format!("{path}: private"));
            self.send_http_response(404, vec![("x-path-gate", "private")], Some(b"not here\n"));
            return Action::Pause;
        }
        self.review = path.starts_with("/review/") && !end_of_stream;
        if self.review {
            info(&format!("{path}: reading the body"));
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.review {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if body.windows(4).any(|window| window == b"deny") {
            info(&format!("denied after {body_size} bytes"));
            self.send_http_response(403, vec![("x-path-gate", "denied")], Some(b"denied\n"));
            return Action::Pause;
        }
        info(&format!("allowed after {body_size} bytes"));
        Action::Continue
    }
}
