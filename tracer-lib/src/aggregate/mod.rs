//! Aggregate: every request and call is folded into the statistics of the window it ended in; nothing is kept per
//! request.
//!
//! The request path records into one of a fixed set of shards, picked by the recording thread, each behind its own
//! mutex. A thread only ever takes its own shard's lock, so on the request path the lock is uncontended unless more
//! threads record than there are shards; there is no lock shared by all requests. Once per window the closer takes
//! each shard's lock in turn, removes that window's part and merges the parts, keeping the edge cap.
//!
//! Memory is bounded: each shard holds at most [`MAX_OPEN_WINDOWS`] windows (older ones are dropped and counted
//! when nobody closes windows) and each window at most 4 × `edge_cap` edges each way, however many distinct caller
//! names arrive, plus the agent addresses of at most [`MAX_CALLERS_BEYOND_CAP`] callers beyond the cap (8 each).
//! A closed window keeps the `edge_cap` busiest edges each way; the rest are counted as overflow, and the callers
//! among them keep their agents so the window's reports still reach them.

pub mod histogram;
pub mod stats;
pub mod window;

use std::{
    cell::Cell,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

pub use stats::{CallSample, MAX_CALLERS_BEYOND_CAP, RequestSample, WindowStats};

use crate::measure::sample::SampleRate;
pub use window::WindowClock;

/// Shards per aggregator; more than the worker threads of a typical service.
const SHARDS: usize = 16;
/// How many more edges than the cap each shard keeps while a window is open.
const SHARD_EDGE_FACTOR: usize = 4;
/// Windows a shard keeps open before it drops the oldest.
pub const MAX_OPEN_WINDOWS: usize = 4;

/// Aligned so two shards never share a cache line.
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Default)]
struct Shard {
    /// Windows up to and including this one have been closed; later records for them are late.
    closed_through: Option<u64>,
    /// Open windows, oldest first.
    windows: Vec<WindowStats>,
}

/// Counts of things that did not make it into a window.
#[derive(Debug, Default)]
pub struct Losses {
    /// Records that arrived after their window was closed.
    pub late: AtomicU64,
    /// Records in windows dropped because nobody closed them.
    pub unclosed: AtomicU64,
}

/// The per-service window aggregator.
pub struct Aggregator {
    clock: WindowClock,
    edge_cap: usize,
    /// The sampling rate, said in each closed window (its counts are weighted as they are recorded).
    sample: SampleRate,
    shards: Box<[Padded<Mutex<Shard>>]>,
    /// Requests handed to the server layer, per shard, since the start: counted without a lock.
    arrivals: Box<[Padded<AtomicU64>]>,
    /// The arrival count at the last close.
    arrivals_at_close: Mutex<u64>,
    losses: Losses,
}

thread_local! {
    static SHARD_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// This thread's shard: assigned round-robin the first time the thread records, then fixed.
fn shard_index() -> usize {
    SHARD_INDEX.with(|index| {
        if index.get() == usize::MAX {
            index.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        index.get()
    })
}

impl Aggregator {
    pub fn new(clock: WindowClock, edge_cap: usize, sample: SampleRate) -> Self {
        Self {
            clock,
            edge_cap,
            sample,
            shards: (0..SHARDS).map(|_| Padded(Mutex::new(Shard::default()))).collect(),
            arrivals: (0..SHARDS).map(|_| Padded(AtomicU64::new(0))).collect(),
            arrivals_at_close: Mutex::new(0),
            losses: Losses::default(),
        }
    }

    pub fn clock(&self) -> &WindowClock {
        &self.clock
    }

    pub fn edge_cap(&self) -> usize {
        self.edge_cap
    }

    pub fn losses(&self) -> &Losses {
        &self.losses
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // Recording never panics while holding the lock, and a shard is plain counters: poison is harmless.
        self.shards[index].0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `record` on this thread's shard's statistics for `window_id`.
    #[inline]
    fn with_window(&self, window_id: u64, record: impl FnOnce(&mut WindowStats, usize)) {
        let mut shard = self.lock(shard_index());
        if shard.closed_through.is_some_and(|closed| window_id <= closed) {
            self.losses.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let position = match shard.windows.iter().rposition(|w| w.window_id == window_id) {
            Some(position) => position,
            None => {
                if shard.windows.len() >= MAX_OPEN_WINDOWS {
                    // Nobody is closing windows. Keep the newest ones: drop the oldest, or this record if it is
                    // older still.
                    if shard.windows.first().is_some_and(|oldest| oldest.window_id > window_id) {
                        self.losses.unclosed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let dropped = shard.windows.remove(0);
                    self.losses.unclosed.fetch_add(dropped.requests + dropped_calls(&dropped), Ordering::Relaxed);
                }
                let position = shard.windows.partition_point(|w| w.window_id < window_id);
                shard.windows.insert(position, WindowStats::new(window_id));
                position
            }
        };
        // Each shard keeps more edges than the cap, so that closing can keep the busiest ones.
        record(&mut shard.windows[position], self.edge_cap * SHARD_EDGE_FACTOR);
    }

    /// A request was handed to the server layer (it ends, and is recorded, later).
    #[inline]
    pub fn note_arrival(&self) {
        self.arrivals[shard_index()].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_request(&self, window_id: u64, sample: &RequestSample<'_>) {
        self.with_window(window_id, |stats, cap| stats.record_request(sample, cap));
    }

    pub fn record_call(&self, window_id: u64, sample: &CallSample<'_>) {
        self.with_window(window_id, |stats, cap| stats.record_call(sample, cap));
    }

    /// Closes every window up to `window_id` and returns the merged statistics of `window_id` itself. Records for
    /// closed windows that arrive later are counted in [`Losses::late`].
    pub fn close(&self, window_id: u64) -> WindowStats {
        let mut merged = WindowStats::new(window_id);
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            shard.closed_through = Some(shard.closed_through.map_or(window_id, |c| c.max(window_id)));
            let keep_from = shard.windows.partition_point(|w| w.window_id <= window_id);
            for stats in shard.windows.drain(..keep_from) {
                if stats.window_id == window_id {
                    merged.merge(&stats);
                } else {
                    self.losses.unclosed.fetch_add(stats.requests + dropped_calls(&stats), Ordering::Relaxed);
                }
            }
        }
        merged.keep_busiest(self.edge_cap);
        merged.sample_every = self.sample.every();
        // Arrivals are counted between closes rather than by window: close enough, and lock-free to count.
        let arrivals: u64 = self.arrivals.iter().map(|count| count.0.load(Ordering::Relaxed)).sum();
        let mut at_close = self.arrivals_at_close.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        merged.arrivals = arrivals.saturating_sub(*at_close);
        *at_close = arrivals;
        merged
    }
}

fn dropped_calls(stats: &WindowStats) -> u64 {
    stats.outbound.values().map(|edge| edge.calls).sum::<u64>() + stats.outbound_overflow
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn from(caller: &str) -> RequestSample<'_> {
        RequestSample {
            caller: Some((caller, Some("127.0.0.1:9797"))),
            total_us: 1000,
            busy_us: 10,
            cpu_wait_us: 0,
            downstream_us: 0,
            local_wait_us: 990,
            pool_wait_us: 0,
            error: false,
            cancelled: false,
            weight: 1,
        }
    }

    #[test]
    fn each_record_counts_as_its_weight_and_the_window_says_the_rate() {
        let rate = SampleRate::one_in(16).unwrap();
        let aggregator = Aggregator::new(WindowClock::new(Duration::from_secs(5)), 8, rate);
        let window = aggregator.clock().window_id(Instant::now());
        // One request from the reservoir (weight 1), one drawn (weight 16) that failed and made a call.
        aggregator.record_request(window, &from("web"));
        aggregator.record_request(window, &RequestSample { total_us: 3000, error: true, weight: 16, ..from("web") });
        let call = CallSample {
            callee: "db",
            callee_agent: None,
            client_total_us: 500,
            remote_total_us: Some(400),
            net_wait_us: Some(100),
            remote_wait: (crate::measure::headers::WaitPointRef::Local("db"), 400),
            critical: true,
            error: false,
            untied: false,
            weight: 16,
        };
        aggregator.record_call(window, &call);
        let stats = aggregator.close(window);
        assert_eq!(stats.sample_every, 16);
        assert_eq!((stats.requests, stats.errors, stats.inbound["web"].requests), (17, 16, 17));
        assert_eq!((stats.total.count(), stats.total.sum_us(), stats.total.max_us()), (17, 1000 + 16 * 3000, 3000));
        let db = &stats.outbound["db"];
        assert_eq!((db.calls, db.critical, db.untimed, db.remote_total.sum_us()), (16, 16, 0, 16 * 400));
        assert_eq!(db.remote_wait_at.first().map(|(_, count, max)| (*count, *max)), Some((16, 400)));
    }

    #[test]
    fn closing_keeps_the_busiest_edges_not_the_first() {
        let aggregator = Aggregator::new(WindowClock::new(Duration::from_secs(5)), 8, SampleRate::ALL);
        let window = aggregator.clock().window_id(Instant::now());
        // Eight spoofed names arrive first, one request each; then a real caller sends many.
        let spoofed: Vec<String> = (0..8).map(|i| format!("spoof-{i}")).collect();
        for name in &spoofed {
            aggregator.record_request(window, &from(name));
        }
        for _ in 0..50 {
            aggregator.record_request(window, &from("checkout"));
        }
        let closed = aggregator.close(window);
        assert_eq!(closed.requests, 58);
        assert_eq!(closed.inbound.len(), 8);
        assert_eq!(closed.inbound.get("checkout").map(|edge| edge.requests), Some(50));
        assert_eq!(closed.inbound_overflow, 1, "one spoofed name is dropped to make room");
        // The dropped caller is still told: its agent is kept, without measurements.
        let beyond: Vec<&str> = closed.callers_beyond_cap.keys().map(|caller| &**caller).collect();
        assert_eq!(beyond.len(), 1, "{beyond:?}");
        assert!(spoofed.iter().any(|name| name == beyond[0]) && !closed.inbound.contains_key(beyond[0]));
        assert_eq!(closed.callers_beyond_cap[beyond[0]], vec![Box::<str>::from("127.0.0.1:9797")]);
        // Late records for a closed window are counted, not kept.
        aggregator.record_request(window, &from("checkout"));
        assert_eq!(aggregator.losses().late.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn callers_beyond_the_cap_keep_their_agents_up_to_a_bound() {
        let aggregator = Aggregator::new(WindowClock::new(Duration::from_secs(5)), 2, SampleRate::ALL);
        let window = aggregator.clock().window_id(Instant::now());
        let callers: Vec<String> = (0..MAX_CALLERS_BEYOND_CAP + 100).map(|i| format!("caller-{i}")).collect();
        for _ in 0..5 {
            aggregator.record_request(window, &from("busy-a"));
            aggregator.record_request(window, &from("busy-b"));
        }
        for caller in &callers {
            aggregator.record_request(window, &from(caller));
        }
        let closed = aggregator.close(window);
        assert_eq!(
            closed.inbound.keys().map(|c| &**c).collect::<std::collections::BTreeSet<_>>(),
            ["busy-a", "busy-b"].into()
        );
        // Every request counted; names beyond the cap kept up to the bound, none twice, none with a measured edge.
        assert_eq!(closed.requests, callers.len() as u64 + 10);
        assert_eq!(closed.inbound_overflow, callers.len() as u64);
        assert_eq!(closed.callers_beyond_cap.len(), MAX_CALLERS_BEYOND_CAP);
        assert!(closed.callers_beyond_cap.keys().all(|caller| caller.starts_with("caller-")));
    }

    #[test]
    fn callers_whose_edges_were_trimmed_come_before_names_only_heard_of() {
        let mut stats = WindowStats::new(3);
        for (caller, requests) in [("busy", 10), ("steady", 5), ("rare", 2), ("rarer", 1)] {
            let edge = stats.inbound.entry(caller.into()).or_default();
            edge.requests = requests;
            edge.caller_agents = vec!["127.0.0.2:9797".into()];
        }
        // The list of callers beyond the cap is full: names only heard of (spoofed, say), and "steady".
        for i in 0..MAX_CALLERS_BEYOND_CAP - 1 {
            stats.callers_beyond_cap.insert(format!("heard-{i:04}").into(), vec!["127.0.0.3:9797".into()]);
        }
        stats.callers_beyond_cap.insert("steady".into(), vec!["127.0.0.3:9797".into()]);
        stats.keep_busiest(2);
        assert_eq!(
            stats.inbound.keys().map(|c| &**c).collect::<std::collections::BTreeSet<_>>(),
            ["busy", "steady"].into()
        );
        assert_eq!(stats.inbound_overflow, 3);
        // "steady" kept its edge, so it leaves the list; "rare" and "rarer" were measured, so they take places
        // before any name only heard of; the last of those (by name) makes room.
        assert_eq!(stats.callers_beyond_cap.len(), MAX_CALLERS_BEYOND_CAP);
        assert!(!stats.callers_beyond_cap.contains_key("steady"));
        assert_eq!(stats.callers_beyond_cap["rare"], vec![Box::<str>::from("127.0.0.2:9797")]);
        assert!(stats.callers_beyond_cap.contains_key("rarer"));
        assert!(stats.callers_beyond_cap.contains_key("heard-0000"));
        assert!(!stats.callers_beyond_cap.contains_key(format!("heard-{:04}", MAX_CALLERS_BEYOND_CAP - 2).as_str()));
    }

    #[test]
    fn without_a_closer_shards_keep_only_the_newest_windows() {
        let aggregator = Aggregator::new(WindowClock::new(Duration::from_secs(5)), 8, SampleRate::ALL);
        for window in 100..100 + MAX_OPEN_WINDOWS as u64 + 2 {
            aggregator.record_request(window, &from("web"));
        }
        assert_eq!(aggregator.losses().unclosed.load(Ordering::Relaxed), 2);
        // An older window than any kept is refused rather than evicting a newer one.
        aggregator.record_request(50, &from("web"));
        assert_eq!(aggregator.losses().unclosed.load(Ordering::Relaxed), 3);
        assert_eq!(aggregator.close(100 + MAX_OPEN_WINDOWS as u64 + 1).requests, 1);
    }
}
