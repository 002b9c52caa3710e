//! Logic shared by the eastwest filters. Everything here is plain Rust with no host calls
//! (unit-tested natively and on wasm32), except the `host` module behind the `host` feature:
//! the one panic-free wrapper over the proxy-wasm ABI that the filters' thin layers share.

pub mod baggage;
pub mod bytes;
pub mod cluster;
pub mod config;
pub mod header_pairs;
#[cfg(feature = "host")]
pub mod host;
pub mod labels;
pub mod memo;
pub mod metric_name;
pub mod party;
pub mod peer;
pub mod properties;
pub mod resolve;
pub mod small_blocks;
pub mod trust;

pub use labels::{Label, Labels};

// Every eastwest module links this crate with `host`: one allocator for each of them.
#[cfg(all(target_arch = "wasm32", feature = "host"))]
#[global_allocator]
static ALLOCATOR: small_blocks::SmallBlocks = small_blocks::SmallBlocks::new();
