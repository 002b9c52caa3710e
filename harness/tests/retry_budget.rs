//! retry-budget's fast integration tests in the harness with two and four VMs (Envoy's
//! workers) sharing one budget through shared data, on virtual time: each runs against
//! dist/retry-budget.wasm and against dist/eastwest.wasm with only the `retry_budget` section.

#[path = "../../e2e/src/module_under_test.rs"]
mod module_under_test;

use eastwest_harness::{Harness, Message, Options};
use module_under_test::{Feature, ModuleUnderTest};
use serde_json::{json, Value};

const FEATURE: Feature = Feature::RetryBudget;

fn harness(module: ModuleUnderTest, config: Value, workers: usize) -> Harness {
    Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, config),
            properties: json!({"xds": {"cluster_name": "outbound|8080||payments.shop.svc.cluster.local"}}),
            workers,
            ..Options::default()
        },
    )
    .unwrap()
}

fn attempt(number: u32) -> Message {
    Message::get("/pay").header("x-envoy-attempt-count", &number.to_string())
}

/// A deterministic pseudo-random sequence (xorshift), so the interleaving is varied but the
/// test is the same on every run.
struct Sequence(u64);

impl Sequence {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// What happened at one virtual millisecond.
#[derive(Default, Clone, Copy)]
struct Tally {
    originals: u64,
    admitted: u64,
    denied: u64,
}

/// A failing destination for `seconds`: every 10 ms, `per_tick` original requests arrive on
/// random workers and each asks for two retries (as a route with `num_retries: 2` does when
/// every attempt fails). Returns what happened per millisecond.
fn outage(h: &mut Harness, workers: usize, seconds: u64, per_tick: u32, seed: u64) -> Vec<Tally> {
    let mut tallies = vec![Tally::default(); (seconds * 1000) as usize];
    let mut random = Sequence(seed);
    for step in 0..seconds * 100 {
        let at = (step * 10) as usize;
        for _ in 0..per_tick {
            let worker = random.next(workers as u64) as usize;
            let first = h.run(worker, None, attempt(1), Some((Message::status(503), 0)));
            assert!(
                h.result(first).local_reply.is_none(),
                "a first attempt was refused"
            );
            tallies[at].originals += 1;
            for number in 2..=3 {
                // Retries of one request stay on its worker, as Envoy's router keeps them.
                let retry = h.run(
                    worker,
                    None,
                    attempt(number),
                    Some((Message::status(503), 0)),
                );
                match h.result(retry).local_reply {
                    None => tallies[at].admitted += 1,
                    Some(reply) => {
                        assert_eq!(reply.status, 503);
                        let header = reply
                            .headers
                            .iter()
                            .find(|(name, _)| name.as_slice() == b"x-eastwest-retry-budget")
                            .map(|(_, value)| value.clone());
                        assert_eq!(header.as_deref(), Some(&b"exhausted"[..]));
                        tallies[at].denied += 1;
                        // A denied retry ends the request: the router does not try again.
                        break;
                    }
                }
            }
        }
        h.advance(10);
    }
    assert!(h.traps.is_empty(), "{:?}", h.traps);
    tallies
}

/// Checks every window of `ttl_ms` (aligned to slots of ttl/10): admitted retries stay within
/// ratio × originals + reserve. Returns the admitted and allowed totals over the whole run.
fn assert_within_budget(
    tallies: &[Tally],
    ratio: f64,
    reserve: u64,
    ttl_ms: usize,
    start_ms: u64,
) -> (u64, u64) {
    let slot = ttl_ms / 10;
    // Slots are aligned to the epoch; the run starts at `start_ms` past a slot boundary.
    let offset = (slot - (start_ms as usize % slot)) % slot;
    let mut start = offset;
    while start + ttl_ms <= tallies.len() {
        let window = &tallies[start..start + ttl_ms];
        let originals: u64 = window.iter().map(|t| t.originals).sum();
        let admitted: u64 = window.iter().map(|t| t.admitted).sum();
        let allowed = (ratio * originals as f64).floor() as u64 + reserve;
        assert!(
            admitted <= allowed,
            "{admitted} retries admitted in the window starting at {start} ms, \
             {allowed} allowed ({originals} originals)"
        );
        start += slot;
    }
    let originals: u64 = tallies.iter().map(|t| t.originals).sum();
    let admitted: u64 = tallies.iter().map(|t| t.admitted).sum();
    (admitted, (ratio * originals as f64) as u64 + reserve)
}

fn shared_budget_holds_with(module: ModuleUnderTest, workers: usize) {
    // ttl 2 s so that a 10 s outage spans five whole windows; reserve 1 retry/s × 2 s.
    let config =
        json!({"mode": "client", "ratio": 0.2, "min_retries_per_second": 1, "ttl_seconds": 2});
    let mut h = harness(module, config, workers);
    let start_ms = (h.now_ns() / 1_000_000) % 200;
    let tallies = outage(&mut h, workers, 10, 4, 0x5eed + workers as u64);
    let (admitted, allowed) = assert_within_budget(&tallies, 0.2, 2, 2000, start_ms);
    let originals: u64 = tallies.iter().map(|t| t.originals).sum();
    let denied: u64 = tallies.iter().map(|t| t.denied).sum();
    // The budget is used, not just respected: the workers' deposits are pooled (a worker alone
    // would see 1/workers of them), losing at most the unpublished last slot of each worker.
    assert!(
        admitted as f64 >= 0.8 * allowed as f64,
        "{workers} VMs: only {admitted} of {allowed} allowed retries were admitted"
    );
    assert!(denied > 0);
    eprintln!(
        "{workers} VMs: {originals} originals, {admitted} retries admitted ({allowed} allowed), \
         {denied} denied"
    );
    // What the metrics say matches what the streams saw.
    assert_eq!(
        h.metric("destination_service=.=payments;.;destination_namespace=.=shop;.;mode=.=client;.;eastwest_retry_budget_admitted_total"),
        Some(admitted as i64)
    );
    assert_eq!(
        h.metric("destination_service=.=payments;.;destination_namespace=.=shop;.;mode=.=client;.;eastwest_retry_budget_denied_total"),
        Some(denied as i64)
    );
    // No shared-data write per request: each write bumps the global CAS counter once, and
    // the writes are the admitted retries plus one publication per worker per slot.
    let writes = h
        .shared_data()
        .values()
        .map(|(_, cas)| u64::from(*cas))
        .max()
        .unwrap_or(0);
    let slots = 10_000 / 200;
    eprintln!("{workers} VMs: {writes} shared-data writes");
    assert!(
        writes <= admitted + (workers as u64) * (slots + 1),
        "{writes} shared-data writes for {originals} requests and {admitted} admitted retries"
    );
}

fn two_vms_share_one_budget(module: ModuleUnderTest) {
    shared_budget_holds_with(module, 2);
}

for_each_module!(two_vms_share_one_budget);

fn four_vms_share_one_budget(module: ModuleUnderTest) {
    shared_budget_holds_with(module, 4);
}

for_each_module!(four_vms_share_one_budget);

fn an_idle_destination_gets_only_the_reserve_and_a_healthy_one_never_writes_per_request(
    module: ModuleUnderTest,
) {
    let config =
        json!({"mode": "client", "ratio": 0.2, "min_retries_per_second": 1, "ttl_seconds": 2});
    let mut h = harness(module, config, 2);
    // Healthy traffic: 1000 first attempts over 5 s on two workers.
    for index in 0..1000u64 {
        h.run((index % 2) as usize, None, attempt(1), None);
        if index % 20 == 19 {
            h.advance(100);
        }
    }
    let writes = h
        .shared_data()
        .values()
        .map(|(_, cas)| u64::from(*cas))
        .max()
        .unwrap_or(0);
    // One publication per worker per 200 ms slot at most.
    assert!(
        writes <= 2 * 26,
        "{writes} shared-data writes for 1000 requests"
    );
    // After a long idle period everything has aged out: only the reserve (2) is left.
    h.advance(60_000);
    let outcomes: Vec<bool> = (0..4)
        .map(|_| {
            let id = h.run(0, None, attempt(2), None);
            h.result(id).local_reply.is_none()
        })
        .collect();
    assert_eq!(outcomes, [true, true, false, false]);
}

for_each_module!(
    an_idle_destination_gets_only_the_reserve_and_a_healthy_one_never_writes_per_request
);

fn per_destination_overrides_apply(module: ModuleUnderTest) {
    let config = json!({
        "mode": "client", "ratio": 0.2, "min_retries_per_second": 1, "ttl_seconds": 10,
        "destinations": {"payments": {"min_retries_per_second": 0.3}},
    });
    // payments: reserve 3 (0.3/s × 10 s); the defaults would give 10.
    let mut h = harness(module, config, 1);
    let admitted = (0..10)
        .filter(|_| {
            let id = h.run(0, None, attempt(2), None);
            h.result(id).local_reply.is_none()
        })
        .count();
    assert_eq!(admitted, 3);
}

for_each_module!(per_destination_overrides_apply);

fn bad_attempt_headers_and_damaged_shared_data_fail_open(module: ModuleUnderTest) {
    let config =
        json!({"mode": "server", "ratio": 0, "min_retries_per_second": 0, "peer_trust": "any"});
    let mut h = harness(module, config, 1);
    for value in ["two", "-1", "", "1e3"] {
        let id = h.run(
            0,
            None,
            Message::get("/").header("x-envoy-attempt-count", value),
            None,
        );
        assert!(h.result(id).local_reply.is_none(), "{value:?} was refused");
    }
    assert_eq!(
        h.metric("reason=.=attempt_header;.;eastwest_retry_budget_fail_open_total"),
        Some(4)
    );
    // A non-UTF-8 attempt header: still a first attempt, no trap.
    let id = h.run(
        0,
        None,
        Message::get("/").header("grpc-previous-rpc-attempts", "\u{fffd}"),
        None,
    );
    assert!(h.result(id).local_reply.is_none());
    assert!(h.traps.is_empty(), "{:?}", h.traps);
}

for_each_module!(bad_attempt_headers_and_damaged_shared_data_fail_open);

fn client_headers_mode_caps_retries_only_when_the_budget_is_spent(module: ModuleUnderTest) {
    let config = json!({"mode": "client-headers", "ratio": 0, "min_retries_per_second": 0.2, "ttl_seconds": 10});
    let mut h = harness(module, config, 1);
    let failed = json!({"upstream": {"request_attempt_count": 3}});
    // Budget 2: the first request may retry; the router made 2 retries, charged at the end.
    let first = h.run(
        0,
        Some(&failed),
        Message::get("/"),
        Some((Message::status(503), 0)),
    );
    let sent = h.result(first).upstream_request.unwrap();
    assert_eq!(sent.get_header("x-envoy-max-retries"), None);
    // Now the budget is spent: retries are switched off and the failure is marked.
    let second = h.run(0, None, Message::get("/"), Some((Message::status(503), 0)));
    let result = h.result(second);
    assert_eq!(
        result
            .upstream_request
            .unwrap()
            .get_header("x-envoy-max-retries"),
        Some("0")
    );
    assert_eq!(
        result
            .downstream_response
            .unwrap()
            .get_header("x-eastwest-retry-budget"),
        Some("exhausted")
    );
    assert!(h.traps.is_empty(), "{:?}", h.traps);
}

for_each_module!(client_headers_mode_caps_retries_only_when_the_budget_is_spent);

/// Per-stream properties: the request was routed to `service`'s Istio cluster.
fn routed_to(service: &str) -> Value {
    json!({"xds": {"cluster_name": format!("outbound|8080||{service}.shop.svc.cluster.local")}})
}

/// One retry toward `service` as each client mode sees one: an attempt header (`client`), or a
/// request the router retried once (`client-headers`, charged when the stream ends).
fn retry_toward(h: &mut Harness, mode: &str, service: &str) {
    let mut properties = routed_to(service);
    let request = if mode == "client" {
        attempt(2)
    } else {
        properties["upstream"] = json!({"request_attempt_count": 2});
        Message::get("/pay")
    };
    h.run(0, Some(&properties), request, None);
}

fn budget_metric_names(h: &Harness) -> Vec<String> {
    h.metrics()
        .into_iter()
        .map(|metric| metric.name)
        .filter(|name| name.ends_with("eastwest_retry_budget_admitted_total"))
        .collect()
}

fn the_overflow_budget_is_labelled_overflow_in_every_client_mode(module: ModuleUnderTest) {
    for mode in ["client", "client-headers"] {
        let mut h = harness(module, json!({"mode": mode, "max_budgets": 1}), 1);
        for service in ["alpha", "bravo", "charlie", "delta"] {
            retry_toward(&mut h, mode, service);
        }
        let names = budget_metric_names(&h);
        let overflow = format!(
            "destination_service=.=overflow;.;destination_namespace=.=overflow;.;mode=.={mode};.;\
             eastwest_retry_budget_admitted_total"
        );
        assert!(names.contains(&overflow), "{mode}: {names:?}");
        assert_eq!(
            h.metric(&overflow),
            Some(3),
            "{mode}: bravo, charlie, delta"
        );
        assert_eq!(
            names.len(),
            2,
            "{mode}: alpha's budget and the overflow: {names:?}"
        );
        for service in ["bravo", "charlie", "delta"] {
            assert!(
                !names.iter().any(|name| name.contains(service)),
                "{mode}: {service} names a budget: {names:?}"
            );
        }
        assert!(h.traps.is_empty(), "{:?}", h.traps);
    }
}

for_each_module!(the_overflow_budget_is_labelled_overflow_in_every_client_mode);

fn a_configured_destination_keeps_its_budget_beyond_max_budgets(module: ModuleUnderTest) {
    // payments may not retry at all; the defaults would admit 0.2 per original request.
    let config = json!({
        "mode": "client", "min_retries_per_second": 0, "max_budgets": 1,
        "destinations": {"payments": {"ratio": 0}},
    });
    let mut h = harness(module, config, 1);
    // alpha takes the one budget max_budgets allows.
    h.run(0, Some(&routed_to("alpha")), attempt(1), None);
    for _ in 0..20 {
        h.run(0, Some(&routed_to("payments")), attempt(1), None);
    }
    let admitted = (0..5)
        .filter(|_| {
            let id = h.run(0, Some(&routed_to("payments")), attempt(2), None);
            h.result(id).local_reply.is_none()
        })
        .count();
    assert_eq!(admitted, 0, "payments' own ratio 0 applies");
    assert_eq!(
        h.metric(
            "destination_service=.=payments;.;destination_namespace=.=shop;.;mode=.=client;.;\
             eastwest_retry_budget_denied_total"
        ),
        Some(5)
    );
}

for_each_module!(a_configured_destination_keeps_its_budget_beyond_max_budgets);

fn an_app_chosen_authority_cannot_push_a_configured_destination_out(module: ModuleUnderTest) {
    // client-headers without a cluster name: the budget is keyed by the app's `:authority`.
    let config = json!({
        "mode": "client-headers", "min_retries_per_second": 0, "max_budgets": 1,
        "destinations": {"payments": {"ratio": 0}},
    });
    let mut h = Harness::new(
        &module.read_wasm(FEATURE),
        Options {
            config: module.config_bytes(FEATURE, config),
            ..Options::default()
        },
    )
    .unwrap();
    let to = |authority: &str| {
        let mut request = Message::get("/pay");
        request
            .headers
            .retain(|(name, _)| name.as_slice() != b":authority");
        request.header(":authority", authority)
    };
    for index in 0..50 {
        h.run(0, None, to(&format!("flood-{index}")), None);
    }
    for index in 0..10 {
        let id = h.run(0, None, to("payments"), None);
        let sent = h.result(id).upstream_request.unwrap();
        assert_eq!(
            sent.get_header("x-envoy-max-retries"),
            Some("0"),
            "request {index} to payments may retry"
        );
    }
}

for_each_module!(an_app_chosen_authority_cannot_push_a_configured_destination_out);
