//! Status codes and enumerations of the proxy-wasm ABI (0.2.0 / 0.2.1) as Envoy's host uses them.

/// `WasmResult` of proxy-wasm-cpp-host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Log levels (spdlog's numbering, as Envoy passes it through).
pub const LOG_LEVEL_NAMES: [&str; 6] = ["trace", "debug", "info", "warn", "error", "critical"];

pub fn log_level_from_name(name: &str) -> Option<u32> {
    LOG_LEVEL_NAMES
        .iter()
        .position(|candidate| candidate.eq_ignore_ascii_case(name))
        .map(|index| index as u32)
}

/// Header map types.
pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_REQUEST_TRAILERS: u32 = 1;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_RESPONSE_TRAILERS: u32 = 3;
pub const MAP_GRPC_RECEIVE_INITIAL_METADATA: u32 = 4;
pub const MAP_GRPC_RECEIVE_TRAILING_METADATA: u32 = 5;
pub const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const MAP_HTTP_CALL_RESPONSE_TRAILERS: u32 = 7;
pub const MAP_MAX: u32 = 7;

/// Buffer types.
pub const BUFFER_REQUEST_BODY: u32 = 0;
pub const BUFFER_RESPONSE_BODY: u32 = 1;
pub const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const BUFFER_GRPC_RECEIVE: u32 = 5;
pub const BUFFER_VM_CONFIGURATION: u32 = 6;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
pub const BUFFER_CALL_DATA: u32 = 8;
pub const BUFFER_MAX: u32 = 8;

/// Metric types and Envoy's id scheme (type in the low two bits, ids step by 4).
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_GAUGE: u32 = 1;
pub const METRIC_HISTOGRAM: u32 = 2;

/// gRPC status codes the host itself produces.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;
pub const GRPC_UNAVAILABLE: u32 = 14;
