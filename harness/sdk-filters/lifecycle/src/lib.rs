//! A root context's lifecycle as an SDK user sees it: `on_vm_start` and `on_configure` log one
//! line each with the root context's id, a 100 ms tick logs `tick <n>` (counted per VM), and
//! the root context's `on_done` logs `root done`. Each stream logs `stream <n>` (its number on
//! this VM) in its request headers.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const TICK_PERIOD: Duration = Duration::from_millis(100);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Lifecycle { context_id, ticks: 0, streams: Rc::new(Cell::new(0)) })
    });
}}

fn info(message: &str) {
    hostcalls::log(LogLevel::Info, message).ok();
}

struct Lifecycle {
    context_id: u32,
    ticks: u64,
    streams: Rc<Cell<u64>>,
}

impl Context for Lifecycle {
    fn on_done(&mut self) -> bool {
        info(&format!("root done after {} ticks", self.ticks));
        true
    }
}

impl RootContext for Lifecycle {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        info(&format!(
            "vm start: root context {}, vm configuration {vm_configuration_size} bytes",
            self.context_id
        ));
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        info(&format!(
            "configure: root context {}, configuration {plugin_configuration_size} bytes",
            self.context_id
        ));
        self.set_tick_period(TICK_PERIOD);
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        info(&format!("tick {}", self.ticks));
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            streams: self.streams.clone(),
        }))
    }
}

struct Stream {
    streams: Rc<Cell<u64>>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.streams.set(self.streams.get() + 1);
        info(&format!("stream {}", self.streams.get()));
        Action::Continue
    }
}
