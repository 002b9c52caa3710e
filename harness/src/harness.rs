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
    pub http_calls: Vec<HttpCallRecord>,
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Headers,
    Body,
    Trailers,
    Done,
}

struct StreamState {
    worker: usize,
    context: u32,
    request: Message,
    req_phase: Phase,
    req_held: bool,
    req_block_all: bool,
    response: Option<Message>,
    resp_phase: Phase,
    resp_held: bool,
    resp_block_all: bool,
    /// Bypass the filter (VM failed with fail open, or a direct local reply).
    bypass: bool,
    sent_upstream: bool,
    finished: bool,
    /// The upstream's answer, when the test gave it in advance.
    upstream_answer: Option<(Message, u64)>,
    result: StreamResult,
}

struct Worker {
    store: Store<VmState>,
    instance: Instance,
    funcs: HashMap<String, Option<Func>>,
    failed: bool,
    next_context: u32,
}

struct PendingCall {
    worker: usize,
    token: u32,
    stream: Option<StreamId>,
    due_ns: Option<u64>,
    answer: Option<HttpAnswer>,
}

enum Event {
    Tick(usize),
    HttpCall(usize),
    Upstream(StreamId),
}

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

/// A plugin loaded into N VMs that share one shared-data store, as Envoy runs it.
pub struct Harness {
    workers: Vec<Worker>,
    shared: Rc<RefCell<Shared>>,
    options: Options,
    streams: Vec<StreamState>,
    answers: HashMap<String, HttpAnswer>,
    pending_calls: Vec<PendingCall>,
    upstream_due: Vec<(StreamId, u64)>,
    actions: VecDeque<(usize, Deferred)>,
    pub traps: Vec<TrapRecord>,
    /// HTTP calls made outside any stream (root contexts).
    pub root_http_calls: Vec<HttpCallRecord>,
    /// Instructions spent in VM start and configuration, per worker.
    pub startup_instructions: Vec<u64>,
    /// Function names of a profiled module.
    profile_names: Option<Vec<String>>,
}

impl Harness {
    /// Compiles the module and starts `options.workers` VMs: `_initialize`, root context,
    /// `on_vm_start`, `on_configure`.
    pub fn new(wasm: &[u8], options: Options) -> Result<Harness, HarnessError> {
        let is_binary = wasm.starts_with(b"\0asm");
        let is_text = std::str::from_utf8(wasm).is_ok_and(|t| t.contains("(module"));
        if !is_binary && !is_text {
            return Err(HarnessError(
                "bad module: not a WebAssembly module (no \\0asm header)".into(),
            ));
        }
        let engine = engine()?;
        let (module, profile_names, imported_funcs) = match options.profile {
            None => (compile(&engine, wasm)?, None, 0),
            Some(_) => {
                let instrumented = crate::profile::instrument(wasm)?;
                (
                    compile(&engine, &instrumented.wasm)?,
                    Some(instrumented.names),
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
        let mut harness = Harness {
            workers: Vec::new(),
            shared: shared.clone(),
            options: options.clone(),
            streams: Vec::new(),
            answers: HashMap::new(),
            pending_calls: Vec::new(),
            upstream_due: Vec::new(),
            actions: VecDeque::new(),
            traps: Vec::new(),
            root_http_calls: Vec::new(),
            startup_instructions: Vec::new(),
            profile_names,
        };
        for index in 0..options.workers.max(1) {
            let mut state = VmState::new(shared.clone(), index);
            state.vm_id = options.vm_id.clone();
            state.root_id = options.root_id.clone();
            state.plugin_name = options.plugin_name.clone();
            state.vm_config = options.vm_config.clone();
            state.plugin_config = options.config.clone();
            state.env = options.env.clone();
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
            harness.workers.push(Worker {
                store,
                instance,
                funcs: HashMap::new(),
                failed: false,
                next_context: 2,
            });
            harness.start_worker(index)?;
        }
        harness.pump();
        Ok(harness)
    }

    fn start_worker(&mut self, index: usize) -> Result<(), HarnessError> {
        let before = self.traps.len();
        let fail = |harness: &Harness, what: &str| {
            let trap = harness
                .traps
                .get(before)
                .map(|t| t.message.clone())
                .unwrap_or_default();
            HarnessError(format!("{what} trapped: {trap}"))
        };
        if self.has_export(index, "_initialize") {
            self.call(index, "_initialize", &[], None);
            if self.traps.len() > before {
                return Err(fail(self, "_initialize"));
            }
            if self.has_export(index, "main") {
                self.call(index, "main", &[0, 0], None);
            }
        } else if self.has_export(index, "_start") {
            self.call(index, "_start", &[], None);
        }
        if self.traps.len() > before {
            return Err(fail(self, "start"));
        }
        let vm_config_size = self.options.vm_config.len() as i32;
        let config_size = self.options.config.len() as i32;
        self.call(index, "proxy_on_context_create", &[1, 0], None);
        let started = self.call(index, "proxy_on_vm_start", &[1, vm_config_size], None);
        if self.traps.len() > before {
            return Err(fail(self, "proxy_on_vm_start"));
        }
        if started == Some(0) {
            return Err(HarnessError(format!(
                "proxy_on_vm_start returned false{}",
                self.recent_errors()
            )));
        }
        self.workers[index].store.data_mut().in_configure = true;
        let configured = self.call(index, "proxy_on_configure", &[1, config_size], None);
        self.workers[index].store.data_mut().in_configure = false;
        if self.traps.len() > before {
            return Err(fail(self, "proxy_on_configure"));
        }
        if configured == Some(0) {
            return Err(HarnessError(format!(
                "proxy_on_configure returned false: the configuration was rejected{}",
                self.recent_errors()
            )));
        }
        let spent: u64 = self.startup_instructions.get(index).copied().unwrap_or(0);
        if self.startup_instructions.len() <= index {
            self.startup_instructions.push(spent);
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

    fn has_export(&mut self, worker: usize, name: &str) -> bool {
        self.func(worker, name).is_some()
    }

    fn func(&mut self, worker: usize, name: &str) -> Option<Func> {
        let w = &mut self.workers[worker];
        if let Some(found) = w.funcs.get(name) {
            return *found;
        }
        let found = w.instance.get_func(&mut w.store, name);
        w.funcs.insert(name.to_string(), found);
        found
    }

    /// Calls an export; `None` when it is missing or trapped. Attributes instructions and traps.
    fn call(
        &mut self,
        worker: usize,
        name: &str,
        args: &[i32],
        stream: Option<StreamId>,
    ) -> Option<i32> {
        if self.workers[worker].failed {
            return None;
        }
        let func = self.func(worker, name)?;
        let fuel = self.options.fuel_per_callback;
        let w = &mut self.workers[worker];
        let ty = func.ty(&w.store);
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
            let state = w.store.data_mut();
            state.current_context = args.first().copied().unwrap_or(0) as u32;
            state.effective_context = 0;
            state.stop_iteration = false;
            if let Some(recorder) = state.profile.as_mut() {
                recorder.begin(fuel, recording);
            }
        }
        w.store.set_fuel(fuel).ok();
        let outcome = func.call(&mut w.store, &params, &mut results);
        let remaining = w.store.get_fuel().unwrap_or(0);
        let mut spent = fuel - remaining;
        if let Some(recorder) = w.store.data_mut().profile.as_mut() {
            // The profiler's hooks are not the module's instructions.
            spent = spent.saturating_sub(recorder.end(remaining));
            if recorder.recording() {
                recorder.count_callback(name, spent);
            }
        }
        let stop = std::mem::take(&mut w.store.data_mut().stop_iteration);
        match stream {
            Some(id) => {
                let result = &mut self.streams[id].result;
                result.instructions += spent;
                result.callbacks.push((name.to_string(), spent));
            }
            None => {
                if self.startup_instructions.len() <= worker {
                    self.startup_instructions.resize(worker + 1, 0);
                }
                self.startup_instructions[worker] += spent;
            }
        }
        self.collect(worker);
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
                    worker,
                    callback: name.to_string(),
                    message: format!("{error:?}"),
                });
                self.workers[worker].failed = true;
                // Every stream of the failed VM is failed by the policy.
                let affected: Vec<StreamId> = (0..self.streams.len())
                    .filter(|id| self.streams[*id].worker == worker && !self.streams[*id].finished)
                    .collect();
                for id in affected {
                    self.fail_stream(id);
                }
                None
            }
        }
    }

    /// Moves what the last callback produced into the harness: deferred stream actions, new HTTP
    /// calls, queue notifications.
    fn collect(&mut self, worker: usize) {
        let state = self.workers[worker].store.data_mut();
        let deferred: Vec<Deferred> = state.deferred.drain(..).collect();
        let calls: Vec<host::NewHttpCall> = state.new_http_calls.drain(..).collect();
        for action in deferred {
            self.actions.push_back((worker, action));
        }
        for call in calls {
            let stream = self.stream_of(worker, call.origin_context);
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
                worker,
                token: call.token,
                stream,
                due_ns,
                answer,
            });
        }
    }

    fn stream_of(&self, worker: usize, context: u32) -> Option<StreamId> {
        self.streams
            .iter()
            .position(|s| s.worker == worker && s.context == context && !s.finished)
    }

    /// Applies deferred actions and queue notifications until none is left.
    fn pump(&mut self) {
        loop {
            let ready: Vec<(usize, u32, u32)> =
                self.shared.borrow_mut().queue_ready.drain(..).collect();
            for (worker, context, token) in ready {
                self.call(
                    worker,
                    "proxy_on_queue_ready",
                    &[context as i32, token as i32],
                    None,
                );
            }
            let Some((worker, action)) = self.actions.pop_front() else {
                if self.shared.borrow().queue_ready.is_empty() {
                    return;
                }
                continue;
            };
            match action {
                Deferred::Continue { context, response } => {
                    let Some(id) = self.stream_of(worker, context) else {
                        continue;
                    };
                    let stream = &mut self.streams[id];
                    if stream.result.local_reply.is_some() && !response {
                        continue;
                    }
                    if response {
                        stream.resp_held = false;
                        stream.resp_block_all = false;
                        if stream.response.is_some() {
                            self.drive_response(id);
                        }
                    } else {
                        stream.req_held = false;
                        stream.req_block_all = false;
                        // Envoy forgets the request maps on continue.
                        if let Some(data) = self.workers[worker]
                            .store
                            .data_mut()
                            .streams
                            .get_mut(&context)
                        {
                            data.request_open = stream.req_phase != Phase::Done;
                        }
                        self.drive_request(id);
                    }
                }
                Deferred::Close { context, .. } => {
                    let Some(id) = self.stream_of(worker, context) else {
                        continue;
                    };
                    self.streams[id].result.downstream_response = None;
                    self.finish(id);
                }
                Deferred::LocalReply {
                    context,
                    status,
                    body,
                    headers,
                    details,
                } => {
                    let Some(id) = self.stream_of(worker, context) else {
                        continue;
                    };
                    self.local_reply(id, status, body, headers, details, true);
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
        let mut shared = self.shared.borrow_mut();
        if !shared.clusters.iter().any(|c| c == cluster) {
            shared.clusters.push(cluster.to_string());
        }
        self.answers.insert(cluster.to_string(), answer);
    }

    /// Starts a stream on a worker: `on_context_create` and the request callbacks, as far as the
    /// filter lets the request go.
    pub fn start_stream(
        &mut self,
        worker: usize,
        properties: Option<&Json>,
        request: Message,
    ) -> StreamId {
        self.start_stream_inner(worker, properties, request, None)
    }

    fn start_stream_inner(
        &mut self,
        worker: usize,
        properties: Option<&Json>,
        request: Message,
        upstream_answer: Option<(Message, u64)>,
    ) -> StreamId {
        let worker = worker.min(self.workers.len() - 1);
        let id = self.streams.len();
        let context = self.workers[worker].next_context;
        self.workers[worker].next_context += 1;
        self.streams.push(StreamState {
            worker,
            context,
            request,
            req_phase: Phase::Headers,
            req_held: false,
            req_block_all: false,
            response: None,
            resp_phase: Phase::Headers,
            resp_held: false,
            resp_block_all: false,
            bypass: false,
            sent_upstream: false,
            finished: false,
            upstream_answer,
            result: StreamResult::default(),
        });
        if self.workers[worker].failed {
            if self.options.fail_open {
                self.streams[id].bypass = true;
                self.drive_request(id);
            } else {
                self.fail_stream(id);
            }
            self.pump();
            return id;
        }
        let data = StreamData {
            properties: properties
                .map(properties::attributes_from_json)
                .unwrap_or_default(),
            ..StreamData::default()
        };
        self.workers[worker]
            .store
            .data_mut()
            .streams
            .insert(context, data);
        let root = self.workers[worker].store.data().root_context_id as i32;
        self.call(
            worker,
            "proxy_on_context_create",
            &[context as i32, root],
            Some(id),
        );
        self.drive_request(id);
        self.pump();
        id
    }

    fn data(&mut self, id: StreamId) -> Option<&mut StreamData> {
        let (worker, context) = (self.streams[id].worker, self.streams[id].context);
        self.workers[worker]
            .store
            .data_mut()
            .streams
            .get_mut(&context)
    }

    fn drive_request(&mut self, id: StreamId) {
        loop {
            let s = &self.streams[id];
            if s.finished || s.result.local_reply.is_some() || s.sent_upstream {
                return;
            }
            let (worker, context) = (s.worker, s.context as i32);
            if s.bypass {
                let request = s.request.clone();
                self.send_upstream(id, request);
                return;
            }
            match s.req_phase {
                Phase::Headers => {
                    let request = s.request.clone();
                    let end = request.body.is_empty() && request.trailers.is_empty();
                    if let Some(data) = self.data(id) {
                        data.request_headers = request.headers.clone();
                        data.request_open = true;
                    }
                    let n = request.headers.len() as i32;
                    let r = self.call(
                        worker,
                        "proxy_on_request_headers",
                        &[context, n, end as i32],
                        Some(id),
                    );
                    let s = &mut self.streams[id];
                    s.req_phase = Phase::Body;
                    let r = r.unwrap_or(0);
                    s.req_held = r != 0;
                    s.req_block_all = r >= 2;
                    if s.req_block_all {
                        return;
                    }
                }
                Phase::Body => {
                    if s.req_block_all {
                        return;
                    }
                    let request = s.request.clone();
                    self.streams[id].req_phase = Phase::Trailers;
                    if !request.body.is_empty() {
                        if let Some(data) = self.data(id) {
                            data.request_body = request.body.clone();
                            data.request_open = true;
                        }
                        let end = request.trailers.is_empty() as i32;
                        let r = self.call(
                            worker,
                            "proxy_on_request_body",
                            &[context, request.body.len() as i32, end],
                            Some(id),
                        );
                        self.streams[id].req_held = r.unwrap_or(0) != 0;
                    }
                }
                Phase::Trailers => {
                    if s.req_block_all {
                        return;
                    }
                    let request = s.request.clone();
                    self.streams[id].req_phase = Phase::Done;
                    if !request.trailers.is_empty() {
                        if let Some(data) = self.data(id) {
                            data.request_trailers = request.trailers.clone();
                            data.request_open = true;
                        }
                        let n = request.trailers.len() as i32;
                        let r =
                            self.call(worker, "proxy_on_request_trailers", &[context, n], Some(id));
                        self.streams[id].req_held = r.unwrap_or(0) != 0;
                    }
                }
                Phase::Done => {
                    if s.req_held {
                        return;
                    }
                    let Some(data) = self.data(id) else { return };
                    data.request_open = false;
                    let message = Message {
                        headers: data.request_headers.clone(),
                        body: data.request_body.clone(),
                        trailers: data.request_trailers.clone(),
                    };
                    self.send_upstream(id, message);
                    return;
                }
            }
        }
    }

    fn send_upstream(&mut self, id: StreamId, message: Message) {
        let s = &mut self.streams[id];
        s.sent_upstream = true;
        s.result.upstream_request = Some(message);
        if let Some((answer, delay_ms)) = s.upstream_answer.take() {
            if delay_ms == 0 {
                self.respond(id, answer);
            } else {
                let due = self.now_ns() + delay_ms * 1_000_000;
                self.streams[id].upstream_answer = Some((answer, delay_ms));
                self.upstream_due.push((id, due));
            }
        }
    }

    /// Answers a stream as its upstream: the response callbacks run, then the stream ends
    /// (`on_log`, `on_done`, `on_delete`) unless the filter pauses the response.
    pub fn respond(&mut self, id: StreamId, response: Message) {
        let s = &mut self.streams[id];
        if s.finished || !s.sent_upstream || s.response.is_some() {
            return;
        }
        s.response = Some(response);
        self.drive_response(id);
        self.pump();
    }

    fn drive_response(&mut self, id: StreamId) {
        loop {
            let s = &self.streams[id];
            if s.finished {
                return;
            }
            let Some(response) = s.response.clone() else {
                return;
            };
            let (worker, context) = (s.worker, s.context as i32);
            if s.bypass || self.workers[worker].failed {
                self.streams[id].result.downstream_response = Some(response);
                self.finish(id);
                return;
            }
            match s.resp_phase {
                Phase::Headers => {
                    let end = response.body.is_empty() && response.trailers.is_empty();
                    if let Some(data) = self.data(id) {
                        data.response_headers = response.headers.clone();
                        data.response_body.clear();
                        data.response_trailers.clear();
                        data.response_open = true;
                    }
                    let n = response.headers.len() as i32;
                    let r = self.call(
                        worker,
                        "proxy_on_response_headers",
                        &[context, n, end as i32],
                        Some(id),
                    );
                    let s = &mut self.streams[id];
                    if s.finished {
                        return;
                    }
                    s.resp_phase = Phase::Body;
                    let r = r.unwrap_or(0);
                    s.resp_held = r != 0;
                    s.resp_block_all = r >= 2;
                    if s.resp_block_all {
                        return;
                    }
                }
                Phase::Body => {
                    if s.resp_block_all {
                        return;
                    }
                    self.streams[id].resp_phase = Phase::Trailers;
                    if !response.body.is_empty() {
                        if let Some(data) = self.data(id) {
                            data.response_body = response.body.clone();
                            data.response_open = true;
                        }
                        let end = response.trailers.is_empty() as i32;
                        let r = self.call(
                            worker,
                            "proxy_on_response_body",
                            &[context, response.body.len() as i32, end],
                            Some(id),
                        );
                        self.streams[id].resp_held = r.unwrap_or(0) != 0;
                    }
                }
                Phase::Trailers => {
                    if s.resp_block_all {
                        return;
                    }
                    self.streams[id].resp_phase = Phase::Done;
                    if !response.trailers.is_empty() {
                        if let Some(data) = self.data(id) {
                            data.response_trailers = response.trailers.clone();
                            data.response_open = true;
                        }
                        let n = response.trailers.len() as i32;
                        let r = self.call(
                            worker,
                            "proxy_on_response_trailers",
                            &[context, n],
                            Some(id),
                        );
                        self.streams[id].resp_held = r.unwrap_or(0) != 0;
                    }
                }
                Phase::Done => {
                    if s.resp_held {
                        return;
                    }
                    let Some(data) = self.data(id) else { return };
                    data.response_open = false;
                    let message = Message {
                        headers: data.response_headers.clone(),
                        body: data.response_body.clone(),
                        trailers: data.response_trailers.clone(),
                    };
                    self.streams[id].result.downstream_response = Some(message);
                    self.finish(id);
                    return;
                }
            }
        }
    }

    fn local_reply(
        &mut self,
        id: StreamId,
        status: u32,
        body: Vec<u8>,
        extra: Pairs,
        details: String,
        via_filter: bool,
    ) {
        let s = &mut self.streams[id];
        if s.finished {
            return;
        }
        let mut headers_out: Pairs = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        if !body.is_empty() {
            headers_out.push((
                b"content-length".to_vec(),
                body.len().to_string().into_bytes(),
            ));
            headers_out.push((b"content-type".to_vec(), b"text/plain".to_vec()));
        }
        for (key, value) in &extra {
            headers::add(&mut headers_out, key, value);
        }
        s.result.local_reply = Some(LocalReply {
            status,
            headers: headers_out.clone(),
            body: body.clone(),
            details,
        });
        let message = Message {
            headers: headers_out,
            body,
            trailers: Vec::new(),
        };
        let in_response = s.response.is_some();
        if let Some(data) = self.data(id) {
            data.request_open = false;
        }
        let s = &mut self.streams[id];
        if via_filter && !in_response && !s.bypass {
            // A local reply from the request path passes through the filter's encoder callbacks.
            s.response = Some(message);
            s.resp_phase = Phase::Headers;
            self.drive_response(id);
        } else {
            s.result.downstream_response = Some(message);
            self.finish(id);
        }
    }

    /// Envoy's failure policy for a stream whose VM failed.
    fn fail_stream(&mut self, id: StreamId) {
        if self.streams[id].finished {
            return;
        }
        if self.options.fail_open {
            self.streams[id].bypass = true;
            if self.streams[id].response.is_some() {
                let response = self.streams[id].response.clone();
                self.streams[id].result.downstream_response = response;
                self.finish(id);
            } else {
                self.drive_request(id);
            }
        } else {
            self.streams[id].bypass = true;
            self.local_reply(
                id,
                503,
                Vec::new(),
                Vec::new(),
                "wasm_fail_stream".into(),
                false,
            );
        }
    }

    fn finish(&mut self, id: StreamId) {
        let s = &mut self.streams[id];
        if s.finished {
            return;
        }
        s.finished = true;
        s.result.complete = true;
        let (worker, context) = (s.worker, s.context as i32);
        if let Some(data) = self.data(id) {
            data.request_open = false;
            data.response_open = false;
            data.access_log = true;
        }
        self.call(worker, "proxy_on_log", &[context], Some(id));
        self.call(worker, "proxy_on_done", &[context], Some(id));
        self.call(worker, "proxy_on_delete", &[context], Some(id));
        self.workers[worker]
            .store
            .data_mut()
            .streams
            .remove(&(context as u32));
        self.pending_calls
            .retain(|call| call.stream != Some(id) || call.due_ns.is_some());
    }

    /// Moves virtual time forward: ticks fire, delayed HTTP call answers and upstream responses
    /// arrive, in time order.
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
        for (index, worker) in self.workers.iter().enumerate() {
            if let (false, Some(due)) = (worker.failed, worker.store.data().next_tick_ns) {
                consider(due, Event::Tick(index));
            }
        }
        for (index, call) in self.pending_calls.iter().enumerate() {
            if let Some(due) = call.due_ns {
                consider(due, Event::HttpCall(index));
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
            Event::Tick(worker) => {
                let state = self.workers[worker].store.data_mut();
                let period = state.tick_period_ms * 1_000_000;
                state.next_tick_ns = Some(due + period.max(1));
                let root = state.root_context_id as i32;
                self.call(worker, "proxy_on_tick", &[root], None);
            }
            Event::HttpCall(index) => {
                let call = self.pending_calls.remove(index);
                let answer = call.answer.unwrap_or_default();
                self.deliver_http_call(call.worker, call.token, call.stream, answer);
            }
            Event::Upstream(id) => {
                self.upstream_due.retain(|(stream, _)| *stream != id);
                if let Some((answer, _)) = self.streams[id].upstream_answer.take() {
                    self.respond(id, answer);
                }
            }
        }
        self.pump();
    }

    fn deliver_http_call(
        &mut self,
        worker: usize,
        token: u32,
        stream: Option<StreamId>,
        answer: HttpAnswer,
    ) {
        let state = self.workers[worker].store.data_mut();
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
            worker,
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
        let state = self.workers[worker].store.data_mut();
        state.http_call_response = None;
        state.status = (0, Vec::new());
    }

    /// Answers the oldest pending HTTP call to `cluster` that has no automatic answer.
    pub fn answer_pending_http_call(&mut self, cluster_token: (usize, u32), answer: HttpAnswer) {
        if let Some(index) = self
            .pending_calls
            .iter()
            .position(|c| (c.worker, c.token) == cluster_token && c.due_ns.is_none())
        {
            let call = self.pending_calls.remove(index);
            self.deliver_http_call(call.worker, call.token, call.stream, answer);
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

    /// Moves time until the stream finishes or no HTTP call answer or upstream response is due.
    pub fn settle(&mut self, id: StreamId) {
        while !self.streams[id].finished {
            let waiting = self.pending_calls.iter().any(|c| c.due_ns.is_some())
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

    /// The stream's observations so far.
    pub fn result(&self, id: StreamId) -> StreamResult {
        let s = &self.streams[id];
        let mut result = s.result.clone();
        let shared = self.shared.borrow();
        result.logs = shared
            .logs
            .iter()
            .filter(|l| l.worker == s.worker && l.context_id == s.context)
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
            .filter(|l| {
                !self
                    .streams
                    .iter()
                    .any(|s| s.worker == l.worker && s.context == l.context_id)
            })
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

    /// Shared data of the plugin's VM id: key → (value, cas).
    pub fn shared_data(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        self.shared
            .borrow()
            .shared_data
            .iter()
            .filter(|((vm, _), _)| *vm == self.options.vm_id)
            .map(|((_, key), value)| (key.clone(), value.clone()))
            .collect()
    }

    /// The profile so far (every worker's VM), when `Options::profile` is set.
    pub fn profile(&self) -> Option<crate::profile::Profile> {
        let names = self.profile_names.as_ref()?;
        let mut profile = crate::profile::Profile::default();
        for worker in &self.workers {
            if let Some(recorder) = worker.store.data().profile.as_ref() {
                recorder.add_to(names, &mut profile);
            }
        }
        Some(profile)
    }

    /// Forgets what the profile counted so far (after warm-up requests).
    pub fn reset_profile(&mut self) {
        for worker in &mut self.workers {
            if let Some(recorder) = worker.store.data_mut().profile.as_mut() {
                recorder.reset();
            }
        }
    }

    /// Whether a worker's VM failed (trapped).
    pub fn worker_failed(&self, worker: usize) -> bool {
        self.workers[worker].failed
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}
