//! eastwest sidecar: the three eastwest features (label-enrich, telemetry, retry-budget) in one
//! proxy-wasm module, so that a sidecar runs one VM and one filter instead of three. Each
//! feature is turned on by a section of the configuration holding exactly that feature's own
//! configuration; labels are resolved once per request and handed from feature to feature in
//! memory. Metrics, headers, filter state and behaviour are those of the separate modules.
//! See docs/filters/sidecar.md.

pub mod config;

// The proxy-wasm layer; left out of unit-test builds, which exercise the logic without a host.
#[cfg(not(test))]
mod filter;
