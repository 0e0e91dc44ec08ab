//! Sends reports to neighbour agents: concurrently, each bounded by a timeout, over cached gRPC channels, with the
//! report's proof (a MAC under the mesh key), the shared token and TLS when configured. Runs on the agent's tasks,
//! never on the request path. It only ever dials agents this service's own traffic named: its edges' and, without
//! edges, its callers' beyond the edge cap. A shared service with more callers than the cache holds reconnects to
//! some of them every window (not measured on a cluster).

use std::{sync::Arc, time::Duration};

use futures_util::future::join_all;
use rootscale_proto::v1::{NeighborReport, neighbor_client::NeighborClient};
use tonic::{metadata::MetadataValue, transport::ClientTlsConfig};

use crate::{
    exchange::{channels::ChannelCache, outbox::Outgoing},
    identity::{
        KeyRing,
        peer::{REPORT_PROOF_METADATA, report_proof},
    },
};

/// Channels kept at most; past that the cache starts over.
const MAX_CHANNELS: usize = 512;

/// Sends reports to agents.
pub struct Sender {
    timeout: Duration,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    keys: Option<Arc<KeyRing>>,
    channels: ChannelCache,
}

impl Sender {
    pub fn new(
        timeout: Duration,
        token: Option<&str>,
        tls: Option<ClientTlsConfig>,
        keys: Option<Arc<KeyRing>>,
    ) -> Result<Self, crate::Error> {
        let token = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| crate::Error::Config("the agent token must be visible ASCII".into()))?,
            ),
            None => None,
        };
        Ok(Self { timeout, token, keys, channels: ChannelCache::new(timeout, tls, MAX_CHANNELS) })
    }

    /// Sends one report; `Err` says why the agent did not take it.
    pub async fn send(&self, agent: &str, report: NeighborReport) -> Result<(), String> {
        let channel = self.channels.channel(agent)?;
        let proof =
            self.keys.as_ref().map(|keys| report_proof(&keys.current(), &prost::Message::encode_to_vec(&report)));
        let mut request = tonic::Request::new(report);
        if let Some(proof) = proof {
            request.metadata_mut().insert(REPORT_PROOF_METADATA, proof);
        }
        request.set_timeout(self.timeout);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        let mut client = NeighborClient::new(channel);
        match tokio::time::timeout(self.timeout, client.exchange(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Sends every report at once; returns each with its outcome, in order.
    pub async fn send_all(&self, outbox: Vec<Outgoing>) -> Vec<(Outgoing, Result<(), String>)> {
        join_all(outbox.into_iter().map(|outgoing| async move {
            let outcome = self.send(&outgoing.agent, outgoing.report.clone()).await;
            (outgoing, outcome)
        }))
        .await
    }
}
