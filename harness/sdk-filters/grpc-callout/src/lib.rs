//! A gRPC callout as SDK users write one (a policy check over gRPC): the request pauses while
//! `eastwest.test.Decider/Decide` on cluster `decider-grpc` is asked, with the request's path as
//! the message and the request's `x-decide-<name>` headers as initial metadata `x-test-<name>`.
//! On status 0 the request resumes with `x-grpc-decision: ok`; on any other status the client
//! gets a local 403 with `x-grpc-status: <code>` and `grpc <code>: <message>` as the body.
//!
//! Configuration: `{"mode": "call" | "stream", "timeout_ms": 1000, "cluster": "decider-grpc"}`.
//! `call` is a unary call (`dispatch_grpc_call`); `stream` opens a stream, sends the one message
//! with end of stream, and logs each event (initial metadata, messages, trailing metadata, close).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

const SERVICE: &str = "eastwest.test.Decider";
const METHOD: &str = "Decide";

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    mode: String,
    timeout_ms: u64,
    cluster: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: "call".into(),
            timeout_ms: 1000,
            cluster: "decider-grpc".into(),
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(CalloutRoot { config: Rc::new(Config::default()) })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

struct CalloutRoot {
    config: Rc<Config>,
}

impl Context for CalloutRoot {}

impl RootContext for CalloutRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let parsed = if bytes.is_empty() {
            Ok(Config::default())
        } else {
            serde_json::from_slice::<Config>(&bytes)
        };
        match parsed {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(error) => {
                hostcalls::log(LogLevel::Error, &format!("grpc-callout: {error}")).ok();
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GrpcCallout {
            config: self.config.clone(),
        }))
    }
}

struct GrpcCallout {
    config: Rc<Config>,
}

impl GrpcCallout {
    fn decide(&self, status: u32, message: &str) {
        if status == 0 {
            self.set_http_request_header("x-grpc-decision", Some("ok"));
            self.resume_http_request();
        } else {
            let code = status.to_string();
            let body = format!("grpc {status}: {message}\n");
            self.send_http_response(403, vec![("x-grpc-status", &code)], Some(body.as_bytes()));
        }
    }
}

impl Context for GrpcCallout {
    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        let (status, message) = self.get_grpc_status();
        let message = message.unwrap_or_default();
        let body = self
            .get_grpc_call_response_body(0, response_size)
            .unwrap_or_default();
        info(&format!(
            "grpc answer: status_code={status_code} get_grpc_status={status} message={message:?} size={response_size} body_starts={:?}",
            String::from_utf8_lossy(&body[..body.len().min(12)])
        ));
        self.decide(status_code, &message);
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token_id: u32, num_elements: u32) {
        let names: Vec<String> = self
            .get_grpc_stream_initial_metadata()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        info(&format!(
            "grpc stream initial metadata: {num_elements} entries {names:?}"
        ));
    }

    fn on_grpc_stream_message(&mut self, _token_id: u32, message_size: usize) {
        let message = self
            .get_grpc_stream_message(0, message_size)
            .unwrap_or_default();
        info(&format!(
            "grpc stream message: {message_size} bytes, starts {:?}",
            String::from_utf8_lossy(&message[..message.len().min(12)])
        ));
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token_id: u32, num_elements: u32) {
        let names: Vec<String> = self
            .get_grpc_stream_trailing_metadata()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let status = self
            .get_grpc_stream_trailing_metadata_value("grpc-status")
            .map(|value| String::from_utf8_lossy(&value).into_owned());
        info(&format!(
            "grpc stream trailing metadata: {num_elements} entries {names:?}, grpc-status {status:?}"
        ));
    }

    fn on_grpc_stream_close(&mut self, _token_id: u32, status_code: u32) {
        let (status, message) = self.get_grpc_status();
        let message = message.unwrap_or_default();
        info(&format!(
            "grpc stream close: status_code={status_code} get_grpc_status={status} message={message:?}"
        ));
        self.decide(status_code, &message);
    }
}

impl HttpContext for GrpcCallout {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let metadata: Vec<(String, String)> = self
            .get_http_request_headers()
            .into_iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix("x-decide-")?;
                Some((format!("x-test-{rest}"), value))
            })
            .collect();
        let metadata: Vec<(&str, &[u8])> = metadata
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        let cluster = self.config.cluster.as_str();
        let sent = if self.config.mode == "stream" {
            self.open_grpc_stream(cluster, SERVICE, METHOD, metadata)
                .inspect(|&token| {
                    self.send_grpc_stream_message(token, Some(path.as_bytes()), true);
                })
        } else {
            let timeout = Duration::from_millis(self.config.timeout_ms);
            self.dispatch_grpc_call(
                cluster,
                SERVICE,
                METHOD,
                metadata,
                Some(path.as_bytes()),
                timeout,
            )
        };
        match sent {
            Ok(_token) => Action::Pause,
            Err(status) => {
                info(&format!("grpc callout not sent: {status:?}"));
                self.send_http_response(503, vec![("x-grpc-status", "unsent")], None);
                Action::Pause
            }
        }
    }
}
