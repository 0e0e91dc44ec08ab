//! Pushed decisions: rootscale's policy does not wait for its next sync. It holds an `Advisor.Watch` stream on
//! every replica's agent — the path the operator takes in a cluster — and hears, as soon as an agent decides it,
//! that a service needs more replicas; the policy then decides that service at once. At most one pushed decision
//! per service every [`PUSH_EVERY_WINDOWS`] windows, however many replicas say so (or say it again after a
//! delegation arrives): replicas just added need a whole window of traffic before what they say counts, and the
//! backlog they drain meanwhile is not new demand. The periodic sync goes on as before.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use futures_util::StreamExt;
use rootscale_operator::agents::AgentClient;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::local::cluster::Cluster;

/// How long a watch that ended waits before it is opened again.
const REOPEN_AFTER: Duration = Duration::from_millis(200);
/// Windows between two pushed decisions for one service.
pub const PUSH_EVERY_WINDOWS: u64 = 3;
/// Pushes queued for the policy at most; more are dropped (the next sync decides anyway).
const MAX_QUEUED: usize = 256;

/// A service's agent said it needs replicas, for `window_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub service: String,
    pub window_id: u64,
}

/// The watches on every live replica's agent, and what they heard.
pub struct Pushes {
    client: AgentClient,
    watching: HashMap<SocketAddr, JoinHandle<()>>,
    sender: mpsc::Sender<Pushed>,
    receiver: mpsc::Receiver<Pushed>,
    /// The last window each service was decided for on a push.
    decided: BTreeMap<String, u64>,
}

impl Pushes {
    pub fn new(client: AgentClient) -> Self {
        let (sender, receiver) = mpsc::channel(MAX_QUEUED);
        Self { client, watching: HashMap::new(), sender, receiver, decided: BTreeMap::new() }
    }

    /// Watches every replica of `cluster` not watched yet, and stops watching the ones that are gone.
    pub fn follow(&mut self, cluster: &Cluster) {
        let mut live = Vec::new();
        for spec in &cluster.topology.services {
            for replica in cluster.replica_info(&spec.name) {
                live.push(replica.agent_addr);
                let (client, sender) = (&self.client, &self.sender);
                self.watching.entry(replica.agent_addr).or_insert_with(|| {
                    tokio::spawn(watch(client.clone(), replica.agent_addr, spec.name.clone(), sender.clone()))
                });
            }
        }
        self.watching.retain(|agent, task| {
            let keep = live.contains(agent);
            if !keep {
                task.abort();
            }
            keep
        });
    }

    /// The next service to decide: the first push at least [`PUSH_EVERY_WINDOWS`] windows after the last one
    /// decided for it.
    pub async fn next(&mut self) -> Option<Pushed> {
        loop {
            let pushed = self.receiver.recv().await?;
            if self.decided.get(&pushed.service).is_none_or(|last| pushed.window_id >= last + PUSH_EVERY_WINDOWS) {
                self.decided.insert(pushed.service.clone(), pushed.window_id);
                return Some(pushed);
            }
        }
    }
}

impl Drop for Pushes {
    fn drop(&mut self) {
        for task in self.watching.values() {
            task.abort();
        }
    }
}

/// Holds a watch on one agent, opening it again whenever it ends, until aborted.
async fn watch(client: AgentClient, agent: SocketAddr, service: String, pushes: mpsc::Sender<Pushed>) {
    loop {
        match client.watch(agent, "local", &service).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(news) = stream.next().await {
                    // An agent speaks for its own service only.
                    if news.service == service
                        && pushes.try_send(Pushed { service: service.clone(), window_id: news.window_id }).is_err()
                    {
                        tracing::debug!(%service, "a push was dropped: the policy is behind");
                    }
                }
            }
            Err(error) => tracing::debug!(%agent, %error, "could not watch an agent"),
        }
        tokio::time::sleep(REOPEN_AFTER).await;
    }
}
