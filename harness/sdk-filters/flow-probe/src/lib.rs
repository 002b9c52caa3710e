//! A configurable flow-control filter, as an SDK user writes one to see what the host does:
//! every HTTP callback logs one line with its arguments (`request_body size=5 eos=true`), and
//! the configuration says where the filter pauses, calls out or answers locally.
//!
//! ```json
//! {"request_headers": "pause_callout", "request_body": "buffer",
//!  "response_headers": "continue", "response_body": "replace",
//!  "reply": {"status": 403, "headers": [["x-gate", "closed"]], "body": "denied\n"}}
//! ```
//!
//! - `request_headers`: `continue` (default), `pause` (wait for a callout answer that never
//!   comes: the stream stays paused), `pause_callout` (call cluster `decider` at `/decide<path>`,
//!   then resume on a 2xx answer or send `reply` otherwise; request headers
//!   `x-decide-<name>` go to the decider as `x-test-<name>`), `local_reply` (send `reply`).
//! - `request_body`: `continue` (default), `buffer` (pause until the end of the stream, then go
//!   on), `reply_at_end` (pause until the end of the stream, then send `reply`), `callout_at_end`
//!   (pause until the end of the stream, then call out as above).
//! - `response_headers`: `continue` (default), `pause_callout` (call out, resume on 2xx,
//!   else `reply`), or `read_request_path` (read the request's `:path`, which the host no
//!   longer offers then: the SDK panics on the unexpected status, a mistake SDK users make).
//! - `response_body`: `continue` (default) or `replace` (pause until the end of the stream, then
//!   replace the body with `body <n> bytes`).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

const DECIDER: &str = "decider";
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    request_headers: String,
    request_body: String,
    response_headers: String,
    response_body: String,
    reply: Reply,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Reply {
    status: u32,
    headers: Vec<(String, String)>,
    body: Option<String>,
}

impl Default for Reply {
    fn default() -> Self {
        Reply {
            status: 403,
            headers: vec![("x-flow-probe".into(), "reply".into())],
            body: Some("denied by flow-probe\n".into()),
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ProbeRoot { config: Rc::new(Config::default()) })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

struct ProbeRoot {
    config: Rc<Config>,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(if bytes.is_empty() { b"{}" } else { &bytes }) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(error) => {
                hostcalls::log(
                    LogLevel::Error,
                    &format!("flow-probe: bad configuration: {error}"),
                )
                .ok();
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            config: self.config.clone(),
            callout_from_response: false,
            path: String::new(),
            forwarded: Vec::new(),
        }))
    }
}

struct Probe {
    config: Rc<Config>,
    callout_from_response: bool,
    /// The request's `:path` (request headers cannot be read from response callbacks).
    path: String,
    /// `x-decide-<name>` request headers, which travel to the decider as `x-test-<name>`.
    forwarded: Vec<(String, String)>,
}

impl Probe {
    fn reply(&self) {
        let reply = &self.config.reply;
        let headers = reply
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        self.send_http_response(
            reply.status,
            headers,
            reply.body.as_deref().map(str::as_bytes),
        );
    }

    /// Asks the `decider` cluster; `Pause` while it answers, or the reply when it cannot.
    fn callout(&mut self) -> Action {
        let decide_path = format!("/decide{}", self.path);
        let forwarded = std::mem::take(&mut self.forwarded);
        let mut headers = vec![
            (":method", "GET"),
            (":path", decide_path.as_str()),
            (":authority", DECIDER),
        ];
        headers.extend(forwarded.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        match self.dispatch_http_call(DECIDER, headers, None, vec![], CALLOUT_TIMEOUT) {
            Ok(_) => Action::Pause,
            Err(status) => {
                info(&format!("callout refused: {status:?}"));
                self.reply();
                Action::Pause
            }
        }
    }
}

impl Context for Probe {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".into());
        info(&format!("callout answer status={status}"));
        if status.starts_with('2') {
            if self.callout_from_response {
                self.resume_http_response();
            } else {
                self.resume_http_request();
            }
        } else {
            self.reply();
        }
    }

    fn on_done(&mut self) -> bool {
        info("done");
        true
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        info(&format!("request_headers eos={end_of_stream}"));
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        self.forwarded = self
            .get_http_request_headers()
            .into_iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix("x-decide-")?;
                Some((format!("x-test-{rest}"), value))
            })
            .collect();
        match self.config.request_headers.as_str() {
            "pause" => Action::Pause,
            "pause_callout" => self.callout(),
            "local_reply" => {
                self.reply();
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        info(&format!(
            "request_body size={body_size} eos={end_of_stream}"
        ));
        let mode = self.config.request_body.as_str();
        if mode == "continue" || mode.is_empty() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        match mode {
            "reply_at_end" => {
                self.reply();
                Action::Pause
            }
            "callout_at_end" => self.callout(),
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        info(&format!("request_trailers n={num_trailers}"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        info(&format!(
            "response_headers status={status} eos={end_of_stream}"
        ));
        match self.config.response_headers.as_str() {
            "pause_callout" => {
                self.callout_from_response = true;
                return self.callout();
            }
            "read_request_path" => {
                let path = self.get_http_request_header(":path");
                info(&format!("request path in the response: {path:?}"));
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        info(&format!(
            "response_body size={body_size} eos={end_of_stream}"
        ));
        if self.config.response_body != "replace" {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let replacement = format!("body {body_size} bytes\n");
        self.set_http_response_body(0, body_size, replacement.as_bytes());
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        info(&format!("response_trailers n={num_trailers}"));
        Action::Continue
    }

    fn on_log(&mut self) {
        info("log");
    }
}
