//! eastwest label-enrich: resolves the ownership labels of both ends of a call and stamps them
//! onto the request (baggage) and back onto the response (`x-eastwest-peer`), so that every
//! hop, log line and metric knows who owns it. See docs/filters/label-enrich.md.

pub mod config;

// The proxy-wasm layer; left out of unit-test builds, which exercise the logic without a host.
#[cfg(not(test))]
pub mod filter;
