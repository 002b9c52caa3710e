//! The budget arithmetic: a sliding window of `ttl` cut into [`SLOTS`] time slots, each
//! counting original requests (deposits) and admitted retries (withdrawals), as Finagle's
//! `RetryBudget` and tower's `TpsBudget` do. A retry is admitted when, over the slots of the
//! last `ttl`, `withdrawals + 1 <= ratio × deposits + min_retries_per_second × ttl`.
//!
//! The window is what the workers of one Envoy process share (serialized into proxy-wasm
//! shared data, [`Window::encode`]), and also what each worker keeps of its own deposits that
//! it has not published yet (merged in with [`Window::merge`]).
//!
//! Time is a slot number (`now / slot length`). Clocks misbehave: a slot number older than the
//! newest one the window holds is treated as the newest (time never runs backwards for the
//! budget), unless it is a whole window older, in which case the clock was reset and the
//! window starts over ([`Clock::Reset`]). A jump forward simply ages everything out.

/// Slots per window: the window slides in steps of `ttl / SLOTS`.
pub const SLOTS: usize = 10;

/// Bytes of an encoded window: a format byte, then per slot its number (u64) and its deposits
/// and withdrawals (u32 each), little-endian.
pub const ENCODED_LEN: usize = 1 + SLOTS * 16;
const FORMAT: u8 = 1;

/// The largest `ratio_milli` (a ratio of 100 retries per request, the configuration's limit).
const MAX_RATIO_MILLI: u64 = 100_000;

/// The budget of one destination, in integers so that the arithmetic is exact and the same on
/// every target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// `ratio` in thousandths (0.2 -> 200).
    pub ratio_milli: u64,
    /// `min_retries_per_second × ttl`, rounded down: retries always allowed per window.
    pub reserve: u64,
    /// The length of one slot, in nanoseconds (`ttl / SLOTS`, at least 1).
    pub slot_nanos: u64,
}

impl Params {
    pub fn new(ratio: f64, min_retries_per_second: f64, ttl_seconds: f64) -> Params {
        let ttl_nanos = (ttl_seconds * 1e9) as u64;
        Params {
            ratio_milli: (ratio * 1000.0).round() as u64,
            reserve: (min_retries_per_second * ttl_seconds).floor() as u64,
            slot_nanos: (ttl_nanos / SLOTS as u64).max(1),
        }
    }

    /// The slot a wall-clock time (nanoseconds since the epoch) falls in.
    pub fn slot_of(&self, now_nanos: u64) -> u64 {
        now_nanos / self.slot_nanos
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// The slot number this entry counts for; entries of older slots are stale.
    number: u64,
    deposits: u32,
    withdrawals: u32,
}

/// What [`Window::advance`] found out about the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Time moved forward or stood still.
    Normal,
    /// The clock went back by less than a window: the newest slot stands in for now.
    Behind,
    /// The clock went back by a whole window or more: the window was emptied.
    Reset,
}

/// Deposits and withdrawals over the last `SLOTS` slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    slots: [Slot; SLOTS],
}

/// An encoded window that is not one (another format, or damaged shared data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl Window {
    pub fn new() -> Window {
        Window::default()
    }

    /// The newest slot number any entry holds (0 for an empty window).
    pub fn newest(&self) -> u64 {
        self.slots.iter().map(|slot| slot.number).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| slot.deposits == 0 && slot.withdrawals == 0)
    }

    /// The slot to count `now` in, given what the window holds; see the module comment.
    pub fn advance(&mut self, now: u64) -> (u64, Clock) {
        let newest = self.newest();
        if now >= newest {
            (now, Clock::Normal)
        } else if newest - now < SLOTS as u64 {
            (newest, Clock::Behind)
        } else {
            *self = Window::new();
            (now, Clock::Reset)
        }
    }

    /// Whether slot `number` still counts when `now` is the current slot.
    fn is_live(number: u64, now: u64) -> bool {
        number <= now && now - number < SLOTS as u64
    }

    /// Adds counts to slot `number` (the current one, normally). Counts for a slot that has
    /// already left the window are dropped: they no longer matter.
    pub fn add(&mut self, number: u64, deposits: u32, withdrawals: u32) {
        let slot = &mut self.slots[(number % SLOTS as u64) as usize];
        if slot.number < number || (slot.deposits == 0 && slot.withdrawals == 0) {
            *slot = Slot {
                number,
                deposits: 0,
                withdrawals: 0,
            };
        } else if slot.number > number {
            return;
        }
        slot.deposits = slot.deposits.saturating_add(deposits);
        slot.withdrawals = slot.withdrawals.saturating_add(withdrawals);
    }

    /// Adds every live entry of `other` (a worker's unpublished deposits) into this window.
    pub fn merge(&mut self, other: &Window) {
        for slot in &other.slots {
            if slot.deposits > 0 || slot.withdrawals > 0 {
                self.add(slot.number, slot.deposits, slot.withdrawals);
            }
        }
    }

    /// Original requests and admitted retries over the window ending at slot `now`.
    pub fn totals(&self, now: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|slot| Window::is_live(slot.number, now))
            .fold((0u64, 0u64), |(deposits, withdrawals), slot| {
                (
                    deposits + u64::from(slot.deposits),
                    withdrawals + u64::from(slot.withdrawals),
                )
            })
    }

    /// The counts of slot `number`, if the window holds them.
    fn counts(&self, number: u64) -> (u64, u64) {
        let slot = &self.slots[(number % SLOTS as u64) as usize];
        if slot.number == number {
            (u64::from(slot.deposits), u64::from(slot.withdrawals))
        } else {
            (0, 0)
        }
    }

    /// Retries still allowed at slot `now`, in thousandths of a retry.
    ///
    /// A retry admitted now stays in every window that ends during the next `ttl`, and those
    /// windows keep fewer and fewer of today's deposits. So the budget is checked for each
    /// suffix of the current window (the last slot, the last two, ... all of them), which are
    /// exactly what the future windows containing `now` keep: the smallest room wins. That
    /// makes the guarantee hold for every window, not only for the one ending now.
    fn room_milli(&self, params: &Params, now: u64) -> u64 {
        // No product here can overflow: a slot counts at most u32::MAX of each, so the sums
        // stay below 2^36, `ratio_milli` is at most 100,000 (ratio <= 100) and 1000 < 2^10.
        // Saturating multiplications would cost a 128-bit multiply each on wasm32.
        let ratio_milli = params.ratio_milli.min(MAX_RATIO_MILLI);
        let reserve_milli = params.reserve.saturating_mul(1000);
        let mut room = u64::MAX;
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for back in 0..SLOTS as u64 {
            let Some(number) = now.checked_sub(back) else {
                break;
            };
            let (d, w) = self.counts(number);
            deposits += d;
            withdrawals += w;
            let allowance = (ratio_milli * deposits).saturating_add(reserve_milli);
            room = room.min(allowance.saturating_sub(withdrawals * 1000));
        }
        room
    }

    /// Whether `count` more retries fit in the budget at slot `now`.
    pub fn can_withdraw(&self, params: &Params, now: u64, count: u64) -> bool {
        count.saturating_mul(1000) <= self.room_milli(params, now)
    }

    /// Retries still allowed at slot `now` (0 when the budget is spent).
    pub fn remaining(&self, params: &Params, now: u64) -> u64 {
        self.room_milli(params, now) / 1000
    }

    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        out[0] = FORMAT;
        for (index, slot) in self.slots.iter().enumerate() {
            let at = 1 + index * 16;
            out[at..at + 8].copy_from_slice(&slot.number.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&slot.deposits.to_le_bytes());
            out[at + 12..at + 16].copy_from_slice(&slot.withdrawals.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Window, Malformed> {
        if bytes.len() != ENCODED_LEN || bytes[0] != FORMAT {
            return Err(Malformed);
        }
        let mut window = Window::new();
        for (index, chunk) in bytes[1..].chunks_exact(16).enumerate() {
            let number = u64::from_le_bytes(chunk[0..8].try_into().map_err(|_| Malformed)?);
            // A slot may only sit at its own position; anything else is damage.
            if (number % SLOTS as u64) as usize != index && number != 0 {
                return Err(Malformed);
            }
            window.slots[index] = Slot {
                number,
                deposits: u32::from_le_bytes(chunk[8..12].try_into().map_err(|_| Malformed)?),
                withdrawals: u32::from_le_bytes(chunk[12..16].try_into().map_err(|_| Malformed)?),
            };
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// ratio 0.2, 1 retry/s, ttl 10 s: reserve 10, slots of 1 s.
    fn params() -> Params {
        Params::new(0.2, 1.0, 10.0)
    }

    const SECOND: u64 = 1_000_000_000;

    /// Admits retries one by one while the budget allows, as a caller would.
    fn withdraw_all(window: &mut Window, params: &Params, now: u64) -> u64 {
        let mut admitted = 0;
        while window.can_withdraw(params, now, 1) {
            window.add(now, 0, 1);
            admitted += 1;
        }
        admitted
    }

    #[test]
    fn params_follow_the_configuration() {
        let params = Params::new(0.2, 10.0, 10.0);
        assert_eq!(params.ratio_milli, 200);
        assert_eq!(params.reserve, 100);
        assert_eq!(params.slot_nanos, SECOND);
        assert_eq!(params.slot_of(12 * SECOND + 5), 12);
        // A fractional reserve rounds down: 0.25/s over 10 s allows 2 retries, not 3.
        assert_eq!(Params::new(0.2, 0.25, 10.0).reserve, 2);
    }

    #[test]
    fn an_idle_window_allows_exactly_the_reserve() {
        let params = params();
        let mut window = Window::new();
        assert_eq!(withdraw_all(&mut window, &params, 100), 10);
        assert_eq!(window.remaining(&params, 100), 0);
    }

    #[test]
    fn deposits_add_ratio_times_their_number() {
        let params = params();
        let mut window = Window::new();
        window.add(100, 50, 0);
        // 0.2 × 50 + 10 = 20.
        assert_eq!(window.remaining(&params, 100), 20);
        assert_eq!(withdraw_all(&mut window, &params, 100), 20);
        // Four more originals buy 0.8 of a retry: not enough.
        window.add(100, 4, 0);
        assert!(!window.can_withdraw(&params, 100, 1));
        window.add(100, 1, 0);
        assert!(window.can_withdraw(&params, 100, 1));
    }

    #[test]
    fn a_burst_cannot_exceed_the_budget() {
        let params = params();
        let mut window = Window::new();
        window.add(100, 1000, 0);
        assert_eq!(withdraw_all(&mut window, &params, 100), 210);
        assert!(!window.can_withdraw(&params, 100, 1));
    }

    #[test]
    fn the_window_rotates_slot_by_slot() {
        let params = params();
        let mut window = Window::new();
        window.add(100, 100, 0);
        withdraw_all(&mut window, &params, 100);
        // Still inside the window nine slots later: nothing is left.
        assert_eq!(window.remaining(&params, 109), 0);
        // At slot 110 the slot of 100 has left the window: only the reserve again.
        assert_eq!(window.totals(110), (0, 0));
        assert_eq!(window.remaining(&params, 110), 10);
        // Writing into slot 110 reuses position 0 and forgets slot 100's counts.
        window.add(110, 5, 1);
        assert_eq!(window.totals(110), (5, 1));
        assert_eq!(window.totals(109), (0, 0));
    }

    #[test]
    fn over_any_ttl_the_admitted_retries_stay_within_budget() {
        // A steady 10 originals per slot, the caller retrying as much as it can every slot:
        // within every window of SLOTS slots, admitted <= 0.2 × originals + reserve.
        let params = params();
        let mut window = Window::new();
        let mut admitted_per_slot = Vec::new();
        for now in 0..100 {
            window.add(now, 10, 0);
            admitted_per_slot.push(withdraw_all(&mut window, &params, now));
        }
        for end in SLOTS..admitted_per_slot.len() {
            let admitted: u64 = admitted_per_slot[end - SLOTS..end].iter().sum();
            assert!(admitted <= 2 * SLOTS as u64 + 10, "{admitted} at {end}");
        }
        // In the steady state the budget is used fully: 0.2 × 100 per window.
        let steady: u64 = admitted_per_slot[90..100].iter().sum();
        assert!(steady >= 20, "{steady}");
    }

    #[test]
    fn an_idle_period_ages_everything_out() {
        let params = params();
        let mut window = Window::new();
        window.add(5, 1000, 0);
        withdraw_all(&mut window, &params, 5);
        let (now, clock) = window.advance(1_000_000);
        assert_eq!((now, clock), (1_000_000, Clock::Normal));
        assert_eq!(window.totals(now), (0, 0));
        assert_eq!(window.remaining(&params, now), 10);
    }

    #[test]
    fn a_clock_going_back_a_little_counts_in_the_newest_slot() {
        let params = params();
        let mut window = Window::new();
        window.add(100, 0, 10);
        let (now, clock) = window.advance(97);
        assert_eq!((now, clock), (100, Clock::Behind));
        // The retries already admitted still count: no fresh budget from a clock step.
        assert!(!window.can_withdraw(&params, now, 1));
    }

    #[test]
    fn a_clock_going_back_a_whole_window_starts_over() {
        let params = params();
        let mut window = Window::new();
        window.add(100, 0, 10);
        let (now, clock) = window.advance(50);
        assert_eq!((now, clock), (50, Clock::Reset));
        assert!(window.is_empty());
        assert_eq!(window.remaining(&params, now), 10);
    }

    #[test]
    fn counts_for_a_slot_that_left_the_window_are_dropped() {
        let mut window = Window::new();
        window.add(110, 1, 0);
        window.add(100, 7, 0);
        assert_eq!(window.totals(110), (1, 0));
    }

    #[test]
    fn huge_counts_saturate_instead_of_wrapping() {
        let params = Params::new(1000.0, 1e12, 1e6);
        let mut window = Window::new();
        window.add(3, u32::MAX, 0);
        window.add(3, u32::MAX, u32::MAX);
        assert_eq!(window.totals(3), (u64::from(u32::MAX), u64::from(u32::MAX)));
        assert!(window.can_withdraw(&params, 3, 1_000_000));
        assert!(!window.can_withdraw(&params, 3, u64::MAX));
        assert!(Window::new().can_withdraw(&params, u64::MAX, 1));
        let zero = Params::new(0.0, 0.0, 10.0);
        assert!(!Window::new().can_withdraw(&zero, 0, 1));
    }

    #[test]
    fn merge_adds_a_workers_unpublished_deposits() {
        let mut shared = Window::new();
        shared.add(100, 10, 2);
        let mut pending = Window::new();
        pending.add(100, 5, 0);
        pending.add(101, 3, 0);
        pending.add(85, 9, 0);
        shared.merge(&pending);
        assert_eq!(shared.totals(101), (18, 2));
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let mut window = Window::new();
        window.add(1234, 56, 7);
        window.add(1239, 1, 0);
        let bytes = window.encode();
        assert_eq!(Window::decode(&bytes), Ok(window));
        assert_eq!(Window::decode(&bytes[1..]), Err(Malformed));
        let mut other_format = bytes;
        other_format[0] = 2;
        assert_eq!(Window::decode(&other_format), Err(Malformed));
        // Slot 1234 stored at position 5 instead of 4.
        let mut misplaced = bytes;
        misplaced.copy_within(1 + 4 * 16..1 + 5 * 16, 1 + 5 * 16);
        assert_eq!(Window::decode(&misplaced), Err(Malformed));
        assert_eq!(Window::decode(&Window::new().encode()), Ok(Window::new()));
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the traffic and however the clock moves forward, the retries admitted in
        /// every window of SLOTS slots never exceed ratio × the originals of that window plus
        /// the reserve.
        #[test]
        fn admitted_retries_never_exceed_the_budget_in_any_window(
            steps in prop::collection::vec((0u32..50, 0u64..40, 0u64..4), 1..200),
            ratio_milli in 0u64..1000,
            reserve in 0u64..20,
        ) {
            let params = Params { ratio_milli, reserve, slot_nanos: 1 };
            let mut window = Window::new();
            let mut history: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
            let mut clock = 1_000u64;
            for (deposits, retries, tick) in steps {
                clock += tick;
                let (now, _) = window.advance(clock);
                window.add(now, deposits, 0);
                history.entry(now).or_default().0 += u64::from(deposits);
                for _ in 0..retries {
                    if window.can_withdraw(&params, now, 1) {
                        window.add(now, 0, 1);
                        history.entry(now).or_default().1 += 1;
                    }
                }
            }
            let last = *history.keys().next_back().unwrap();
            for start in 1_000 - SLOTS as u64..=last {
                let (d, w) = history
                    .range(start..start + SLOTS as u64)
                    .fold((0, 0), |(d, w), (_, (dd, ww))| (d + dd, w + ww));
                prop_assert!(w * 1000 <= ratio_milli * d + reserve * 1000,
                    "window from {}: {} retries for {} originals", start, w, d);
            }
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Window::decode(&bytes);
        }
    }
}
