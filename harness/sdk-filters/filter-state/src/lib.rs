//! One link of a filter chain, as SDK users write filters that cooperate: each instance is
//! configured with a name (`{"name": "first", "reply_path": "/first"}`), appends its name to the
//! stream's filter state `chain` (`set_property(["chain"])`), logs what it found there, stamps
//! `x-chain: <name>` on the request and `x-chain-response: <name>` on the response, and answers
//! 403 locally itself when the request's path is its `reply_path`. Every callback logs a line
//! starting with its name, so the order of the chain's callbacks can be read from the log.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

const CHAIN_PROPERTY: &str = "chain";

#[derive(Debug, Default, Deserialize)]
struct Config {
    name: String,
    #[serde(default)]
    reply_path: Option<String>,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(LinkRoot { config: Rc::new(Config::default()) })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

struct LinkRoot {
    config: Rc<Config>,
}

impl Context for LinkRoot {}

impl RootContext for LinkRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(config) if !config.name.is_empty() => {
                self.config = Rc::new(config);
                true
            }
            _ => {
                hostcalls::log(
                    LogLevel::Error,
                    "filter-state: a non-empty `name` is required",
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
        Some(Box::new(Link {
            config: self.config.clone(),
        }))
    }
}

struct Link {
    config: Rc<Config>,
}

impl Link {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn chain(&self) -> String {
        self.get_property(vec![CHAIN_PROPERTY])
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|| "none".to_string())
    }
}

impl Context for Link {}

impl HttpContext for Link {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let found = self.chain();
        info(&format!(
            "{} request_headers eos={end_of_stream} chain={found}",
            self.name()
        ));
        let chain = if found == "none" {
            self.name().to_string()
        } else {
            format!("{found},{}", self.name())
        };
        self.set_property(vec![CHAIN_PROPERTY], Some(chain.as_bytes()));
        self.add_http_request_header("x-chain", self.name());
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if self.config.reply_path.as_deref() == Some(path.as_str()) {
            let body = format!("{} said no\n", self.name());
            self.send_http_response(
                403,
                vec![("x-replied-by", self.name())],
                Some(body.as_bytes()),
            );
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        info(&format!(
            "{} request_body size={body_size} eos={end_of_stream}",
            self.name()
        ));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        info(&format!(
            "{} response_headers status={status} eos={end_of_stream}",
            self.name()
        ));
        self.add_http_response_header("x-chain-response", self.name());
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        info(&format!(
            "{} response_body size={body_size} eos={end_of_stream}",
            self.name()
        ));
        Action::Continue
    }

    fn on_log(&mut self) {
        info(&format!("{} log chain={}", self.name(), self.chain()));
    }
}
