//! Sampling (docs/DESIGN.md §1.9) on real axum servers on loopback: svc-a (an entry) calls svc-b for every
//! request, both at one request in 16. svc-a measures the first outside request of each sixteenth of a window (its
//! reservoir, weight 1) and draws one in 16 of the rest (weight 16); svc-b measures exactly the calls svc-a measured, with
//! their weights, leaves out the ones it marked, and chooses nothing of its own; each window counts a measured
//! request as its weight.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use futures_util::{StreamExt, stream};
use rootscale_tracer::{
    ClosedWindow, SAMPLE_RESERVOIR, SampleRate, Tracer,
    identity::{KeyRing, MeshKeys},
};

const REQUESTS: u64 = 4_000;
const EVERY: u32 = 16;

fn sampled(service: &str, keys: Option<&Arc<KeyRing>>) -> (Tracer, Arc<Records>) {
    let records = Arc::new(Records::default());
    let mut builder = Tracer::builder(service)
        .agent_addr(format!("127.0.0.1:{}", 9000 + service.len()))
        .window(Duration::from_secs(1))
        .sample(SampleRate::one_in(EVERY).unwrap())
        .observer(records.clone());
    if let Some(keys) = keys {
        builder = builder.mesh_keys(keys.clone());
    }
    (builder.build().unwrap(), records)
}

/// Sums of the closed windows: (requests, arrivals, external requests, requests from svc-a, calls to svc-b,
/// windows).
fn totals(windows: &[Arc<ClosedWindow>]) -> (u64, u64, u64, u64, u64, u64) {
    windows.iter().fold((0, 0, 0, 0, 0, 0), |sum, window| {
        let stats = &window.stats;
        assert_eq!(stats.sample_every, EVERY, "a closed window says it was a sample");
        (
            sum.0 + stats.requests,
            sum.1 + stats.arrivals,
            sum.2 + stats.external_requests,
            sum.3 + stats.inbound.get("svc-a").map_or(0, |edge| edge.requests),
            sum.4 + stats.outbound.get("svc-b").map_or(0, |edge| edge.calls),
            sum.5 + 1,
        )
    })
}

/// Measured records by weight: (from the reservoir, drawn), and the weighted sum; any other weight fails.
fn by_weight(weights: impl Iterator<Item = u32>) -> (u64, u64, u64) {
    weights.fold((0, 0, 0), |(reserved, drawn, sum), weight| match weight {
        1 => (reserved + 1, drawn, sum + 1),
        EVERY => (reserved, drawn + 1, sum + u64::from(EVERY)),
        other => panic!("a weight of {other}"),
    })
}

async fn one_in_sixteen(keys: Option<Arc<KeyRing>>) {
    let (b, b_records) = sampled("svc-b", keys.as_ref());
    let b_addr = serve_http(&b, Behavior::default()).await;
    let (a, a_records) = sampled("svc-a", keys.as_ref());
    let a_addr = serve_http(&a, Behavior::default().then(vec![Callee::http(&a, b_addr)])).await;
    let first = a.window_clock().window_id(std::time::Instant::now());
    let (a_windows, b_windows) = (WindowCollector::start(&a, first), WindowCollector::start(&b, first));
    let client = plain_client();
    stream::iter(0..REQUESTS)
        .for_each_concurrent(8, |_| {
            let client = client.clone();
            async move {
                get_from_outside(&client, a_addr).await;
            }
        })
        .await;
    // Bodies end (and requests are recorded) just after the client has read them.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (a_reserved, a_drawn, a_weighted) = by_weight(a_records.requests().iter().map(|r| r.weight));
    let (a_calls_reserved, a_calls_drawn, a_calls_weighted) = by_weight(a_records.calls().iter().map(|c| c.weight));
    let (b_reserved, b_drawn, b_weighted) = by_weight(b_records.requests().iter().map(|r| r.weight));
    let (requests, arrivals, external, _, calls, windows) = totals(&a_windows.finish());
    let reservoir = u64::from(SAMPLE_RESERVOIR);
    // The first of each sixteenth of a window the run touched, never more.
    assert!(
        (1..=reservoir * windows).contains(&a_reserved),
        "svc-a measured {a_reserved} from its reservoir over {windows} windows"
    );
    // Binomial(4,000 − reserved, 1/16): mean under 250, standard deviation 15.3; ±6 standard deviations never
    // fail by chance.
    assert!((150..=342).contains(&a_drawn), "svc-a drew {a_drawn} of {REQUESTS}");
    assert_eq!(
        (a_calls_reserved, a_calls_drawn),
        (a_reserved, a_drawn),
        "svc-a records the calls of the requests it measures, with their weights, and only those"
    );
    // Exactly the calls svc-a measured, with the same weights, all named svc-a: had svc-b chosen the marked ones
    // itself, it would have ~1.9× as many, and its own reservoir's.
    assert_eq!((b_reserved, b_drawn), (a_reserved, a_drawn), "svc-b measures what svc-a measured, weighed alike");
    assert!(b_records.requests().iter().all(|r| r.caller.as_deref() == Some("svc-a")));

    assert_eq!(arrivals, REQUESTS, "every arrival is counted, sampled or not");
    let losses = a.losses();
    assert_eq!(
        requests,
        a_weighted,
        "svc-a's windows count each measured request as its weight (records lost: {} late, {} in unclosed windows)",
        losses.late.load(std::sync::atomic::Ordering::Relaxed),
        losses.unclosed.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(external, requests);
    assert_eq!(calls, a_calls_weighted);
    let (requests, arrivals, external, from_a, _, _) = totals(&b_windows.finish());
    assert_eq!(arrivals, REQUESTS);
    assert_eq!(requests, b_weighted);
    assert_eq!((external, from_a), (0, requests), "svc-b's requests all came from svc-a, none chosen from outside");
    // The weighted count estimates the whole: 4,000 ± 6 standard deviations of 16 × Binomial(4,000, 1/16).
    assert!((2_528..=5_472).contains(&requests), "estimated {requests} requests of {REQUESTS}");
    assert_eq!(a.counters().malformed_caller.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(b.counters().malformed_caller.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_in_sixteen_is_chosen_at_the_entry_and_followed_downstream() {
    one_in_sixteen(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_mesh_key_the_marked_header_carries_the_same_proof() {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    one_in_sixteen(Some(keys)).await;
}

/// Without a mesh key nothing proves a caller's weight: a request marked `w=1024` counts as at most the receiving
/// service's own rate (here 1: it measures every request), so an outsider cannot inflate a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_a_received_weight_is_capped_at_the_services_own_rate() {
    let records = Arc::new(Records::default());
    let tracer = Tracer::builder("svc-b")
        .agent_addr("127.0.0.1:9011")
        // Long, so the run spans at most two windows however slow the machine: closed only at the end, a run
        // longer than the windows a shard keeps open would lose records.
        .window(Duration::from_secs(60))
        .observer(records.clone())
        .build()
        .unwrap();
    let addr = serve_http(&tracer, Behavior::default()).await;
    let first = tracer.window_clock().window_id(std::time::Instant::now());
    let client = plain_client();
    for _ in 0..20 {
        let request = http::Request::get(format!("http://{addr}/"))
            .header("rootscale-caller", "s=svc-a;w=1024;a=127.0.0.1:9010")
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = client.request(request).await.expect("request");
        http_body_util::BodyExt::collect(response.into_body()).await.expect("body");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let weights: Vec<u32> = records.requests().iter().map(|r| r.weight).collect();
    assert_eq!(weights, vec![1; 20], "every request measured, each as one");
    let requests: u64 = close_all(&tracer, first).iter().map(|window| window.stats.requests).sum();
    assert_eq!(requests, 20);
}
