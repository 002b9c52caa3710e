//! Host calls on the request path without the proxy-wasm Rust SDK's panics (the SDK's
//! `hostcalls` panic on any status they do not expect, and a panic is a trap in a production
//! proxy): header reads and writes, every value of a header whatever bytes its name holds, and
//! filter state. Each returns the host's status instead; callers count failures and go on.

use proxy_wasm::types::{MapType, Status};

use crate::header_pairs;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> Status;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Status;
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `data` must be null or a buffer of exactly `size` bytes allocated by the SDK's allocator.
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: the SDK allocates host buffers as boxed slices of exactly `size` bytes.
        unsafe { Vec::from_raw_parts(data, size, size) }
    }
}

/// The whole header map in the proxy-wasm pairs encoding (decode with [`header_pairs::decode`]).
pub fn header_map_bytes(map: MapType) -> Result<Vec<u8>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and size it allocated through our allocator.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
        Status::Ok => Ok(unsafe { take_host_buffer(data, size) }),
        status => Err(status),
    }
}

/// Every value of header `name` in `map`, in order (Envoy's single-value call returns only the
/// first, which would let a second forged header through).
pub fn header_values(map: MapType, name: &str) -> Result<Vec<Vec<u8>>, Status> {
    let bytes = header_map_bytes(map)?;
    let pairs = header_pairs::decode(&bytes).ok_or(Status::SerializationFailure)?;
    Ok(header_pairs::values_of(&pairs, name)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect())
}

/// Writes filter state (`wasm.<key>` in Envoy) and reports a refusal instead of panicking.
pub fn set_filter_state(key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: both slices outlive the call; the host copies them.
    match unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) } {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// The (first) value of header `name`; `Ok(None)` when absent.
pub fn header_value(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and size it allocated through our allocator.
    match unsafe {
        proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size)
    } {
        Status::Ok => Ok(Some(unsafe { take_host_buffer(data, size) })),
        Status::NotFound => Ok(None),
        status => Err(status),
    }
}

/// Replaces header `name` by `value`, or removes it when `value` is `None`.
pub fn set_header(map: MapType, name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    // SAFETY: the slices outlive the calls; the host copies them.
    let status = match value {
        Some(value) => unsafe {
            proxy_replace_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        },
        None => unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) },
    };
    match status {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// A shared-data value and its CAS token; `Ok(None)` when the key was never written.
pub fn shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the host writes a pointer and size it allocated through our allocator.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) }
    {
        Status::Ok => Ok(Some((unsafe { take_host_buffer(data, size) }, cas))),
        Status::NotFound => Ok(None),
        status => Err(status),
    }
}

/// Writes shared data if the key is still at `cas` (0: unconditionally); `Err(CasMismatch)`
/// when another VM wrote it first.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: both slices outlive the call; the host copies them.
    match unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    } {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// Answers the request locally with `status`, `headers` and `body` (a gRPC status when
/// `grpc_status` is not -1); the upstream is not contacted.
pub fn send_local_reply(
    status: u32,
    details: &str,
    headers: &[(&[u8], &[u8])],
    body: &[u8],
    grpc_status: i32,
) -> Result<(), Status> {
    let headers = header_pairs::encode(headers);
    // SAFETY: every slice outlives the call; the host copies them.
    match unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    } {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// The host's wall clock in nanoseconds since the epoch; `None` if the host refuses.
pub fn now_nanos() -> Option<u64> {
    let mut now: u64 = 0;
    // SAFETY: the host writes one u64.
    match unsafe { proxy_get_current_time_nanoseconds(&mut now) } {
        Status::Ok => Some(now),
        _ => None,
    }
}

/// Asks for `on_tick` every `millis` milliseconds (0 stops the timer).
pub fn set_tick_period(millis: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    match unsafe { proxy_set_tick_period_milliseconds(millis) } {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// The calling service's labels on an inbound sidecar: what label-enrich published in filter
/// state when it ran first, else resolved here from the request's claims with the same trust
/// rules. The problems found while resolving are returned for the caller to count.
pub fn inbound_source(
    settings: &crate::resolve::LabelSettings,
) -> (crate::labels::Labels, crate::resolve::Problems) {
    if let Some(state) = property(&[crate::resolve::SOURCE_STATE_KEY]) {
        return (
            crate::resolve::labels_from_state(&state),
            crate::resolve::Problems::default(),
        );
    }
    let baggage = header_values(MapType::HttpRequestHeaders, "baggage").unwrap_or_default();
    let slices: Vec<&[u8]> = baggage.iter().map(Vec::as_slice).collect();
    let peer_metadata = header_value(
        MapType::HttpRequestHeaders,
        crate::peer::ISTIO_PEER_METADATA_HEADER,
    )
    .ok()
    .flatten();
    let outcome = crate::resolve::inbound_request(
        settings,
        &slices,
        peer_metadata.as_deref(),
        &downstream_identity(settings.peer_trust),
    );
    (outcome.source, outcome.problems)
}

/// A property's raw value; `None` when absent or when the host refuses.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    proxy_wasm::hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
}

/// The first of several property paths that exists (newer Envoy names first).
fn property_any(paths: &[&[&str]]) -> Option<Vec<u8>> {
    paths.iter().find_map(|path| property(path))
}

/// The serialized `Node` Envoy runs as: `xds.node`, or `node` on Envoy before the `xds`
/// attributes; `None` when neither is available (yet: some hosts expose it only to streams).
pub fn node() -> Option<Vec<u8>> {
    property_any(&[&["xds", "node"], &["node"]])
}

/// The traffic direction of the listener the stream came in on.
pub fn listener_direction() -> Option<crate::properties::Direction> {
    let value = property_any(&[&["xds", "listener_direction"], &["listener_direction"]])?;
    crate::properties::decode_int64(&value)
        .and_then(crate::properties::Direction::from_traffic_direction)
}

/// What the downstream connection proves: mTLS and the client certificate's SPIFFE ID.
///
/// A property read costs microseconds in Envoy, so the common cases take one: a URI SAN can
/// only come from a certificate the peer presented, which answers both questions.
pub fn downstream_identity(trust: crate::config::PeerTrust) -> crate::trust::PeerIdentity {
    use crate::trust::{PeerIdentity, SpiffeId};
    if let Some(uri) = property(&["connection", "uri_san_peer_certificate"]) {
        return PeerIdentity {
            mtls: true,
            spiffe: SpiffeId::parse(&uri),
        };
    }
    // Without a URI SAN nothing is proven; whether the peer used mTLS only decides which
    // refusal is counted (`no_mtls` or `no_spiffe_id`), which only the `mtls` mode reports.
    let mtls = trust == crate::config::PeerTrust::Mtls
        && property(&["connection", "mtls"])
            .and_then(|value| crate::properties::decode_bool(&value))
            .unwrap_or(false);
    PeerIdentity { mtls, spiffe: None }
}

/// The name of the upstream cluster the request was routed to (`xds.cluster_name`).
pub fn upstream_cluster() -> Option<Vec<u8>> {
    property(&["xds", "cluster_name"])
}

/// What the upstream connection proves: the server certificate's SPIFFE ID, which Envoy has
/// verified when the cluster's TLS context has a validation context.
pub fn upstream_identity() -> crate::trust::PeerIdentity {
    let spiffe = property(&["upstream", "uri_san_peer_certificate"])
        .and_then(|uri| crate::trust::SpiffeId::parse(&uri));
    crate::trust::PeerIdentity {
        mtls: spiffe.is_some(),
        spiffe,
    }
}

/// This workload's labels: the configuration's `local` first, then the node's metadata.
pub struct OwnLabels {
    pub labels: crate::labels::Labels,
    /// Node metadata values present but invalid (ignored).
    pub invalid_values: u32,
    /// Why the node could not be decoded, when it could not (only `local` applies then).
    pub undecodable: Option<String>,
}

/// Resolves this workload's labels; `None` when the host does not expose the node (yet).
pub fn own_labels(settings: &crate::resolve::LabelSettings) -> Option<OwnLabels> {
    let bytes = node()?;
    let mut own = OwnLabels {
        labels: settings.local.clone(),
        invalid_values: 0,
        undecodable: None,
    };
    match crate::properties::labels_from_node(&bytes, &settings.label_keys) {
        Ok(resolved) => {
            own.invalid_values = resolved.invalid_values;
            own.labels.fill_from(&resolved.labels);
        }
        Err(error) => own.undecodable = Some(error.to_string()),
    }
    Some(own)
}

/// This workload's labels as a filter keeps them: resolved when the filter is configured, and
/// again on a later request while the host does not expose the node yet.
pub struct OwnLabelsCell {
    labels: std::cell::RefCell<crate::labels::Labels>,
    pending: std::cell::Cell<bool>,
}

impl OwnLabelsCell {
    /// Starts from the configured `local` labels; resolve with [`OwnLabelsCell::refresh`].
    pub fn new(settings: &crate::resolve::LabelSettings) -> OwnLabelsCell {
        OwnLabelsCell {
            labels: std::cell::RefCell::new(settings.local.clone()),
            pending: std::cell::Cell::new(true),
        }
    }

    /// Resolves the labels from the node if that has not happened yet; `on_resolved` sees what
    /// the node held (to count and log invalid values) when it happens.
    pub fn refresh(
        &self,
        settings: &crate::resolve::LabelSettings,
        on_resolved: impl FnOnce(&OwnLabels),
    ) {
        if !self.pending.get() {
            return;
        }
        if let Some(own) = own_labels(settings) {
            on_resolved(&own);
            *self.labels.borrow_mut() = own.labels;
            self.pending.set(false);
        }
    }

    pub fn get(&self) -> std::cell::Ref<'_, crate::labels::Labels> {
        self.labels.borrow()
    }
}

/// Logs `eastwest-<filter>: <message>` (the prefix every eastwest log line carries).
pub fn log(filter: &str, level: proxy_wasm::types::LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, &format!("eastwest-{filter}: {message}"));
}

/// Reads the plugin configuration and parses it; on a bad configuration logs
/// `eastwest-<filter>: invalid configuration: <field path>: <reason>` and returns `None`, so that
/// `on_configure` returns false and Envoy refuses the configuration (DESIGN.md §6).
pub fn configure<T>(
    filter: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, crate::config::ConfigError>,
) -> Option<T> {
    let bytes = proxy_wasm::hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    match parse(&bytes) {
        Ok(settings) => Some(settings),
        Err(error) => {
            let _ = proxy_wasm::hostcalls::log(
                proxy_wasm::types::LogLevel::Error,
                &error.log_line(filter),
            );
            None
        }
    }
}
