//! Scenarios (YAML) for the CLI, and the JSON document a run produces.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::harness::{
    GrpcAnswer, Harness, HarnessError, HttpAnswer, Message, Options, Plugin, StreamResult,
    TrapRecord,
};
use crate::host::{headers, LogEntry, Pairs};
use crate::metrics::MetricSnapshot;

/// Headers as a list of pairs (`[[name, value], ...]`) or a map (`{name: value}`).
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum HeaderList {
    #[default]
    None,
    Pairs(Vec<(String, String)>),
    Map(BTreeMap<String, String>),
}

impl HeaderList {
    fn to_pairs(&self) -> Pairs {
        let mut pairs = Pairs::new();
        let list: Vec<(String, String)> = match self {
            HeaderList::None => Vec::new(),
            HeaderList::Pairs(list) => list.clone(),
            HeaderList::Map(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        for (key, value) in list {
            headers::add(&mut pairs, key.as_bytes(), value.as_bytes());
        }
        pairs
    }
}

#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    /// Headers, pseudo-headers (`:path`, `:status`, ...) included.
    #[serde(default)]
    pub headers: HeaderList,
    /// The body, as text.
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub trailers: HeaderList,
    /// Upstream answers and HTTP calls: milliseconds of virtual time before the answer arrives.
    #[serde(default)]
    pub delay_ms: u64,
    /// HTTP calls only: answer with a connection reset.
    #[serde(default)]
    pub reset: bool,
}

impl MessageSpec {
    /// The request or response this spec describes.
    pub fn message(&self) -> Message {
        Message {
            headers: self.headers.to_pairs(),
            body: self.body.clone().into_bytes(),
            trailers: self.trailers.to_pairs(),
        }
    }
}

/// How a cluster answers gRPC calls and streams: a call gets the first message when `status`
/// is 0, else `on_grpc_close` with the status; a stream gets the initial metadata, every
/// message, the trailing metadata and the close, `delay_ms` after its first message.
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcSpec {
    #[serde(default)]
    pub initial_metadata: HeaderList,
    /// Messages without gRPC framing, as text.
    #[serde(default)]
    pub messages: Vec<String>,
    #[serde(default)]
    pub trailing_metadata: HeaderList,
    #[serde(default)]
    pub status: u32,
    #[serde(default)]
    pub status_message: String,
    #[serde(default)]
    pub delay_ms: u64,
}

impl GrpcSpec {
    pub fn answer(&self) -> GrpcAnswer {
        GrpcAnswer {
            initial_metadata: self.initial_metadata.to_pairs(),
            messages: self
                .messages
                .iter()
                .map(|m| m.clone().into_bytes())
                .collect(),
            trailing_metadata: self.trailing_metadata.to_pairs(),
            status: self.status,
            status_message: self.status_message.clone(),
            delay_ms: self.delay_ms,
        }
    }
}

/// One filter of a chain (`plugins:`).
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The module's path, relative to the scenario file.
    pub module: String,
    /// Plugin configuration: an object (serialized as JSON) or a string.
    #[serde(default)]
    pub config: Option<Json>,
    /// VM configuration: an object or a string.
    #[serde(default)]
    pub vm_config: Option<Json>,
    #[serde(default)]
    pub root_id: Option<String>,
    /// Plugins with the same vm_id share shared data and queues.
    #[serde(default)]
    pub vm_id: Option<String>,
    /// This filter's failure_policy: FAIL_OPEN when true.
    #[serde(default)]
    pub fail_open: bool,
    /// WASI environment variables.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// The worker (VM) the stream runs on.
    #[serde(default)]
    pub worker: usize,
    /// Attributes of this stream, merged over the scenario's.
    #[serde(default)]
    pub properties: Option<Json>,
    /// What the client sends.
    #[serde(default)]
    pub request: MessageSpec,
    /// How the upstream answers (`:status: 200`, no body, when left out).
    #[serde(default)]
    pub upstream: Option<MessageSpec>,
    /// Milliseconds of virtual time that pass before the stream starts.
    #[serde(default)]
    pub advance_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatsTag {
    pub tag_name: String,
    pub regex: String,
}

#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Plugin configuration: an object (serialized as JSON) or a string.
    #[serde(default)]
    pub config: Option<Json>,
    /// VM configuration: an object or a string.
    #[serde(default)]
    pub vm_config: Option<Json>,
    #[serde(default)]
    pub root_id: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    /// Worker threads, one VM each (default 1).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Envoy attributes shared by every stream, as nested objects.
    #[serde(default)]
    pub properties: Option<Json>,
    /// `trace`, `debug`, `info` (default), `warn`, `error`, `critical`.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Envoy's failure_policy: FAIL_OPEN when true.
    #[serde(default)]
    pub fail_open: bool,
    /// WASI environment variables.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Envoy's stats_tags, for `--prometheus`.
    #[serde(default)]
    pub stats_tags: Vec<StatsTag>,
    /// How each cluster answers HTTP calls (`reset: true` for a connection reset).
    #[serde(default)]
    pub http_calls: BTreeMap<String, MessageSpec>,
    /// How each cluster answers gRPC calls and streams.
    #[serde(default)]
    pub grpc_calls: BTreeMap<String, GrpcSpec>,
    /// A filter chain instead of the one module given on the command line.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Run Envoy's base and main-thread VMs too (default true).
    #[serde(default)]
    pub main_thread_vm: Option<bool>,
    /// The connection's buffer limit (default 1048576).
    #[serde(default)]
    pub buffer_limit_bytes: Option<usize>,
    /// Bodies reach the filters in chunks of at most this size (default 16384).
    #[serde(default)]
    pub body_chunk_bytes: Option<usize>,
    /// The streams, run one after another.
    #[serde(default)]
    pub streams: Vec<StreamSpec>,
    /// Time that passes after the last stream (ticks fire).
    #[serde(default)]
    pub advance_ms: u64,
}

/// A configuration as Envoy passes it: a JSON string as is, anything else serialized.
pub fn config_bytes(config: &Json) -> Vec<u8> {
    match config {
        Json::String(text) => text.clone().into_bytes(),
        Json::Null => Vec::new(),
        other => other.to_string().into_bytes(),
    }
}

#[derive(Serialize)]
pub struct StreamOutput {
    pub upstream_request: Option<Message>,
    pub local_reply: Option<crate::harness::LocalReply>,
    pub downstream_response: Option<Message>,
    pub downstream_reset: Option<String>,
    pub http_calls: Vec<crate::harness::HttpCallRecord>,
    pub grpc_calls: Vec<crate::harness::GrpcCallRecord>,
    pub logs: Vec<LogEntry>,
    pub instructions: u64,
    pub complete: bool,
}

impl From<StreamResult> for StreamOutput {
    fn from(result: StreamResult) -> Self {
        StreamOutput {
            upstream_request: result.upstream_request,
            local_reply: result.local_reply,
            downstream_response: result.downstream_response,
            downstream_reset: result.downstream_reset,
            http_calls: result.http_calls,
            grpc_calls: result.grpc_calls,
            logs: result.logs,
            instructions: result.instructions,
            complete: result.complete,
        }
    }
}

#[derive(Serialize)]
pub struct SharedDataOutput {
    pub value: String,
    pub cas: u32,
}

#[derive(Serialize)]
pub struct Output {
    pub streams: Vec<StreamOutput>,
    pub logs: Vec<LogEntry>,
    pub metrics: Vec<MetricSnapshot>,
    pub shared_data: BTreeMap<String, SharedDataOutput>,
    pub traps: Vec<TrapRecord>,
    pub startup_instructions: Vec<u64>,
}

/// Overrides from the command line.
#[derive(Default)]
pub struct Overrides {
    pub config: Option<Vec<u8>>,
    pub workers: Option<usize>,
    pub root_id: Option<String>,
    /// Profile the run (`eastwest-harness profile`).
    pub profile: Option<crate::profile::ProfileScope>,
    /// Streams run before the profile starts counting (warm-up).
    pub profile_warmup: usize,
}

/// The JSON schema of the scenario format (shipped as harness/scenario.schema.json).
pub fn schema() -> Json {
    let mut schema = serde_json::to_value(schemars::schema_for!(Scenario)).unwrap_or_default();
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "$id".into(),
            Json::String(
                "https://github.com/eastwest-mesh/eastwest/harness/scenario.schema.json".into(),
            ),
        );
        object.insert(
            "title".into(),
            Json::String("eastwest-harness scenario".into()),
        );
    }
    schema
}

pub fn parse(text: &str) -> Result<Scenario, HarnessError> {
    serde_yaml_ng::from_str(text).map_err(|e| HarnessError(format!("bad scenario: {e}")))
}

/// The chain a scenario's `plugins:` list, modules read relative to `base_dir`.
pub fn load_plugins(scenario: &Scenario, base_dir: &Path) -> Result<Vec<Plugin>, HarnessError> {
    scenario
        .plugins
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let path = base_dir.join(&spec.module);
            let wasm = std::fs::read(&path).map_err(|e| {
                HarnessError(format!(
                    "bad scenario: plugins[{index}].module: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            let root_id = spec.root_id.clone().unwrap_or_default();
            Ok(Plugin {
                wasm,
                config: spec.config.as_ref().map(config_bytes).unwrap_or_default(),
                vm_config: spec
                    .vm_config
                    .as_ref()
                    .map(config_bytes)
                    .unwrap_or_default(),
                plugin_name: root_id.clone(),
                root_id,
                vm_id: spec.vm_id.clone().unwrap_or_default(),
                fail_open: spec.fail_open,
                env: spec
                    .environment
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        })
        .collect()
}

/// Runs a scenario with one module; returns the harness (for Prometheus rendering) and the
/// output document.
pub fn run(
    wasm: &[u8],
    scenario: &Scenario,
    overrides: Overrides,
) -> Result<(Harness, Output), HarnessError> {
    if !scenario.plugins.is_empty() {
        return Err(HarnessError(
            "bad scenario: it lists plugins: run it without a module (or remove plugins)".into(),
        ));
    }
    run_chain(Some(wasm), Vec::new(), scenario, overrides)
}

/// Runs a scenario with a chain (`plugins`, from [`load_plugins`]), or with `wasm` when the
/// chain is empty.
pub fn run_chain(
    wasm: Option<&[u8]>,
    plugins: Vec<Plugin>,
    scenario: &Scenario,
    overrides: Overrides,
) -> Result<(Harness, Output), HarnessError> {
    let log_level = match &scenario.log_level {
        Some(name) => crate::abi::log_level_from_name(name)
            .ok_or_else(|| HarnessError(format!("bad scenario: unknown log_level {name:?}")))?,
        None => 2,
    };
    let mut options = Options {
        config: overrides.config.unwrap_or_else(|| {
            scenario
                .config
                .as_ref()
                .map(config_bytes)
                .unwrap_or_default()
        }),
        vm_config: scenario
            .vm_config
            .as_ref()
            .map(config_bytes)
            .unwrap_or_default(),
        root_id: overrides
            .root_id
            .or(scenario.root_id.clone())
            .unwrap_or_default(),
        vm_id: scenario.vm_id.clone().unwrap_or_default(),
        workers: overrides.workers.or(scenario.workers).unwrap_or(1).max(1),
        properties: scenario
            .properties
            .clone()
            .unwrap_or(Json::Object(Default::default())),
        log_level,
        fail_open: scenario.fail_open,
        clusters: scenario
            .http_calls
            .keys()
            .chain(scenario.grpc_calls.keys())
            .cloned()
            .collect(),
        env: scenario
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        profile: overrides.profile,
        ..Options::default()
    };
    if let Some(main) = scenario.main_thread_vm {
        options.main_thread_vm = main;
    }
    if let Some(limit) = scenario.buffer_limit_bytes {
        options.buffer_limit_bytes = limit;
    }
    if let Some(chunk) = scenario.body_chunk_bytes {
        if chunk == 0 {
            return Err(HarnessError(
                "bad scenario: body_chunk_bytes must be at least 1".into(),
            ));
        }
        options.body_chunk_bytes = chunk;
    }
    options.plugin_name = options.root_id.clone();
    let mut harness = match (wasm, plugins.is_empty()) {
        (Some(wasm), true) => Harness::new(wasm, options)?,
        (None, false) => Harness::chain(plugins, options)?,
        (Some(_), false) => {
            return Err(HarnessError(
                "bad scenario: give either a module or plugins, not both".into(),
            ))
        }
        (None, true) => {
            return Err(HarnessError(
                "bad scenario: no module and no plugins".into(),
            ))
        }
    };
    for (cluster, spec) in &scenario.grpc_calls {
        harness.answer_grpc_calls(cluster, spec.answer());
    }
    for (cluster, spec) in &scenario.http_calls {
        harness.answer_http_calls(
            cluster,
            HttpAnswer {
                response: spec.message(),
                delay_ms: spec.delay_ms,
                reset: spec.reset,
            },
        );
    }
    let mut ids = Vec::new();
    for (index, stream) in scenario.streams.iter().enumerate() {
        if stream.worker >= harness.workers() {
            return Err(HarnessError(format!(
                "bad scenario: streams[{index}].worker is {} but there are {} workers",
                stream.worker,
                harness.workers()
            )));
        }
        harness.advance(stream.advance_ms);
        if overrides.profile_warmup > 0 && index == overrides.profile_warmup {
            harness.reset_profile();
        }
        let upstream = stream
            .upstream
            .as_ref()
            .map(|spec| (spec.message(), spec.delay_ms));
        ids.push(harness.run(
            stream.worker,
            stream.properties.as_ref(),
            stream.request.message(),
            upstream,
        ));
    }
    harness.advance(scenario.advance_ms);
    let output = Output {
        streams: ids.iter().map(|id| harness.result(*id).into()).collect(),
        logs: harness.root_logs(),
        metrics: harness.metrics(),
        shared_data: harness
            .shared_data()
            .into_iter()
            .map(|(key, (value, cas))| {
                (
                    key,
                    SharedDataOutput {
                        value: String::from_utf8_lossy(&value).into_owned(),
                        cas,
                    },
                )
            })
            .collect(),
        traps: harness.traps.clone(),
        startup_instructions: harness.startup_instructions.clone(),
    };
    Ok((harness, output))
}
