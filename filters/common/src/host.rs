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
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
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

/// A header map as the host encodes it, fetched once; read the values of any header from it.
#[derive(Default)]
pub struct HeaderMap(Vec<u8>);

impl HeaderMap {
    /// Every value of header `name`, in order (Envoy's single-value call returns only the
    /// first, which would let a second forged header through); `None` when the encoding is
    /// inconsistent.
    pub fn values(&self, name: &str) -> Option<Vec<&[u8]>> {
        header_pairs::values_in(&self.0, name)
    }

    /// Every value of each header in `names`, in one pass over the map.
    pub fn values_of_each<const N: usize>(&self, names: [&str; N]) -> Option<[Vec<&[u8]>; N]> {
        header_pairs::values_in_each(&self.0, names)
    }
}

/// The whole header map, to read several values of a header from.
pub fn header_map(map: MapType) -> Result<HeaderMap, Status> {
    header_map_bytes(map).map(HeaderMap)
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

/// Property paths as the host reads them (segments separated by NUL), encoded once.
pub mod paths {
    pub const XDS_NODE: &[u8] = b"xds\0node";
    pub const NODE: &[u8] = b"node";
    pub const XDS_LISTENER_DIRECTION: &[u8] = b"xds\0listener_direction";
    pub const LISTENER_DIRECTION: &[u8] = b"listener_direction";
    pub const XDS_CLUSTER_NAME: &[u8] = b"xds\0cluster_name";
    pub const CONNECTION_URI_SAN: &[u8] = b"connection\0uri_san_peer_certificate";
    pub const CONNECTION_MTLS: &[u8] = b"connection\0mtls";
    pub const UPSTREAM_URI_SAN: &[u8] = b"upstream\0uri_san_peer_certificate";
    pub const RESPONSE_CODE: &[u8] = b"response\0code";
    pub const RESPONSE_FLAGS: &[u8] = b"response\0flags";
    pub const RESPONSE_GRPC_STATUS: &[u8] = b"response\0grpc_status";
    pub const REQUEST_DURATION: &[u8] = b"request\0duration";
    pub const UPSTREAM_ATTEMPTS: &[u8] = b"upstream\0request_attempt_count";
}

/// A property's raw value at an encoded path ([`paths`]); `None` when absent or refused.
pub fn property_at(path: &[u8]) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and size it allocated through our allocator.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        Status::Ok => Some(unsafe { take_host_buffer(data, size) }),
        _ => None,
    }
}

/// An `int64` property ([`crate::properties::decode_int64`]).
pub fn int_property(path: &[u8]) -> Option<i64> {
    property_at(path).and_then(|value| crate::properties::decode_int64(&value))
}

/// The first of several property paths that exists (newer Envoy names first).
fn property_any(paths: &[&[u8]]) -> Option<Vec<u8>> {
    paths.iter().find_map(|path| property_at(path))
}

/// The serialized `Node` Envoy runs as: `xds.node`, or `node` on Envoy before the `xds`
/// attributes; `None` when neither is available (yet: some hosts expose it only to streams).
pub fn node() -> Option<Vec<u8>> {
    property_any(&[paths::XDS_NODE, paths::NODE])
}

/// The traffic direction of the listener the stream came in on.
pub fn listener_direction() -> Option<crate::properties::Direction> {
    let value = property_any(&[paths::XDS_LISTENER_DIRECTION, paths::LISTENER_DIRECTION])?;
    crate::properties::decode_int64(&value)
        .and_then(crate::properties::Direction::from_traffic_direction)
}

/// What the downstream connection shows of the peer, as raw property values: the client
/// certificate's URI SAN and, when there is none and `mtls` trust needs to know, whether the
/// connection used mTLS.
///
/// A property read costs microseconds in Envoy, so the common cases take one: a URI SAN can
/// only come from a certificate the peer presented, which answers both questions.
pub fn downstream_identity_raw(trust: crate::config::PeerTrust) -> RawIdentity {
    if let Some(uri) = property_at(paths::CONNECTION_URI_SAN) {
        return RawIdentity {
            uri: Some(uri),
            mtls: true,
        };
    }
    // Without a URI SAN nothing is proven; whether the peer used mTLS only decides which
    // refusal is counted (`no_mtls` or `no_spiffe_id`), which only the `mtls` mode reports.
    let mtls = trust == crate::config::PeerTrust::Mtls
        && property_at(paths::CONNECTION_MTLS)
            .and_then(|value| crate::properties::decode_bool(&value))
            .unwrap_or(false);
    RawIdentity { uri: None, mtls }
}

/// What the upstream connection shows: the server certificate's URI SAN, which Envoy has
/// verified when the cluster's TLS context has a validation context.
pub fn upstream_identity_raw() -> RawIdentity {
    let uri = property_at(paths::UPSTREAM_URI_SAN);
    RawIdentity {
        mtls: uri.is_some(),
        uri,
    }
}

/// A peer's identity as the host reported it, before parsing: the memo key of a resolution.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawIdentity {
    pub uri: Option<Vec<u8>>,
    pub mtls: bool,
}

impl RawIdentity {
    /// What it proves (the SPIFFE ID parsed); for the upstream, mTLS only with a SPIFFE ID.
    pub fn parse(&self) -> crate::trust::PeerIdentity {
        let spiffe = self.uri.as_deref().and_then(crate::trust::SpiffeId::parse);
        crate::trust::PeerIdentity {
            mtls: self.mtls,
            spiffe,
        }
    }

    fn flags(&self) -> &'static [u8] {
        match (self.uri.is_some(), self.mtls) {
            (false, false) => b"\0",
            (false, true) => b"\x01",
            (true, false) => b"\x02",
            (true, true) => b"\x03",
        }
    }
}

/// The name of the upstream cluster the request was routed to (`xds.cluster_name`).
pub fn upstream_cluster() -> Option<Vec<u8>> {
    property_at(paths::XDS_CLUSTER_NAME)
}

fn presence(value: Option<&[u8]>) -> &'static [u8] {
    if value.is_some() {
        b"\x01"
    } else {
        b"\0"
    }
}

/// The caller of an inbound request as resolved from its claims, memoized.
pub struct InboundResolution {
    pub decision: crate::resolve::InboundDecision,
    pub source: std::rc::Rc<crate::party::Party>,
}

/// The destination of an outbound request as resolved from the callee's claims, memoized.
pub struct OutboundResolution {
    pub outcome: crate::resolve::OutboundResponse,
    pub destination: std::rc::Rc<crate::party::Party>,
    /// The routed cluster (as read) when it filled a label: the result holds only for it.
    cluster: Option<Option<Vec<u8>>>,
}

/// Label resolution of one filter (its [`crate::resolve::LabelSettings`]), with memos of
/// recent inputs: the same peer with the same claims is resolved once, not once per request.
/// A hit returns exactly what resolving would (the key is every input byte).
pub struct Resolver {
    pub settings: crate::resolve::LabelSettings,
    inbound: std::cell::RefCell<crate::memo::Memo<std::rc::Rc<InboundResolution>>>,
    inbound_exact: std::cell::RefCell<crate::memo::Memo<std::rc::Rc<InboundResolution>>>,
    outbound: std::cell::RefCell<crate::memo::Memo<std::rc::Rc<OutboundResolution>>>,
    states: std::cell::RefCell<crate::memo::Memo<std::rc::Rc<crate::party::Party>>>,
}

impl Resolver {
    pub fn new(settings: crate::resolve::LabelSettings) -> Resolver {
        use crate::memo::{Memo, DEFAULT_CAPACITY};
        Resolver {
            settings,
            inbound: std::cell::RefCell::new(Memo::new(DEFAULT_CAPACITY)),
            inbound_exact: std::cell::RefCell::new(Memo::new(DEFAULT_CAPACITY)),
            outbound: std::cell::RefCell::new(Memo::new(DEFAULT_CAPACITY)),
            states: std::cell::RefCell::new(Memo::new(DEFAULT_CAPACITY)),
        }
    }

    /// Resolves the caller of an inbound request from every `baggage` value, every value of
    /// Istio's peer metadata and what the downstream connection proves.
    pub fn inbound(
        &self,
        baggage: &[&[u8]],
        peer_metadata: &[&[u8]],
        identity: &RawIdentity,
    ) -> std::rc::Rc<InboundResolution> {
        let resolve = || {
            let decision = crate::resolve::inbound_decision(
                &self.settings,
                baggage,
                peer_metadata,
                &identity.parse(),
            );
            let source = std::rc::Rc::new(crate::party::Party::new(decision.source.clone()));
            std::rc::Rc::new(InboundResolution { decision, source })
        };
        // Several peer-metadata values are refused whatever they hold: resolved without the
        // memos, so that such requests cannot push real callers out of them.
        let peer_metadata = match peer_metadata {
            [] => None,
            [one] => Some(*one),
            _ => return resolve(),
        };
        // First the exact inputs: a caller sending the same baggage again costs one
        // comparison. Then the claims only: the other baggage members (a user id, a session)
        // change from request to request and decide nothing, so a caller whose baggage varies
        // is still resolved once.
        let baggage_count = (baggage.len() as u32).to_le_bytes();
        let mut exact: Vec<&[u8]> = Vec::with_capacity(baggage.len() + 5);
        exact.push(&baggage_count);
        exact.extend_from_slice(baggage);
        exact.push(presence(peer_metadata));
        exact.push(peer_metadata.unwrap_or_default());
        exact.push(identity.flags());
        exact.push(identity.uri.as_deref().unwrap_or_default());
        if let Some(found) = self.inbound_exact.borrow().get(&exact) {
            return found.clone();
        }
        let (label_members, oversized) =
            crate::resolve::claims_key(baggage, self.settings.max_baggage_bytes);
        let count = (label_members.len() as u32).to_le_bytes();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(label_members.len() + 6);
        parts.push(&count);
        parts.extend_from_slice(&label_members);
        parts.push(if oversized { b"\x01" } else { b"\0" });
        parts.push(presence(peer_metadata));
        parts.push(peer_metadata.unwrap_or_default());
        parts.push(identity.flags());
        parts.push(identity.uri.as_deref().unwrap_or_default());
        let resolution = self
            .inbound
            .borrow_mut()
            .get_or_insert_with(&parts, resolve)
            .clone();
        self.inbound_exact
            .borrow_mut()
            .insert(&exact, resolution.clone());
        resolution
    }

    /// Resolves the destination of an outbound request from every value of its
    /// `x-eastwest-peer` header and what the upstream connection proves; the routed cluster is
    /// read only when needed.
    pub fn outbound(
        &self,
        peer_header: &[&[u8]],
        identity: &RawIdentity,
    ) -> std::rc::Rc<OutboundResolution> {
        let peer_header = match peer_header {
            [] => None,
            [one] => Some(*one),
            // Refused whatever they hold; kept out of the memo.
            several => return self.resolve_outbound(several, identity, None),
        };
        let parts: [&[u8]; 4] = [
            presence(peer_header),
            peer_header.unwrap_or_default(),
            identity.flags(),
            identity.uri.as_deref().unwrap_or_default(),
        ];
        let mut memo = self.outbound.borrow_mut();
        // The cluster is read only when the claims left a label to fill; the result is kept for
        // the claims with the cluster it was computed for.
        let mut cluster = None;
        if let Some(found) = memo.get(&parts) {
            match &found.cluster {
                None => return found.clone(),
                Some(used) => {
                    let current = upstream_cluster();
                    let same = match (used, &current) {
                        (Some(used), Some(current)) => crate::bytes::equal(used, current),
                        (None, None) => true,
                        _ => false,
                    };
                    if same {
                        return found.clone();
                    }
                    cluster = Some(current);
                }
            }
        }
        let values = peer_header.as_slice();
        let resolution = self.resolve_outbound(values, identity, cluster);
        memo.put(&parts, resolution.clone());
        resolution
    }

    /// [`Resolver::outbound`] without the memo (`cluster`: the routed cluster when already read).
    fn resolve_outbound(
        &self,
        peer_header: &[&[u8]],
        identity: &RawIdentity,
        mut cluster: Option<Option<Vec<u8>>>,
    ) -> std::rc::Rc<OutboundResolution> {
        let mut used_cluster = None;
        let outcome = crate::resolve::outbound_response(
            &self.settings,
            peer_header,
            &identity.parse(),
            || {
                let current = cluster.take().unwrap_or_else(upstream_cluster);
                used_cluster = Some(current.clone());
                current
            },
        );
        let destination = std::rc::Rc::new(crate::party::Party::new(outcome.destination.clone()));
        std::rc::Rc::new(OutboundResolution {
            outcome,
            destination,
            cluster: used_cluster,
        })
    }

    /// One end's labels as label-enrich published them in filter state (`key`); `None` when
    /// it did not run before this filter.
    pub fn from_state(&self, key: &str) -> Option<std::rc::Rc<crate::party::Party>> {
        let value = property_at(key.as_bytes())?;
        Some(
            self.states
                .borrow_mut()
                .get_or_insert_with(&[&value], || {
                    std::rc::Rc::new(crate::party::Party::new(crate::resolve::labels_from_state(
                        &value,
                    )))
                })
                .clone(),
        )
    }

    /// The destination of an outbound request from the response's `x-eastwest-peer` values
    /// (every one of them) and the upstream connection; problems are in the outcome.
    pub fn outbound_from_response(&self) -> std::rc::Rc<OutboundResolution> {
        let headers = header_map(MapType::HttpResponseHeaders).ok();
        let peer_header = headers
            .as_ref()
            .and_then(|headers| headers.values(crate::resolve::PEER_HEADER))
            .unwrap_or_default();
        self.outbound(&peer_header, &upstream_identity_raw())
    }

    /// The calling service on an inbound sidecar: what label-enrich published in filter state
    /// when it ran first, else resolved here from the request's claims with the same trust
    /// rules. The problems found while resolving are returned for the caller to count.
    pub fn inbound_source(
        &self,
    ) -> (
        std::rc::Rc<crate::party::Party>,
        Option<crate::resolve::Problems>,
    ) {
        if let Some(state) = self.from_state(crate::resolve::SOURCE_STATE_KEY) {
            return (state, None);
        }
        let identity = downstream_identity_raw(self.settings.peer_trust);
        let headers = header_map(MapType::HttpRequestHeaders).ok();
        let [baggage, peer_metadata] = headers
            .as_ref()
            .and_then(|headers| {
                headers.values_of_each(["baggage", crate::peer::ISTIO_PEER_METADATA_HEADER])
            })
            .unwrap_or_default();
        let resolution = self.inbound(&baggage, &peer_metadata, &identity);
        (
            resolution.source.clone(),
            Some(resolution.decision.problems.clone()),
        )
    }
}

/// What the features of one stream learn about it and hand each other in memory (all of them
/// in one module); a separate module starts each stream with an empty one and reads what an
/// earlier filter published in filter state instead.
#[derive(Default)]
pub struct Exchange {
    listener_direction: Option<Option<crate::properties::Direction>>,
    /// The caller, once a feature resolved it.
    pub source: Option<std::rc::Rc<crate::party::Party>>,
    /// The callee, once a feature resolved it.
    pub destination: Option<std::rc::Rc<crate::party::Party>>,
    /// `upstream.request_attempt_count` once read (at the end of the stream, where telemetry
    /// and retry-budget both need it: one host call, one buffer, instead of two).
    upstream_attempts: Option<Option<i64>>,
}

impl Exchange {
    /// The direction a feature works in: its configured one, else the listener's (read from
    /// the host once per stream).
    pub fn direction(
        &mut self,
        configured: Option<crate::properties::Direction>,
    ) -> Option<crate::properties::Direction> {
        configured.or_else(|| {
            *self
                .listener_direction
                .get_or_insert_with(listener_direction)
        })
    }

    /// How many attempts the router made (`upstream.request_attempt_count`), read from the host
    /// once per stream; call it only when the stream has ended (`on_log`).
    pub fn upstream_attempts(&mut self) -> Option<i64> {
        *self
            .upstream_attempts
            .get_or_insert_with(|| int_property(paths::UPSTREAM_ATTEMPTS))
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
    party: std::cell::RefCell<std::rc::Rc<crate::party::Party>>,
    pending: std::cell::Cell<bool>,
}

impl OwnLabelsCell {
    /// Starts from the configured `local` labels; resolve with [`OwnLabelsCell::refresh`].
    pub fn new(settings: &crate::resolve::LabelSettings) -> OwnLabelsCell {
        OwnLabelsCell {
            party: std::cell::RefCell::new(std::rc::Rc::new(crate::party::Party::new(
                settings.local.clone(),
            ))),
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
            *self.party.borrow_mut() = std::rc::Rc::new(crate::party::Party::new(own.labels));
            self.pending.set(false);
        }
    }

    pub fn get(&self) -> std::rc::Rc<crate::party::Party> {
        self.party.borrow().clone()
    }
}

/// Logs `eastwest-<filter>: <message>` (the prefix every eastwest log line carries).
pub fn log(filter: &str, level: proxy_wasm::types::LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, &format!("eastwest-{filter}: {message}"));
}

/// The plugin configuration as the host passes it (empty when there is none).
pub fn plugin_configuration() -> Vec<u8> {
    proxy_wasm::hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Reads the plugin configuration and parses it; on a bad configuration logs
/// `eastwest-<filter>: invalid configuration: <field path>: <reason>` and returns `None`, so that
/// `on_configure` returns false and Envoy refuses the configuration (DESIGN.md §6).
pub fn configure<T>(
    filter: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, crate::config::ConfigError>,
) -> Option<T> {
    match parse(&plugin_configuration()) {
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
