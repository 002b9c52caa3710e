//! The host side of one VM: its state and every proxy-wasm and WASI import, with the status
//! codes of Envoy's host (proxy-wasm-cpp-host `exports.cc` and Envoy's `context.cc`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

use wasmtime::{Caller, Linker, Memory, TypedFunc};

use crate::abi::*;
use crate::metrics::{MetricKind, Registry};
use crate::properties::{self, Value};

pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One log line, as the filter wrote it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LogEntry {
    pub level: String,
    pub message: String,
    /// The thread of the VM that wrote it (workers `0..n`, the main thread `n`).
    #[serde(skip)]
    pub worker: usize,
    /// The plugin (its index in a filter chain) whose VM wrote it.
    #[serde(skip)]
    pub plugin: usize,
    #[serde(skip)]
    pub context_id: u32,
}

pub struct Queue {
    pub items: VecDeque<Vec<u8>>,
    pub worker: usize,
    pub context_id: u32,
}

/// State shared by every VM of the plugin: Envoy's process-wide shared data and queues, the
/// plugin's stats scope, the virtual clock, the attributes.
#[derive(Default)]
pub struct Shared {
    pub now_ns: u64,
    pub monotonic_ns: u64,
    pub shared_data: BTreeMap<(String, String), (Vec<u8>, u32)>,
    pub cas: u32,
    pub queues: HashMap<u32, Queue>,
    pub queue_tokens: HashMap<(String, String), u32>,
    pub next_queue_token: u32,
    pub queue_ready: Vec<(usize, u32, u32)>,
    pub registry: Registry,
    pub logs: Vec<LogEntry>,
    pub attributes: Value,
    pub log_level: u32,
    pub clusters: Vec<String>,
}

impl Default for Value {
    fn default() -> Self {
        Value::Map(Vec::new())
    }
}

/// What every filter of one HTTP stream shares: Envoy keeps one header map per direction and one
/// filter state per stream, whichever filter of the chain reads or writes them.
#[derive(Default)]
pub struct StreamMaps {
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    pub filter_state: BTreeMap<String, Vec<u8>>,
    pub properties: Value,
}

/// What the host keeps for one filter's HTTP stream context.
#[derive(Default)]
pub struct StreamData {
    pub maps: Rc<RefCell<StreamMaps>>,
    /// The body this filter sees: the current chunk, or what it buffered so far.
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    /// Which maps and buffers Envoy exposes right now (during the callback, or while paused).
    pub request_open: bool,
    pub response_open: bool,
    /// During `on_log`: read-only access to the final headers.
    pub access_log: bool,
}

impl StreamMaps {
    /// The request's or the response's headers.
    pub fn headers(&self, response: bool) -> &Pairs {
        if response {
            &self.response_headers
        } else {
            &self.request_headers
        }
    }

    pub fn trailers(&self, response: bool) -> &Pairs {
        if response {
            &self.response_trailers
        } else {
            &self.request_trailers
        }
    }
}

impl StreamData {
    /// The filter's request or response body buffer.
    pub fn body(&mut self, response: bool) -> &mut Vec<u8> {
        if response {
            &mut self.response_body
        } else {
            &mut self.request_body
        }
    }

    /// Exposes (or hides) the request's or the response's maps and buffer to the filter.
    pub fn set_open(&mut self, response: bool, open: bool) {
        if response {
            self.response_open = open;
        } else {
            self.request_open = open;
        }
    }
}

/// A gRPC call or stream the filter opened during the last callback.
#[derive(Clone, Debug)]
pub struct NewGrpcCall {
    pub token: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub initial_metadata: Pairs,
    /// The request message of a call; streams send theirs with `proxy_grpc_send`.
    pub message: Option<Vec<u8>>,
    pub timeout_ms: u64,
    pub origin_context: u32,
}

/// What the filter did to an open gRPC stream or call during the last callback.
#[derive(Clone, Debug)]
pub enum GrpcAction {
    Send {
        token: u32,
        message: Vec<u8>,
        end_stream: bool,
    },
    Close {
        token: u32,
    },
    Cancel {
        token: u32,
    },
}

/// What a gRPC callback may read (Envoy's receive buffer and metadata maps).
#[derive(Default)]
pub struct GrpcReceive {
    pub initial_metadata: Option<Pairs>,
    pub trailing_metadata: Option<Pairs>,
    pub message: Option<Vec<u8>>,
}

/// An HTTP call the filter dispatched during the last callback.
#[derive(Clone, Debug)]
pub struct NewHttpCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout_ms: u64,
    /// The context that asked (the effective context at the time).
    pub origin_context: u32,
}

/// Effects the host applies after the VM call returns (Envoy defers them the same way).
#[derive(Clone, Debug)]
pub enum Deferred {
    Continue {
        context: u32,
        response: bool,
    },
    Close {
        context: u32,
        response: bool,
    },
    LocalReply {
        context: u32,
        status: u32,
        body: Vec<u8>,
        headers: Pairs,
        details: String,
        /// The filter's gRPC status; `None` for the SDKs' -1 (unset).
        grpc_status: Option<u32>,
    },
}

pub struct HttpCallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

pub struct VmState {
    pub shared: Rc<RefCell<Shared>>,
    pub worker: usize,
    pub plugin: usize,
    pub vm_id: String,
    pub root_id: String,
    pub plugin_name: String,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    pub in_configure: bool,
    pub env: Vec<(String, String)>,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub root_context_id: u32,
    pub current_context: u32,
    pub effective_context: u32,
    pub streams: HashMap<u32, StreamData>,
    pub metric_ids: HashMap<u32, (MetricKind, String)>,
    pub next_metric_id: [u32; 3],
    pub tick_period_ms: u64,
    pub next_tick_ns: Option<u64>,
    pub new_http_calls: Vec<NewHttpCall>,
    pub next_http_token: u32,
    pub http_call_response: Option<HttpCallResponse>,
    pub new_grpc_calls: Vec<NewGrpcCall>,
    pub grpc_actions: Vec<GrpcAction>,
    /// Open gRPC calls (odd tokens) and streams (even tokens), as Envoy's root context numbers them.
    pub grpc_calls: std::collections::HashSet<u32>,
    pub grpc_streams: std::collections::HashSet<u32>,
    pub next_grpc_token: u32,
    pub grpc_receive: GrpcReceive,
    pub deferred: Vec<Deferred>,
    pub stop_iteration: bool,
    pub status: (u32, Vec<u8>),
    pub pending_done: bool,
    pub done_called: bool,
    pub call_data: Vec<u8>,
    /// The profiler's call tree, when the module was instrumented (`Options::profile`).
    pub profile: Option<Box<crate::profile::Recorder>>,
}

impl VmState {
    pub fn new(shared: Rc<RefCell<Shared>>, worker: usize) -> VmState {
        VmState {
            shared,
            worker,
            plugin: 0,
            vm_id: String::new(),
            root_id: String::new(),
            plugin_name: String::new(),
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
            in_configure: false,
            env: Vec::new(),
            memory: None,
            alloc: None,
            root_context_id: 1,
            current_context: 0,
            effective_context: 0,
            streams: HashMap::new(),
            metric_ids: HashMap::new(),
            next_metric_id: [METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM],
            tick_period_ms: 0,
            next_tick_ns: None,
            new_http_calls: Vec::new(),
            next_http_token: 1,
            http_call_response: None,
            new_grpc_calls: Vec::new(),
            grpc_actions: Vec::new(),
            grpc_calls: Default::default(),
            grpc_streams: Default::default(),
            next_grpc_token: 1,
            grpc_receive: GrpcReceive::default(),
            deferred: Vec::new(),
            stop_iteration: false,
            status: (0, Vec::new()),
            pending_done: false,
            done_called: false,
            call_data: Vec::new(),
            profile: None,
        }
    }

    /// The context host calls act on: the effective context when one was set and still exists.
    pub fn context(&self) -> u32 {
        if self.effective_context != 0
            && (self.effective_context == self.root_context_id
                || self.streams.contains_key(&self.effective_context))
        {
            self.effective_context
        } else {
            self.current_context
        }
    }

    fn stream(&mut self) -> Option<&mut StreamData> {
        let context = self.context();
        self.streams.get_mut(&context)
    }

    /// A header map for reading (Envoy's `getConstMap`).
    fn const_map(&mut self, map: u32) -> Option<Pairs> {
        match map {
            MAP_HTTP_CALL_RESPONSE_HEADERS => {
                return self.http_call_response.as_ref().map(|r| r.headers.clone())
            }
            MAP_HTTP_CALL_RESPONSE_TRAILERS => {
                return self.http_call_response.as_ref().map(|r| r.trailers.clone())
            }
            MAP_GRPC_RECEIVE_INITIAL_METADATA => return self.grpc_receive.initial_metadata.clone(),
            MAP_GRPC_RECEIVE_TRAILING_METADATA => {
                return self.grpc_receive.trailing_metadata.clone()
            }
            _ => {}
        }
        let stream = self.stream()?;
        let log = stream.access_log;
        let maps = stream.maps.borrow();
        match map {
            MAP_REQUEST_HEADERS if stream.request_open || log => Some(maps.request_headers.clone()),
            MAP_REQUEST_TRAILERS if stream.request_open => Some(maps.request_trailers.clone()),
            MAP_RESPONSE_HEADERS if stream.response_open || log => {
                Some(maps.response_headers.clone())
            }
            MAP_RESPONSE_TRAILERS if stream.response_open || log => {
                Some(maps.response_trailers.clone())
            }
            _ => None,
        }
    }

    /// Changes a header map (Envoy's `getMap`): only the stream's own, while open.
    fn with_map_mut<R>(&mut self, map: u32, change: impl FnOnce(&mut Pairs) -> R) -> Option<R> {
        let stream = self.stream()?;
        let mut maps = stream.maps.borrow_mut();
        let target = match map {
            MAP_REQUEST_HEADERS if stream.request_open => &mut maps.request_headers,
            MAP_REQUEST_TRAILERS if stream.request_open => &mut maps.request_trailers,
            MAP_RESPONSE_HEADERS if stream.response_open => &mut maps.response_headers,
            MAP_RESPONSE_TRAILERS if stream.response_open => &mut maps.response_trailers,
            _ => return None,
        };
        Some(change(target))
    }

    pub fn log(&mut self, level: u32, message: String) {
        let mut shared = self.shared.borrow_mut();
        if level < shared.log_level {
            return;
        }
        let context_id = self.context();
        shared.logs.push(LogEntry {
            level: LOG_LEVEL_NAMES[level as usize].to_string(),
            message,
            worker: self.worker,
            plugin: self.plugin,
            context_id,
        });
    }
}

/// Header-map operations with Envoy's semantics: keys lower-cased, pseudo-headers kept first,
/// `replace` removes every value and appends one.
pub mod headers {
    use super::Pairs;

    pub fn lower(key: &[u8]) -> Vec<u8> {
        key.to_ascii_lowercase()
    }

    pub fn get<'a>(map: &'a Pairs, key: &[u8]) -> Option<&'a [u8]> {
        let key = lower(key);
        map.iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value.as_slice())
    }

    pub fn add(map: &mut Pairs, key: &[u8], value: &[u8]) {
        let key = lower(key);
        if key.first() == Some(&b':') {
            let position = map
                .iter()
                .position(|(name, _)| name.first() != Some(&b':'))
                .unwrap_or(map.len());
            map.insert(position, (key, value.to_vec()));
        } else {
            map.push((key, value.to_vec()));
        }
    }

    pub fn remove(map: &mut Pairs, key: &[u8]) {
        let key = lower(key);
        map.retain(|(name, _)| *name != key);
    }

    pub fn replace(map: &mut Pairs, key: &[u8], value: &[u8]) {
        remove(map, key);
        add(map, key, value);
    }

    pub fn encode(map: &Pairs) -> Vec<u8> {
        let borrowed: Vec<(&[u8], &[u8])> = map
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
            .collect();
        eastwest_common::header_pairs::encode(&borrowed)
    }

    /// cpp-host's `toPairs`: an inconsistent buffer gives no pairs.
    pub fn decode(bytes: &[u8]) -> Pairs {
        eastwest_common::header_pairs::decode(bytes)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key.to_vec(), value.to_vec()))
            .collect()
    }

    pub fn from_strs(pairs: &[(&str, &str)]) -> Pairs {
        pairs
            .iter()
            .map(|(key, value)| (lower(key.as_bytes()), value.as_bytes().to_vec()))
            .collect()
    }
}

type C<'a> = Caller<'a, VmState>;

fn memory(caller: &C<'_>) -> Option<Memory> {
    caller.data().memory
}

fn read(caller: &C<'_>, ptr: i32, size: i32) -> Result<Vec<u8>, Status> {
    let memory = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data(caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(size as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let memory = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data_mut(caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C<'_>, ptr: i32, value: u32) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Allocates in the guest (`malloc`, else `proxy_on_memory_allocate`) and writes pointer and size;
/// an empty value is pointer 0 and size 0.
fn copy_out(caller: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<(), Status> {
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let alloc = caller
        .data()
        .alloc
        .clone()
        .ok_or(Status::InvalidMemoryAccess)?;
    let pointer = alloc
        .call(&mut *caller, bytes.len() as i32)
        .map_err(|_| Status::InvalidMemoryAccess)?;
    if pointer == 0 {
        return Err(Status::InvalidMemoryAccess);
    }
    write(caller, pointer, bytes)?;
    write_u32(caller, ptr_ptr, pointer as u32)?;
    write_u32(caller, size_ptr, bytes.len() as u32)
}

fn code(result: Result<(), Status>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(status) => status.code(),
    }
}

/// A header-map type the ABI knows; anything else is `BadArgument`, checked before any guest
/// memory is read, as Envoy's host does.
fn map_type(map: i32) -> Result<u32, Status> {
    let map = map as u32;
    if map > MAP_MAX {
        return Err(Status::BadArgument);
    }
    Ok(map)
}

macro_rules! wrap {
    ($linker:expr, $name:expr, |$caller:ident $(, $arg:ident : $ty:ty)*| $body:block) => {
        #[allow(unused_mut)]
        let function = move |mut $caller: C<'_> $(, $arg: $ty)*| -> i32 {
            #[allow(clippy::redundant_closure_call)]
            let result: Result<(), Status> = (|| $body)();
            code(result)
        };
        $linker.func_wrap("env", $name, function)?;
    };
}

/// Defines every import of ABI 0.2.1 / 0.2.0 (and the 0.1.0 leftovers the SDKs still import) plus
/// WASI preview1.
pub fn define(linker: &mut Linker<VmState>) -> anyhow::Result<()> {
    wrap!(
        linker,
        "proxy_log",
        |caller, level: i32, ptr: i32, size: i32| {
            if level as u32 > 5 {
                return Err(Status::BadArgument);
            }
            let message = read(&caller, ptr, size)?;
            caller
                .data_mut()
                .log(level as u32, String::from_utf8_lossy(&message).into_owned());
            Ok(())
        }
    );
    wrap!(linker, "proxy_get_log_level", |caller, ptr: i32| {
        let level = caller.data().shared.borrow().log_level;
        write_u32(&mut caller, ptr, level)
    });
    wrap!(
        linker,
        "proxy_get_current_time_nanoseconds",
        |caller, ptr: i32| {
            let now = caller.data().shared.borrow().now_ns;
            write(&mut caller, ptr, &now.to_le_bytes())
        }
    );
    wrap!(
        linker,
        "proxy_set_tick_period_milliseconds",
        |caller, period: i32| {
            let state = caller.data_mut();
            // Envoy sets the timer of the root context of the calling context.
            state.tick_period_ms = period as u32 as u64;
            let now = state.shared.borrow().now_ns;
            state.next_tick_ns = (period != 0).then(|| now + state.tick_period_ms * 1_000_000);
            Ok(())
        }
    );
    wrap!(
        linker,
        "proxy_get_buffer_bytes",
        |caller, kind: i32, start: i32, length: i32, ptr_ptr: i32, size_ptr: i32| {
            let bytes = buffer(caller.data_mut(), kind as u32)?;
            let start = start as u32 as usize;
            let length = length as u32 as usize;
            let end = start.saturating_add(length).min(bytes.len());
            if start >= end {
                return Ok(());
            }
            let slice = bytes[start..end].to_vec();
            copy_out(&mut caller, &slice, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_get_buffer_status",
        |caller, kind: i32, length_ptr: i32, flags_ptr: i32| {
            let bytes = buffer(caller.data_mut(), kind as u32)?;
            write_u32(&mut caller, length_ptr, bytes.len() as u32)?;
            write_u32(&mut caller, flags_ptr, 0)
        }
    );
    wrap!(
        linker,
        "proxy_set_buffer_bytes",
        |caller, kind: i32, start: i32, length: i32, ptr: i32, size: i32| {
            let kind = kind as u32;
            if kind > BUFFER_MAX {
                return Err(Status::BadArgument);
            }
            let data = read(&caller, ptr, size)?;
            let state = caller.data_mut();
            let target = match kind {
                BUFFER_REQUEST_BODY => state
                    .stream()
                    .filter(|s| s.request_open)
                    .map(|s| &mut s.request_body),
                BUFFER_RESPONSE_BODY => state
                    .stream()
                    .filter(|s| s.response_open)
                    .map(|s| &mut s.response_body),
                _ => None,
            };
            let Some(target) = target else {
                buffer(state, kind)?;
                return Err(Status::BadArgument);
            };
            let (start, length) = (start as u32 as usize, length as u32 as usize);
            if start == 0 && length == 0 {
                let mut joined = data;
                joined.extend_from_slice(target);
                *target = joined;
            } else if start == 0 && length >= target.len() {
                *target = data;
            } else if start >= target.len() {
                target.extend_from_slice(&data);
            } else {
                return Err(Status::BadArgument);
            }
            Ok(())
        }
    );
    wrap!(
        linker,
        "proxy_get_header_map_pairs",
        |caller, map: i32, ptr_ptr: i32, size_ptr: i32| {
            let map = map_type(map)?;
            let pairs = caller.data_mut().const_map(map).unwrap_or_default();
            let bytes = if pairs.is_empty() {
                Vec::new()
            } else {
                headers::encode(&pairs)
            };
            copy_out(&mut caller, &bytes, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_set_header_map_pairs",
        |caller, map: i32, ptr: i32, size: i32| {
            let map = map_type(map)?;
            let data = read(&caller, ptr, size)?;
            let pairs = headers::decode(&data);
            caller
                .data_mut()
                .with_map_mut(map, |target| {
                    target.clear();
                    for (key, value) in pairs {
                        headers::add(target, &key, &value);
                    }
                })
                .ok_or(Status::BadArgument)
        }
    );
    wrap!(
        linker,
        "proxy_get_header_map_value",
        |caller, map: i32, key_ptr: i32, key_size: i32, ptr_ptr: i32, size_ptr: i32| {
            let map = map_type(map)?;
            let key = read(&caller, key_ptr, key_size)?;
            let pairs = caller
                .data_mut()
                .const_map(map)
                .ok_or(Status::BadArgument)?;
            let value = headers::get(&pairs, &key).ok_or(Status::NotFound)?.to_vec();
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_add_header_map_value",
        |caller, map: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32| {
            let map = map_type(map)?;
            let key = read(&caller, key_ptr, key_size)?;
            let value = read(&caller, value_ptr, value_size)?;
            caller
                .data_mut()
                .with_map_mut(map, |target| headers::add(target, &key, &value))
                .ok_or(Status::BadArgument)
        }
    );
    wrap!(
        linker,
        "proxy_replace_header_map_value",
        |caller, map: i32, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32| {
            let map = map_type(map)?;
            let key = read(&caller, key_ptr, key_size)?;
            let value = read(&caller, value_ptr, value_size)?;
            caller
                .data_mut()
                .with_map_mut(map, |target| headers::replace(target, &key, &value))
                .ok_or(Status::BadArgument)
        }
    );
    wrap!(
        linker,
        "proxy_remove_header_map_value",
        |caller, map: i32, key_ptr: i32, key_size: i32| {
            let map = map_type(map)?;
            let key = read(&caller, key_ptr, key_size)?;
            caller
                .data_mut()
                .with_map_mut(map, |target| headers::remove(target, &key))
                .ok_or(Status::BadArgument)
        }
    );
    wrap!(
        linker,
        "proxy_get_header_map_size",
        |caller, map: i32, ptr: i32| {
            let map = map_type(map)?;
            let pairs = caller
                .data_mut()
                .with_map_mut(map, |target| target.clone())
                .ok_or(Status::BadArgument)?;
            // Envoy reports the map's byte size.
            let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            write_u32(&mut caller, ptr, size as u32)
        }
    );
    wrap!(
        linker,
        "proxy_get_property",
        |caller, path_ptr: i32, path_size: i32, ptr_ptr: i32, size_ptr: i32| {
            let path = read(&caller, path_ptr, path_size)?;
            let value = property(caller.data_mut(), &path)?;
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_set_property",
        |caller, path_ptr: i32, path_size: i32, value_ptr: i32, value_size: i32| {
            let path = read(&caller, path_ptr, path_size)?;
            let value = read(&caller, value_ptr, value_size)?;
            let stream = caller.data_mut().stream().ok_or(Status::NotFound)?;
            let key = format!("wasm.{}", String::from_utf8_lossy(&path));
            stream.maps.borrow_mut().filter_state.insert(key, value);
            Ok(())
        }
    );
    wrap!(
        linker,
        "proxy_get_shared_data",
        |caller, key_ptr: i32, key_size: i32, ptr_ptr: i32, size_ptr: i32, cas_ptr: i32| {
            let key = String::from_utf8_lossy(&read(&caller, key_ptr, key_size)?).into_owned();
            let vm_id = caller.data().vm_id.clone();
            let entry = caller
                .data()
                .shared
                .borrow()
                .shared_data
                .get(&(vm_id, key))
                .cloned();
            let (value, cas) = entry.ok_or(Status::NotFound)?;
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)?;
            write_u32(&mut caller, cas_ptr, cas)
        }
    );
    wrap!(
        linker,
        "proxy_set_shared_data",
        |caller, key_ptr: i32, key_size: i32, value_ptr: i32, value_size: i32, cas: i32| {
            let key = String::from_utf8_lossy(&read(&caller, key_ptr, key_size)?).into_owned();
            let value = read(&caller, value_ptr, value_size)?;
            let vm_id = caller.data().vm_id.clone();
            let mut shared = caller.data().shared.borrow_mut();
            let cas = cas as u32;
            if let Some((_, current)) = shared.shared_data.get(&(vm_id.clone(), key.clone())) {
                if cas != 0 && cas != *current {
                    return Err(Status::CasMismatch);
                }
            }
            shared.cas = shared.cas.wrapping_add(1);
            if shared.cas == 0 {
                shared.cas = 1;
            }
            let version = shared.cas;
            shared.shared_data.insert((vm_id, key), (value, version));
            Ok(())
        }
    );
    wrap!(
        linker,
        "proxy_register_shared_queue",
        |caller, name_ptr: i32, name_size: i32, token_ptr: i32| {
            let name = String::from_utf8_lossy(&read(&caller, name_ptr, name_size)?).into_owned();
            let state = caller.data();
            let (vm_id, worker, context) = (state.vm_id.clone(), state.worker, state.context());
            let token = {
                let mut shared = state.shared.borrow_mut();
                let existing = shared
                    .queue_tokens
                    .get(&(vm_id.clone(), name.clone()))
                    .copied();
                let token = match existing {
                    Some(token) => token,
                    None => {
                        shared.next_queue_token += 1;
                        let token = shared.next_queue_token;
                        shared.queue_tokens.insert((vm_id, name), token);
                        token
                    }
                };
                let queue = shared.queues.entry(token).or_insert(Queue {
                    items: VecDeque::new(),
                    worker,
                    context_id: context,
                });
                // The last registration receives `on_queue_ready`, as in Envoy.
                queue.worker = worker;
                queue.context_id = context;
                token
            };
            write_u32(&mut caller, token_ptr, token)
        }
    );
    wrap!(
        linker,
        "proxy_resolve_shared_queue",
        |caller, vm_ptr: i32, vm_size: i32, name_ptr: i32, name_size: i32, token_ptr: i32| {
            let vm_id = String::from_utf8_lossy(&read(&caller, vm_ptr, vm_size)?).into_owned();
            let name = String::from_utf8_lossy(&read(&caller, name_ptr, name_size)?).into_owned();
            let token = caller
                .data()
                .shared
                .borrow()
                .queue_tokens
                .get(&(vm_id, name))
                .copied();
            write_u32(&mut caller, token_ptr, token.ok_or(Status::NotFound)?)
        }
    );
    wrap!(
        linker,
        "proxy_dequeue_shared_queue",
        |caller, token: i32, ptr_ptr: i32, size_ptr: i32| {
            let item = {
                let mut shared = caller.data().shared.borrow_mut();
                let queue = shared
                    .queues
                    .get_mut(&(token as u32))
                    .ok_or(Status::NotFound)?;
                queue.items.pop_front().ok_or(Status::Empty)?
            };
            copy_out(&mut caller, &item, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_enqueue_shared_queue",
        |caller, token: i32, ptr: i32, size: i32| {
            let data = read(&caller, ptr, size)?;
            let mut shared = caller.data().shared.borrow_mut();
            let queue = shared
                .queues
                .get_mut(&(token as u32))
                .ok_or(Status::NotFound)?;
            queue.items.push_back(data);
            let target = (queue.worker, queue.context_id, token as u32);
            shared.queue_ready.push(target);
            Ok(())
        }
    );
    wrap!(linker, "proxy_continue_stream", |caller, kind: i32| {
        continue_stream(caller.data_mut(), kind as u32)
    });
    wrap!(linker, "proxy_continue_request", |caller| {
        continue_stream(caller.data_mut(), 0)
    });
    wrap!(linker, "proxy_continue_response", |caller| {
        continue_stream(caller.data_mut(), 1)
    });
    wrap!(linker, "proxy_close_stream", |caller, kind: i32| {
        let state = caller.data_mut();
        let context = state.context();
        match kind {
            0 | 1 => {
                if state.streams.contains_key(&context) {
                    state.deferred.push(Deferred::Close {
                        context,
                        response: kind == 1,
                    });
                }
                Ok(())
            }
            2 | 3 => Ok(()),
            _ => Err(Status::BadArgument),
        }
    });
    wrap!(
        linker,
        "proxy_send_local_response",
        |caller,
         status: i32,
         details_ptr: i32,
         details_size: i32,
         body_ptr: i32,
         body_size: i32,
         headers_ptr: i32,
         headers_size: i32,
         grpc: i32| {
            let details = read(&caller, details_ptr, details_size)?;
            let body = read(&caller, body_ptr, body_size)?;
            let headers = headers::decode(&read(&caller, headers_ptr, headers_size)?);
            let state = caller.data_mut();
            let context = state.context();
            if state.streams.contains_key(&context) {
                state.deferred.push(Deferred::LocalReply {
                    context,
                    status: status as u32,
                    body,
                    headers,
                    details: String::from_utf8_lossy(&details).into_owned(),
                    grpc_status: (grpc >= 0).then_some(grpc as u32),
                });
            }
            state.stop_iteration = true;
            Ok(())
        }
    );
    wrap!(linker, "proxy_clear_route_cache", |_caller| { Ok(()) });
    wrap!(
        linker,
        "proxy_http_call",
        |caller,
         uri_ptr: i32,
         uri_size: i32,
         headers_ptr: i32,
         headers_size: i32,
         body_ptr: i32,
         body_size: i32,
         trailers_ptr: i32,
         trailers_size: i32,
         timeout: i32,
         token_ptr: i32| {
            let cluster = String::from_utf8_lossy(&read(&caller, uri_ptr, uri_size)?).into_owned();
            let headers = headers::decode(&read(&caller, headers_ptr, headers_size)?);
            let body = read(&caller, body_ptr, body_size)?;
            let trailers = headers::decode(&read(&caller, trailers_ptr, trailers_size)?);
            write_u32(&mut caller, token_ptr, 0)?;
            if timeout < 0 {
                return Err(Status::BadArgument);
            }
            if !caller.data().shared.borrow().clusters.contains(&cluster) {
                return Err(Status::BadArgument);
            }
            for required in [&b":path"[..], b":method", b":authority"] {
                if headers::get(&headers, required).is_none() {
                    return Err(Status::BadArgument);
                }
            }
            let state = caller.data_mut();
            let token = state.next_http_token;
            state.next_http_token = state.next_http_token.wrapping_add(1).max(1);
            let origin_context = state.context();
            state.new_http_calls.push(NewHttpCall {
                token,
                cluster,
                headers,
                body,
                trailers,
                timeout_ms: timeout as u32 as u64,
                origin_context,
            });
            write_u32(&mut caller, token_ptr, token)
        }
    );
    wrap!(
        linker,
        "proxy_grpc_call",
        |caller,
         service_ptr: i32,
         service_size: i32,
         service_name_ptr: i32,
         service_name_size: i32,
         method_ptr: i32,
         method_size: i32,
         metadata_ptr: i32,
         metadata_size: i32,
         request_ptr: i32,
         request_size: i32,
         timeout: i32,
         token_ptr: i32| {
            let service = read(&caller, service_ptr, service_size)?;
            let service_name = read(&caller, service_name_ptr, service_name_size)?;
            let method = read(&caller, method_ptr, method_size)?;
            let metadata = headers::decode(&read(&caller, metadata_ptr, metadata_size)?);
            let request = read(&caller, request_ptr, request_size)?;
            let token = open_grpc(
                caller.data_mut(),
                &service,
                &service_name,
                &method,
                metadata,
                Some(request),
                timeout as u32 as u64,
            )?;
            write_u32(&mut caller, token_ptr, token)
        }
    );
    wrap!(
        linker,
        "proxy_grpc_stream",
        |caller,
         service_ptr: i32,
         service_size: i32,
         service_name_ptr: i32,
         service_name_size: i32,
         method_ptr: i32,
         method_size: i32,
         metadata_ptr: i32,
         metadata_size: i32,
         token_ptr: i32| {
            let service = read(&caller, service_ptr, service_size)?;
            let service_name = read(&caller, service_name_ptr, service_name_size)?;
            let method = read(&caller, method_ptr, method_size)?;
            let metadata = headers::decode(&read(&caller, metadata_ptr, metadata_size)?);
            let token = open_grpc(
                caller.data_mut(),
                &service,
                &service_name,
                &method,
                metadata,
                None,
                0,
            )?;
            write_u32(&mut caller, token_ptr, token)
        }
    );
    wrap!(
        linker,
        "proxy_grpc_send",
        |caller, token: i32, ptr: i32, size: i32, end: i32| {
            let message = read(&caller, ptr, size)?;
            let state = caller.data_mut();
            let token = token as u32;
            if token % 2 == 1 {
                return Err(Status::BadArgument);
            }
            if !state.grpc_streams.contains(&token) {
                return Err(Status::NotFound);
            }
            state.grpc_actions.push(GrpcAction::Send {
                token,
                message,
                end_stream: end != 0,
            });
            Ok(())
        }
    );
    wrap!(linker, "proxy_grpc_cancel", |caller, token: i32| {
        let state = caller.data_mut();
        let token = token as u32;
        if !state.grpc_calls.remove(&token) && !state.grpc_streams.remove(&token) {
            return Err(Status::NotFound);
        }
        state.grpc_actions.push(GrpcAction::Cancel { token });
        Ok(())
    });
    wrap!(linker, "proxy_grpc_close", |caller, token: i32| {
        let state = caller.data_mut();
        let token = token as u32;
        if token % 2 == 1 {
            if !state.grpc_calls.remove(&token) {
                return Err(Status::NotFound);
            }
            // Closing a call cancels it (Envoy's `grpcClose`).
            state.grpc_actions.push(GrpcAction::Cancel { token });
        } else {
            if !state.grpc_streams.contains(&token) {
                return Err(Status::NotFound);
            }
            state.grpc_actions.push(GrpcAction::Close { token });
        }
        Ok(())
    });
    wrap!(
        linker,
        "proxy_get_status",
        |caller, code_ptr: i32, ptr_ptr: i32, size_ptr: i32| {
            let (status, message) = caller.data().status.clone();
            write_u32(&mut caller, code_ptr, status)?;
            copy_out(&mut caller, &message, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_set_effective_context",
        |caller, context: i32| {
            let state = caller.data_mut();
            let context = context as u32;
            if context != state.root_context_id && !state.streams.contains_key(&context) {
                return Err(Status::BadArgument);
            }
            state.effective_context = context;
            Ok(())
        }
    );
    wrap!(linker, "proxy_done", |caller| {
        let state = caller.data_mut();
        if !state.pending_done {
            return Err(Status::NotFound);
        }
        state.pending_done = false;
        state.done_called = true;
        Ok(())
    });
    wrap!(
        linker,
        "proxy_call_foreign_function",
        |caller,
         name_ptr: i32,
         name_size: i32,
         args_ptr: i32,
         args_size: i32,
         _results: i32,
         _results_size: i32| {
            read(&caller, name_ptr, name_size)?;
            read(&caller, args_ptr, args_size)?;
            Err(Status::NotFound)
        }
    );
    wrap!(
        linker,
        "proxy_get_configuration",
        |caller, ptr_ptr: i32, size_ptr: i32| {
            let state = caller.data();
            let value = if state.in_configure {
                state.plugin_config.clone()
            } else {
                state.vm_config.clone()
            };
            copy_out(&mut caller, &value, ptr_ptr, size_ptr)
        }
    );
    wrap!(
        linker,
        "proxy_define_metric",
        |caller, kind: i32, name_ptr: i32, name_size: i32, id_ptr: i32| {
            let name = String::from_utf8_lossy(&read(&caller, name_ptr, name_size)?).into_owned();
            let kind = kind as u32;
            let metric_kind = match kind {
                METRIC_COUNTER => MetricKind::Counter,
                METRIC_GAUGE => MetricKind::Gauge,
                METRIC_HISTOGRAM => MetricKind::Histogram,
                _ => return Err(Status::BadArgument),
            };
            let state = caller.data_mut();
            state.next_metric_id[kind as usize] += 4;
            let id = state.next_metric_id[kind as usize];
            state.metric_ids.insert(id, (metric_kind, name.clone()));
            state
                .shared
                .borrow_mut()
                .registry
                .define(metric_kind, &name);
            write_u32(&mut caller, id_ptr, id)
        }
    );
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: C<'_>, id: i32, offset: i64| -> i32 {
            let state = caller.data();
            let id = id as u32;
            let result = match id & 3 {
                METRIC_COUNTER | METRIC_GAUGE => match state.metric_ids.get(&id) {
                    Some((kind, name)) => {
                        let mut shared = state.shared.borrow_mut();
                        let data = shared.registry.get_mut(*kind, name);
                        match (kind, data) {
                            (MetricKind::Counter, Some(_)) if offset <= 0 => {
                                Err(Status::BadArgument)
                            }
                            (_, Some(data)) => {
                                data.value = data.value.wrapping_add(offset);
                                Ok(())
                            }
                            (_, None) => Err(Status::NotFound),
                        }
                    }
                    None => Err(Status::NotFound),
                },
                _ => Err(Status::BadArgument),
            };
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: C<'_>, id: i32, value: i64| -> i32 {
            let state = caller.data();
            let result = match state.metric_ids.get(&(id as u32)) {
                Some((kind, name)) => {
                    let mut shared = state.shared.borrow_mut();
                    match shared.registry.get_mut(*kind, name) {
                        Some(data) => {
                            match kind {
                                // `record` adds to a counter and sets a gauge.
                                MetricKind::Counter => data.value = data.value.wrapping_add(value),
                                MetricKind::Gauge => data.value = value,
                                MetricKind::Histogram => data.samples.push(value as u64),
                            }
                            Ok(())
                        }
                        None => Err(Status::NotFound),
                    }
                }
                None => Err(Status::NotFound),
            };
            code(result)
        },
    )?;
    wrap!(linker, "proxy_get_metric", |caller, id: i32, ptr: i32| {
        let id = id as u32;
        if id & 3 == METRIC_HISTOGRAM || id & 3 == 3 {
            return Err(Status::BadArgument);
        }
        let state = caller.data();
        let (kind, name) = state.metric_ids.get(&id).cloned().ok_or(Status::NotFound)?;
        let value = state
            .shared
            .borrow_mut()
            .registry
            .get_mut(kind, &name)
            .map(|data| data.value)
            .ok_or(Status::NotFound)?;
        write(&mut caller, ptr, &(value as u64).to_le_bytes())
    });
    define_wasi(linker)?;
    Ok(())
}

fn continue_stream(state: &mut VmState, kind: u32) -> Result<(), Status> {
    let context = state.context();
    match kind {
        0 | 1 => {
            if state.streams.contains_key(&context) {
                state.deferred.push(Deferred::Continue {
                    context,
                    response: kind == 1,
                });
            }
            Ok(())
        }
        _ => Err(Status::BadArgument),
    }
}

/// The cluster a gRPC call goes to: `service` is a serialized `envoy.config.core.v3.GrpcService`
/// (its `envoy_grpc.cluster_name`), or, when it does not parse as one, a cluster name, which must
/// be known (else ParseFailure), as Envoy's `grpcCall` reads it.
fn grpc_cluster(state: &VmState, service: &[u8]) -> Result<String, Status> {
    if let Some(cluster) = grpc_service_cluster(service) {
        return Ok(cluster);
    }
    let name = String::from_utf8_lossy(service).into_owned();
    if state.shared.borrow().clusters.contains(&name) {
        Ok(name)
    } else {
        Err(Status::ParseFailure)
    }
}

/// `envoy_grpc.cluster_name` of a serialized GrpcService; `None` if the bytes are not a valid
/// protobuf message. A valid message without it names no cluster (the call then fails).
fn grpc_service_cluster(bytes: &[u8]) -> Option<String> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    /// Walks a message; returns the length-delimited field `wanted`, if any.
    fn field(bytes: &[u8], wanted: u64) -> Option<Option<&[u8]>> {
        let (mut at, mut found) = (0, None);
        while at < bytes.len() {
            let key = varint(bytes, &mut at)?;
            if key >> 3 == 0 {
                return None;
            }
            match key & 7 {
                0 => {
                    varint(bytes, &mut at)?;
                }
                1 => at = at.checked_add(8).filter(|end| *end <= bytes.len())?,
                5 => at = at.checked_add(4).filter(|end| *end <= bytes.len())?,
                2 => {
                    let length = usize::try_from(varint(bytes, &mut at)?).ok()?;
                    let end = at.checked_add(length).filter(|end| *end <= bytes.len())?;
                    if key >> 3 == wanted {
                        found = Some(&bytes[at..end]);
                    }
                    at = end;
                }
                _ => return None,
            }
        }
        Some(found)
    }
    let envoy_grpc = field(bytes, 1)?;
    let cluster = match envoy_grpc {
        Some(inner) => field(inner, 1)?.map(|name| String::from_utf8_lossy(name).into_owned()),
        None => None,
    };
    Some(cluster.unwrap_or_default())
}

/// Opens a gRPC call (with its request `message`) or a stream (`None`): resolves the cluster,
/// takes a token and records the call for the harness; returns the token.
fn open_grpc(
    state: &mut VmState,
    service: &[u8],
    service_name: &[u8],
    method: &[u8],
    initial_metadata: Pairs,
    message: Option<Vec<u8>>,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let cluster = grpc_cluster(state, service)?;
    let call = message.is_some();
    let token = next_grpc_token(state, call);
    if call {
        state.grpc_calls.insert(token);
    } else {
        state.grpc_streams.insert(token);
    }
    let origin_context = state.context();
    state.new_grpc_calls.push(NewGrpcCall {
        token,
        cluster,
        service: String::from_utf8_lossy(service_name).into_owned(),
        method: String::from_utf8_lossy(method).into_owned(),
        initial_metadata,
        message,
        timeout_ms,
        origin_context,
    });
    Ok(token)
}

/// Envoy's token numbering on the root context: calls odd, streams even, never 0.
fn next_grpc_token(state: &mut VmState, call: bool) -> u32 {
    loop {
        let token = state.next_grpc_token;
        state.next_grpc_token = state.next_grpc_token.wrapping_add(1);
        let odd = token % 2 == 1;
        if token == 0 || odd != call {
            continue;
        }
        if !state.grpc_calls.contains(&token) && !state.grpc_streams.contains(&token) {
            return token;
        }
    }
}

fn buffer(state: &mut VmState, kind: u32) -> Result<Vec<u8>, Status> {
    if kind > BUFFER_MAX {
        return Err(Status::BadArgument);
    }
    match kind {
        BUFFER_REQUEST_BODY => Ok(state
            .stream()
            .filter(|s| s.request_open)
            .map(|s| s.request_body.clone())
            .unwrap_or_default()),
        BUFFER_RESPONSE_BODY => Ok(state
            .stream()
            .filter(|s| s.response_open)
            .map(|s| s.response_body.clone())
            .unwrap_or_default()),
        BUFFER_HTTP_CALL_RESPONSE_BODY => state
            .http_call_response
            .as_ref()
            .map(|r| r.body.clone())
            .ok_or(Status::NotFound),
        BUFFER_GRPC_RECEIVE => Ok(state.grpc_receive.message.clone().unwrap_or_default()),
        BUFFER_VM_CONFIGURATION => Ok(state.vm_config.clone()),
        BUFFER_PLUGIN_CONFIGURATION if state.in_configure => Ok(state.plugin_config.clone()),
        BUFFER_CALL_DATA => Ok(state.call_data.clone()),
        _ => Err(Status::NotFound),
    }
}

fn property(state: &mut VmState, path: &[u8]) -> Result<Vec<u8>, Status> {
    let parts = properties::split_path(path);
    match parts.first().map(String::as_str) {
        Some("plugin_root_id") if parts.len() == 1 => {
            return Ok(state.root_id.clone().into_bytes())
        }
        Some("plugin_vm_id") if parts.len() == 1 => return Ok(state.vm_id.clone().into_bytes()),
        Some("plugin_name") if parts.len() == 1 => {
            return Ok(state.plugin_name.clone().into_bytes())
        }
        _ => {}
    }
    let context = state.context();
    let shared = state.shared.borrow();
    match state.streams.get(&context) {
        Some(stream) => {
            let maps = stream.maps.borrow();
            let merged = properties::merge(&shared.attributes, &maps.properties);
            properties::lookup(&merged, &maps.filter_state, path)
        }
        None => properties::lookup(&shared.attributes, &BTreeMap::new(), path),
    }
}

const WASI_EBADF: i32 = 8;
const WASI_EFAULT: i32 = 21;
const WASI_ENOSYS: i32 = 52;
const WASI_ENOTSUP: i32 = 58;

fn define_wasi(linker: &mut Linker<VmState>) -> anyhow::Result<()> {
    let module = "wasi_snapshot_preview1";
    linker.func_wrap(
        module,
        "fd_write",
        |mut caller: C<'_>, fd: i32, iovs: i32, count: i32, written_ptr: i32| -> i32 {
            let level = match fd {
                1 => 2,
                2 => 4,
                _ => return WASI_EBADF,
            };
            let mut text = Vec::new();
            for index in 0..count {
                let Ok(iov) = read(&caller, iovs + index * 8, 8) else {
                    return WASI_EFAULT;
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&caller, ptr, len) {
                    Ok(bytes) => text.extend_from_slice(&bytes),
                    Err(_) => return WASI_EFAULT,
                }
            }
            let written = text.len();
            if text.last() == Some(&b'\n') {
                text.pop();
            }
            if written > 0 {
                caller
                    .data_mut()
                    .log(level, String::from_utf8_lossy(&text).into_owned());
            }
            match write_u32(&mut caller, written_ptr, written as u32) {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        module,
        "fd_read",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { WASI_ENOSYS },
    )?;
    linker.func_wrap(
        module,
        "fd_seek",
        |_: C<'_>, _: i32, _: i64, _: i32, _: i32| -> i32 { 0 },
    )?;
    linker.func_wrap(module, "fd_close", |_: C<'_>, _: i32| -> i32 { 0 })?;
    linker.func_wrap(
        module,
        "fd_prestat_get",
        |_: C<'_>, _: i32, _: i32| -> i32 { WASI_EBADF },
    )?;
    linker.func_wrap(
        module,
        "fd_prestat_dir_name",
        |_: C<'_>, _: i32, _: i32, _: i32| -> i32 { WASI_EBADF },
    )?;
    linker.func_wrap(
        module,
        "fd_fdstat_get",
        |mut caller: C<'_>, fd: i32, out: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return WASI_EBADF;
            }
            let mut stat = [0u8; 24];
            stat[8] = 64;
            match write(&mut caller, out, &stat) {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        module,
        "environ_sizes_get",
        |mut caller: C<'_>, count_ptr: i32, size_ptr: i32| -> i32 {
            let env = caller.data().env.clone();
            let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            match write_u32(&mut caller, count_ptr, env.len() as u32)
                .and_then(|_| write_u32(&mut caller, size_ptr, size as u32))
            {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        module,
        "environ_get",
        |mut caller: C<'_>, array_ptr: i32, buf_ptr: i32| -> i32 {
            let env = caller.data().env.clone();
            let (mut array, mut buf) = (array_ptr, buf_ptr);
            for (key, value) in env {
                let entry = format!("{key}={value}\0");
                if write_u32(&mut caller, array, buf as u32).is_err()
                    || write(&mut caller, buf, entry.as_bytes()).is_err()
                {
                    return WASI_EFAULT;
                }
                array += 4;
                buf += entry.len() as i32;
            }
            0
        },
    )?;
    linker.func_wrap(
        module,
        "args_sizes_get",
        |mut caller: C<'_>, argc: i32, size: i32| -> i32 {
            match write_u32(&mut caller, argc, 0).and_then(|_| write_u32(&mut caller, size, 0)) {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(module, "args_get", |_: C<'_>, _: i32, _: i32| -> i32 { 0 })?;
    linker.func_wrap(
        module,
        "clock_time_get",
        |mut caller: C<'_>, clock: i32, _precision: i64, out: i32| -> i32 {
            let shared = caller.data().shared.clone();
            let now = match clock {
                0 => shared.borrow().now_ns,
                1 => shared.borrow().monotonic_ns,
                _ => return WASI_ENOTSUP,
            };
            match write(&mut caller, out, &now.to_le_bytes()) {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(
        module,
        "random_get",
        |mut caller: C<'_>, ptr: i32, len: i32| -> i32 {
            // Deterministic bytes (a test host wants reproducible runs).
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ caller.data().shared.borrow().now_ns;
            let bytes: Vec<u8> = (0..len.max(0))
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            match write(&mut caller, ptr, &bytes) {
                Ok(()) => 0,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    linker.func_wrap(module, "sched_yield", |_: C<'_>| -> i32 { 0 })?;
    linker.func_wrap(
        module,
        "poll_oneoff",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { WASI_ENOSYS },
    )?;
    linker.func_wrap(
        module,
        "proc_exit",
        |_: C<'_>, code: i32| -> anyhow::Result<()> {
            anyhow::bail!("wasi proc_exit({code}) called")
        },
    )?;
    Ok(())
}
