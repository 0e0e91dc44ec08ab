//! gRPC channels to agents: one per address, made on first use (connecting lazily, and again after a failure) and
//! reused from call to call, over TLS when configured. Bounded: past the cap the cache starts over. Shared by the
//! agents' report sender and the operator's `Advisor` client.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Channels to agents, by address.
pub struct ChannelCache {
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
    cap: usize,
    channels: Mutex<HashMap<String, Channel>>,
}

impl ChannelCache {
    /// Channels whose connections and calls are bounded by `timeout`, over `tls` when given, at most `cap` kept.
    pub fn new(timeout: Duration, tls: Option<ClientTlsConfig>, cap: usize) -> Self {
        Self { timeout, tls, cap: cap.max(1), channels: Mutex::new(HashMap::new()) }
    }

    /// The channel to the agent at `agent` (`host:port`); `Err` says why there is none.
    pub fn channel(&self, agent: &str) -> Result<Channel, String> {
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
        if channels.len() >= self.cap {
            channels.clear();
        }
        channels.insert(agent.to_string(), channel.clone());
        Ok(channel)
    }
}
