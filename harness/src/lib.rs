//! eastwest-harness: a proxy-wasm host on wasmtime that behaves like Envoy's, for filter tests,
//! fuzzing and benchmarks. See the crate README for the API, the CLI and the known differences.

pub mod abi;
pub mod bench;
pub mod harness;
pub mod host;
pub mod metrics;
pub mod probe;
pub mod profile;
pub mod properties;
pub mod scenario;

pub use harness::{
    GrpcAnswer, GrpcCallRecord, Harness, HarnessError, HttpAnswer, HttpCallRecord, LocalReply,
    Message, Options, Plugin, StreamId, StreamResult, TrapRecord,
};
pub use host::LogEntry;
pub use metrics::MetricSnapshot;
pub use profile::{Profile, ProfileScope};
