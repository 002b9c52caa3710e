//! The configurations each module is fuzzed in: both directions (and one plugin instance serving
//! both), each `peer_trust`, each retry-budget mode, tiny and large caps.

use std::path::Path;

use eastwest_harness::{Harness, HarnessError, Options, Plugin};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
    /// No `direction` configured: each stream's listener says (one instance, both directions).
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    Mtls,
    Any,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Client,
    ClientHeaders,
    Server,
}

/// The trust domain the configurations that set one use.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Destinations named in the retry-budget configurations (they keep their own budget).
pub const CONFIGURED_DESTINATIONS: [&str; 2] = ["payments", "ledger"];

/// Instructions one callback may spend before the harness traps it (Envoy has no such limit,
/// but a filter that needs more on any input has a bug worth a failure).
pub const FUEL_PER_CALLBACK: u64 = 50_000_000;

#[derive(Clone, Debug)]
pub struct FuzzConfig {
    pub name: String,
    /// The file stem under dist/.
    pub module: &'static str,
    pub config: Value,
    /// Modules after it in one filter chain (file stem, configuration): they read what
    /// label-enrich published in filter state, so their metrics and budgets show it.
    pub then: Vec<(&'static str, Value)>,
    pub workers: usize,
    pub direction: Direction,
    pub trust: Trust,
    pub trust_domain: Option<&'static str>,
    pub label_enrich: bool,
    /// telemetry's `max_series`, when telemetry is on.
    pub max_series: Option<usize>,
    /// retry-budget's mode and `max_budgets`, when retry-budget is on.
    pub retry_budget: Option<(Mode, usize)>,
}

impl FuzzConfig {
    /// The node every VM runs as: an Istio sidecar of `checkout` in `shop`.
    pub fn properties(&self) -> Value {
        let mut xds = json!({
            "node": {
                "id": "sidecar~10.0.0.7~checkout-0.shop~shop.svc.cluster.local",
                "cluster": "checkout.shop",
                "metadata": {
                    "NAMESPACE": "shop",
                    "WORKLOAD_NAME": "checkout-v1",
                    "LABELS": {"app": "checkout", "team": "payments", "criticality": "high",
                               "environment": "prod"},
                },
                "locality": {"region": "eu-west-1", "zone": "eu-west-1a"},
            },
        });
        match self.direction {
            Direction::Inbound => xds["listener_direction"] = json!(1),
            Direction::Outbound => xds["listener_direction"] = json!(2),
            Direction::Both => {}
        }
        json!({ "xds": xds })
    }

    /// Every module of the configuration, in chain order (file stems under dist/).
    pub fn modules(&self) -> Vec<&'static str> {
        std::iter::once(self.module)
            .chain(self.then.iter().map(|(module, _)| *module))
            .collect()
    }

    /// A harness running the modules (`wasm`, in the order of [`FuzzConfig::modules`]).
    pub fn harness(&self, wasm: &[Vec<u8>]) -> Result<Harness, HarnessError> {
        let options = Options {
            config: self.config.to_string().into_bytes(),
            properties: self.properties(),
            workers: self.workers,
            fuel_per_callback: FUEL_PER_CALLBACK,
            ..Options::default()
        };
        if self.then.is_empty() {
            return Harness::new(&wasm[0], options);
        }
        let configs = std::iter::once(&self.config).chain(self.then.iter().map(|(_, c)| c));
        let plugins = wasm
            .iter()
            .zip(configs)
            .map(|(wasm, config)| Plugin::new(wasm.clone(), config.to_string()))
            .collect();
        Harness::chain(plugins, options)
    }

    /// Shared-data keys (one per budget subject) all VMs together may hold: each VM its
    /// `max_budgets`, plus the configured destinations (client modes) and the overflow budget,
    /// which every VM shares.
    pub fn max_budget_keys(&self) -> Option<usize> {
        let (mode, max_budgets) = self.retry_budget?;
        Some(self.workers * max_budgets + self.configured_budgets(mode) + 1)
    }

    /// Budget metric series all VMs together may hold: each VM at most `max_budgets`, the
    /// configured destinations and the overflow budget (a VM tags a budget with the
    /// destination namespace of the request that created it, so two VMs may tag one subject
    /// differently).
    pub fn max_budget_series(&self) -> Option<usize> {
        let (mode, max_budgets) = self.retry_budget?;
        Some(self.workers * (max_budgets + self.configured_budgets(mode) + 1))
    }

    fn configured_budgets(&self, mode: Mode) -> usize {
        if mode == Mode::Server {
            0
        } else {
            CONFIGURED_DESTINATIONS.len()
        }
    }

    /// Series of telemetry's five series metrics all VMs together may hold: per VM `max_series`
    /// plus one overflow series per metric and reporter.
    pub fn max_telemetry_series(&self) -> Option<usize> {
        self.max_series.map(|cap| self.workers * (cap + 10))
    }
}

fn trust_name(trust: Trust) -> &'static str {
    match trust {
        Trust::Mtls => "mtls",
        Trust::Any => "any",
        Trust::None => "none",
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Client => "client",
        Mode::ClientHeaders => "client-headers",
        Mode::Server => "server",
    }
}

fn direction_name(direction: Direction) -> Option<&'static str> {
    match direction {
        Direction::Inbound => Some("inbound"),
        Direction::Outbound => Some("outbound"),
        Direction::Both => None,
    }
}

fn destinations() -> Value {
    json!({"payments": {"ratio": 0, "min_retries_per_second": 0.5}, "ledger": {"ratio": 0.5}})
}

/// Every configuration, whatever modules exist.
pub fn all() -> Vec<FuzzConfig> {
    let mut configs = Vec::new();
    // label-enrich: each direction with each trust, one instance for both directions, a tiny
    // baggage limit.
    for (direction, trust, tiny, workers) in [
        (Direction::Inbound, Trust::Mtls, false, 1),
        (Direction::Inbound, Trust::Any, true, 1),
        (Direction::Inbound, Trust::None, false, 1),
        (Direction::Outbound, Trust::Mtls, false, 1),
        (Direction::Outbound, Trust::Any, true, 1),
        (Direction::Both, Trust::Mtls, false, 2),
    ] {
        let mut config = json!({"peer_trust": trust_name(trust), "trust_domain": TRUST_DOMAIN});
        if let Some(name) = direction_name(direction) {
            config["direction"] = json!(name);
        }
        if tiny {
            config["max_baggage_bytes"] = json!(256);
        }
        configs.push(FuzzConfig {
            name: format!(
                "label-enrich/{}/{}{}",
                direction_name(direction).unwrap_or("both"),
                trust_name(trust),
                if tiny { "/tiny" } else { "" }
            ),
            module: "label-enrich",
            config,
            then: Vec::new(),
            workers,
            direction,
            trust,
            trust_domain: Some(TRUST_DOMAIN),
            label_enrich: true,
            max_series: None,
            retry_budget: None,
        });
    }
    // telemetry: tiny and large caps, each direction and both.
    for (direction, trust, max_series, workers) in [
        (Direction::Inbound, Trust::Mtls, 4, 1),
        (Direction::Inbound, Trust::Any, 10_000, 1),
        (Direction::Outbound, Trust::Mtls, 10_000, 1),
        (Direction::Outbound, Trust::None, 4, 1),
        (Direction::Both, Trust::Mtls, 6, 2),
    ] {
        let mut config = json!({
            "peer_trust": trust_name(trust),
            "max_series": max_series,
            "dimensions": ["reporter", "source_service", "source_namespace", "source_team",
                           "destination_service", "destination_namespace", "response_code",
                           "request_protocol", "grpc_status"],
        });
        if let Some(name) = direction_name(direction) {
            config["direction"] = json!(name);
        }
        configs.push(FuzzConfig {
            name: format!(
                "telemetry/{}/{}/{}",
                direction_name(direction).unwrap_or("both"),
                trust_name(trust),
                if max_series < 100 { "tiny" } else { "large" }
            ),
            module: "telemetry",
            config,
            then: Vec::new(),
            workers,
            direction,
            trust,
            trust_domain: None,
            label_enrich: false,
            max_series: Some(max_series),
            retry_budget: None,
        });
    }
    // retry-budget: every mode, tiny and large caps.
    for (mode, trust, max_budgets, workers) in [
        (Mode::Client, Trust::Mtls, 2, 1),
        (Mode::Client, Trust::Mtls, 10_000, 2),
        (Mode::ClientHeaders, Trust::Mtls, 2, 2),
        (Mode::ClientHeaders, Trust::Mtls, 10_000, 1),
        (Mode::Server, Trust::Mtls, 2, 1),
        (Mode::Server, Trust::Any, 10_000, 2),
    ] {
        let direction = if mode == Mode::Server {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        configs.push(FuzzConfig {
            name: format!(
                "retry-budget/{}/{}/{}",
                mode_name(mode),
                trust_name(trust),
                if max_budgets < 100 { "tiny" } else { "large" }
            ),
            module: "retry-budget",
            config: json!({
                "mode": mode_name(mode), "peer_trust": trust_name(trust),
                "max_budgets": max_budgets, "ttl_seconds": 2, "destinations": destinations(),
            }),
            then: Vec::new(),
            workers,
            direction,
            trust,
            trust_domain: None,
            label_enrich: false,
            max_series: None,
            retry_budget: Some((mode, max_budgets)),
        });
    }
    // eastwest.wasm: the three features together, each direction and both.
    for (direction, trust, mode, tiny, workers) in [
        (Direction::Inbound, Trust::Mtls, Mode::Server, true, 1),
        (Direction::Inbound, Trust::Any, Mode::Server, false, 2),
        (Direction::Inbound, Trust::None, Mode::Server, true, 1),
        (
            Direction::Outbound,
            Trust::Mtls,
            Mode::ClientHeaders,
            true,
            2,
        ),
        (Direction::Outbound, Trust::Mtls, Mode::Client, false, 1),
        (Direction::Both, Trust::Mtls, Mode::ClientHeaders, true, 2),
    ] {
        let (max_series, max_budgets) = if tiny { (6, 2) } else { (10_000, 10_000) };
        let mut config = json!({
            "peer_trust": trust_name(trust),
            "trust_domain": TRUST_DOMAIN,
            "label_enrich": {},
            "telemetry": {"max_series": max_series,
                          "dimensions": ["reporter", "source_service", "source_namespace",
                                         "destination_service", "destination_namespace",
                                         "response_code"]},
            "retry_budget": {"mode": mode_name(mode), "max_budgets": max_budgets,
                             "ttl_seconds": 2, "destinations": destinations()},
        });
        if let Some(name) = direction_name(direction) {
            config["direction"] = json!(name);
        }
        configs.push(FuzzConfig {
            name: format!(
                "eastwest/{}/{}/{}/{}",
                direction_name(direction).unwrap_or("both"),
                trust_name(trust),
                mode_name(mode),
                if tiny { "tiny" } else { "large" }
            ),
            module: "eastwest",
            config,
            then: Vec::new(),
            workers,
            direction,
            trust,
            trust_domain: Some(TRUST_DOMAIN),
            label_enrich: true,
            max_series: Some(max_series),
            retry_budget: Some((mode, max_budgets)),
        });
    }
    // The three separate modules chained, as the shipped chains run them: telemetry and
    // retry-budget take the labels from label-enrich's filter state.
    for (direction, mode, workers) in [
        (Direction::Inbound, Mode::Server, 1),
        (Direction::Outbound, Mode::ClientHeaders, 2),
    ] {
        let name = direction_name(direction).unwrap_or("both");
        configs.push(FuzzConfig {
            name: format!("chain/{name}/mtls/{}/tiny", mode_name(mode)),
            module: "label-enrich",
            config: json!({"direction": name, "trust_domain": TRUST_DOMAIN}),
            then: vec![
                (
                    "telemetry",
                    json!({"direction": name, "max_series": 6,
                           "dimensions": ["reporter", "source_service", "source_namespace",
                                          "destination_service", "destination_namespace"]}),
                ),
                (
                    "retry-budget",
                    json!({"mode": mode_name(mode), "max_budgets": 2, "ttl_seconds": 2,
                           "destinations": destinations()}),
                ),
            ],
            workers,
            direction,
            trust: Trust::Mtls,
            trust_domain: Some(TRUST_DOMAIN),
            label_enrich: true,
            max_series: Some(6),
            retry_budget: Some((mode, 2)),
        });
    }
    configs
}

/// The configurations whose modules are all present in `dist`.
pub fn available(dist: &Path) -> Vec<FuzzConfig> {
    all()
        .into_iter()
        .filter(|config| {
            config
                .modules()
                .iter()
                .all(|module| dist.join(format!("{module}.wasm")).is_file())
        })
        .collect()
}
