//! eastwest retry-budget: retries toward a destination service may add at most a fraction of
//! its original traffic (DESIGN.md §5), counted across all Envoy workers of a process, enforced
//! on the caller's sidecar (`client`, `client-headers`) or the callee's (`server`). See
//! docs/filters/retry-budget.md.

pub mod config;
pub mod ledger;
pub mod request;
pub mod window;

// The proxy-wasm layer; left out of unit-test builds, which exercise the logic without a host.
#[cfg(not(test))]
pub mod filter;
