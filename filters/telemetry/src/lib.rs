//! eastwest telemetry: east-west metrics per service pair (DESIGN.md §4), recorded once per
//! request when the stream ends, on the caller's sidecar (`reporter=source`) and on the
//! callee's (`reporter=destination`). See docs/filters/telemetry.md.

pub mod config;
pub mod dependencies;
pub mod response_flags;
pub mod series;
pub mod tags;

// The proxy-wasm layer; left out of unit-test builds, which exercise the logic without a host.
#[cfg(not(test))]
pub mod filter;
