//! A root context with a tick period, as a proxy-wasm SDK user writes one: every tick logs
//! `tick <n>` and increments the counter `sdk_ticks_total`.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{LogLevel, MetricType};

const TICK_PERIOD: Duration = Duration::from_millis(100);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(TickCounter { ticks: 0, metric: None })
    });
}}

struct TickCounter {
    ticks: u64,
    metric: Option<u32>,
}

impl Context for TickCounter {}

impl RootContext for TickCounter {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        match hostcalls::define_metric(MetricType::Counter, "sdk_ticks_total") {
            Ok(id) => self.metric = Some(id),
            Err(status) => log::warn(&format!("cannot define sdk_ticks_total: {status:?}")),
        }
        self.set_tick_period(TICK_PERIOD);
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        log::info(&format!("tick {}", self.ticks));
        if let Some(metric) = self.metric {
            if let Err(status) = hostcalls::increment_metric(metric, 1) {
                log::warn(&format!("cannot count the tick: {status:?}"));
            }
        }
    }
}

mod log {
    use proxy_wasm::hostcalls;
    use proxy_wasm::types::LogLevel;

    pub fn info(message: &str) {
        hostcalls::log(LogLevel::Info, message).ok();
    }

    pub fn warn(message: &str) {
        hostcalls::log(LogLevel::Warn, message).ok();
    }
}
