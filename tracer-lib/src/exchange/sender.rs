//! Sends reports to neighbour agents: concurrently, each bounded by a timeout, over cached gRPC channels, with the
//! report's proof (a MAC under the mesh key), the shared token and TLS when configured. Runs on the agent's tasks,
//! never on the request path. It only ever dials agents learned from this service's own edges.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::future::join_all;
use rootscale_proto::v1::{NeighborReport, neighbor_client::NeighborClient};
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    exchange::outbox::Outgoing,
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
    tls: Option<ClientTlsConfig>,
    keys: Option<Arc<KeyRing>>,
    channels: Mutex<HashMap<String, Channel>>,
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
        Ok(Self { timeout, token, tls, keys, channels: Mutex::new(HashMap::new()) })
    }

    fn channel(&self, agent: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(agent) {
            return Ok(channel.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{agent}"))
            .map_err(|error| format!("bad agent address {agent}: {error}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|error| format!("TLS for {agent}: {error}"))?;
        }
        let channel = endpoint.connect_lazy();
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        channels.insert(agent.to_string(), channel.clone());
        Ok(channel)
    }

    /// Sends one report; `Err` says why the agent did not take it.
    pub async fn send(&self, agent: &str, report: NeighborReport) -> Result<(), String> {
        let channel = self.channel(agent)?;
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
