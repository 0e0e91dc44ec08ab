//! Asking the agents: one `Advisor.Recommend` call to each ready pod's agent, all at once, each bounded by a
//! timeout, over one cached channel per agent (TLS and the shared token when configured). An agent that does not
//! answer, fails TLS verification, or answers garbage, counts as missing data — which never scales a Deployment
//! down. And listening to them: `Advisor.Watch`, the stream on which an agent says, as soon as it decides it, that
//! its service needs more replicas ([`AgentClient::watch`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use rootscale_proto::v1::{
    NeedsReplicas as WireNeedsReplicas, RecommendRequest, RecommendResponse, WatchRequest,
    advisor_client::AdvisorClient,
};
use rootscale_tracer::{
    exchange::channels::ChannelCache,
    identity::{
        KeyRing,
        peer::{OPERATOR_PROOF_METADATA, operator_proof},
    },
    measure::headers::valid_service_name,
};
use tonic::metadata::{Ascii, MetadataValue};

use crate::{
    Error,
    engine::{Advice, Verdict},
    tls::AgentTls,
};

/// Largest usage ratio taken as real (a replica at 1,000 times its target); more is garbage.
const MAX_USAGE_RATIO: f64 = 1_000.0;
/// Longest text kept from an agent (a reason, an error): it goes into status, conditions and Events.
pub const MAX_AGENT_TEXT: usize = 512;

/// `text` as it may be shown: control characters replaced, cut to [`MAX_AGENT_TEXT`] bytes on a character
/// boundary, with `…` when cut.
pub fn bounded_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_AGENT_TEXT + 3));
    for c in text.chars() {
        if out.len() + c.len_utf8() > MAX_AGENT_TEXT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// What the operator tells every agent of a Deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub namespace: String,
    pub deployment: String,
    /// The entry service's SLO (latency, percentile), if the Deployment has one.
    pub slo: Option<(Duration, f64)>,
    pub target_utilization: f64,
    pub current_replicas: u32,
}

/// One pod's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub pod: String,
    /// The agent's verdict and usage ratio, or why there is none.
    pub advice: Result<Advice, String>,
    /// The service's latency at the SLO percentile, if it answered.
    pub observed_latency: Option<Duration>,
    /// The agent's own explanation, and where it points.
    pub reason: String,
    pub suspect: Option<String>,
    /// The service its agent speaks for, and the callees it delegated to (for the dashboard).
    pub service: Option<String>,
    pub delegated_to: Vec<String>,
    /// Its traffic and waits, for the dashboard; `None` when absent or implausible.
    pub traffic: Option<Traffic>,
}

/// One replica's traffic and waits over its window, as its agent reported them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub requests_per_second: f64,
    pub local_wait: Duration,
    pub net_wait: Duration,
    pub remote_wait: Duration,
    /// Calls per second, by callee service.
    pub callees: Vec<(String, f64)>,
}

/// Most callees read from one answer.
const MAX_CALLEES: usize = 64;
/// Largest rate or wait taken as real.
const MAX_RATE: f64 = 10_000_000.0;
const MAX_WAIT_US: u64 = 3_600_000_000;

/// The traffic part of an answer, if every value in it is plausible: it only feeds the dashboard, so anything
/// odd drops it rather than the answer.
fn traffic(wire: Option<&rootscale_proto::v1::Traffic>) -> Option<Traffic> {
    let wire = wire?;
    let rate_ok = |rate: f64| rate.is_finite() && (0.0..=MAX_RATE).contains(&rate);
    if !rate_ok(wire.requests_per_second)
        || wire.callees.len() > MAX_CALLEES
        || [wire.local_wait_us, wire.net_wait_us, wire.remote_wait_us].iter().any(|us| *us > MAX_WAIT_US)
        || wire.callees.iter().any(|c| !rate_ok(c.calls_per_second) || !valid_service_name(&c.callee))
    {
        return None;
    }
    Some(Traffic {
        requests_per_second: wire.requests_per_second,
        local_wait: Duration::from_micros(wire.local_wait_us),
        net_wait: Duration::from_micros(wire.net_wait_us),
        remote_wait: Duration::from_micros(wire.remote_wait_us),
        callees: wire.callees.iter().map(|c| (c.callee.clone(), c.calls_per_second)).collect(),
    })
}

impl Answer {
    /// No answer from `pod`'s agent, and why.
    pub fn unanswered(pod: &str, why: String) -> Self {
        Self {
            pod: pod.to_string(),
            advice: Err(why),
            observed_latency: None,
            reason: String::new(),
            suspect: None,
            service: None,
            delegated_to: Vec::new(),
            traffic: None,
        }
    }

    /// The engine's input: `None` for missing data.
    pub fn advice(&self) -> Option<Advice> {
        self.advice.as_ref().ok().copied()
    }
}

fn request(query: &Query) -> RecommendRequest {
    RecommendRequest {
        slo_latency_us: query.slo.map_or(0, |(latency, _)| u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)),
        slo_percentile: query.slo.map_or(0.0, |(_, percentile)| percentile),
        target_utilization: query.target_utilization,
        current_replicas: query.current_replicas,
        namespace: query.namespace.clone(),
        deployment: query.deployment.clone(),
    }
}

/// Reads an agent's answer; anything out of range is garbage, and its texts are bounded.
fn interpret(pod: &str, response: RecommendResponse) -> Answer {
    let reason = response
        .decision
        .as_ref()
        .and_then(|d| d.evidence.as_ref())
        .map(|e| bounded_text(&e.reason))
        .unwrap_or_default();
    // The suspect is a service name, or nothing.
    let suspect = response
        .decision
        .as_ref()
        .and_then(|d| d.bottleneck.as_ref())
        .map(|point| point.service.clone())
        .filter(|service| valid_service_name(service));
    let verdict = match response.decision.as_ref() {
        Some(decision) => Verdict::from_proto(decision.verdict)
            .ok_or_else(|| "the agent answered with an unknown verdict".to_string()),
        None => Err("the agent answered without a decision".to_string()),
    };
    let ratio = response.recommendation.as_ref().map(|r| r.usage_ratio);
    let advice = match (verdict, ratio) {
        (Err(error), _) => Err(error),
        (Ok(_), None) => Err("the agent answered without a recommendation".to_string()),
        (Ok(_), Some(ratio)) if !(ratio.is_finite() && (0.0..=MAX_USAGE_RATIO).contains(&ratio)) => {
            Err(format!("the agent answered with a usage ratio of {ratio}"))
        }
        (Ok(verdict), Some(usage_ratio)) => Ok(Advice { verdict, usage_ratio }),
    };
    let observed = (response.observed_latency_us > 0).then(|| Duration::from_micros(response.observed_latency_us));
    let delegated_to = response
        .decision
        .as_ref()
        .map(|d| d.delegated_to.iter().filter(|c| valid_service_name(c)).take(MAX_CALLEES).cloned().collect())
        .unwrap_or_default();
    let traffic = traffic(response.traffic.as_ref());
    let service = Some(response.service).filter(|name| valid_service_name(name));
    Answer { pod: pod.to_string(), advice, observed_latency: observed, reason, suspect, service, delegated_to, traffic }
}

/// Channels kept at most, one per agent address; past that the cache starts over.
const MAX_CHANNELS: usize = 1024;

/// How the operator calls the agents, built once at start and shared by every reconcile: the timeout, the
/// shared token, TLS, and one channel per agent address, reused from call to call.
#[derive(Clone)]
pub struct AgentClient {
    /// How long an agent may take to answer, connecting included.
    timeout: Duration,
    /// `authorization: Bearer <token>` on every call.
    token: Option<MetadataValue<Ascii>>,
    /// TLS toward the agents; `None`: plain HTTP/2.
    tls: Option<AgentTls>,
    /// The mesh key: every question carries the operator's proof made with it, so the agents keep its settings.
    mesh_keys: Option<Arc<KeyRing>>,
    channels: Arc<ChannelCache>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("timeout", &self.timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("mesh_keys", &self.mesh_keys.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Plain HTTP/2, no token.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            token: None,
            tls: None,
            mesh_keys: None,
            channels: Arc::new(ChannelCache::new(timeout, None, MAX_CHANNELS)),
        }
    }

    /// Signs every question with the mesh key (the operator's proof).
    pub fn with_mesh_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.mesh_keys = Some(keys);
        self
    }

    /// The keys questions are signed with.
    pub fn mesh_keys(&self) -> Option<&Arc<KeyRing>> {
        self.mesh_keys.as_ref()
    }

    /// Sends `token` on every call; it must be non-empty visible ASCII (as the agents require).
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidConfig("the agent token must be non-empty visible ASCII".into()));
        }
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::InvalidConfig("the agent token must be non-empty visible ASCII".into()))?;
        self.token = Some(value);
        Ok(self)
    }

    /// Calls the agents over TLS.
    pub fn with_tls(mut self, tls: AgentTls) -> Self {
        self.channels = Arc::new(ChannelCache::new(self.timeout, Some(tls.client()), MAX_CHANNELS));
        self.tls = Some(tls);
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    pub fn tls(&self) -> Option<&AgentTls> {
        self.tls.as_ref()
    }

    /// One call's request to `method`: the message and the metadata every call carries.
    fn request<T: prost::Message>(&self, method: &str, message: T) -> tonic::Request<T> {
        let mut request = self.open_ended(method, message);
        request.set_timeout(self.timeout);
        request
    }

    /// Opens `Advisor.Watch` on `agent`: the decisions that call for more replicas, as the agent makes them. The
    /// stream ends when the agent stops or the connection goes; the caller opens it again. Messages that do not
    /// parse end it too.
    pub async fn watch(
        &self,
        agent: SocketAddr,
        namespace: &str,
        deployment: &str,
    ) -> Result<impl futures_util::Stream<Item = NeedsReplicas> + Send + 'static, String> {
        let channel = self.channels.channel(&agent.to_string())?;
        let mut advisor = AdvisorClient::new(channel).max_decoding_message_size(MAX_WATCH_MESSAGE);
        let request = WatchRequest { namespace: namespace.to_string(), deployment: deployment.to_string() };
        let opened = tokio::time::timeout(self.timeout, advisor.watch(self.open_ended("Watch", request))).await;
        let stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(bounded_text(&self.failure(agent, &status))),
            Err(_) => return Err(format!("the agent at {agent} did not answer within {:?}", self.timeout)),
        };
        Ok(futures_util::stream::unfold(stream, |mut stream| async move {
            let news = NeedsReplicas::from_wire(stream.message().await.ok()??)?;
            Some((news, stream))
        }))
    }

    /// A request with the token and the operator's proof, and no deadline (a stream that stays open).
    fn open_ended<T: prost::Message>(&self, method: &str, message: T) -> tonic::Request<T> {
        let proof =
            self.mesh_keys.as_ref().map(|keys| operator_proof(&keys.current(), method, &message.encode_to_vec()));
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        if let Some(proof) = proof {
            request.metadata_mut().insert(OPERATOR_PROOF_METADATA, proof);
        }
        request
    }

    /// Why a call failed, for the answer: silence, no connection (TCP or TLS), or the agent's refusal.
    fn failure(&self, agent: SocketAddr, status: &tonic::Status) -> String {
        let timeout = self.timeout;
        // A status the agent sent has no source; one made of a transport error has the error as its source.
        let transport = std::error::Error::source(status).is_some();
        let mut detail = status.message().to_string();
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !detail.contains(&text) && text != "transport error" {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            source = cause.source();
        }
        let silent = format!("the agent at {agent} did not answer within {timeout:?}");
        match status.code() {
            // tonic's own deadline can fire first; it is the same silence.
            tonic::Code::DeadlineExceeded => silent,
            _ if detail.contains("Timeout expired") => silent,
            _ if transport => {
                // Over TLS 1.3 a server that refuses the client's certificate says so after the handshake: the
                // client sees the connection close (or its write fail).
                let closed = ["connection closed", "broken pipe", "reset by peer", "stream closed"];
                let hint = if self.tls.is_some() && closed.iter().any(|c| detail.contains(c)) {
                    " (an agent on TLS closes the connection when it does not accept the operator's client certificate)"
                } else {
                    ""
                };
                format!("cannot reach the agent at {agent}: {detail}{hint}")
            }
            tonic::Code::Cancelled => silent,
            _ => format!("the agent at {agent} refused: {detail}"),
        }
    }
}

async fn ask_one(client: &AgentClient, pod: &str, agent: SocketAddr, request: RecommendRequest) -> Answer {
    let timeout = client.timeout;
    let channel = match client.channels.channel(&agent.to_string()) {
        Ok(channel) => channel,
        Err(why) => return Answer::unanswered(pod, why),
    };
    let mut advisor = AdvisorClient::new(channel);
    match tokio::time::timeout(timeout, advisor.recommend(client.request("Recommend", request))).await {
        Ok(Ok(response)) => interpret(pod, response.into_inner()),
        Ok(Err(status)) => Answer::unanswered(pod, bounded_text(&client.failure(agent, &status))),
        Err(_) => Answer::unanswered(pod, format!("the agent at {agent} did not answer within {timeout:?}")),
    }
}

/// Largest `Advisor.Watch` message read: a name, a window, a verdict and a count.
const MAX_WATCH_MESSAGE: usize = 1024;

/// An agent's word that its service needs more replicas, from `Advisor.Watch`.
#[derive(Clone, Debug, PartialEq)]
pub struct NeedsReplicas {
    pub service: String,
    pub window_id: u64,
    pub verdict: Verdict,
    pub desired_replicas: u32,
}

impl NeedsReplicas {
    /// Only a valid service name and a verdict that calls for replicas are taken.
    fn from_wire(wire: WireNeedsReplicas) -> Option<Self> {
        let verdict = Verdict::from_proto(wire.verdict)?;
        (valid_service_name(&wire.service) && matches!(verdict, Verdict::RootCause | Verdict::Saturated)).then_some(
            Self { service: wire.service, window_id: wire.window_id, verdict, desired_replicas: wire.desired_replicas },
        )
    }
}

/// Asks every pod's agent at once.
pub async fn ask_all(pods: &[(String, SocketAddr)], query: &Query, client: &AgentClient) -> Vec<Answer> {
    let request = request(query);
    join_all(pods.iter().map(|(pod, agent)| ask_one(client, pod, *agent, request.clone()))).await
}

#[cfg(test)]
mod tests {
    use rootscale_proto::v1::{Decision, Recommendation, Verdict as WireVerdict};

    use super::*;

    fn response(verdict: i32, usage_ratio: f64) -> RecommendResponse {
        RecommendResponse {
            decision: Some(Decision { verdict, ..Default::default() }),
            recommendation: Some(Recommendation { usage_ratio, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn garbage_answers_are_missing_data() {
        let good = interpret("p", response(WireVerdict::RootCause as i32, 1.5));
        assert_eq!(good.advice(), Some(Advice { verdict: Verdict::RootCause, usage_ratio: 1.5 }));
        for (bad, why) in [
            (response(42, 1.0), "unknown verdict"),
            (response(0, 1.0), "unknown verdict"),
            (response(WireVerdict::Idle as i32, -0.5), "usage ratio of -0.5"),
            (response(WireVerdict::Idle as i32, f64::NAN), "usage ratio of NaN"),
            (response(WireVerdict::RootCause as i32, 1e6), "usage ratio of 1000000"),
            (
                RecommendResponse { recommendation: None, ..response(WireVerdict::Idle as i32, 0.1) },
                "without a recommendation",
            ),
            (RecommendResponse::default(), "without a decision"),
        ] {
            let answer = interpret("p", bad);
            assert!(answer.advice.as_ref().is_err_and(|e| e.contains(why)), "{why}: {answer:?}");
            assert_eq!(answer.advice(), None);
        }
    }

    #[test]
    fn implausible_traffic_is_dropped_but_the_answer_kept() {
        use rootscale_proto::v1::{CalleeRate, Traffic as WireTraffic};
        let with = |traffic: WireTraffic| RecommendResponse {
            traffic: Some(traffic),
            ..response(WireVerdict::Healthy as i32, 1.0)
        };
        let good = WireTraffic {
            requests_per_second: 12.5,
            local_wait_us: 1500,
            callees: vec![CalleeRate { callee: "db".into(), calls_per_second: 12.5 }],
            ..Default::default()
        };
        let answer = interpret("p", with(good.clone()));
        let traffic = answer.traffic.unwrap();
        assert_eq!(
            (traffic.local_wait, traffic.callees),
            (Duration::from_micros(1500), vec![("db".to_string(), 12.5)])
        );
        for bad in [
            WireTraffic { requests_per_second: f64::NAN, ..good.clone() },
            WireTraffic { net_wait_us: u64::MAX, ..good.clone() },
            WireTraffic {
                callees: vec![CalleeRate { callee: "Bad Name!".into(), calls_per_second: 1.0 }],
                ..good.clone()
            },
            WireTraffic { callees: vec![CalleeRate { callee: "db".into(), calls_per_second: -1.0 }], ..good.clone() },
            WireTraffic { callees: vec![CalleeRate::default(); 65], ..good.clone() },
        ] {
            let answer = interpret("p", with(bad));
            assert_eq!(answer.traffic, None);
            assert!(answer.advice.is_ok());
        }
    }

    #[test]
    fn an_agents_texts_are_bounded_and_its_suspect_must_be_a_service_name() {
        use rootscale_proto::v1::{Evidence, WaitPoint};
        let huge = "x".repeat(1 << 20);
        let mut wire = response(WireVerdict::RootCause as i32, 2.0);
        if let Some(decision) = wire.decision.as_mut() {
            decision.evidence = Some(Evidence { reason: format!("line\nbreak {huge}"), ..Default::default() });
            decision.bottleneck = Some(WaitPoint { service: huge.clone(), ..Default::default() });
        }
        let answer = interpret("p", wire);
        assert!(answer.reason.len() <= MAX_AGENT_TEXT + '…'.len_utf8(), "{}", answer.reason.len());
        assert!(answer.reason.starts_with("line break x") && answer.reason.ends_with('…'));
        assert_eq!(answer.suspect, None, "a megabyte is no service name");
        assert_eq!(bounded_text("é".repeat(300).as_str()).chars().filter(|c| *c == 'é').count(), 256);
        assert_eq!(bounded_text("short"), "short");
    }
}
