//! The retry-budget configuration (docs/filters/retry-budget.md is its reference).

use std::collections::BTreeMap;

use eastwest_common::config::{ConfigError, PeerTrust};
use eastwest_common::labels::{LabelKeys, LocalLabels};
use eastwest_common::resolve::LabelSettings;
use serde::Deserialize;

use crate::window::Params;

pub const DEFAULT_RATIO: f64 = 0.2;
pub const DEFAULT_MIN_RETRIES_PER_SECOND: f64 = 10.0;
pub const DEFAULT_TTL_SECONDS: f64 = 10.0;
/// Distinct budgets (destinations, or calling services in `server` mode) per VM before new
/// ones share the `overflow` budget.
pub const DEFAULT_MAX_BUDGETS: usize = 500;

/// Where the filter sits and how it enforces the budget (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Mode {
    /// An upstream HTTP filter of the destination cluster: sees every attempt and refuses an
    /// over-budget retry with a local reply the router does not retry.
    #[serde(rename = "client")]
    Client,
    /// An ordinary HTTP filter on the caller's side: when the budget is spent, sets
    /// `x-envoy-max-retries: 0` so the router does not retry.
    #[serde(rename = "client-headers")]
    ClientHeaders,
    /// On the callee's inbound side: sheds retried requests of a calling service over budget.
    #[serde(rename = "server")]
    Server,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Client => "client",
            Mode::ClientHeaders => "client-headers",
            Mode::Server => "server",
        }
    }
}

/// Budget parameters as users write them, at the top level and per destination.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub ratio: Option<f64>,
    #[serde(default)]
    pub min_retries_per_second: Option<f64>,
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
}

/// The configuration as users write it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub ratio: Option<f64>,
    #[serde(default)]
    pub min_retries_per_second: Option<f64>,
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// Overrides per destination service (the caller's view), or for this service when it is
    /// the destination (`server` mode): one configuration can serve a whole mesh.
    #[serde(default)]
    pub destinations: BTreeMap<String, BudgetConfig>,
    #[serde(default)]
    pub max_budgets: Option<usize>,
    #[serde(default)]
    pub local: LocalLabels,
    #[serde(default)]
    pub label_keys: LabelKeys,
    #[serde(default)]
    pub peer_trust: PeerTrust,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub max_baggage_bytes: Option<usize>,
}

/// The budget that budgets beyond `max_budgets` share, and the value of its subject tag
/// (`destination_service`, or `source_service` in `server` mode), as telemetry's overflow series.
pub const OVERFLOW: &str = "overflow";

/// Where a subject's budget comes from ([`Settings::assign`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// A destination named in the configuration: its own budget, not counted.
    Configured,
    /// Its own budget, counted against `max_budgets`.
    Counted,
    /// The shared overflow budget.
    Overflow,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub defaults: Params,
    pub destinations: BTreeMap<String, Params>,
    pub max_budgets: usize,
    /// How the calling service is identified in `server` mode (and this workload's labels).
    pub labels: LabelSettings,
}

/// Checks one set of budget parameters, filling what is absent from `fallback`.
fn budget_params(
    path: &str,
    budget: &BudgetConfig,
    fallback: (f64, f64, f64),
) -> Result<((f64, f64, f64), Params), ConfigError> {
    let field = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    let ratio = budget.ratio.unwrap_or(fallback.0);
    if !(0.0..=100.0).contains(&ratio) {
        return Err(ConfigError::new(
            field("ratio"),
            format!("{ratio} is outside 0..=100 (retries per original request)"),
        ));
    }
    let min_per_second = budget.min_retries_per_second.unwrap_or(fallback.1);
    if !(0.0..=1_000_000.0).contains(&min_per_second) {
        return Err(ConfigError::new(
            field("min_retries_per_second"),
            format!("{min_per_second} is outside 0..=1000000"),
        ));
    }
    let ttl = budget.ttl_seconds.unwrap_or(fallback.2);
    if !(1.0..=3600.0).contains(&ttl) {
        return Err(ConfigError::new(
            field("ttl_seconds"),
            format!("{ttl} is outside 1..=3600 seconds"),
        ));
    }
    let values = (ratio, min_per_second, ttl);
    Ok((values, Params::new(ratio, min_per_second, ttl)))
}

impl Settings {
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let config: Config = eastwest_common::config::parse(bytes)?;
        let labels = LabelSettings::new(
            &config.local,
            config.label_keys,
            config.peer_trust,
            config.trust_domain,
            config.max_baggage_bytes,
        )?;
        let (top, defaults) = budget_params(
            "",
            &BudgetConfig {
                ratio: config.ratio,
                min_retries_per_second: config.min_retries_per_second,
                ttl_seconds: config.ttl_seconds,
            },
            (
                DEFAULT_RATIO,
                DEFAULT_MIN_RETRIES_PER_SECOND,
                DEFAULT_TTL_SECONDS,
            ),
        )?;
        let mut destinations = BTreeMap::new();
        for (name, budget) in &config.destinations {
            if name.is_empty() {
                return Err(ConfigError::new(
                    "destinations",
                    "a destination service name must not be empty",
                ));
            }
            if name == OVERFLOW {
                return Err(ConfigError::new(
                    "destinations.overflow",
                    "`overflow` names the budget that destinations beyond max_budgets share",
                ));
            }
            let (_, params) = budget_params(&format!("destinations.{name}"), budget, top)?;
            destinations.insert(name.clone(), params);
        }
        let max_budgets = config.max_budgets.unwrap_or(DEFAULT_MAX_BUDGETS);
        if !(1..=100_000).contains(&max_budgets) {
            return Err(ConfigError::new(
                "max_budgets",
                format!("{max_budgets} is outside 1..=100000"),
            ));
        }
        Ok(Settings {
            mode: config.mode.unwrap_or(Mode::ClientHeaders),
            defaults,
            destinations,
            max_budgets,
            labels,
        })
    }

    /// Which budget a subject without one yet draws on, when `counted` budgets that count
    /// against `max_budgets` exist. A destination named in `destinations` (client modes) always
    /// gets its own, with its own parameters, and does not count: neither a flood of other
    /// destinations nor an app-chosen `:authority` can push it into the overflow budget.
    pub fn assign(&self, subject: &str, counted: usize) -> Assignment {
        if self.mode != Mode::Server && self.destinations.contains_key(subject) {
            Assignment::Configured
        } else if counted < self.max_budgets {
            Assignment::Counted
        } else {
            Assignment::Overflow
        }
    }

    /// Budgets a VM may hold: the counted ones, the configured destinations and the overflow
    /// budget (the bound the fuzzer checks).
    pub fn max_budgets_per_vm(&self) -> usize {
        let configured = if self.mode == Mode::Server {
            0
        } else {
            self.destinations.len()
        };
        self.max_budgets + configured + 1
    }

    /// The budget of a destination service: its override, else the defaults.
    pub fn params_for(&self, destination: &str) -> Params {
        self.destinations
            .get(destination)
            .copied()
            .unwrap_or(self.defaults)
    }

    /// How often a worker publishes its deposits: one slot of the shortest window, between
    /// 100 ms and 1 s.
    pub fn publish_period_millis(&self) -> u64 {
        let shortest = self
            .destinations
            .values()
            .chain(std::iter::once(&self.defaults))
            .map(|params| params.slot_nanos)
            .min()
            .unwrap_or(self.defaults.slot_nanos);
        (shortest / 1_000_000).clamp(100, 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn defaults_are_finagles() {
        let settings = Settings::parse(b"").unwrap();
        assert_eq!(settings.mode, Mode::ClientHeaders);
        assert_eq!(settings.defaults, Params::new(0.2, 10.0, 10.0));
        assert_eq!(settings.defaults.reserve, 100);
        assert_eq!(settings.max_budgets, DEFAULT_MAX_BUDGETS);
        assert_eq!(settings.publish_period_millis(), 1000);
        assert_eq!(settings.labels.peer_trust, PeerTrust::Mtls);
    }

    #[test]
    fn configured_destinations_keep_their_own_budget_beyond_max_budgets() {
        let settings = Settings::parse(
            br#"{"mode": "client-headers", "max_budgets": 1, "destinations": {"payments": {"ratio": 0}}}"#,
        )
        .unwrap();
        assert_eq!(settings.assign("payments", 0), Assignment::Configured);
        assert_eq!(settings.assign("payments", 5), Assignment::Configured);
        assert_eq!(settings.assign("bravo", 0), Assignment::Counted);
        assert_eq!(settings.assign("bravo", 1), Assignment::Overflow);
        assert_eq!(settings.max_budgets_per_vm(), 3);
        // In `server` mode the subject is the caller: `destinations` name this service.
        let server = Settings::parse(
            br#"{"mode": "server", "max_budgets": 1, "destinations": {"payments": {}}}"#,
        )
        .unwrap();
        assert_eq!(server.assign("payments", 1), Assignment::Overflow);
        assert_eq!(server.max_budgets_per_vm(), 2);
    }

    #[test]
    fn destinations_override_and_inherit_the_top_level() {
        let settings = Settings::parse(
            br#"{"mode": "client", "ratio": 0.1, "min_retries_per_second": 2,
                 "destinations": {"payments": {"ratio": 0.05, "ttl_seconds": 2},
                                  "inventory": {}}}"#,
        )
        .unwrap();
        assert_eq!(settings.mode, Mode::Client);
        assert_eq!(settings.params_for("payments"), Params::new(0.05, 2.0, 2.0));
        assert_eq!(
            settings.params_for("inventory"),
            Params::new(0.1, 2.0, 10.0)
        );
        assert_eq!(settings.params_for("other"), Params::new(0.1, 2.0, 10.0));
        // Slots of the 2 s window are 200 ms.
        assert_eq!(settings.publish_period_millis(), 200);
    }

    #[test]
    fn modes_by_name() {
        for (name, mode) in [
            ("client", Mode::Client),
            ("client-headers", Mode::ClientHeaders),
            ("server", Mode::Server),
        ] {
            let settings = Settings::parse(format!(r#"{{"mode": "{name}"}}"#).as_bytes()).unwrap();
            assert_eq!(settings.mode, mode);
            assert_eq!(mode.as_str(), name);
        }
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let cases: [(&[u8], &str); 11] = [
            (br#"{"mode": "clients"}"#, "mode"),
            (br#"{"ratio": -0.1}"#, "ratio"),
            (br#"{"ratio": "20%"}"#, "ratio"),
            (
                br#"{"min_retries_per_second": -1}"#,
                "min_retries_per_second",
            ),
            (br#"{"ttl_seconds": 0}"#, "ttl_seconds"),
            (
                br#"{"destinations": {"payments": {"ratio": 101}}}"#,
                "destinations.payments.ratio",
            ),
            (
                br#"{"destinations": {"payments": {"ttl": 5}}}"#,
                "destinations.payments.ttl",
            ),
            (br#"{"destinations": {"": {}}}"#, "destinations"),
            (br#"{"max_budgets": 0}"#, "max_budgets"),
            (
                br#"{"destinations": {"overflow": {}}}"#,
                "destinations.overflow",
            ),
            (br#"{"budget_percent": 20}"#, "budget_percent"),
        ];
        for (input, path) in cases {
            let error = Settings::parse(input).unwrap_err();
            assert_eq!(
                error.path,
                path,
                "{}: {error}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
