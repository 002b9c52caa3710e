//! One budget shared by every worker of an Envoy process: the window lives in proxy-wasm
//! shared data (one key per budget), read freely and written with compare-and-swap. A worker
//! keeps the original requests it saw in its own [`Window`] (no shared write per request) and
//! publishes them when it writes anyway (an admitted retry) and on its timer ([`publish`]).
//! Unpublished deposits of other workers make the budget briefly smaller, never larger.
//!
//! Every function here takes the store as a trait so that the logic, including contention
//! between workers, is tested without a host.

use crate::window::{Clock, Malformed, Params, Window};

/// Shared data as the host offers it.
pub trait SharedStore {
    /// The value and its CAS token; `Ok(None)` when the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if the key is still at `cas` (0: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker wrote the key since it was read.
    CasMismatch,
    /// The host refused the call.
    Refused,
}

/// How often a write is retried after losing a CAS race before giving up (and failing open).
pub const CAS_ATTEMPTS: usize = 16;

/// Why the filter could not use the budget and let the request through instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    SharedData,
    Contention,
    MalformedState,
    ClockReset,
}

impl Trouble {
    pub const ALL: [Trouble; 4] = [
        Trouble::SharedData,
        Trouble::Contention,
        Trouble::MalformedState,
        Trouble::ClockReset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trouble::SharedData => "shared_data",
            Trouble::Contention => "cas_contention",
            Trouble::MalformedState => "malformed_state",
            Trouble::ClockReset => "clock_reset",
        }
    }

    pub fn index(self) -> usize {
        Trouble::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// What the budget said about a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admitted,
    Denied,
    /// The budget could not be consulted; the retry goes ahead (fail open).
    FailedOpen(Trouble),
}

/// The shared window of `key` (empty when absent) with its CAS token, and what went wrong
/// reading it. A damaged value is replaced by an empty window rather than blocking traffic.
fn read(store: &dyn SharedStore, key: &str) -> Result<(Window, u32, Option<Trouble>), Trouble> {
    match store.get(key) {
        Ok(None) => Ok((Window::new(), 0, None)),
        Ok(Some((bytes, cas))) => match Window::decode(&bytes) {
            Ok(window) => Ok((window, cas, None)),
            Err(Malformed) => Ok((Window::new(), cas, Some(Trouble::MalformedState))),
        },
        Err(_) => Err(Trouble::SharedData),
    }
}

/// The shared window plus this worker's unpublished deposits, at `now_nanos`: what the budget
/// looks like from here. Read-only.
pub fn view(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &Window,
    now_nanos: u64,
) -> Result<(Window, u64), Trouble> {
    let (mut window, _, _) = read(store, key)?;
    window.merge(pending);
    let (now, _) = window.advance(params.slot_of(now_nanos));
    Ok((window, now))
}

/// The shared window of `key` as stored (empty when absent or damaged): what
/// [`has_room_in`] compares against, read once per slot in `client-headers` mode.
pub fn shared_window(store: &dyn SharedStore, key: &str) -> Result<Window, Trouble> {
    read(store, key).map(|(window, _, _)| window)
}

/// Whether at least one retry would be admitted now, given the `shared` window read earlier
/// and this worker's unpublished deposits: [`has_room`] without the read.
pub fn has_room_in(shared: &Window, params: &Params, pending: &Window, now_nanos: u64) -> bool {
    let mut window = shared.clone();
    window.merge(pending);
    let (now, _) = window.advance(params.slot_of(now_nanos));
    window.can_withdraw(params, now, 1)
}

/// Whether at least one retry toward `key` would be admitted now (`client-headers` mode asks
/// this before the request goes out). Trouble answers yes: the filter fails open.
pub fn has_room(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &Window,
    now_nanos: u64,
) -> Result<bool, Trouble> {
    let (window, now) = view(store, key, params, pending, now_nanos)?;
    Ok(window.can_withdraw(params, now, 1))
}

/// Applies `change` to the shared window of `key` with compare-and-swap, publishing this
/// worker's `pending` deposits in the same write (and clearing them once written). `change`
/// gets the merged window and the current slot and returns false to leave the store alone.
fn update(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &mut Window,
    now_nanos: u64,
    mut change: impl FnMut(&mut Window, u64) -> bool,
) -> Result<(bool, Option<Trouble>), Trouble> {
    let mut noticed = None;
    for _ in 0..CAS_ATTEMPTS {
        let (mut window, cas, trouble) = read(store, key)?;
        noticed = noticed.or(trouble);
        window.merge(pending);
        let (now, clock) = window.advance(params.slot_of(now_nanos));
        if clock == Clock::Reset {
            noticed = noticed.or(Some(Trouble::ClockReset));
        }
        if !change(&mut window, now) {
            return Ok((false, noticed));
        }
        match store.set(key, &window.encode(), cas) {
            Ok(()) => {
                *pending = Window::new();
                return Ok((true, noticed));
            }
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Refused) => return Err(Trouble::SharedData),
        }
    }
    Err(Trouble::Contention)
}

/// Asks the budget of `key` for `count` retries and, when they fit, takes them. Denied
/// retries leave the store untouched (a denial costs one read).
pub fn withdraw(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &mut Window,
    now_nanos: u64,
    count: u32,
) -> (Decision, Option<Trouble>) {
    let outcome = update(store, key, params, pending, now_nanos, |window, now| {
        if window.can_withdraw(params, now, u64::from(count)) {
            window.add(now, 0, count);
            true
        } else {
            false
        }
    });
    match outcome {
        Ok((true, noticed)) => (Decision::Admitted, noticed),
        Ok((false, noticed)) => (Decision::Denied, noticed),
        Err(trouble) => (Decision::FailedOpen(trouble), Some(trouble)),
    }
}

/// Records retries that already happened (`client-headers` mode learns of them when the
/// request ends), whether or not they fit.
pub fn charge(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &mut Window,
    now_nanos: u64,
    count: u32,
) -> Option<Trouble> {
    match update(store, key, params, pending, now_nanos, |window, now| {
        window.add(now, 0, count);
        true
    }) {
        Ok((_, noticed)) => noticed,
        Err(trouble) => Some(trouble),
    }
}

/// Publishes this worker's unpublished deposits for `key` (on the worker's timer).
pub fn publish(
    store: &dyn SharedStore,
    key: &str,
    params: &Params,
    pending: &mut Window,
    now_nanos: u64,
) -> Option<Trouble> {
    if pending.is_empty() {
        return None;
    }
    match update(store, key, params, pending, now_nanos, |_, _| true) {
        Ok((_, noticed)) => noticed,
        Err(trouble) => Some(trouble),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    type Interloper = Box<dyn FnMut(&MemoryStore)>;

    /// Shared data as Envoy keeps it: one global CAS counter, `cas = 0` writes unconditionally.
    #[derive(Default)]
    struct MemoryStore {
        values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        refuse: Cell<bool>,
        /// Runs before each `set`: simulates another worker writing in between.
        interloper: RefCell<Option<Interloper>>,
        writes: Cell<u32>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if self.refuse.get() {
                return Err(StoreError::Refused);
            }
            Ok(self.values.borrow().get(key).cloned())
        }

        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            let taken = self.interloper.borrow_mut().take();
            if let Some(mut interloper) = taken {
                interloper(self);
                *self.interloper.borrow_mut() = Some(interloper);
            }
            self.raw_set(key, value, cas)
        }
    }

    impl MemoryStore {
        fn raw_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            let mut values = self.values.borrow_mut();
            if let Some((_, current)) = values.get(key) {
                if cas != 0 && cas != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            self.next_cas.set(self.next_cas.get() + 1);
            values.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
            self.writes.set(self.writes.get() + 1);
            Ok(())
        }

        fn window(&self, key: &str) -> Window {
            Window::decode(&self.values.borrow()[key].0).unwrap()
        }
    }

    const KEY: &str = "eastwest.retry_budget/client/payments";
    const SECOND: u64 = 1_000_000_000;
    const NOW: u64 = 1_700_000_000 * SECOND;

    fn params() -> Params {
        Params::new(0.2, 1.0, 10.0)
    }

    #[test]
    fn deposits_stay_local_until_published() {
        let store = MemoryStore::default();
        let params = params();
        let mut pending = Window::new();
        pending.add(params.slot_of(NOW), 50, 0);
        assert_eq!(store.writes.get(), 0);
        assert_eq!(publish(&store, KEY, &params, &mut pending, NOW), None);
        assert!(pending.is_empty());
        assert_eq!(store.window(KEY).totals(params.slot_of(NOW)), (50, 0));
        // Nothing pending: publishing writes nothing.
        assert_eq!(publish(&store, KEY, &params, &mut pending, NOW), None);
        assert_eq!(store.writes.get(), 1);
    }

    #[test]
    fn a_worker_sees_its_own_unpublished_deposits() {
        let store = MemoryStore::default();
        let params = params();
        let mut pending = Window::new();
        pending.add(params.slot_of(NOW), 50, 0);
        // 0.2 × 50 + 10 = 20 retries; the 21st is denied and costs no write.
        for _ in 0..20 {
            let (decision, trouble) = withdraw(&store, KEY, &params, &mut pending, NOW, 1);
            assert_eq!((decision, trouble), (Decision::Admitted, None));
        }
        let writes = store.writes.get();
        let (decision, _) = withdraw(&store, KEY, &params, &mut pending, NOW, 1);
        assert_eq!(decision, Decision::Denied);
        assert_eq!(store.writes.get(), writes);
        assert!(!has_room(&store, KEY, &params, &pending, NOW).unwrap());
        // The deposits were published with the first admitted retry.
        assert_eq!(store.window(KEY).totals(params.slot_of(NOW)), (50, 20));
    }

    #[test]
    fn workers_share_one_budget() {
        let store = MemoryStore::default();
        let params = params();
        let (mut first, mut second) = (Window::new(), Window::new());
        let slot = params.slot_of(NOW);
        first.add(slot, 25, 0);
        second.add(slot, 25, 0);
        publish(&store, KEY, &params, &mut first, NOW);
        publish(&store, KEY, &params, &mut second, NOW);
        let mut admitted = 0;
        for turn in 0..100 {
            let pending = if turn % 2 == 0 {
                &mut first
            } else {
                &mut second
            };
            if withdraw(&store, KEY, &params, pending, NOW, 1).0 == Decision::Admitted {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 20);
    }

    #[test]
    fn a_lost_cas_race_is_retried_on_fresh_data() {
        let store = MemoryStore::default();
        let params = params();
        let slot = params.slot_of(NOW);
        let mut seed = Window::new();
        seed.add(slot, 0, 9);
        publish(&store, KEY, &params, &mut seed, NOW);
        // Another worker takes a retry between our read and our write, once.
        let raced = Cell::new(false);
        let raced = std::rc::Rc::new(raced);
        let flag = raced.clone();
        *store.interloper.borrow_mut() = Some(Box::new(move |store: &MemoryStore| {
            if !flag.replace(true) {
                let (bytes, cas) = store.values.borrow()[KEY].clone();
                let mut window = Window::decode(&bytes).unwrap();
                window.add(slot, 0, 1);
                store.raw_set(KEY, &window.encode(), cas).unwrap();
            }
        }));
        // Reserve 10, 9 + 1 taken: ours must be denied after re-reading.
        let (decision, _) = withdraw(&store, KEY, &params, &mut Window::new(), NOW, 1);
        assert!(raced.get());
        assert_eq!(decision, Decision::Denied);
        assert_eq!(store.window(KEY).totals(slot), (0, 10));
    }

    #[test]
    fn endless_contention_fails_open() {
        let store = MemoryStore::default();
        let params = params();
        store.raw_set(KEY, &Window::new().encode(), 0).unwrap();
        *store.interloper.borrow_mut() = Some(Box::new(|store: &MemoryStore| {
            store.raw_set(KEY, &Window::new().encode(), 0).unwrap();
        }));
        let mut pending = Window::new();
        pending.add(params.slot_of(NOW), 3, 0);
        let (decision, trouble) = withdraw(&store, KEY, &params, &mut pending, NOW, 1);
        assert_eq!(decision, Decision::FailedOpen(Trouble::Contention));
        assert_eq!(trouble, Some(Trouble::Contention));
        // The deposits were not lost: they are published with a later write.
        assert!(!pending.is_empty());
    }

    #[test]
    fn a_refusing_host_fails_open() {
        let store = MemoryStore::default();
        store.refuse.set(true);
        let params = params();
        let mut pending = Window::new();
        let (decision, _) = withdraw(&store, KEY, &params, &mut pending, NOW, 1);
        assert_eq!(decision, Decision::FailedOpen(Trouble::SharedData));
        assert_eq!(
            has_room(&store, KEY, &params, &pending, NOW),
            Err(Trouble::SharedData)
        );
    }

    #[test]
    fn damaged_shared_data_is_replaced_and_counted() {
        let store = MemoryStore::default();
        store.raw_set(KEY, b"garbage", 0).unwrap();
        let params = params();
        let (decision, trouble) = withdraw(&store, KEY, &params, &mut Window::new(), NOW, 1);
        assert_eq!(decision, Decision::Admitted);
        assert_eq!(trouble, Some(Trouble::MalformedState));
        assert_eq!(store.window(KEY).totals(params.slot_of(NOW)), (0, 1));
    }

    #[test]
    fn charge_records_retries_that_already_happened() {
        let store = MemoryStore::default();
        let params = params();
        let mut pending = Window::new();
        charge(&store, KEY, &params, &mut pending, NOW, 12);
        // Over budget (reserve 10): recorded anyway, and no room is left.
        assert_eq!(store.window(KEY).totals(params.slot_of(NOW)), (0, 12));
        assert!(!has_room(&store, KEY, &params, &pending, NOW).unwrap());
    }

    #[test]
    fn a_clock_reset_is_reported_and_starts_a_fresh_window() {
        let store = MemoryStore::default();
        let params = params();
        let mut pending = Window::new();
        charge(&store, KEY, &params, &mut pending, NOW, 10);
        let an_hour_ago = NOW - 3600 * SECOND;
        let (decision, trouble) = withdraw(&store, KEY, &params, &mut pending, an_hour_ago, 1);
        assert_eq!(decision, Decision::Admitted);
        assert_eq!(trouble, Some(Trouble::ClockReset));
    }
}
