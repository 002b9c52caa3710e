//! The proxy-wasm layer: one root context holding the features that are on, one stream
//! context running them in the order the shipped filter chains run the separate modules
//! (label-enrich, telemetry, retry-budget on the request; the reverse on the response), with
//! one [`Exchange`] per stream through which the resolved labels pass in memory.

use std::rc::Rc;

use eastwest_common::host::{self, Exchange};
use eastwest_label_enrich::filter::{self as label_enrich, LabelEnrich};
use eastwest_retry_budget::filter::{self as retry_budget, RetryBudget};
use eastwest_telemetry::filter::Telemetry;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::Settings;

proxy_wasm::main! {{
    // Trace lets Envoy's own log level decide what is printed; it also installs the SDK's panic
    // hook, so that a bug would at least be logged before the VM stops.
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(Root { features: None }));
}}

/// The features that are on, for one VM.
struct Features {
    label_enrich: Option<LabelEnrich>,
    telemetry: Option<Telemetry>,
    retry_budget: Option<RetryBudget>,
}

struct Root {
    features: Option<Rc<Features>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let settings = match Settings::parse(&host::plugin_configuration()) {
            Ok(settings) => settings,
            Err(error) => {
                let _ = proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!("eastwest: invalid configuration: {error}"),
                );
                return false;
            }
        };
        self.features = Some(Rc::new(Features {
            label_enrich: settings.label_enrich.map(LabelEnrich::new),
            telemetry: settings.telemetry.map(Telemetry::new),
            retry_budget: settings.retry_budget.map(RetryBudget::new),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(retry_budget) = self.features.as_ref().and_then(|f| f.retry_budget.as_ref()) {
            retry_budget.on_tick();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let features = self.features.clone()?;
        Some(Box::new(Stream {
            features,
            label_enrich: label_enrich::StreamState::default(),
            retry_budget: retry_budget::StreamState::default(),
            exchange: Exchange::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    features: Rc<Features>,
    label_enrich: label_enrich::StreamState,
    retry_budget: retry_budget::StreamState,
    exchange: Exchange,
}

impl Context for Stream {}

// The callbacks implemented here are listed in Cargo.toml (`callbacks`); the build removes
// the SDK's other stream callbacks from the exports.
impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let features = &self.features;
        if let Some(feature) = &features.label_enrich {
            feature.on_request_headers(&mut self.label_enrich, &mut self.exchange);
        }
        match &features.retry_budget {
            Some(feature) => feature.on_request_headers(&mut self.retry_budget, &mut self.exchange),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let features = &self.features;
        if let Some(feature) = &features.retry_budget {
            feature.on_response_headers(&self.retry_budget);
        }
        if let Some(feature) = &features.label_enrich {
            feature.on_response_headers(&self.label_enrich, &mut self.exchange);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let features = &self.features;
        if let Some(feature) = &features.telemetry {
            feature.on_log(&mut self.exchange);
        }
        if let Some(feature) = &features.retry_budget {
            feature.on_log(&self.retry_budget, &mut self.exchange);
        }
    }
}
