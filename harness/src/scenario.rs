//! Scenarios (YAML) for the CLI, and the JSON document a run produces.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::harness::{
    Harness, HarnessError, HttpAnswer, Message, Options, StreamResult, TrapRecord,
};
use crate::host::{headers, LogEntry, Pairs};
use crate::metrics::MetricSnapshot;

/// Headers as a list of pairs (`[[name, value], ...]`) or a map (`{name: value}`).
#[derive(Clone, Debug, Default, Deserialize)]
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

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    #[serde(default)]
    pub headers: HeaderList,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub trailers: HeaderList,
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

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    #[serde(default)]
    pub worker: usize,
    #[serde(default)]
    pub properties: Option<Json>,
    #[serde(default)]
    pub request: MessageSpec,
    #[serde(default)]
    pub upstream: Option<MessageSpec>,
    #[serde(default)]
    pub advance_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsTag {
    pub tag_name: String,
    pub regex: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub config: Option<Json>,
    #[serde(default)]
    pub vm_config: Option<Json>,
    #[serde(default)]
    pub root_id: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub properties: Option<Json>,
    /// `trace`, `debug`, `info` (default), `warn`, `error`, `critical`.
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub stats_tags: Vec<StatsTag>,
    #[serde(default)]
    pub http_calls: BTreeMap<String, MessageSpec>,
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
    pub http_calls: Vec<crate::harness::HttpCallRecord>,
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
            http_calls: result.http_calls,
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

pub fn parse(text: &str) -> Result<Scenario, HarnessError> {
    serde_yaml_ng::from_str(text).map_err(|e| HarnessError(format!("bad scenario: {e}")))
}

/// Runs a scenario; returns the harness (for Prometheus rendering) and the output document.
pub fn run(
    wasm: &[u8],
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
        clusters: scenario.http_calls.keys().cloned().collect(),
        env: scenario
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        profile: overrides.profile,
        ..Options::default()
    };
    options.plugin_name = options.root_id.clone();
    let mut harness = Harness::new(wasm, options)?;
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
