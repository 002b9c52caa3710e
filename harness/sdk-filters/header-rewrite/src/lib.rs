//! Header rewriting as a proxy-wasm SDK user writes it: one header added, one replaced and one
//! removed on the request, and the same on the response.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_context_id, _root_context_id| -> Box<dyn HttpContext> {
        Box::new(HeaderRewrite)
    });
}}

struct HeaderRewrite;

impl Context for HeaderRewrite {}

impl HttpContext for HeaderRewrite {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_request_header("x-request-added", "sdk");
        // Replacing drops every earlier value of the header.
        self.set_http_request_header("x-request-replaced", Some("new"));
        self.set_http_request_header("x-request-removed", None);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-response-added", "sdk");
        self.set_http_response_header("x-response-replaced", Some("new"));
        self.set_http_response_header("x-response-removed", None);
        Action::Continue
    }
}
