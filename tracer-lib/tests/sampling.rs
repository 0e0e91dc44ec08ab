//! Sampling (docs/DESIGN.md §1.9) on real axum servers on loopback: svc-a (an entry) calls svc-b for every
//! request, both measuring one request in 16. svc-a draws each outside request; svc-b measures exactly the calls
//! svc-a measured, leaves out the ones it marked, and draws nothing of its own; each window counts a measured
//! request as 16.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use futures_util::{StreamExt, stream};
use rootscale_tracer::{
    SampleRate, Tracer,
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

/// Sums of the closed windows: (requests, arrivals, external requests, requests from svc-a, calls to svc-b).
fn totals(tracer: &Tracer, first: u64) -> (u64, u64, u64, u64, u64) {
    close_all(tracer, first).iter().fold((0, 0, 0, 0, 0), |sum, window| {
        let stats = &window.stats;
        assert_eq!(stats.sample_every, EVERY, "a closed window says it was a sample");
        (
            sum.0 + stats.requests,
            sum.1 + stats.arrivals,
            sum.2 + stats.external_requests,
            sum.3 + stats.inbound.get("svc-a").map_or(0, |edge| edge.requests),
            sum.4 + stats.outbound.get("svc-b").map_or(0, |edge| edge.calls),
        )
    })
}

async fn one_in_sixteen(keys: Option<Arc<KeyRing>>) {
    let (b, b_records) = sampled("svc-b", keys.as_ref());
    let b_addr = serve_http(&b, Behavior::default()).await;
    let (a, a_records) = sampled("svc-a", keys.as_ref());
    let a_addr = serve_http(&a, Behavior::default().then(vec![Callee::http(&a, b_addr)])).await;
    let first = a.window_clock().window_id(std::time::Instant::now());
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

    let a_measured = a_records.requests().len() as u64;
    let a_calls = a_records.calls().len() as u64;
    let b_measured = b_records.requests().len() as u64;
    // Binomial(4,000, 1/16): mean 250, standard deviation 15.3; ±6 standard deviations never fail by chance.
    assert!((158..=342).contains(&a_measured), "svc-a measured {a_measured} of {REQUESTS}");
    assert_eq!(a_calls, a_measured, "svc-a records the calls of the requests it measures, and only those");
    // Exactly the calls svc-a measured, all named svc-a: had svc-b drawn the marked ones, it would have ~1.9×.
    assert_eq!(b_measured, a_calls, "svc-b measures what svc-a measured");
    assert!(b_records.requests().iter().all(|r| r.caller.as_deref() == Some("svc-a")));

    let weight = u64::from(EVERY);
    let (requests, arrivals, external, _, calls) = totals(&a, first);
    assert_eq!(arrivals, REQUESTS, "every arrival is counted, sampled or not");
    assert_eq!(requests, a_measured * weight, "svc-a's window counts each measured request as {EVERY}");
    assert_eq!(external, requests);
    assert_eq!(calls, a_calls * weight);
    let (requests, arrivals, external, from_a, _) = totals(&b, first);
    assert_eq!(arrivals, REQUESTS);
    assert_eq!(requests, b_measured * weight);
    assert_eq!((external, from_a), (0, requests), "svc-b's requests all came from svc-a, none drawn from outside");
    // The scaled count estimates the whole: 4,000 ± 6 standard deviations of 16 × Binomial(4,000, 1/16).
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
