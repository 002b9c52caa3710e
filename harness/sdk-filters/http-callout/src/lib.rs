//! An HTTP callout as a proxy-wasm SDK user writes it (an external authorization check): the
//! request pauses while the `auth` cluster is asked, then resumes with the answer's status in
//! `x-auth-status`, or gets a local 403 when the answer is not a 2xx.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

const AUTH_CLUSTER: &str = "auth";
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_context_id, _root_context_id| -> Box<dyn HttpContext> {
        Box::new(AuthCallout)
    });
}}

struct AuthCallout;

impl HttpContext for AuthCallout {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let auth_path = format!("/auth{path}");
        // As ext_authz does, the auth service sees the request's own headers.
        let forwarded = self.get_http_request_headers();
        let mut headers = vec![
            (":method", "GET"),
            (":path", auth_path.as_str()),
            (":authority", AUTH_CLUSTER),
        ];
        headers.extend(
            forwarded
                .iter()
                .filter(|(name, _)| !name.starts_with(':') && name != "content-length")
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        match self.dispatch_http_call(AUTH_CLUSTER, headers, None, vec![], AUTH_TIMEOUT) {
            Ok(_token) => Action::Pause,
            Err(status) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Warn,
                    &format!("auth callout not sent: {status:?}"),
                )
                .ok();
                self.send_http_response(503, vec![("x-auth-status", "unsent")], None);
                Action::Pause
            }
        }
    }
}

impl Context for AuthCallout {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        // A reset or a failed connection answers without a `:status`.
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".to_string());
        if status.starts_with('2') {
            self.set_http_request_header("x-auth-status", Some(&status));
            self.resume_http_request();
        } else {
            self.send_http_response(
                403,
                vec![("x-auth-status", &status)],
                Some(b"denied by the auth service\n"),
            );
        }
    }
}
