//! Asking real agents on loopback, as the controller will: concurrently, with a timeout, unreachable or
//! garbage-answering agents counted as missing data.

use std::{net::SocketAddr, time::Duration};

use rootscale_operator::{
    agents::{AgentClient, Query, ask_all},
    engine::{Advice, Verdict},
};
use rootscale_tracer::Agent;

fn query() -> Query {
    Query {
        namespace: "shop".into(),
        deployment: "checkout".into(),
        slo: Some((Duration::from_millis(200), 95.0)),
        target_utilization: 0.7,
        current_replicas: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_is_asked_at_once_and_silence_is_missing_data() {
    let first = Agent::builder("checkout").listen("127.0.0.1:0".parse().unwrap()).start().await.unwrap();
    let second =
        Agent::builder("checkout").listen("127.0.0.1:0".parse().unwrap()).token("t0k3n").start().await.unwrap();
    // A port that accepts connections but never speaks: the timeout must end the wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let pods = vec![
        ("checkout-1".to_string(), first.local_addr()),
        ("checkout-2".to_string(), second.local_addr()),
        ("checkout-3".to_string(), silent_addr),
        ("checkout-4".to_string(), closed),
    ];
    let started = std::time::Instant::now();
    let client = AgentClient::new(Duration::from_millis(500)).with_token("t0k3n").unwrap();
    let answers = ask_all(&pods, &query(), &client).await;
    assert!(started.elapsed() < Duration::from_secs(2), "asked concurrently, bounded by the timeout");
    assert_eq!(answers.len(), 4);
    // No traffic yet: the agents say insufficient-data, with no load at all.
    for answer in &answers[..2] {
        assert_eq!(
            answer.advice(),
            Some(Advice { verdict: Verdict::InsufficientData, usage_ratio: 0.0 }),
            "{answer:?}"
        );
    }
    assert!(answers[2].advice.as_ref().is_err_and(|why| why.contains("did not answer")), "{:?}", answers[2]);
    assert!(answers[3].advice.as_ref().is_err_and(|why| why.contains("cannot reach")), "{:?}", answers[3]);
    // The first agent needs no token; a wrong token is refused by the second.
    let wrong = AgentClient::new(Duration::from_millis(500)).with_token("wrong").unwrap();
    let refused = ask_all(&pods[1..2], &query(), &wrong).await;
    assert!(refused[0].advice.as_ref().is_err_and(|why| why.contains("refused")), "{:?}", refused[0]);
    first.shutdown(Duration::from_secs(1)).await;
    second.shutdown(Duration::from_secs(1)).await;
    drop(silent);
}
