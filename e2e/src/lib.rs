//! End-to-end harness for eastwest: real Envoy processes, the test application behind the
//! sidecars, a blocking HTTP client, a load generator ([`load`]), SPIFFE test certificates and
//! Envoy bootstrap builders.
//!
//! Typical test:
//!
//! ```no_run
//! use eastwest_e2e::{bootstrap, free_port, http_request, ClusterBuilder, Envoy, EnvoyOptions,
//!     ListenerBuilder, Node, TestApp};
//!
//! let app = TestApp::start().unwrap();
//! let (admin, listen) = (free_port(), free_port());
//! let config = bootstrap(
//!     &Node::new("client-1", "client"),
//!     admin,
//!     vec![ListenerBuilder::new("outbound", listen, "app").build()],
//!     vec![ClusterBuilder::new("app", app.port()).build()],
//!     &[],
//! );
//! let envoy = Envoy::start("plain-proxy", config, &EnvoyOptions::default()).unwrap();
//! let response = http_request("GET", &format!("http://127.0.0.1:{listen}/hello"), &[], "").unwrap();
//! assert_eq!(response.status, 200);
//! drop(envoy); // SIGTERM, then SIGKILL after 5 s; always reaped
//! ```

pub mod app;
pub mod bench;
pub mod bootstrap;
pub mod certs;
pub mod client;
pub mod demo;
pub mod envoy;
pub mod live_config;
pub mod load;
pub mod module_under_test;
mod paths;
pub mod process;
pub mod prometheus;
pub mod retry_storm;
pub mod soak;
pub mod wat_modules;

pub use app::TestApp;
pub use bootstrap::{
    bootstrap, feature_filter, wasm_filter, ClusterBuilder, ListenerBuilder, Node, TrafficDirection,
};
pub use certs::{TestCa, WorkloadCert};
pub use client::{http2_request, http_request, http_request_with, RequestOptions, Response};
pub use envoy::{Envoy, EnvoyOptions};
pub use load::{LoadPlan, LoadReport};
pub use module_under_test::{Feature, ModuleUnderTest};
pub use paths::{
    dist_wasm, envoy_binary, envoy_oldest_binary, free_port, sdk_filter_wasm, workspace_root,
    ENVOY_OLDEST_VERSION, ENVOY_VERSION,
};
