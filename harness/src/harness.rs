//! The driver: VMs (workers), streams, virtual time, HTTP callouts, the failure policy.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use serde_json::Value as Json;
use wasmtime::{Config, Engine, Func, Instance, Linker, Module, Store, Val};

use crate::host::{
    self, headers, Deferred, HttpCallResponse, LogEntry, Pairs, Shared, StreamData, VmState,
};
use crate::metrics::{self, MetricSnapshot, TagExtractor};
use crate::properties;

/// 2025-01-01T00:00:00Z: where the virtual clock starts.
pub const EPOCH_NS: u64 = 1_735_689_600_000_000_000;

/// How the plugin is loaded.
#[derive(Clone, Debug)]
pub struct Options {
    /// Plugin configuration (what `on_configure` reads).
    pub config: Vec<u8>,
    /// VM configuration (what `on_vm_start` reads).
    pub vm_config: Vec<u8>,
    pub root_id: String,
    pub vm_id: String,
    pub plugin_name: String,
    /// VMs, one per Envoy worker thread.
    pub workers: usize,
    /// Envoy attributes shared by every stream, as nested JSON (`xds.node` as the Node fields).
    pub properties: Json,
    /// Envoy's log level (`info` by default): lower levels are not logged.
    pub log_level: u32,
    /// Envoy's `failure_policy`: false (default) is FAIL_CLOSED.
    pub fail_open: bool,
    /// Instruction budget of one callback; beyond it the callback traps.
    pub fuel_per_callback: u64,
    /// Clusters HTTP calls may name (others are refused with BadArgument, as Envoy does).
    pub clusters: Vec<String>,
    /// WASI environment (Envoy's `vm_config.environment_variables`).
    pub env: Vec<(String, String)>,
    /// Profile the module ([`Harness::profile`]): instrument it before compiling, and count the
    /// callbacks of this scope. Instructions per callback and stream stay those of the module
    /// as it is.
    pub profile: Option<crate::profile::ProfileScope>,
    /// Run a VM on Envoy's main thread too, as Envoy does: it starts and is configured before
    /// the workers' VMs, and its root context gets ticks, but it serves no stream. Its log lines
    /// carry `worker == workers`.
    pub main_thread_vm: bool,
    /// The connection's buffer limit (Envoy's `per_connection_buffer_limit_bytes`, 1 MiB by
    /// default): a body a filter buffers beyond it gets 413 (request) or a reset / 500
    /// (response).
    pub buffer_limit_bytes: usize,
    /// Bodies reach the filters in chunks of at most this many bytes, as Envoy's codec delivers
    /// them from the socket.
    pub body_chunk_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: Vec::new(),
            vm_config: Vec::new(),
            root_id: String::new(),
            vm_id: String::new(),
            plugin_name: "eastwest-harness".into(),
            workers: 1,
            properties: Json::Object(Default::default()),
            log_level: 2,
            fail_open: false,
            fuel_per_callback: 1_000_000_000,
            clusters: Vec::new(),
            env: Vec::new(),
            profile: None,
            main_thread_vm: true,
            buffer_limit_bytes: 1024 * 1024,
            body_chunk_bytes: 16 * 1024,
        }
    }
}

/// One filter of a chain: its module and how Envoy loads it.
#[derive(Clone, Debug, Default)]
pub struct Plugin {
    pub wasm: Vec<u8>,
    /// Plugin configuration (what `on_configure` reads).
    pub config: Vec<u8>,
    /// VM configuration (what `on_vm_start` reads).
    pub vm_config: Vec<u8>,
    pub root_id: String,
    pub vm_id: String,
    pub plugin_name: String,
    /// Envoy's `failure_policy`: false (default) is FAIL_CLOSED.
    pub fail_open: bool,
    /// WASI environment (Envoy's `vm_config.environment_variables`).
    pub env: Vec<(String, String)>,
}

impl Plugin {
    pub fn new(wasm: impl Into<Vec<u8>>, config: impl Into<Vec<u8>>) -> Plugin {
        Plugin {
            wasm: wasm.into(),
            config: config.into(),
            plugin_name: "eastwest-harness".into(),
            ..Plugin::default()
        }
    }

    /// The plugin `Options` describe (for [`Harness::new`]).
    fn from_options(wasm: &[u8], options: &Options) -> Plugin {
        Plugin {
            wasm: wasm.to_vec(),
            config: options.config.clone(),
            vm_config: options.vm_config.clone(),
            root_id: options.root_id.clone(),
            vm_id: options.vm_id.clone(),
            plugin_name: options.plugin_name.clone(),
            fail_open: options.fail_open,
            env: options.env.clone(),
        }
    }
}

/// Headers, body and trailers of a request or response.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Message {
    #[serde(serialize_with = "serialize_pairs")]
    pub headers: Pairs,
    #[serde(serialize_with = "serialize_bytes")]
    pub body: Vec<u8>,
    #[serde(
        serialize_with = "serialize_pairs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub trailers: Pairs,
}

fn serialize_pairs<S: serde::Serializer>(pairs: &Pairs, s: S) -> Result<S::Ok, S::Error> {
    let strings: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect();
    strings.serialize(s)
}

fn serialize_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    String::from_utf8_lossy(bytes).serialize(s)
}

impl Message {
    pub fn new(headers: &[(&str, &str)]) -> Message {
        Message {
            headers: headers::from_strs(headers),
            ..Message::default()
        }
    }

    /// A GET request with the pseudo-headers Envoy gives a filter.
    pub fn get(path: &str) -> Message {
        Message::new(&[
            (":authority", "example.com"),
            (":path", path),
            (":method", "GET"),
            (":scheme", "http"),
        ])
    }

    /// A response with `:status`.
    pub fn status(code: u16) -> Message {
        Message::new(&[(":status", &code.to_string())])
    }

    pub fn header(mut self, key: &str, value: &str) -> Message {
        headers::add(&mut self.headers, key.as_bytes(), value.as_bytes());
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Message {
        self.body = body.into();
        self
    }

    pub fn trailer(mut self, key: &str, value: &str) -> Message {
        headers::add(&mut self.trailers, key.as_bytes(), value.as_bytes());
        self
    }

    /// The first value of a header (names compared without regard to case).
    pub fn get_header(&self, key: &str) -> Option<&str> {
        headers::get(&self.headers, key.as_bytes()).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of a header.
    pub fn header_values(&self, key: &str) -> Vec<String> {
        let key = key.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
}

/// A local reply the filter (or the failure policy) sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalReply {
    pub status: u32,
    #[serde(serialize_with = "serialize_pairs")]
    pub headers: Pairs,
    #[serde(serialize_with = "serialize_bytes")]
    pub body: Vec<u8>,
    pub details: String,
}

/// A gRPC call or stream a filter opened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrpcCallRecord {
    pub cluster: String,
    pub service: String,
    pub method: String,
    #[serde(serialize_with = "serialize_pairs")]
    pub initial_metadata: Pairs,
    /// The request message of a call, or every message sent on a stream (without gRPC framing).
    #[serde(serialize_with = "serialize_messages")]
    pub messages: Vec<Vec<u8>>,
    pub timeout_ms: u64,
    /// A stream (`proxy_grpc_stream`) rather than a call.
    pub stream: bool,
    /// The stream was closed by the filter (half-close or end of stream), or cancelled.
    pub closed: bool,
    #[serde(skip)]
    pub token: u32,
}

fn serialize_messages<S: serde::Serializer>(messages: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    let strings: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    strings.serialize(s)
}

/// How a cluster answers gRPC calls and streams: initial metadata, the messages (without gRPC
/// framing), trailing metadata and the status. A call gets its first message when the status
/// is OK (0), else the status and message; a stream gets everything in order, `delay_ms` after
/// its first message (or its close).
#[derive(Clone, Debug, Default)]
pub struct GrpcAnswer {
    pub initial_metadata: Pairs,
    pub messages: Vec<Vec<u8>>,
    pub trailing_metadata: Pairs,
    pub status: u32,
    pub status_message: String,
    pub delay_ms: u64,
}

/// An HTTP call a filter made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpCallRecord {
    pub cluster: String,
    #[serde(serialize_with = "serialize_pairs")]
    pub headers: Pairs,
    #[serde(serialize_with = "serialize_bytes")]
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    #[serde(skip)]
    pub token: u32,
}

/// How a cluster answers HTTP calls.
#[derive(Clone, Debug, Default)]
pub struct HttpAnswer {
    pub response: Message,
    pub delay_ms: u64,
    /// Answer with a connection reset (`on_http_call_response` with no headers, status
    /// BrokenConnection "reset").
    pub reset: bool,
}

/// A trap in the guest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrapRecord {
    pub worker: usize,
    pub callback: String,
    pub message: String,
}

/// Everything observed about one stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamResult {
    pub upstream_request: Option<Message>,
    pub local_reply: Option<LocalReply>,
    pub downstream_response: Option<Message>,
    /// Set when Envoy resets the stream towards the client (a buffer limit passed after the
    /// response headers went out, a local reply too late, `close_stream`): what it says.
    pub downstream_reset: Option<String>,
    pub http_calls: Vec<HttpCallRecord>,
    pub grpc_calls: Vec<GrpcCallRecord>,
    pub logs: Vec<LogEntry>,
    pub instructions: u64,
    /// Instructions per callback, in call order.
    #[serde(skip)]
    pub callbacks: Vec<(String, u64)>,
    pub complete: bool,
}

impl StreamResult {
    /// Instructions by callback name (`proxy_on_request_headers`, `proxy_on_log`, ...), summed
    /// over the callback's calls; they add up to `instructions`.
    pub fn instructions_by_callback(&self) -> BTreeMap<String, u64> {
        let mut by_callback = BTreeMap::new();
        for (name, spent) in &self.callbacks {
            *by_callback.entry(name.clone()).or_insert(0) += spent;
        }
        by_callback
    }
}

pub type StreamId = usize;

/// Why the harness could not start or run.
#[derive(Debug)]
pub struct HarnessError(pub String);

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

/// One engine per process (compiled modules can only be shared within one engine).
fn engine() -> Result<Engine, HarnessError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            config.consume_fuel(true);
            config.wasm_backtrace(true);
            Engine::new(&config).map_err(|e| format!("engine: {e}"))
        })
        .clone()
        .map_err(HarnessError)
}

/// Compiles a module once per process, and once per machine through an on-disk cache of
/// compiled code (in `$EASTWEST_HARNESS_CACHE`, else the system temp directory; keyed by the
/// module's bytes and this crate's version, and wasmtime refuses an incompatible file):
/// Cranelift is slow in debug builds, and tests load the same filter many times.
fn compile(engine: &Engine, wasm: &[u8]) -> Result<Module, HarnessError> {
    static MODULES: OnceLock<Mutex<HashMap<u64, Module>>> = OnceLock::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    wasm.hash(&mut hasher);
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    let key = hasher.finish();
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut modules = modules
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(module) = modules.get(&key) {
        return Ok(module.clone());
    }
    let cache_dir = std::env::var_os("EASTWEST_HARNESS_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("eastwest-harness-cache"));
    let cache_file = cache_dir.join(format!("{key:016x}-{}.cwasm", wasm.len()));
    // SAFETY: the file was written by `Module::serialize` of this same program (keyed by the
    // module's hash); wasmtime checks that it matches this engine's version and configuration.
    let cached = unsafe { Module::deserialize_file(engine, &cache_file) }.ok();
    let module = match cached {
        Some(module) => module,
        None => {
            let module = Module::new(engine, wasm)
                .map_err(|e| HarnessError(format!("bad module: {e:#}")))?;
            if let Ok(bytes) = module.serialize() {
                let _ = std::fs::create_dir_all(&cache_dir);
                let temporary = cache_file.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&temporary, bytes).is_ok() {
                    let _ = std::fs::rename(&temporary, &cache_file);
                }
            }
            module
        }
    };
    modules.insert(key, module.clone());
    Ok(module)
}

/// Where a frame of a stream is going.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    /// Client → upstream: filters in chain order (Envoy's decoder filters).
    Request,
    /// Upstream → client: filters in reverse order (encoder filters).
    Response,
}

/// What passes between the filters of a chain.
#[derive(Clone, Debug)]
enum Frame {
    Headers { end: bool },
    Data { bytes: Vec<u8>, end: bool },
    Trailers,
}

/// One filter's side of one direction: what waits for it and what it holds.
#[derive(Default)]
struct Lane {
    /// Frames that reached the filter and wait for it.
    input: VecDeque<Frame>,
    /// Headers paused (Envoy turns every pause from a headers callback into StopAll): nothing
    /// reaches the filter until it continues. `Some(true)`: StopAllIterationAndBuffer, whose
    /// buffered body counts against the buffer limit; `Some(false)`: watermark (flow control).
    stopped_all: Option<bool>,
    /// Frames the filter processed but did not let through (paused); a `Data` here is the
    /// body it buffers.
    held: Vec<Frame>,
    /// The held body counts against the buffer limit (StopIterationAndBuffer).
    limited: bool,
}

impl Lane {
    fn held_body_len(&self) -> usize {
        self.held
            .iter()
            .map(|frame| match frame {
                Frame::Data { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum()
    }

    fn input_body_len(&self) -> usize {
        self.input
            .iter()
            .map(|frame| match frame {
                Frame::Data { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum()
    }
}

/// One filter of a stream.
struct Slot {
    vm: usize,
    context: u32,
    /// `on_context_create` ran.
    created: bool,
    /// The request headers reached the filter: only then does Envoy run its response callbacks.
    started: bool,
    /// The VM failed and the policy is fail open: frames pass it untouched.
    bypass: bool,
    request: Lane,
    response: Lane,
}

struct StreamState {
    worker: usize,
    slots: Vec<Slot>,
    maps: Rc<RefCell<host::StreamMaps>>,
    /// The client's request frames not yet delivered to the first filter.
    request_source: VecDeque<Frame>,
    /// The upstream's (or a local reply's) response frames not yet delivered.
    response_source: VecDeque<Frame>,
    /// What reached the upstream so far (headers when they got there).
    upstream: Option<Message>,
    sent_upstream: bool,
    /// The upstream's response arrived (Envoy's `responseHeaders().has_value()`).
    response_started: bool,
    /// What the client received so far.
    downstream: Option<Message>,
    /// A local reply was sent: the request path is over.
    replied: bool,
    finished: bool,
    /// The upstream's answer, when the test gave it in advance.
    upstream_answer: Option<(Message, u64)>,
    result: StreamResult,
}

/// One VM: a plugin's module instantiated on one thread.
struct Vm {
    store: Store<VmState>,
    instance: Instance,
    funcs: HashMap<String, Option<Func>>,
    failed: bool,
    next_context: u32,
    plugin: usize,
    /// Ticks fire (every VM but Envoy's base VM, which only validates the configuration).
    ticks: bool,
}

struct PendingCall {
    vm: usize,
    token: u32,
    stream: Option<StreamId>,
    due_ns: Option<u64>,
    answer: Option<HttpAnswer>,
}

struct PendingGrpc {
    vm: usize,
    token: u32,
    stream: Option<StreamId>,
    /// When the answer arrives; `None` until a stream sent its first message.
    due_ns: Option<u64>,
    answer: GrpcAnswer,
    is_stream: bool,
}

enum Event {
    Tick(usize),
    HttpCall(usize),
    Grpc(usize),
    Upstream(StreamId),
}

/// Plugins loaded into VMs on every thread, sharing one shared-data store and stats, as Envoy
/// runs them; streams pass through the plugins as one HTTP filter chain.
pub struct Harness {
    vms: Vec<Vm>,
    /// Threads per plugin: the workers, then the main thread when it has a VM.
    threads: usize,
    workers: usize,
    plugins: Vec<Plugin>,
    shared: Rc<RefCell<Shared>>,
    options: Options,
    streams: Vec<StreamState>,
    answers: HashMap<String, HttpAnswer>,
    grpc_answers: HashMap<String, GrpcAnswer>,
    pending_calls: Vec<PendingCall>,
    pending_grpc: Vec<PendingGrpc>,
    /// Where each gRPC call's record is, by (VM, token): its stream (or root) and index.
    grpc_records: HashMap<(usize, u32), (Option<StreamId>, usize)>,
    upstream_due: Vec<(StreamId, u64)>,
    actions: VecDeque<(usize, Deferred)>,
    pub traps: Vec<TrapRecord>,
    /// HTTP calls made outside any stream (root contexts).
    pub root_http_calls: Vec<HttpCallRecord>,
    /// gRPC calls made outside any stream (root contexts).
    pub root_grpc_calls: Vec<GrpcCallRecord>,
    /// Instructions spent outside streams (start, configuration, ticks, root callbacks), per VM:
    /// for one plugin, index `w` is worker `w`, `workers` the main thread's VM and
    /// `workers + 1` the base VM; a chain's plugins follow one another.
    pub startup_instructions: Vec<u64>,
    /// Function names of a profiled module.
    profile_names: Option<Vec<String>>,
}

const PAYLOAD_TOO_LARGE: &str = "request_payload_too_large";
const RESPONSE_TOO_LARGE: &str = "response_payload_too_large";

impl Harness {
    /// Compiles the module and starts its VMs (the main thread's, then one per worker):
    /// `_initialize`, root context, `on_vm_start`, `on_configure`.
    pub fn new(wasm: &[u8], options: Options) -> Result<Harness, HarnessError> {
        let plugin = Plugin::from_options(wasm, &options);
        Harness::chain(vec![plugin], options)
    }

    /// Several plugins as one Envoy HTTP filter chain: request callbacks in list order,
    /// response callbacks in reverse, one header map and filter state per stream, a local reply
    /// skipping the request callbacks of the filters after the one that sent it. `options`
    /// gives what the host has (workers, properties, clusters, limits); its plugin fields
    /// (`config`, `root_id`, ...) are not used.
    pub fn chain(plugins: Vec<Plugin>, options: Options) -> Result<Harness, HarnessError> {
        if plugins.is_empty() {
            return Err(HarnessError("a chain needs at least one plugin".into()));
        }
        if options.profile.is_some() && plugins.len() > 1 {
            return Err(HarnessError(
                "profiles are of one module: profile a chain's modules one at a time".into(),
            ));
        }
        let engine = engine()?;
        let mut linker: Linker<VmState> = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| HarnessError(format!("linker: {e}")))?;
        crate::profile::define(&mut linker).map_err(|e| HarnessError(format!("linker: {e}")))?;
        let shared = Rc::new(RefCell::new(Shared {
            now_ns: EPOCH_NS,
            log_level: options.log_level,
            clusters: options.clusters.clone(),
            attributes: properties::attributes_from_json(&options.properties),
            ..Shared::default()
        }));
        let workers = options.workers.max(1);
        // Per plugin: one VM per worker, then (as Envoy) the main thread's VM and the base VM
        // Envoy creates when it loads the configuration; both live on the main thread.
        let threads = workers + if options.main_thread_vm { 2 } else { 0 };
        let mut harness = Harness {
            vms: Vec::new(),
            threads,
            workers,
            plugins: plugins.clone(),
            shared: shared.clone(),
            options: options.clone(),
            streams: Vec::new(),
            answers: HashMap::new(),
            grpc_answers: HashMap::new(),
            pending_calls: Vec::new(),
            pending_grpc: Vec::new(),
            grpc_records: HashMap::new(),
            upstream_due: Vec::new(),
            actions: VecDeque::new(),
            traps: Vec::new(),
            root_http_calls: Vec::new(),
            root_grpc_calls: Vec::new(),
            startup_instructions: Vec::new(),
            profile_names: None,
        };
        for (plugin_index, plugin) in plugins.iter().enumerate() {
            let wasm = &plugin.wasm;
            let is_binary = wasm.starts_with(b"\0asm");
            let is_text = std::str::from_utf8(wasm).is_ok_and(|t| t.contains("(module"));
            if !is_binary && !is_text {
                return Err(HarnessError(
                    "bad module: not a WebAssembly module (no \\0asm header)".into(),
                ));
            }
            let (module, imported_funcs) = match options.profile {
                None => (compile(&engine, wasm)?, 0),
                Some(_) => {
                    let instrumented = crate::profile::instrument(wasm)?;
                    harness.profile_names = Some(instrumented.names);
                    (
                        compile(&engine, &instrumented.wasm)?,
                        instrumented.imported_funcs,
                    )
                }
            };
            let abi = [
                "proxy_abi_version_0_2_1",
                "proxy_abi_version_0_2_0",
                "proxy_abi_version_0_1_0",
            ];
            if !module.exports().any(|export| abi.contains(&export.name())) {
                return Err(HarnessError(
                    "bad module: not a proxy-wasm module (no proxy_abi_version_* export)".into(),
                ));
            }
            for thread in 0..threads {
                let mut state = VmState::new(shared.clone(), thread.min(workers));
                state.plugin = plugin_index;
                state.vm_id = plugin.vm_id.clone();
                state.root_id = plugin.root_id.clone();
                state.plugin_name = plugin.plugin_name.clone();
                state.vm_config = plugin.vm_config.clone();
                state.plugin_config = plugin.config.clone();
                state.env = plugin.env.clone();
                if options.profile.is_some() {
                    state.profile = Some(Box::new(crate::profile::Recorder::new(imported_funcs)));
                }
                let mut store = Store::new(&engine, state);
                store.set_fuel(options.fuel_per_callback).ok();
                let instance = linker
                    .instantiate(&mut store, &module)
                    .map_err(|e| HarnessError(format!("cannot instantiate: {e:#}")))?;
                let memory = instance
                    .get_memory(&mut store, "memory")
                    .ok_or_else(|| HarnessError("bad module: no exported memory".into()))?;
                let alloc = instance
                    .get_typed_func::<i32, i32>(&mut store, "malloc")
                    .or_else(|_| {
                        instance.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
                    })
                    .map_err(|_| {
                        HarnessError(
                            "bad module: neither malloc nor proxy_on_memory_allocate is exported"
                                .into(),
                        )
                    })?;
                store.data_mut().memory = Some(memory);
                store.data_mut().alloc = Some(alloc);
                harness.vms.push(Vm {
                    store,
                    instance,
                    funcs: HashMap::new(),
                    failed: false,
                    next_context: 2,
                    plugin: plugin_index,
                    ticks: thread <= workers,
                });
            }
            harness.startup_instructions.resize(harness.vms.len(), 0);
            // Envoy starts and configures the base VM, then the main thread's, then each
            // worker's.
            let first = plugin_index * threads;
            let mut order: Vec<usize> = (first..first + workers).collect();
            if options.main_thread_vm {
                order.insert(0, first + workers);
                order.insert(0, first + workers + 1);
            }
            for vm in order {
                harness.start_vm(vm)?;
            }
        }
        harness.pump();
        Ok(harness)
    }

    fn vm_index(&self, plugin: usize, thread: usize) -> usize {
        plugin * self.threads + thread
    }

    fn start_vm(&mut self, vm: usize) -> Result<(), HarnessError> {
        let before = self.traps.len();
        let fail = |harness: &Harness, what: &str| {
            let trap = harness
                .traps
                .get(before)
                .map(|t| t.message.clone())
                .unwrap_or_default();
            HarnessError(format!("{what} trapped: {trap}"))
        };
        if self.has_export(vm, "_initialize") {
            self.call(vm, "_initialize", &[], None);
            if self.traps.len() > before {
                return Err(fail(self, "_initialize"));
            }
            if self.has_export(vm, "main") {
                self.call(vm, "main", &[0, 0], None);
            }
        } else if self.has_export(vm, "_start") {
            self.call(vm, "_start", &[], None);
        }
        if self.traps.len() > before {
            return Err(fail(self, "start"));
        }
        let plugin = &self.plugins[self.vms[vm].plugin];
        let vm_config_size = plugin.vm_config.len() as i32;
        let config_size = plugin.config.len() as i32;
        self.call(vm, "proxy_on_context_create", &[1, 0], None);
        let started = self.call(vm, "proxy_on_vm_start", &[1, vm_config_size], None);
        if self.traps.len() > before {
            return Err(fail(self, "proxy_on_vm_start"));
        }
        if started == Some(0) {
            return Err(HarnessError(format!(
                "proxy_on_vm_start returned false{}",
                self.recent_errors()
            )));
        }
        self.vms[vm].store.data_mut().in_configure = true;
        let configured = self.call(vm, "proxy_on_configure", &[1, config_size], None);
        self.vms[vm].store.data_mut().in_configure = false;
        if self.traps.len() > before {
            return Err(fail(self, "proxy_on_configure"));
        }
        if configured == Some(0) {
            return Err(HarnessError(format!(
                "proxy_on_configure returned false: the configuration was rejected{}",
                self.recent_errors()
            )));
        }
        Ok(())
    }

    fn recent_errors(&self) -> String {
        let shared = self.shared.borrow();
        let errors: Vec<&str> = shared
            .logs
            .iter()
            .filter(|l| l.level == "error" || l.level == "critical")
            .map(|l| l.message.as_str())
            .collect();
        if errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", errors.join("; "))
        }
    }

    fn has_export(&mut self, vm: usize, name: &str) -> bool {
        self.func(vm, name).is_some()
    }

    fn func(&mut self, vm: usize, name: &str) -> Option<Func> {
        let v = &mut self.vms[vm];
        if let Some(found) = v.funcs.get(name) {
            return *found;
        }
        let found = v.instance.get_func(&mut v.store, name);
        v.funcs.insert(name.to_string(), found);
        found
    }

    /// Calls an export; `None` when it is missing or trapped. Attributes instructions and traps.
    fn call(
        &mut self,
        vm: usize,
        name: &str,
        args: &[i32],
        stream: Option<StreamId>,
    ) -> Option<i32> {
        if self.vms[vm].failed {
            return None;
        }
        let func = self.func(vm, name)?;
        let fuel = self.options.fuel_per_callback;
        let v = &mut self.vms[vm];
        let ty = func.ty(&v.store);
        let params: Vec<Val> = args
            .iter()
            .take(ty.params().len())
            .map(|a| Val::I32(*a))
            .collect();
        let mut results = vec![Val::I32(0); ty.results().len()];
        let recording = match self.options.profile {
            Some(crate::profile::ProfileScope::Everything) => true,
            Some(crate::profile::ProfileScope::Streams) => stream.is_some(),
            None => false,
        };
        {
            let state = v.store.data_mut();
            state.current_context = args.first().copied().unwrap_or(0) as u32;
            state.effective_context = 0;
            state.stop_iteration = false;
            if let Some(recorder) = state.profile.as_mut() {
                recorder.begin(fuel, recording);
            }
        }
        v.store.set_fuel(fuel).ok();
        let outcome = func.call(&mut v.store, &params, &mut results);
        let remaining = v.store.get_fuel().unwrap_or(0);
        let mut spent = fuel - remaining;
        if let Some(recorder) = v.store.data_mut().profile.as_mut() {
            // The profiler's hooks are not the module's instructions.
            spent = spent.saturating_sub(recorder.end(remaining));
            if recorder.recording() {
                recorder.count_callback(name, spent);
            }
        }
        let stop = std::mem::take(&mut v.store.data_mut().stop_iteration);
        match stream {
            Some(id) => {
                let result = &mut self.streams[id].result;
                result.instructions += spent;
                result.callbacks.push((name.to_string(), spent));
            }
            None => self.startup_instructions[vm] += spent,
        }
        self.collect(vm);
        match outcome {
            Ok(()) => {
                let value = match results.first() {
                    Some(Val::I32(v)) => *v,
                    Some(Val::I64(v)) => *v as i32,
                    _ => 0,
                };
                Some(if stop && value == 0 { 1 } else { value })
            }
            Err(error) => {
                self.traps.push(TrapRecord {
                    worker: vm,
                    callback: name.to_string(),
                    message: format!("{error:?}"),
                });
                self.vms[vm].failed = true;
                // Every stream of the failed VM is failed by the policy.
                let affected: Vec<StreamId> = (0..self.streams.len())
                    .filter(|id| {
                        !self.streams[*id].finished
                            && self.streams[*id].slots.iter().any(|slot| slot.vm == vm)
                    })
                    .collect();
                for id in affected {
                    self.fail_stream(id, vm);
                }
                None
            }
        }
    }

    /// Moves what the last callback produced into the harness: deferred stream actions, new HTTP
    /// and gRPC calls, what the filter did to its gRPC streams.
    fn collect(&mut self, vm: usize) {
        let state = self.vms[vm].store.data_mut();
        let deferred: Vec<Deferred> = state.deferred.drain(..).collect();
        let calls: Vec<host::NewHttpCall> = state.new_http_calls.drain(..).collect();
        let grpc_calls: Vec<host::NewGrpcCall> = state.new_grpc_calls.drain(..).collect();
        let grpc_actions: Vec<host::GrpcAction> = state.grpc_actions.drain(..).collect();
        for action in deferred {
            self.actions.push_back((vm, action));
        }
        for call in calls {
            let stream = self.stream_of(vm, call.origin_context).map(|(id, _)| id);
            let record = HttpCallRecord {
                cluster: call.cluster.clone(),
                headers: call.headers.clone(),
                body: call.body.clone(),
                timeout_ms: call.timeout_ms,
                token: call.token,
            };
            match stream {
                Some(id) => self.streams[id].result.http_calls.push(record),
                None => self.root_http_calls.push(record),
            }
            let answer = self.answers.get(&call.cluster).cloned();
            let now = self.now_ns();
            let due_ns = answer.as_ref().map(|a| {
                let delay = if call.timeout_ms > 0 {
                    a.delay_ms.min(call.timeout_ms)
                } else {
                    a.delay_ms
                };
                now + delay * 1_000_000
            });
            let answer = answer.map(|a| {
                if call.timeout_ms > 0 && a.delay_ms > call.timeout_ms {
                    HttpAnswer {
                        response: Message::status(504).body("upstream request timeout"),
                        delay_ms: call.timeout_ms,
                        reset: false,
                    }
                } else {
                    a
                }
            });
            self.pending_calls.push(PendingCall {
                vm,
                token: call.token,
                stream,
                due_ns,
                answer,
            });
        }
        for call in grpc_calls {
            let stream = self.stream_of(vm, call.origin_context).map(|(id, _)| id);
            let is_stream = call.message.is_none();
            let record = GrpcCallRecord {
                cluster: call.cluster.clone(),
                service: call.service.clone(),
                method: call.method.clone(),
                initial_metadata: call.initial_metadata.clone(),
                messages: call.message.clone().into_iter().collect(),
                timeout_ms: call.timeout_ms,
                stream: is_stream,
                closed: false,
                token: call.token,
            };
            let index = match stream {
                Some(id) => {
                    let calls = &mut self.streams[id].result.grpc_calls;
                    calls.push(record);
                    calls.len() - 1
                }
                None => {
                    self.root_grpc_calls.push(record);
                    self.root_grpc_calls.len() - 1
                }
            };
            let now = self.now_ns();
            let known = self.shared.borrow().clusters.contains(&call.cluster);
            let declared = self.grpc_answers.get(&call.cluster).cloned();
            let (answer, due_ns) = match (known, declared) {
                // A cluster that does not exist (a GrpcService naming it): the call fails.
                (false, _) => (
                    GrpcAnswer {
                        status: crate::abi::GRPC_UNAVAILABLE,
                        status_message: format!("cluster {} not found", call.cluster),
                        ..GrpcAnswer::default()
                    },
                    Some(now),
                ),
                (true, None) => (GrpcAnswer::default(), None),
                (true, Some(answer)) if !is_stream => {
                    if call.timeout_ms > 0 && answer.delay_ms > call.timeout_ms {
                        (
                            // Envoy's async client answers a timeout as UNAVAILABLE.
                            GrpcAnswer {
                                status: crate::abi::GRPC_UNAVAILABLE,
                                status_message: "upstream request timeout{response_timeout}".into(),
                                delay_ms: call.timeout_ms,
                                ..GrpcAnswer::default()
                            },
                            Some(now + call.timeout_ms * 1_000_000),
                        )
                    } else {
                        let due = now + answer.delay_ms * 1_000_000;
                        (via_upstream(answer), Some(due))
                    }
                }
                (true, Some(answer)) => (via_upstream(answer), None),
            };
            self.grpc_records.insert((vm, call.token), (stream, index));
            self.pending_grpc.push(PendingGrpc {
                vm,
                token: call.token,
                stream,
                due_ns,
                answer,
                is_stream,
            });
        }
        for action in grpc_actions {
            let token = match &action {
                host::GrpcAction::Send { token, .. }
                | host::GrpcAction::Close { token }
                | host::GrpcAction::Cancel { token } => *token,
            };
            let Some(&(record_stream, record_index)) = self.grpc_records.get(&(vm, token)) else {
                continue;
            };
            let record = match record_stream {
                Some(id) => &mut self.streams[id].result.grpc_calls[record_index],
                None => &mut self.root_grpc_calls[record_index],
            };
            let answered = self.grpc_answers.contains_key(&record.cluster);
            let pending = self
                .pending_grpc
                .iter()
                .position(|p| p.vm == vm && p.token == token);
            // A stream's answer comes `delay_ms` after its first message, or its close.
            let arm = match action {
                host::GrpcAction::Send {
                    message,
                    end_stream,
                    ..
                } => {
                    record.messages.push(message);
                    record.closed |= end_stream;
                    true
                }
                host::GrpcAction::Close { .. } => {
                    record.closed = true;
                    true
                }
                host::GrpcAction::Cancel { .. } => {
                    record.closed = true;
                    if let Some(index) = pending {
                        self.pending_grpc.remove(index);
                    }
                    false
                }
            };
            if let (true, true, Some(index)) = (arm, answered, pending) {
                let now = self.now_ns();
                let pending = &mut self.pending_grpc[index];
                if pending.due_ns.is_none() {
                    pending.due_ns = Some(now + pending.answer.delay_ms * 1_000_000);
                }
            }
        }
    }

    /// The stream (not yet finished) one of whose filters is `context` on `vm`.
    fn stream_of(&self, vm: usize, context: u32) -> Option<(StreamId, usize)> {
        self.streams.iter().enumerate().find_map(|(id, s)| {
            if s.finished {
                return None;
            }
            s.slots
                .iter()
                .position(|slot| slot.vm == vm && slot.context == context)
                .map(|slot| (id, slot))
        })
    }

    /// Applies deferred actions and queue notifications until none is left.
    fn pump(&mut self) {
        loop {
            let ready: Vec<(usize, u32, u32)> =
                self.shared.borrow_mut().queue_ready.drain(..).collect();
            for (vm, context, token) in ready {
                self.call(
                    vm,
                    "proxy_on_queue_ready",
                    &[context as i32, token as i32],
                    None,
                );
            }
            let Some((vm, action)) = self.actions.pop_front() else {
                if self.shared.borrow().queue_ready.is_empty() {
                    return;
                }
                continue;
            };
            match action {
                Deferred::Continue { context, response } => {
                    let Some((id, slot)) = self.stream_of(vm, context) else {
                        continue;
                    };
                    let direction = if response {
                        Direction::Response
                    } else {
                        Direction::Request
                    };
                    self.resume(id, slot, direction);
                }
                Deferred::Close { context, .. } => {
                    let Some((id, _)) = self.stream_of(vm, context) else {
                        continue;
                    };
                    self.reset(id, "wasm_close_stream");
                }
                Deferred::LocalReply {
                    context,
                    status,
                    body,
                    headers,
                    details,
                    grpc_status,
                } => {
                    let Some((id, _)) = self.stream_of(vm, context) else {
                        continue;
                    };
                    self.local_reply(id, status, body, headers, details, grpc_status);
                }
            }
        }
    }

    /// The current virtual time, nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> u64 {
        self.shared.borrow().now_ns
    }

    /// How a cluster answers HTTP calls from now on (and makes it a known cluster).
    pub fn answer_http_calls(&mut self, cluster: &str, answer: HttpAnswer) {
        self.declare_cluster(cluster);
        self.answers.insert(cluster.to_string(), answer);
    }

    /// How a cluster answers gRPC calls and streams from now on (and makes it a known cluster).
    pub fn answer_grpc_calls(&mut self, cluster: &str, answer: GrpcAnswer) {
        self.declare_cluster(cluster);
        self.grpc_answers.insert(cluster.to_string(), answer);
    }

    fn declare_cluster(&mut self, cluster: &str) {
        let mut shared = self.shared.borrow_mut();
        if !shared.clusters.iter().any(|c| c == cluster) {
            shared.clusters.push(cluster.to_string());
        }
    }

    /// Starts a stream on a worker: the request goes through the filters as far as they let it.
    pub fn start_stream(
        &mut self,
        worker: usize,
        properties: Option<&Json>,
        request: Message,
    ) -> StreamId {
        self.start_stream_inner(worker, properties, request, None)
    }

    /// A message as frames: headers, the body in chunks, trailers.
    fn frames(&self, message: &Message) -> VecDeque<Frame> {
        let mut frames = VecDeque::new();
        let has_trailers = !message.trailers.is_empty();
        frames.push_back(Frame::Headers {
            end: message.body.is_empty() && !has_trailers,
        });
        let chunk = self.options.body_chunk_bytes.max(1);
        let chunks: Vec<&[u8]> = message.body.chunks(chunk).collect();
        for (index, bytes) in chunks.iter().enumerate() {
            frames.push_back(Frame::Data {
                bytes: bytes.to_vec(),
                end: index + 1 == chunks.len() && !has_trailers,
            });
        }
        if has_trailers {
            frames.push_back(Frame::Trailers);
        }
        frames
    }

    fn start_stream_inner(
        &mut self,
        worker: usize,
        properties: Option<&Json>,
        request: Message,
        upstream_answer: Option<(Message, u64)>,
    ) -> StreamId {
        let worker = worker.min(self.workers - 1);
        let id = self.streams.len();
        let maps = Rc::new(RefCell::new(host::StreamMaps {
            request_headers: request.headers.clone(),
            request_trailers: request.trailers.clone(),
            properties: properties
                .map(properties::attributes_from_json)
                .unwrap_or_default(),
            ..host::StreamMaps::default()
        }));
        let mut slots = Vec::new();
        for plugin in 0..self.plugins.len() {
            let vm = self.vm_index(plugin, worker);
            let context = self.vms[vm].next_context;
            self.vms[vm].next_context += 1;
            slots.push(Slot {
                vm,
                context,
                created: false,
                started: false,
                bypass: false,
                request: Lane::default(),
                response: Lane::default(),
            });
        }
        let request_source = self.frames(&request);
        self.streams.push(StreamState {
            worker,
            slots,
            maps,
            request_source,
            response_source: VecDeque::new(),
            upstream: None,
            sent_upstream: false,
            response_started: false,
            downstream: None,
            replied: false,
            finished: false,
            upstream_answer,
            result: StreamResult::default(),
        });
        // A VM that failed before the stream: the failure policy decides at once.
        for slot in 0..self.plugins.len() {
            let vm = self.streams[id].slots[slot].vm;
            if self.vms[vm].failed {
                self.fail_stream(id, vm);
            }
        }
        self.drive(id);
        self.pump();
        id
    }

    /// Creates the filter's context in its VM (Envoy does it when the request headers reach the
    /// filter, or at `on_log` for a filter they never reached).
    fn create_context(&mut self, id: StreamId, slot: usize) {
        let (vm, context) = {
            let s = &mut self.streams[id].slots[slot];
            if s.created {
                return;
            }
            s.created = true;
            (s.vm, s.context)
        };
        let data = StreamData {
            maps: self.streams[id].maps.clone(),
            ..StreamData::default()
        };
        self.vms[vm].store.data_mut().streams.insert(context, data);
        let root = self.vms[vm].store.data().root_context_id as i32;
        self.call(
            vm,
            "proxy_on_context_create",
            &[context as i32, root],
            Some(id),
        );
    }

    fn slot_data(&mut self, id: StreamId, slot: usize) -> Option<&mut StreamData> {
        let (vm, context) = {
            let s = &self.streams[id].slots[slot];
            (s.vm, s.context)
        };
        self.vms[vm].store.data_mut().streams.get_mut(&context)
    }

    fn lane(&mut self, id: StreamId, slot: usize, direction: Direction) -> &mut Lane {
        let s = &mut self.streams[id].slots[slot];
        match direction {
            Direction::Request => &mut s.request,
            Direction::Response => &mut s.response,
        }
    }

    /// Filters in the order a direction visits them.
    fn order(&self, id: StreamId, direction: Direction) -> Vec<usize> {
        let n = self.streams[id].slots.len();
        match direction {
            Direction::Request => (0..n).collect(),
            Direction::Response => (0..n).rev().collect(),
        }
    }

    /// Whether a direction still runs.
    fn live(&self, id: StreamId, direction: Direction) -> bool {
        let s = &self.streams[id];
        !s.finished && (direction == Direction::Response || !s.replied)
    }

    /// Moves frames through the filters until nothing can move.
    fn drive(&mut self, id: StreamId) {
        for direction in [Direction::Request, Direction::Response] {
            while self.live(id, direction) && self.step(id, direction) {}
        }
    }

    /// Moves one frame one filter further; false when nothing could move. As in Envoy, an event
    /// goes through the whole chain before the next one arrives: the filter furthest along
    /// goes first, and the source delivers its next frame only when no filter can move.
    fn step(&mut self, id: StreamId, direction: Direction) -> bool {
        let order = self.order(id, direction);
        for (position, &slot) in order.iter().enumerate().rev() {
            let next = order.get(position + 1).copied();
            let limit = self.options.buffer_limit_bytes;
            let lane = self.lane(id, slot, direction);
            if let Some(limited) = lane.stopped_all {
                if limited && lane.input_body_len() > limit {
                    self.too_large(id, direction);
                    return false;
                }
                continue;
            }
            let Some(mut frame) = lane.input.pop_front() else {
                continue;
            };
            // What arrived while the filter stopped reaches it as one chunk (Envoy's buffer).
            if let Frame::Data { bytes, end } = &mut frame {
                while let Some(Frame::Data { .. }) = lane.input.front() {
                    if let Some(Frame::Data {
                        bytes: more,
                        end: last,
                    }) = lane.input.pop_front()
                    {
                        bytes.extend_from_slice(&more);
                        *end = last;
                    }
                }
            }
            self.process(id, slot, next, direction, frame);
            // Envoy runs what the callback deferred (a local reply, a continue) as soon as the
            // VM call returns, before the event goes further.
            self.pump();
            return true;
        }
        let Some(&first) = order.first() else {
            return false;
        };
        let s = &mut self.streams[id];
        let source = match direction {
            Direction::Request => &mut s.request_source,
            Direction::Response => &mut s.response_source,
        };
        match source.pop_front() {
            Some(frame) => {
                self.lane(id, first, direction).input.push_back(frame);
                true
            }
            None => false,
        }
    }

    /// Passes a frame to the filter after `slot` (or out of the chain).
    fn forward(&mut self, id: StreamId, next: Option<usize>, direction: Direction, frame: Frame) {
        match next {
            Some(next) => self.lane(id, next, direction).input.push_back(frame),
            None => match direction {
                Direction::Request => self.leave_for_upstream(id, frame),
                Direction::Response => self.leave_for_client(id, frame),
            },
        }
    }

    /// One filter's callback for one frame, and what its answer does to the frame.
    fn process(
        &mut self,
        id: StreamId,
        slot: usize,
        next: Option<usize>,
        direction: Direction,
        frame: Frame,
    ) {
        let bypass = {
            let s = &self.streams[id].slots[slot];
            s.bypass || self.vms[s.vm].failed || (direction == Direction::Response && !s.started)
        };
        if bypass {
            self.forward(id, next, direction, frame);
            return;
        }
        let (vm, context) = {
            let s = &self.streams[id].slots[slot];
            (s.vm, s.context as i32)
        };
        let response = direction == Direction::Response;
        match frame {
            Frame::Headers { end } => {
                if !response {
                    self.create_context(id, slot);
                    self.streams[id].slots[slot].started = true;
                }
                if let Some(data) = self.slot_data(id, slot) {
                    data.set_open(response, true);
                }
                let n = self.streams[id].maps.borrow().headers(response).len() as i32;
                let callback = if response {
                    "proxy_on_response_headers"
                } else {
                    "proxy_on_request_headers"
                };
                let r = self.call(vm, callback, &[context, n, end as i32], Some(id));
                if !self.live(id, direction) {
                    return;
                }
                let frame = Frame::Headers { end };
                match r.unwrap_or(0) {
                    // Continue, ContinueAndEndStream.
                    0 | 2 => {
                        self.close_maps(id, slot, direction);
                        self.forward(id, next, direction, frame);
                    }
                    // StopAllIterationAndBuffer.
                    3 => {
                        let lane = self.lane(id, slot, direction);
                        lane.stopped_all = Some(true);
                        lane.held.push(frame);
                    }
                    // StopIteration becomes StopAllIterationAndWatermark (proxy-wasm-cpp-host).
                    _ => {
                        let lane = self.lane(id, slot, direction);
                        lane.stopped_all = Some(false);
                        lane.held.push(frame);
                    }
                }
            }
            Frame::Data { bytes, end } => {
                // A filter that buffers sees everything it buffered so far.
                let held = {
                    let lane = self.lane(id, slot, direction);
                    let position = lane
                        .held
                        .iter()
                        .position(|f| matches!(f, Frame::Data { .. }));
                    position.map(|p| lane.held.remove(p))
                };
                let buffered = match held {
                    // What the filter's buffer holds now (it may have changed it meanwhile).
                    Some(Frame::Data { bytes: kept, .. }) => Some(
                        self.slot_data(id, slot)
                            .map(|data| data.body(response).clone())
                            .unwrap_or(kept),
                    ),
                    _ => None,
                };
                let mut body = match buffered {
                    Some(mut kept) => {
                        kept.extend_from_slice(&bytes);
                        kept
                    }
                    None => bytes,
                };
                let length = body.len() as i32;
                if let Some(data) = self.slot_data(id, slot) {
                    *data.body(response) = std::mem::take(&mut body);
                    data.set_open(response, true);
                }
                let callback = if response {
                    "proxy_on_response_body"
                } else {
                    "proxy_on_request_body"
                };
                let r = self.call(vm, callback, &[context, length, end as i32], Some(id));
                if !self.live(id, direction) {
                    return;
                }
                // The body as the filter left it; while it holds the body, the filter's buffer
                // stays readable and writable (a callout answer may rewrite it).
                let body = self
                    .slot_data(id, slot)
                    .map(|data| data.body(response).clone())
                    .unwrap_or_default();
                let frame = Frame::Data { bytes: body, end };
                match r.unwrap_or(0) {
                    0 => {
                        self.close_maps(id, slot, direction);
                        self.release(id, slot, next, direction);
                        self.forward(id, next, direction, frame);
                    }
                    // StopIterationAndBuffer: held against the buffer limit.
                    1 => {
                        let limit = self.options.buffer_limit_bytes;
                        let lane = self.lane(id, slot, direction);
                        lane.limited = true;
                        lane.held.insert(0, frame);
                        if lane.held_body_len() > limit {
                            self.too_large(id, direction);
                        }
                    }
                    // StopIterationAndWatermark, StopIterationNoBuffer.
                    _ => {
                        let lane = self.lane(id, slot, direction);
                        lane.limited = false;
                        lane.held.insert(0, frame);
                    }
                }
            }
            Frame::Trailers => {
                if let Some(data) = self.slot_data(id, slot) {
                    data.set_open(response, true);
                }
                let n = self.streams[id].maps.borrow().trailers(response).len() as i32;
                let callback = if response {
                    "proxy_on_response_trailers"
                } else {
                    "proxy_on_request_trailers"
                };
                let r = self.call(vm, callback, &[context, n], Some(id));
                if !self.live(id, direction) {
                    return;
                }
                if r.unwrap_or(0) == 0 {
                    self.close_maps(id, slot, direction);
                    self.release(id, slot, next, direction);
                    self.forward(id, next, direction, Frame::Trailers);
                } else {
                    self.lane(id, slot, direction).held.push(Frame::Trailers);
                }
            }
        }
    }

    /// Envoy forgets a filter's maps and buffers once it lets the direction continue.
    fn close_maps(&mut self, id: StreamId, slot: usize, direction: Direction) {
        let response = direction == Direction::Response;
        if let Some(data) = self.slot_data(id, slot) {
            data.set_open(response, false);
            data.body(response).clear();
        }
    }

    /// Lets through what a filter held (its buffered body, held trailers).
    fn release(&mut self, id: StreamId, slot: usize, next: Option<usize>, direction: Direction) {
        let held = std::mem::take(&mut self.lane(id, slot, direction).held);
        let trailers_follow = held.iter().any(|f| matches!(f, Frame::Trailers));
        for frame in held {
            let frame = match frame {
                Frame::Data { bytes, end } => Frame::Data {
                    bytes,
                    end: end && !trailers_follow,
                },
                other => other,
            };
            self.forward(id, next, direction, frame);
        }
    }

    /// `proxy_continue_stream`: the filter lets what it held go on.
    fn resume(&mut self, id: StreamId, slot: usize, direction: Direction) {
        if !self.live(id, direction) {
            return;
        }
        let order = self.order(id, direction);
        let position = order.iter().position(|s| *s == slot).unwrap_or(0);
        let next = order.get(position + 1).copied();
        let held_body = {
            let lane = self.lane(id, slot, direction);
            lane.stopped_all = None;
            lane.held.iter().find_map(|f| match f {
                Frame::Data { .. } => Some(()),
                _ => None,
            })
        };
        // A buffered body goes on as the filter left it in its buffer.
        if held_body.is_some() {
            let response = direction == Direction::Response;
            let body = self
                .slot_data(id, slot)
                .map(|data| data.body(response).clone());
            if let Some(body) = body {
                let lane = self.lane(id, slot, direction);
                for frame in lane.held.iter_mut() {
                    if let Frame::Data { bytes, .. } = frame {
                        *bytes = body.clone();
                    }
                }
            }
        }
        self.close_maps(id, slot, direction);
        self.release(id, slot, next, direction);
        self.drive(id);
    }

    /// A frame leaves the chain towards the upstream. Envoy's router opens the upstream request
    /// with the headers, but an application sees a request once it is complete: a request
    /// answered locally before its end (413, a decision on the body) never reached it. The
    /// upstream answers once the request is complete.
    fn leave_for_upstream(&mut self, id: StreamId, frame: Frame) {
        let s = &mut self.streams[id];
        let maps = s.maps.borrow();
        let upstream = s.upstream.get_or_insert_with(Message::default);
        let end = append_frame(
            upstream,
            frame,
            &maps.request_headers,
            &maps.request_trailers,
        );
        drop(maps);
        if end {
            s.result.upstream_request = s.upstream.clone();
            self.send_upstream(id);
        }
    }

    /// A frame leaves the chain towards the client.
    fn leave_for_client(&mut self, id: StreamId, frame: Frame) {
        let s = &mut self.streams[id];
        let maps = s.maps.borrow();
        let downstream = s.downstream.get_or_insert_with(Message::default);
        let end = append_frame(
            downstream,
            frame,
            &maps.response_headers,
            &maps.response_trailers,
        );
        drop(maps);
        if end {
            let response = s.downstream.clone();
            s.result.downstream_response = response;
            self.finish(id);
        }
    }

    fn send_upstream(&mut self, id: StreamId) {
        let s = &mut self.streams[id];
        if s.sent_upstream {
            return;
        }
        s.sent_upstream = true;
        if let Some((answer, delay_ms)) = s.upstream_answer.take() {
            if delay_ms == 0 {
                self.respond_inner(id, answer);
            } else {
                let due = self.now_ns() + delay_ms * 1_000_000;
                self.streams[id].upstream_answer = Some((answer, delay_ms));
                self.upstream_due.push((id, due));
            }
        }
    }

    /// Answers a stream as its upstream: the response goes through the filters (in reverse
    /// order), then the stream ends (`on_log`, `on_done`, `on_delete`) unless a filter holds it.
    pub fn respond(&mut self, id: StreamId, response: Message) {
        self.respond_inner(id, response);
        self.pump();
    }

    fn respond_inner(&mut self, id: StreamId, response: Message) {
        let frames = self.frames(&response);
        let s = &mut self.streams[id];
        if s.finished || !s.sent_upstream || s.response_started || s.replied {
            return;
        }
        s.response_started = true;
        {
            let mut maps = s.maps.borrow_mut();
            maps.response_headers = response.headers;
            maps.response_trailers = response.trailers;
        }
        s.response_source = frames;
        self.drive(id);
    }

    /// A body buffered beyond the connection's limit (Envoy's `requestDataTooLarge` /
    /// `responseDataTooLarge`).
    fn too_large(&mut self, id: StreamId, direction: Direction) {
        match direction {
            Direction::Request => self.local_reply(
                id,
                413,
                b"Payload Too Large".to_vec(),
                Vec::new(),
                PAYLOAD_TOO_LARGE.into(),
                None,
            ),
            Direction::Response => self.local_reply(
                id,
                500,
                b"Internal Server Error".to_vec(),
                Vec::new(),
                RESPONSE_TOO_LARGE.into(),
                None,
            ),
        }
    }

    /// Envoy's `sendLocalReply`: through the filters' response callbacks while no response has
    /// started; straight to the client once one has but no headers went out; a reset after.
    fn local_reply(
        &mut self,
        id: StreamId,
        status: u32,
        body: Vec<u8>,
        extra: Pairs,
        details: String,
        grpc_status: Option<u32>,
    ) {
        let s = &mut self.streams[id];
        if s.finished {
            return;
        }
        if s.downstream.is_some() {
            self.reset(id, &details);
            return;
        }
        let is_grpc = {
            let maps = s.maps.borrow();
            headers::get(&maps.request_headers, b"content-type").is_some_and(|value| {
                value.starts_with(b"application/grpc")
                    && matches!(value.get(16), None | Some(b'+') | Some(b';'))
            })
        };
        let (headers_out, body) = local_reply_message(status, body, &extra, grpc_status, is_grpc);
        s.result.local_reply = Some(LocalReply {
            status: if is_grpc { 200 } else { status },
            headers: headers_out.clone(),
            body: body.clone(),
            details,
        });
        let message = Message {
            headers: headers_out,
            body,
            trailers: Vec::new(),
        };
        let through_filters = !s.response_started;
        s.replied = true;
        s.response_started = true;
        for slot in &mut s.slots {
            slot.request = Lane::default();
            slot.response = Lane::default();
        }
        s.request_source.clear();
        let vms: Vec<(usize, u32)> = s.slots.iter().map(|slot| (slot.vm, slot.context)).collect();
        for (vm, context) in vms {
            if let Some(data) = self.vms[vm].store.data_mut().streams.get_mut(&context) {
                data.request_open = false;
            }
        }
        let frames = self.frames(&message);
        let s = &mut self.streams[id];
        if through_filters {
            {
                let mut maps = s.maps.borrow_mut();
                maps.response_headers = message.headers.clone();
                maps.response_trailers.clear();
            }
            s.response_source = frames;
            self.drive(id);
        } else {
            s.response_source.clear();
            s.result.downstream_response = Some(message);
            self.finish(id);
        }
    }

    /// The stream is reset towards the client.
    fn reset(&mut self, id: StreamId, details: &str) {
        let s = &mut self.streams[id];
        if s.finished {
            return;
        }
        s.result.downstream_reset = Some(details.to_string());
        s.result.downstream_response = None;
        self.finish(id);
    }

    /// Envoy's failure policy for a stream whose VM failed: fail open lets the stream pass that
    /// filter; fail closed answers 503.
    fn fail_stream(&mut self, id: StreamId, vm: usize) {
        if self.streams[id].finished {
            return;
        }
        let plugin = self.vms[vm].plugin;
        if self.plugins[plugin].fail_open {
            if let Some(slot) = self.streams[id].slots.iter_mut().find(|s| s.vm == vm) {
                slot.bypass = true;
                // What the filter held goes on.
                let held_request = std::mem::take(&mut slot.request.held);
                let held_response = std::mem::take(&mut slot.response.held);
                slot.request.stopped_all = None;
                slot.response.stopped_all = None;
                for frame in held_request.into_iter().rev() {
                    slot.request.input.push_front(frame);
                }
                for frame in held_response.into_iter().rev() {
                    slot.response.input.push_front(frame);
                }
            }
        } else {
            let s = &mut self.streams[id];
            if s.downstream.is_some() {
                self.reset(id, "wasm_fail_stream");
                return;
            }
            // Straight to the client: the failed filter cannot run.
            s.response_started = true;
            self.local_reply(
                id,
                503,
                Vec::new(),
                Vec::new(),
                "wasm_fail_stream".into(),
                None,
            );
        }
    }

    /// The stream ends: every filter's `on_log` (in chain order; a filter the request never
    /// reached gets its context created first, as Envoy does), then `on_done` and `on_delete`.
    fn finish(&mut self, id: StreamId) {
        let s = &mut self.streams[id];
        if s.finished {
            return;
        }
        s.finished = true;
        s.result.complete = true;
        let slots = s.slots.len();
        for slot in 0..slots {
            let vm = self.streams[id].slots[slot].vm;
            if self.vms[vm].failed {
                continue;
            }
            self.create_context(id, slot);
            let context = self.streams[id].slots[slot].context as i32;
            if let Some(data) = self.slot_data(id, slot) {
                data.request_open = false;
                data.response_open = false;
                data.access_log = true;
            }
            self.call(vm, "proxy_on_log", &[context], Some(id));
        }
        for slot in 0..slots {
            let (vm, context) = {
                let s = &self.streams[id].slots[slot];
                (s.vm, s.context)
            };
            self.call(vm, "proxy_on_done", &[context as i32], Some(id));
            self.call(vm, "proxy_on_delete", &[context as i32], Some(id));
            self.vms[vm].store.data_mut().streams.remove(&context);
        }
        self.pending_calls
            .retain(|call| call.stream != Some(id) || call.due_ns.is_some());
    }

    /// Moves virtual time forward: ticks fire, delayed HTTP and gRPC answers and upstream
    /// responses arrive, in time order.
    pub fn advance(&mut self, ms: u64) {
        let target = self.now_ns() + ms * 1_000_000;
        while let Some((due, event)) = self.next_event(Some(target)) {
            self.fire(due, event);
        }
        self.set_now(target);
    }

    fn set_now(&mut self, now: u64) {
        let mut shared = self.shared.borrow_mut();
        if now > shared.now_ns {
            shared.monotonic_ns += now - shared.now_ns;
            shared.now_ns = now;
        }
    }

    fn next_event(&mut self, limit: Option<u64>) -> Option<(u64, Event)> {
        let mut best: Option<(u64, Event)> = None;
        let mut consider = |due: u64, event: Event| {
            if limit.is_some_and(|l| due > l) {
                return;
            }
            if best.as_ref().is_none_or(|(b, _)| due < *b) {
                best = Some((due, event));
            }
        };
        for (index, vm) in self.vms.iter().enumerate() {
            if let (false, true, Some(due)) = (vm.failed, vm.ticks, vm.store.data().next_tick_ns) {
                consider(due, Event::Tick(index));
            }
        }
        for (index, call) in self.pending_calls.iter().enumerate() {
            if let Some(due) = call.due_ns {
                consider(due, Event::HttpCall(index));
            }
        }
        for (index, call) in self.pending_grpc.iter().enumerate() {
            if let Some(due) = call.due_ns {
                consider(due, Event::Grpc(index));
            }
        }
        for (id, due) in &self.upstream_due {
            consider(*due, Event::Upstream(*id));
        }
        best
    }

    fn fire(&mut self, due: u64, event: Event) {
        self.set_now(due);
        match event {
            Event::Tick(vm) => {
                let state = self.vms[vm].store.data_mut();
                let period = state.tick_period_ms * 1_000_000;
                state.next_tick_ns = Some(due + period.max(1));
                let root = state.root_context_id as i32;
                self.call(vm, "proxy_on_tick", &[root], None);
            }
            Event::HttpCall(index) => {
                let call = self.pending_calls.remove(index);
                let answer = call.answer.unwrap_or_default();
                self.deliver_http_call(call.vm, call.token, call.stream, answer);
            }
            Event::Grpc(index) => {
                let call = self.pending_grpc.remove(index);
                self.deliver_grpc(call);
            }
            Event::Upstream(id) => {
                self.upstream_due.retain(|(stream, _)| *stream != id);
                if let Some((answer, _)) = self.streams[id].upstream_answer.take() {
                    self.respond_inner(id, answer);
                }
            }
        }
        self.pump();
    }

    fn deliver_http_call(
        &mut self,
        vm: usize,
        token: u32,
        stream: Option<StreamId>,
        answer: HttpAnswer,
    ) {
        let state = self.vms[vm].store.data_mut();
        let root = state.root_context_id as i32;
        let (n_headers, body_len, n_trailers) = if answer.reset {
            state.status = (
                crate::abi::Status::BrokenConnection as u32,
                b"reset".to_vec(),
            );
            state.http_call_response = Some(HttpCallResponse {
                headers: Vec::new(),
                body: Vec::new(),
                trailers: Vec::new(),
            });
            (0, 0, 0)
        } else {
            let response = &answer.response;
            state.http_call_response = Some(HttpCallResponse {
                headers: response.headers.clone(),
                body: response.body.clone(),
                trailers: response.trailers.clone(),
            });
            (
                response.headers.len(),
                response.body.len(),
                response.trailers.len(),
            )
        };
        let attribution = stream.filter(|id| !self.streams[*id].finished);
        self.call(
            vm,
            "proxy_on_http_call_response",
            &[
                root,
                token as i32,
                n_headers as i32,
                body_len as i32,
                n_trailers as i32,
            ],
            attribution,
        );
        let state = self.vms[vm].store.data_mut();
        state.http_call_response = None;
        state.status = (0, Vec::new());
    }

    /// A gRPC answer arrives. A call: `on_grpc_receive` with its message when the status is OK,
    /// else `on_grpc_close` with the status (Envoy's `onSuccessRaw` / `onFailure`). A stream:
    /// initial metadata, each message, trailing metadata, then `on_grpc_close`.
    fn deliver_grpc(&mut self, call: PendingGrpc) {
        let vm = call.vm;
        let token = call.token as i32;
        let root = self.vms[vm].store.data().root_context_id as i32;
        let attribution = call.stream.filter(|id| !self.streams[*id].finished);
        let answer = call.answer;
        let open = |harness: &Harness| {
            let state = harness.vms[vm].store.data();
            state.grpc_calls.contains(&call.token) || state.grpc_streams.contains(&call.token)
        };
        if !call.is_stream {
            self.vms[vm].store.data_mut().grpc_calls.remove(&call.token);
            if answer.status == 0 {
                let message = answer.messages.first().cloned().unwrap_or_default();
                let size = message.len() as i32;
                self.vms[vm].store.data_mut().grpc_receive.message = Some(message);
                self.call(
                    vm,
                    "proxy_on_grpc_receive",
                    &[root, token, size],
                    attribution,
                );
                self.vms[vm].store.data_mut().grpc_receive = host::GrpcReceive::default();
            } else {
                self.grpc_close(vm, root, token, &answer, attribution);
            }
            return;
        }
        let state = self.vms[vm].store.data_mut();
        state.grpc_receive.initial_metadata = Some(answer.initial_metadata.clone());
        self.call(
            vm,
            "proxy_on_grpc_receive_initial_metadata",
            &[root, token, answer.initial_metadata.len() as i32],
            attribution,
        );
        self.vms[vm].store.data_mut().grpc_receive = host::GrpcReceive::default();
        for message in &answer.messages {
            if !open(self) {
                return;
            }
            let size = message.len() as i32;
            self.vms[vm].store.data_mut().grpc_receive.message = Some(message.clone());
            self.call(
                vm,
                "proxy_on_grpc_receive",
                &[root, token, size],
                attribution,
            );
            self.vms[vm].store.data_mut().grpc_receive = host::GrpcReceive::default();
        }
        if !open(self) {
            return;
        }
        self.vms[vm].store.data_mut().grpc_receive.trailing_metadata =
            Some(answer.trailing_metadata.clone());
        self.call(
            vm,
            "proxy_on_grpc_receive_trailing_metadata",
            &[root, token, answer.trailing_metadata.len() as i32],
            attribution,
        );
        self.vms[vm].store.data_mut().grpc_receive = host::GrpcReceive::default();
        if !open(self) {
            return;
        }
        self.vms[vm]
            .store
            .data_mut()
            .grpc_streams
            .remove(&call.token);
        self.grpc_close(vm, root, token, &answer, attribution);
    }

    fn grpc_close(
        &mut self,
        vm: usize,
        root: i32,
        token: i32,
        answer: &GrpcAnswer,
        attribution: Option<StreamId>,
    ) {
        self.vms[vm].store.data_mut().status =
            (answer.status, answer.status_message.clone().into_bytes());
        self.call(
            vm,
            "proxy_on_grpc_close",
            &[root, token, answer.status as i32],
            attribution,
        );
        self.vms[vm].store.data_mut().status = (0, Vec::new());
    }

    /// Answers a pending HTTP call (one whose cluster has no automatic answer) by its worker's
    /// VM and token.
    pub fn answer_pending_http_call(&mut self, vm_token: (usize, u32), answer: HttpAnswer) {
        if let Some(index) = self
            .pending_calls
            .iter()
            .position(|c| (c.vm, c.token) == vm_token && c.due_ns.is_none())
        {
            let call = self.pending_calls.remove(index);
            self.deliver_http_call(call.vm, call.token, call.stream, answer);
            self.pump();
        }
    }

    /// Runs one exchange: starts the stream, answers it as the upstream (after `delay_ms`) when the
    /// request gets there, and moves time until the stream ends or nothing is left to wait for
    /// (ticks alone do not count).
    pub fn run(
        &mut self,
        worker: usize,
        properties: Option<&Json>,
        request: Message,
        upstream: Option<(Message, u64)>,
    ) -> StreamId {
        // The answer must be known before the request can reach the upstream.
        let upstream = upstream.unwrap_or_else(|| (Message::status(200), 0));
        let id = self.start_stream_inner(worker, properties, request, Some(upstream));
        self.settle(id);
        id
    }

    /// Moves time until the stream finishes or no HTTP or gRPC answer or upstream response is
    /// due.
    pub fn settle(&mut self, id: StreamId) {
        while !self.streams[id].finished {
            let waiting = self.pending_calls.iter().any(|c| c.due_ns.is_some())
                || self.pending_grpc.iter().any(|c| c.due_ns.is_some())
                || !self.upstream_due.is_empty();
            if !waiting {
                return;
            }
            let Some((due, event)) = self.next_event(None) else {
                return;
            };
            self.fire(due, event);
        }
    }

    /// Whether a log line was written by one of the stream's filters.
    fn stream_wrote(&self, s: &StreamState, line: &LogEntry) -> bool {
        line.worker == s.worker
            && s.slots.iter().any(|slot| {
                self.vms[slot.vm].plugin == line.plugin && slot.context == line.context_id
            })
    }

    /// The stream's observations so far.
    pub fn result(&self, id: StreamId) -> StreamResult {
        let s = &self.streams[id];
        let mut result = s.result.clone();
        let shared = self.shared.borrow();
        result.logs = shared
            .logs
            .iter()
            .filter(|l| self.stream_wrote(s, l))
            .cloned()
            .collect();
        result
    }

    /// The instructions of a stream's callbacks so far (as `result(id).instructions`, cheaper).
    pub fn instructions(&self, id: StreamId) -> u64 {
        self.streams[id].result.instructions
    }

    /// Log lines not written by a stream context (VM start, configure, ticks, root callbacks).
    pub fn root_logs(&self) -> Vec<LogEntry> {
        let shared = self.shared.borrow();
        shared
            .logs
            .iter()
            .filter(|l| !self.streams.iter().any(|s| self.stream_wrote(s, l)))
            .cloned()
            .collect()
    }

    /// Every log line.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.shared.borrow().logs.clone()
    }

    pub fn metrics(&self) -> Vec<MetricSnapshot> {
        self.shared.borrow().registry.snapshot()
    }

    /// A counter's or gauge's value by its full (tagged) name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.shared.borrow().registry.value(name)
    }

    /// Envoy's Prometheus text with the given `stats_tags` (`(tag_name, regex)`).
    pub fn prometheus(&self, stats_tags: &[(String, String)]) -> Result<String, HarnessError> {
        let extractors = stats_tags
            .iter()
            .map(|(name, regex)| TagExtractor::new(name, regex))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HarnessError(format!("bad stats_tags regex: {e}")))?;
        Ok(metrics::render_prometheus(&self.metrics(), &extractors))
    }

    /// Shared data of the (first) plugin's VM id: key → (value, cas).
    pub fn shared_data(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        let vm_id = &self.plugins[0].vm_id;
        self.shared
            .borrow()
            .shared_data
            .iter()
            .filter(|((vm, _), _)| vm == vm_id)
            .map(|((_, key), value)| (key.clone(), value.clone()))
            .collect()
    }

    /// The profile so far (every VM), when `Options::profile` is set.
    pub fn profile(&self) -> Option<crate::profile::Profile> {
        let names = self.profile_names.as_ref()?;
        let mut profile = crate::profile::Profile::default();
        for vm in &self.vms {
            if let Some(recorder) = vm.store.data().profile.as_ref() {
                recorder.add_to(names, &mut profile);
            }
        }
        Some(profile)
    }

    /// Forgets what the profile counted so far (after warm-up requests).
    pub fn reset_profile(&mut self) {
        for vm in &mut self.vms {
            if let Some(recorder) = vm.store.data_mut().profile.as_mut() {
                recorder.reset();
            }
        }
    }

    /// Whether a worker's VM (of any plugin of the chain) failed (trapped).
    pub fn worker_failed(&self, worker: usize) -> bool {
        (0..self.plugins.len()).any(|plugin| self.vms[self.vm_index(plugin, worker)].failed)
    }

    /// Worker threads (streams run on `0..workers()`).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The thread index of the main thread's VMs (log lines' `worker`), when they run: the base
    /// VM Envoy configures first, and the main thread's own (whose root context ticks).
    pub fn main_thread(&self) -> Option<usize> {
        self.options.main_thread_vm.then_some(self.workers)
    }

    /// The wasm memory of each VM in bytes (for bounds checks): per plugin, the workers', then
    /// the main thread's and the base VM's.
    pub fn memory_sizes(&self) -> Vec<usize> {
        self.vms
            .iter()
            .map(|vm| {
                vm.store
                    .data()
                    .memory
                    .map(|memory| memory.data_size(&vm.store))
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// Adds a frame to the message a peer receives (headers and trailers as the stream's maps hold
/// them when the frame leaves the filters); true at the end of the message.
fn append_frame(message: &mut Message, frame: Frame, headers: &Pairs, trailers: &Pairs) -> bool {
    match frame {
        Frame::Headers { end } => {
            message.headers = headers.clone();
            end
        }
        Frame::Data { bytes, end } => {
            message.body.extend_from_slice(&bytes);
            end
        }
        Frame::Trailers => {
            message.trailers = trailers.clone();
            true
        }
    }
}

/// Headers and body of a local reply as Envoy builds it (`Utility::prepareLocalReply`): the
/// filter's headers in their order, then `content-length` and, unless the filter gave one,
/// `content-type: text/plain`; for a gRPC request a trailers-only answer instead (`:status 200`,
/// `content-type: application/grpc` in place of the filter's, `grpc-status` from the filter or
/// mapped from the HTTP status, the body as a percent-encoded `grpc-message`, no body).
fn local_reply_message(
    status: u32,
    body: Vec<u8>,
    extra: &Pairs,
    grpc_status: Option<u32>,
    is_grpc: bool,
) -> (Pairs, Vec<u8>) {
    let http_status = if is_grpc { 200 } else { status };
    let mut headers_out: Pairs = vec![(b":status".to_vec(), http_status.to_string().into_bytes())];
    for (key, value) in extra {
        headers::add(&mut headers_out, key, value);
    }
    let set_in_place = |map: &mut Pairs, key: &[u8], value: &[u8]| match map
        .iter_mut()
        .find(|(name, _)| name.as_slice() == key)
    {
        Some((_, existing)) => *existing = value.to_vec(),
        None => map.push((key.to_vec(), value.to_vec())),
    };
    if is_grpc {
        set_in_place(&mut headers_out, b"content-type", b"application/grpc");
        let code = grpc_status.unwrap_or_else(|| http_to_grpc_status(status));
        set_in_place(
            &mut headers_out,
            b"grpc-status",
            code.to_string().as_bytes(),
        );
        if !body.is_empty() {
            set_in_place(
                &mut headers_out,
                b"grpc-message",
                &grpc_percent_encode(&body),
            );
        }
        return (headers_out, Vec::new());
    }
    if !body.is_empty() {
        set_in_place(
            &mut headers_out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
        if headers::get(&headers_out, b"content-type").is_none() {
            headers_out.push((b"content-type".to_vec(), b"text/plain".to_vec()));
        }
    }
    (headers_out, body)
}

/// An answer from an upstream as Envoy's gRPC client passes it on: the status message gets the
/// response code details appended (`{via_upstream}`).
fn via_upstream(mut answer: GrpcAnswer) -> GrpcAnswer {
    if !answer.status_message.is_empty() {
        answer.status_message.push_str("{via_upstream}");
    }
    answer
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
fn http_to_grpc_status(status: u32) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &byte in text {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte);
        } else {
            out.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
    }
    out
}
