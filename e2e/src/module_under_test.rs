//! Which module a behaviour test loads: a feature's own module (`dist/<feature>.wasm`) or the
//! one-module sidecar (`dist/eastwest.wasm`, DESIGN.md §8) with only that feature's section.
//! The behaviour tests of each feature run against both ([`for_each_module!`]), so that the
//! sidecar is held to exactly the separate modules' behaviour.
//!
//! This file is part of `eastwest-e2e` (`eastwest_e2e::module_under_test`) and is also compiled
//! into the harness's behaviour tests (`#[path]` from `harness/tests/`), so it uses nothing but
//! `std` and `serde_json` and finds `dist/` from either crate's directory.

// Each harness test binary uses only part of this file.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::{json, Value};

/// One of the three features, as a module and as a section of the sidecar's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    LabelEnrich,
    Telemetry,
    RetryBudget,
}

impl Feature {
    /// The feature's own module: `dist/<module>.wasm`, log prefix `eastwest-<module>:`.
    pub fn module(self) -> &'static str {
        match self {
            Feature::LabelEnrich => "label-enrich",
            Feature::Telemetry => "telemetry",
            Feature::RetryBudget => "retry-budget",
        }
    }

    /// The feature's section in the sidecar's configuration.
    pub fn section(self) -> &'static str {
        match self {
            Feature::LabelEnrich => "label_enrich",
            Feature::Telemetry => "telemetry",
            Feature::RetryBudget => "retry_budget",
        }
    }
}

/// The module a behaviour test runs a feature in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleUnderTest {
    /// The feature's own module, e.g. `dist/telemetry.wasm` with configuration `C`.
    Separate,
    /// `dist/eastwest.wasm` with configuration `{"<section>": C}`.
    Sidecar,
}

impl ModuleUnderTest {
    pub const ALL: [ModuleUnderTest; 2] = [ModuleUnderTest::Separate, ModuleUnderTest::Sidecar];

    /// The file name under `dist/`, without `.wasm`.
    pub fn wasm_name(self, feature: Feature) -> &'static str {
        match self {
            ModuleUnderTest::Separate => feature.module(),
            ModuleUnderTest::Sidecar => "eastwest",
        }
    }

    /// `<workspace>/dist/<name>.wasm` (not checked: see [`Self::read_wasm`] and `dist_wasm`).
    pub fn wasm_path(self, feature: Feature) -> PathBuf {
        // Both crates that compile this file sit directly under the workspace root.
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../dist")
            .join(format!("{}.wasm", self.wasm_name(feature)))
    }

    /// The module's bytes; panics with how to build it when it is missing.
    pub fn read_wasm(self, feature: Feature) -> Vec<u8> {
        let path = self.wasm_path(feature);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask build`)", path.display()))
    }

    /// The configuration that gives the feature `config`: `config` itself for the separate
    /// module, `{"<section>": config}` for the sidecar.
    pub fn config(self, feature: Feature, config: Value) -> Value {
        match self {
            ModuleUnderTest::Separate => config,
            ModuleUnderTest::Sidecar => json!({ feature.section(): config }),
        }
    }

    /// [`Self::config`] as the bytes a host hands to `on_configure`.
    pub fn config_bytes(self, feature: Feature, config: Value) -> Vec<u8> {
        self.config(feature, config).to_string().into_bytes()
    }

    /// The start of the line the module logs when it refuses the configuration, for an error
    /// at `path_and_reason` (`<field path>: <reason>`, as the separate module words it) in
    /// the feature's configuration: `eastwest-<module>: invalid configuration: <path>: ...`,
    /// or the sidecar's `eastwest: invalid configuration: <section>.<path>: ...`.
    pub fn config_error(self, feature: Feature, path_and_reason: &str) -> String {
        match self {
            ModuleUnderTest::Separate => format!(
                "eastwest-{}: invalid configuration: {path_and_reason}",
                feature.module()
            ),
            ModuleUnderTest::Sidecar => {
                // An error about the whole configuration names the section.
                let within = match path_and_reason.strip_prefix("(root)") {
                    Some(rest) => rest.to_string(),
                    None => format!(".{path_and_reason}"),
                };
                format!(
                    "eastwest: invalid configuration: {}{within}",
                    feature.section()
                )
            }
        }
    }

    /// `name` for the separate module, `name-sidecar` for the sidecar: for the names of
    /// Envoy processes, log files and directories, so that both runs of a test never share
    /// one.
    pub fn tag(self, name: &str) -> String {
        match self {
            ModuleUnderTest::Separate => name.to_string(),
            ModuleUnderTest::Sidecar => format!("{name}-sidecar"),
        }
    }
}

/// What a test function may return: nothing, or a `Result` whose error fails the test.
pub trait TestOutcome {
    fn check(self);
}

impl TestOutcome for () {
    fn check(self) {}
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn check(self) {
        if let Err(error) = self {
            panic!("{error:?}");
        }
    }
}

/// For each `fn test_name(module: ModuleUnderTest)` listed (returning `()` or a `Result`),
/// two tests: `test_name::separate` and `test_name::sidecar`. This file must be the crate's
/// `module_under_test` module (as in `eastwest-e2e`, and in the harness tests that include it).
///
/// ```ignore
/// fn outbound_stamps_baggage(module: ModuleUnderTest) { ... }
/// for_each_module!(outbound_stamps_baggage);
/// ```
#[macro_export]
macro_rules! for_each_module {
    ($($test:ident),+ $(,)?) => {
        $(
            mod $test {
                use $crate::module_under_test::{ModuleUnderTest, TestOutcome};

                #[test]
                fn separate() {
                    super::$test(ModuleUnderTest::Separate).check()
                }

                #[test]
                fn sidecar() {
                    super::$test(ModuleUnderTest::Sidecar).check()
                }
            }
        )+
    };
}
