//! The open-loop load generator: Poisson arrivals at a scheduled rate, sent on time whether or not earlier
//! requests returned (a closed loop would slow down with the system and hide its latency), each bounded by a
//! timeout. Every request is tallied by the second it was sent in, and by the second it ended in (the live view).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Exp};
use rootscale_tracer::aggregate::histogram::Histogram;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::local::{
    balance::Replicas,
    replica::{entry_client, read_to_end},
    scenario::RateSchedule,
};

/// A request that takes longer than this failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests of one second.
#[derive(Clone, Debug, Default)]
pub struct Second {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Latency of the requests that succeeded, in microseconds.
    pub latency: Histogram,
}

impl Second {
    /// The latency percentile, counting failed requests as the timeout.
    pub fn percentile(&self, percentile: f64) -> Option<Duration> {
        let mut all = self.latency.clone();
        for _ in 0..self.failed.min(100_000) {
            all.record(REQUEST_TIMEOUT.as_micros() as u64);
        }
        all.percentile_us(percentile).map(Duration::from_micros)
    }
}

#[derive(Default)]
struct Tally {
    /// By the second the request was sent in.
    by_start: Vec<Second>,
    /// By the second the request ended in.
    by_end: Vec<Second>,
}

fn slot(seconds: &mut Vec<Second>, index: usize) -> &mut Second {
    if seconds.len() <= index {
        seconds.resize(index + 1, Second::default());
    }
    &mut seconds[index]
}

/// A running load generator.
pub struct Load {
    started: Instant,
    tally: Arc<Mutex<Tally>>,
    in_flight: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// Starts sending to the entry's replicas on `runtime`.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        entry: watch::Receiver<Replicas>,
        schedule: RateSchedule,
        seed: u64,
    ) -> Self {
        let started = Instant::now();
        let tally: Arc<Mutex<Tally>> = Arc::default();
        let in_flight: Arc<AtomicU64> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (task_tally, task_in_flight, task_stop) = (tally.clone(), in_flight.clone(), stop.clone());
        runtime.spawn(async move {
            let client = entry_client(entry);
            let mut random = StdRng::seed_from_u64(seed);
            let mut next = tokio::time::Instant::now();
            while !task_stop.load(Ordering::Relaxed) {
                let rate = schedule.rate_at(started.elapsed());
                if rate <= 0.0 {
                    next = tokio::time::Instant::now() + Duration::from_millis(50);
                    tokio::time::sleep_until(next).await;
                    continue;
                }
                let gap = Exp::new(rate)
                    .map_or(Duration::from_secs(1), |exp| Duration::from_secs_f64(exp.sample(&mut random).min(10.0)));
                next += gap;
                tokio::time::sleep_until(next).await;
                let (client, tally, in_flight) = (client.clone(), task_tally.clone(), task_in_flight.clone());
                in_flight.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let request = http::Request::get("/").body(Empty::<Bytes>::new())?;
                        read_to_end(client.oneshot(request).await?).await
                    })
                    .await;
                    let ended = Instant::now();
                    let latency = ended - sent;
                    let ok = matches!(outcome, Ok(Ok(())));
                    {
                        let mut guard = tally.lock().unwrap_or_else(|p| p.into_inner());
                        let tally = &mut *guard;
                        let start_index = sent.saturating_duration_since(started).as_secs() as usize;
                        let end_index = ended.saturating_duration_since(started).as_secs() as usize;
                        for (seconds, index) in [(&mut tally.by_start, start_index), (&mut tally.by_end, end_index)] {
                            let second = slot(seconds, index);
                            second.sent += 1;
                            if ok {
                                second.ok += 1;
                                second.latency.record(latency.as_micros() as u64);
                            } else {
                                second.failed += 1;
                            }
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                });
            }
        });
        Self { started, tally, in_flight, stop }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Requests that ended in second `index` (counted from the start).
    pub fn ended_in(&self, index: usize) -> Second {
        let tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.by_end.get(index).cloned().unwrap_or_default()
    }

    /// Every second so far, by the second its requests were sent in.
    pub fn by_start(&self) -> Vec<Second> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).by_start.clone()
    }

    /// Stops sending and waits (up to the request timeout and a little) for the requests still out.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let give_up = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Totals: (sent, ok, failed).
    pub fn totals(&self) -> (u64, u64, u64) {
        let tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.by_start.iter().fold((0, 0, 0), |(s, o, f), second| (s + second.sent, o + second.ok, f + second.failed))
    }
}
