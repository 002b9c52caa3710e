//! A configuration read at start, as a proxy-wasm SDK user writes it, built for
//! `wasm32-wasip1`: `{"header": NAME, "value": VALUE}` decides a header stamped on every
//! request and response. It reports through stdout and stderr, which the host turns into log
//! lines (info and error), as a WASI program would.

use std::io::Write;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(ConfiguredHeaderRoot { header: None })
    });
}}

struct Header {
    name: String,
    value: String,
}

struct ConfiguredHeaderRoot {
    header: Option<Rc<Header>>,
}

impl Context for ConfiguredHeaderRoot {}

impl RootContext for ConfiguredHeaderRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match parse(&config) {
            Ok(header) => {
                println!("configured-header: {}={}", header.name, header.value);
                self.header = Some(Rc::new(header));
                true
            }
            Err(reason) => {
                // stderr is unbuffered: `eprintln!` would write each piece separately, and a
                // host logs every write as its own line. One write, one line.
                let line = format!("configured-header: invalid configuration: {reason}\n");
                let _ = std::io::stderr().write_all(line.as_bytes());
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let header = self.header.clone()?;
        Some(Box::new(ConfiguredHeader { header }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn parse(config: &[u8]) -> Result<Header, String> {
    let json: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("not JSON: {e}"))?;
    let field = |key: &str| match json.get(key).and_then(|v| v.as_str()) {
        Some(text) if !text.is_empty() => Ok(text.to_string()),
        _ => Err(format!("{key}: a non-empty string is required")),
    };
    Ok(Header {
        name: field("header")?.to_ascii_lowercase(),
        value: field("value")?,
    })
}

struct ConfiguredHeader {
    header: Rc<Header>,
}

impl Context for ConfiguredHeader {}

impl HttpContext for ConfiguredHeader {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header(&self.header.name, Some(&self.header.value));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header(&self.header.name, Some(&self.header.value));
        Action::Continue
    }
}
