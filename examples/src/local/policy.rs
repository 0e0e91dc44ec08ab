//! Who decides the replica counts, once per sync period, for every service: rootscale (each replica's agent is
//! asked over gRPC, `Advisor.Recommend`, exactly as the operator asks pods) or an HPA baseline — HPA's formula
//! `ceil(current × metric / target)` on each replica's virtual-CPU utilisation, or on each service's own latency
//! against its budget, both on an equal footing (the run's sync period, the metric since the last sync); and
//! `hpa-default`, HPA as clusters run it: CPU at a 70 % target, a 15 s sync, the metric averaged over the last 30 s
//! as metrics-server delivers it. All go through the operator's decision engine with HPA's default behaviour (a
//! 5-minute scale-down stabilisation), and apply through [`LocalTarget`], so a comparison differs only in the
//! signal and its timing.

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use rootscale_operator::{
    agents::{AgentClient, Query, ask_all},
    engine::{Engine, Outcome, Pods, ScaleTarget, TargetConfig},
};
use rootscale_tracer::aggregate::histogram::Histogram;

use crate::local::{
    Error,
    cluster::{Cluster, LocalTarget},
};

/// HPA's tolerance: no change while the metric is within 10 % of its target.
const TOLERANCE: f64 = 0.1;
/// `hpa-default`: HPA's own sync period (`--horizontal-pod-autoscaler-sync-period`).
pub const HPA_DEFAULT_SYNC: Duration = Duration::from_secs(15);
/// `hpa-default`: the window metrics-server averages CPU usage over.
pub const HPA_DEFAULT_METRIC_WINDOW: Duration = Duration::from_secs(30);
/// `hpa-default`: the CPU target clusters commonly set (70–80 %; the lower end, the kinder one to HPA).
pub const HPA_DEFAULT_CPU_TARGET: f64 = 0.7;

/// Which signal scales the services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The agents' recommendations: only a root cause (or a saturated service) is scaled.
    Rootscale,
    /// HPA on virtual-CPU utilisation against a target.
    HpaCpu,
    /// HPA on each service's own latency (at the SLO percentile) against its budget.
    HpaLatency,
    /// HPA as clusters run it: CPU against 70 %, every 15 s, on a 30 s average.
    HpaDefault,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::Rootscale, Policy::HpaCpu, Policy::HpaLatency, Policy::HpaDefault];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Rootscale => "rootscale",
            Policy::HpaCpu => "hpa-cpu",
            Policy::HpaLatency => "hpa-latency",
            Policy::HpaDefault => "hpa-default",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Policy::ALL
            .into_iter()
            .find(|policy| policy.as_str() == text)
            .ok_or_else(|| format!("unknown policy `{text}` (rootscale, hpa-cpu, hpa-latency, hpa-default)"))
    }
}

/// A change of a service's replica count.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    /// Seconds since the load started.
    pub at: f64,
    pub service: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    /// Made on an agent's push: seconds from the end of the window whose decision was pushed to this request.
    /// `None` when the periodic sync made it.
    pub pushed_after: Option<f64>,
}

/// How long an agent may take to answer the policy.
const AGENT_TIMEOUT: Duration = Duration::from_millis(800);

/// Decides and applies, one sync at a time.
pub struct Controller {
    pub policy: Policy,
    cluster: Arc<Cluster>,
    engines: BTreeMap<String, (Engine, TargetConfig)>,
    /// HPA-cpu's target utilisation.
    cpu_target: f64,
    /// How the agents are asked: as the operator, with the run's mesh key.
    agents: AgentClient,
    /// Each replica's virtual-CPU busy time at the last sync: (service, replica) → (when, nanoseconds).
    cpu_seen: BTreeMap<(String, u32), (Instant, u64)>,
    /// `hpa-default`: each replica's busy time at every sync within the metric window, oldest first.
    cpu_samples: BTreeMap<(String, u32), std::collections::VecDeque<(Instant, u64)>>,
    /// `hpa-default`: when it last decided.
    last_decided: Option<Instant>,
}

impl Controller {
    /// `scale_down_stabilization` is HPA's 5 minutes unless a run asks for less (a test that must see a
    /// scale-down in a minute).
    pub fn new(
        policy: Policy,
        cluster: Arc<Cluster>,
        cpu_target: f64,
        scale_down_stabilization: Duration,
    ) -> Result<Self, Error> {
        let mut engines = BTreeMap::new();
        for spec in &cluster.topology.services {
            let mut config = TargetConfig {
                min_replicas: spec.min_replicas,
                max_replicas: spec.max_replicas,
                tolerance: TOLERANCE,
                ..TargetConfig::default()
            };
            config.behavior.scale_down.stabilization_window = scale_down_stabilization;
            config.validate().map_err(|e| Error::Scenario(format!("{}: {e}", spec.name)))?;
            engines.insert(spec.name.clone(), (Engine::new(), config));
        }
        Ok(Self {
            policy,
            cluster: cluster.clone(),
            engines,
            cpu_target,
            agents: AgentClient::new(AGENT_TIMEOUT).with_mesh_keys(cluster.mesh_keys.clone()),
            cpu_seen: BTreeMap::new(),
            cpu_samples: BTreeMap::new(),
            last_decided: None,
        })
    }

    /// One sync: every service decided, changes applied. `elapsed` stamps the actions.
    pub async fn sync(&mut self, elapsed: Duration) -> Vec<Action> {
        let now = Instant::now();
        let names: Vec<String> = self.engines.keys().cloned().collect();
        if self.policy == Policy::HpaDefault {
            // Metrics are sampled at every sync of the run; HPA decides on its own period.
            for name in &names {
                self.sample_cpu(now, name);
            }
            if self.last_decided.is_some_and(|last| now.saturating_duration_since(last) < HPA_DEFAULT_SYNC) {
                return Vec::new();
            }
            self.last_decided = Some(now);
        }
        let mut actions = Vec::new();
        for name in names {
            actions.extend(self.decide(now, elapsed, &name).await);
        }
        actions
    }

    /// Decides `service` at once because its agent pushed that it needs replicas for `window_id` (rootscale only;
    /// the baselines keep to their sync period). `window` is the agents' window length.
    pub async fn pushed(
        &mut self,
        elapsed: Duration,
        service: &str,
        window_id: u64,
        window: Duration,
    ) -> Option<Action> {
        if self.policy != Policy::Rootscale || !self.engines.contains_key(service) {
            return None;
        }
        let window_ms = window.as_millis().max(1);
        let window_end_ms = u128::from(window_id).saturating_add(1).saturating_mul(window_ms);
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let mut action = self.decide(Instant::now(), elapsed, service).await?;
        action.pushed_after = Some(now_ms.saturating_sub(window_end_ms) as f64 / 1e3);
        Some(action)
    }

    /// Decides one service by the run's policy and applies the result; the change made, if any.
    async fn decide(&mut self, now: Instant, elapsed: Duration, name: &str) -> Option<Action> {
        let target = LocalTarget { cluster: self.cluster.clone(), service: name.to_string() };
        let outcome = match self.policy {
            Policy::Rootscale => self.rootscale(now, name, &target).await,
            Policy::HpaCpu => {
                let recommended = self.hpa_cpu(now, name);
                self.apply(now, name, &target, recommended).await
            }
            Policy::HpaLatency => {
                let recommended = self.hpa_latency(name);
                self.apply(now, name, &target, recommended).await
            }
            Policy::HpaDefault => {
                let recommended = self.hpa_default(name);
                self.apply(now, name, &target, recommended).await
            }
        };
        match outcome {
            Ok(outcome) if outcome.desired != outcome.current => Some(Action {
                at: elapsed.as_secs_f64(),
                service: name.to_string(),
                from: outcome.current,
                to: outcome.desired,
                reason: outcome.reason,
                pushed_after: None,
            }),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(service = %name, %error, "could not scale");
                None
            }
        }
    }

    /// How the agents are asked (and watched).
    pub fn agents(&self) -> &AgentClient {
        &self.agents
    }

    async fn rootscale(&mut self, now: Instant, name: &str, target: &LocalTarget) -> Result<Outcome, Error> {
        let replicas = self.cluster.replica_info(name);
        let pods: Vec<(String, std::net::SocketAddr)> =
            replicas.iter().map(|r| (format!("{name}-{}", r.id), r.agent_addr)).collect();
        let topology = &self.cluster.topology;
        let (engine, config) = self.engines.get_mut(name).ok_or_else(|| Error::Scenario(format!("no `{name}`")))?;
        let query = Query {
            namespace: "local".into(),
            deployment: name.to_string(),
            slo: (name == topology.entry).then_some((topology.slo, topology.slo_percentile)),
            target_utilization: 0.7,
            current_replicas: self.cluster.replicas(name),
        };
        let answers = ask_all(&pods, &query, &self.agents).await;
        let advice: Vec<_> = answers.iter().map(|answer| answer.advice()).collect();
        // Local replicas are ready once started: a new one's agent answers `insufficient-data` until it has a
        // window of traffic, which counts as a missing answer.
        let run = engine
            .run(now, config, target, Pods { ready: &advice, unready: 0 }, true)
            .await
            .map_err(|e| Error::Scenario(e.to_string()))?;
        match run.failed {
            Some(failed) => Err(Error::Scenario(failed)),
            None => Ok(run.outcome),
        }
    }

    async fn apply(
        &mut self,
        now: Instant,
        name: &str,
        target: &LocalTarget,
        recommended: Option<(u32, String)>,
    ) -> Result<Outcome, Error> {
        let (engine, config) = self.engines.get_mut(name).ok_or_else(|| Error::Scenario(format!("no `{name}`")))?;
        let current = target.current_replicas().await.map_err(|e| Error::Scenario(e.to_string()))?;
        // No metric (no traffic yet): HPA keeps the count.
        let (recommended, reason) = recommended.unwrap_or((current, "no metric".into()));
        let outcome = engine.decide_recommended(now, config, current, recommended, reason);
        if outcome.desired != current {
            target.set_replicas(outcome.desired).await.map_err(|e| Error::Scenario(e.to_string()))?;
            engine.record_scale(now, current, outcome.desired);
        }
        Ok(outcome)
    }

    /// HPA's formula on the mean utilisation of the replicas' virtual cores since the last sync.
    fn hpa_cpu(&mut self, now: Instant, name: &str) -> Option<(u32, String)> {
        let spec = self.cluster.topology.spec(name)?;
        let cores = f64::from(spec.cores);
        let mut utilizations = Vec::new();
        for replica in self.cluster.replica_info(name) {
            let busy = replica.usage.cpu_busy_ns.load(std::sync::atomic::Ordering::Relaxed);
            let key = (name.to_string(), replica.id);
            if let Some((then, busy_then)) = self.cpu_seen.insert(key, (now, busy)) {
                let seconds = now.saturating_duration_since(then).as_secs_f64();
                if seconds > 0.0 {
                    utilizations.push(busy.saturating_sub(busy_then) as f64 / 1e9 / seconds / cores);
                }
            }
        }
        if utilizations.is_empty() {
            return None;
        }
        let mean = utilizations.iter().sum::<f64>() / utilizations.len() as f64;
        let reason = format!("CPU {:.0}% against a {:.0}% target", mean * 100.0, self.cpu_target * 100.0);
        Some((hpa_formula(self.cluster.replicas(name), mean / self.cpu_target), reason))
    }

    /// Keeps each replica's busy time now, dropping samples older than the metric window (one older than it stays,
    /// so the average spans the whole window once there is one).
    fn sample_cpu(&mut self, now: Instant, name: &str) {
        for replica in self.cluster.replica_info(name) {
            let busy = replica.usage.cpu_busy_ns.load(std::sync::atomic::Ordering::Relaxed);
            let samples = self.cpu_samples.entry((name.to_string(), replica.id)).or_default();
            samples.push_back((now, busy));
            while samples.len() > 2
                && samples.get(1).is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HPA_DEFAULT_METRIC_WINDOW)
            {
                samples.pop_front();
            }
        }
        let live: Vec<u32> = self.cluster.replica_info(name).iter().map(|replica| replica.id).collect();
        self.cpu_samples.retain(|(service, id), _| service != name || live.contains(id));
    }

    /// HPA's formula on the replicas' virtual-CPU utilisation averaged over the metric window (as metrics-server
    /// reports it), against HPA-default's target. A replica with less than a second of samples has no metric yet.
    fn hpa_default(&self, name: &str) -> Option<(u32, String)> {
        let spec = self.cluster.topology.spec(name)?;
        let cores = f64::from(spec.cores);
        let utilizations: Vec<f64> = self
            .cpu_samples
            .iter()
            .filter(|((service, _), _)| service == name)
            .filter_map(|(_, samples)| {
                let ((first_at, first_busy), (last_at, last_busy)) = (samples.front()?, samples.back()?);
                let seconds = last_at.saturating_duration_since(*first_at).as_secs_f64();
                (seconds >= 1.0).then(|| last_busy.saturating_sub(*first_busy) as f64 / 1e9 / seconds / cores)
            })
            .collect();
        if utilizations.is_empty() {
            return None;
        }
        let mean = utilizations.iter().sum::<f64>() / utilizations.len() as f64;
        let reason =
            format!("CPU {:.0}% (30 s average) against a {:.0}% target", mean * 100.0, HPA_DEFAULT_CPU_TARGET * 100.0);
        Some((hpa_formula(self.cluster.replicas(name), mean / HPA_DEFAULT_CPU_TARGET), reason))
    }

    /// HPA's formula on the mean of the replicas' own latency (at the SLO percentile, last window) against the
    /// service's budget.
    fn hpa_latency(&self, name: &str) -> Option<(u32, String)> {
        let topology = &self.cluster.topology;
        let budget = topology.spec(name)?.budget;
        let latencies: Vec<f64> = self
            .cluster
            .replica_info(name)
            .iter()
            .filter_map(|replica| {
                let window = replica.view.snapshot().last_window?;
                let total = Histogram::from_proto(window.total.as_ref()?).ok()?;
                total.percentile_us(topology.slo_percentile).map(|us| us as f64 / 1e6)
            })
            .collect();
        if latencies.is_empty() {
            return None;
        }
        let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
        let reason =
            format!("p{} {:.0}ms against a {}ms budget", topology.slo_percentile, mean * 1e3, budget.as_millis());
        Some((hpa_formula(self.cluster.replicas(name), mean / budget.as_secs_f64().max(1e-6)), reason))
    }
}

/// `ceil(current × ratio)`, or no change within the tolerance.
pub fn hpa_formula(current: u32, ratio: f64) -> u32 {
    if !ratio.is_finite() || (ratio - 1.0).abs() <= TOLERANCE {
        return current;
    }
    (f64::from(current) * ratio).ceil().clamp(1.0, 10_000.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpa_formula_is_hpas() {
        assert_eq!(hpa_formula(4, 1.05), 4);
        assert_eq!(hpa_formula(4, 1.5), 6);
        assert_eq!(hpa_formula(1, 2.2), 3);
        assert_eq!(hpa_formula(4, 0.3), 2);
        assert_eq!(hpa_formula(4, f64::NAN), 4);
        assert_eq!("hpa-cpu".parse::<Policy>(), Ok(Policy::HpaCpu));
        assert_eq!("hpa-default".parse::<Policy>(), Ok(Policy::HpaDefault));
        assert!("hpa".parse::<Policy>().unwrap_err().contains("unknown policy"));
    }
}
