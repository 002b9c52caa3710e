//! Rewriting a body, as SDK users do it: the filter buffers the body (returns `Pause` from the
//! body callback until the end of the stream), then replaces it with
//! `rewritten <n> bytes\n` (`n` the size of the original body) and logs
//! `<request|response> body rewritten: <n> bytes`. The replaced body has another length, so
//! the filter removes `content-length` from the headers first.
//!
//! Configuration: `{"request": true, "response": true}` (both default false) chooses which bodies
//! are rewritten.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    request: bool,
    response: bool,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(RewriteRoot { config: Rc::new(Config::default()) })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

fn replacement(size: usize) -> String {
    format!("rewritten {size} bytes\n")
}

struct RewriteRoot {
    config: Rc<Config>,
}

impl Context for RewriteRoot {}

impl RootContext for RewriteRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(error) => {
                hostcalls::log(LogLevel::Error, &format!("body-rewrite: {error}")).ok();
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BodyRewrite {
            config: self.config.clone(),
        }))
    }
}

struct BodyRewrite {
    config: Rc<Config>,
}

impl Context for BodyRewrite {}

impl HttpContext for BodyRewrite {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.config.request {
            self.set_http_request_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.config.request {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.set_http_request_body(0, body_size, replacement(body_size).as_bytes());
        info(&format!("request body rewritten: {body_size} bytes"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.config.response {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.config.response {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.set_http_response_body(0, body_size, replacement(body_size).as_bytes());
        info(&format!("response body rewritten: {body_size} bytes"));
        Action::Continue
    }
}
