//! The localization matrix on local mode: a topology file's services run as local mode's replicas (real servers on
//! loopback, each with its own agent), under its open-loop load, with no policy scaling anything; one fault is
//! injected at a window boundary, and every agent's verdict is read after each window and checked: the faulty
//! service says root-cause (for a slow link, its caller says network), every service above it delegated toward
//! it, and nobody else says root-cause.
//!
//! The matrix's topologies are files like the demo's ([`MATRIX`]); their `demo:` faults are the matrix's scenarios.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use rootscale_proto::v1::{Verdict as WireVerdict, WaitKind};
use rootscale_tracer::{
    AgentView, SampleRate,
    decide::AggregationMode,
    identity::{KeyRing, MeshKeys},
};

use crate::local::{
    Error,
    cluster::{Cluster, ClusterConfig},
    load::Load,
    replica::CpuModel,
    scenario::{Fault, FaultKind, RateSchedule},
    topology::Topology,
};

/// The matrix's topologies: (name, file contents).
pub const MATRIX: [(&str, &str); 3] = [
    ("chain-4", include_str!("../topologies/matrix/chain-4.yaml")),
    ("diamond", include_str!("../topologies/matrix/diamond.yaml")),
    ("fan-out", include_str!("../topologies/matrix/fan-out.yaml")),
];

/// One of the matrix's topologies, by name.
pub fn matrix_topology(name: &str) -> Result<Topology, Error> {
    let (_, text) = MATRIX
        .iter()
        .find(|(shipped, _)| *shipped == name)
        .ok_or_else(|| Error::Topology(format!("no matrix topology `{name}`")))?;
    Topology::parse(text, name)
}

/// How a run is set up, beyond its topology.
#[derive(Clone)]
pub struct Settings {
    pub window: Duration,
    /// The entry's SLO, instead of the topology's.
    pub slo: Option<Duration>,
    /// Requests per second at the entry, instead of the topology's demo rate.
    pub rate: Option<f64>,
    pub mode: AggregationMode,
    /// The mesh key every replica proves its membership with.
    pub mesh_keys: Arc<KeyRing>,
    pub seed: u64,
    /// Which requests the replicas measure.
    pub sample: SampleRate,
}

impl Settings {
    /// One-second windows, the topology's SLO and rate, max mode, and a mesh key made for the run (identity on,
    /// as in production).
    pub fn new() -> Result<Self, Error> {
        let keys = MeshKeys::generate().map_err(|error| Error::Start(error.to_string()))?;
        Ok(Self {
            window: Duration::from_secs(1),
            slo: None,
            rate: None,
            mode: AggregationMode::Max,
            mesh_keys: Arc::new(KeyRing::fixed(keys)),
            seed: 1,
            sample: SampleRate::ALL,
        })
    }
}

/// One service's decision about a window, as its (first) replica's agent made it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub window_id: u64,
    pub verdict: WireVerdict,
    pub delegated_to: Vec<String>,
    /// For a network verdict: the link, as (from, to).
    pub link: Option<(String, String)>,
    pub reason: String,
    /// The waits the rule compared, largest first, as `point via callee: value`.
    pub compared: Vec<String>,
}

/// A topology running under load, with nothing scaling it.
pub struct Running {
    pub topology: Topology,
    window: Duration,
    cluster: Arc<Cluster>,
    load: Load,
    // Runs the load generator; dropped last.
    _harness: tokio::runtime::Runtime,
}

impl Running {
    /// Starts every service's replicas, then the load, in the middle of a window.
    pub fn start(mut topology: Topology, settings: &Settings) -> Result<Self, Error> {
        if let Some(slo) = settings.slo {
            topology.slo = slo;
        }
        let rate = settings.rate.unwrap_or(topology.demo.rate);
        let harness = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Start(e.to_string()))?;
        let cluster = Cluster::start(
            topology.clone(),
            &ClusterConfig {
                window: settings.window,
                mode: settings.mode,
                seed: settings.seed,
                cpu_model: CpuModel::Virtual,
                mesh_keys: settings.mesh_keys.clone(),
                sample: settings.sample,
            },
        )?;
        std::thread::sleep(crate::local::run::until_mid_window(settings.window));
        let load =
            Load::start(harness.handle(), cluster.entry_registry()?, RateSchedule::constant(rate), settings.seed);
        Ok(Self { topology, window: settings.window, cluster, load, _harness: harness })
    }

    pub fn inject(&self, fault: &Fault) -> Result<(), Error> {
        self.cluster.inject(fault)
    }

    /// Crashes every replica of `service` while the rest runs on.
    pub fn crash(&self, service: &str) -> Result<(), Error> {
        self.cluster.crash(service)
    }

    /// The current window id (windows are aligned to wall-clock multiples, the same for every agent).
    pub fn window_now(&self) -> u64 {
        unix_ms() / self.window_ms()
    }

    fn window_ms(&self) -> u64 {
        self.window.as_millis().max(1) as u64
    }

    /// Sleeps until window `id` has closed everywhere and delegations had time to travel.
    pub fn wait_for_window(&self, id: u64) {
        let window_ms = self.window_ms();
        let end_ms = (id + 1) * window_ms;
        let settle_ms = (window_ms * 2 / 5).clamp(150, 600);
        std::thread::sleep(Duration::from_millis(end_ms.saturating_sub(unix_ms()) + settle_ms));
    }

    /// What every service with a live replica decided for its latest window.
    pub fn verdicts(&self) -> BTreeMap<String, Seen> {
        self.topology
            .services
            .iter()
            .filter_map(|spec| {
                let replica = self.cluster.replica_info(&spec.name).into_iter().next()?;
                let snapshot = replica.view.snapshot();
                let decision = snapshot.decision.unwrap_or_default();
                let link = decision
                    .bottleneck
                    .as_ref()
                    .filter(|point| point.kind() == WaitKind::Net)
                    .map(|point| (point.from_service.clone(), point.service.clone()));
                let seen = Seen {
                    window_id: snapshot.last_window.map_or(0, |w| w.window_id),
                    verdict: decision.verdict(),
                    delegated_to: decision.delegated_to.clone(),
                    link,
                    compared: decision.evidence.as_ref().map_or_else(Vec::new, |evidence| {
                        evidence
                            .compared
                            .iter()
                            .map(|c| {
                                let point = c.point.as_ref().map_or_else(String::new, |p| match p.kind() {
                                    WaitKind::Net => format!("{}>{}", p.from_service, p.service),
                                    _ => format!("{} ({:?})", p.service, p.kind()),
                                });
                                format!("{point} via {:?}: {:.1}ms", c.via_callee, c.value_us as f64 / 1000.0)
                            })
                            .collect()
                    }),
                    reason: decision.evidence.map(|e| e.reason).unwrap_or_default(),
                };
                Some((spec.name.clone(), seen))
            })
            .collect()
    }

    /// Where the first replica of `service` has its agent.
    pub fn agent_addr(&self, service: &str) -> Option<String> {
        self.cluster.replica_info(service).first().map(|r| r.agent_addr.to_string())
    }

    /// Every live replica's agent view, by service.
    pub fn views(&self) -> BTreeMap<String, Vec<AgentView>> {
        self.topology
            .services
            .iter()
            .map(|spec| {
                (spec.name.clone(), self.cluster.replica_info(&spec.name).into_iter().map(|r| r.view).collect())
            })
            .collect()
    }

    /// The load generator's totals so far: (sent, ok, failed).
    pub fn load_totals(&self) -> (u64, u64, u64) {
        self.load.totals()
    }

    /// Stops the load, then every replica.
    pub fn stop(self) {
        self.load.stop();
        self.cluster.stop();
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The link a link fault slows: (its only caller, the service). Errors for a fault of another kind, and for a
/// service with no caller or several (a slow link into it would be several links).
pub fn faulty_link(topology: &Topology, fault: &Fault) -> Result<(String, String), Error> {
    if !matches!(fault.kind, FaultKind::Link(_)) {
        return Err(Error::Scenario(format!("fault `{fault}` is not a link fault")));
    }
    let callers: Vec<&str> = topology
        .services
        .iter()
        .filter(|spec| topology.callees(&spec.name).contains(&fault.service))
        .map(|spec| spec.name.as_str())
        .collect();
    match callers.as_slice() {
        [caller] => Ok((caller.to_string(), fault.service.clone())),
        _ => Err(Error::Scenario(format!(
            "fault `{fault}`: `{}` has {} callers; the matrix slows a link with one",
            fault.service,
            callers.len()
        ))),
    }
}

/// How much of the tree above a culprit must have delegated toward it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every service above it.
    EveryAncestor,
    /// From every entry above it, a chain of delegations; an ancestor off that chain may not have decided yet
    /// (healthy, idle, too little data), but none acts elsewhere. Sampled runs: a branch whose calls end seconds
    /// after they start (the diamond's second branch behind a cut shared service) can have no measured call end
    /// in the first windows, so its caller has nothing through it to compare — the entry still reaches the culprit
    /// through the other branch, and scaling the culprit is the whole decision.
    EveryEntry,
}

impl Reach {
    /// The reach a run with `settings` is held to.
    pub fn for_settings(settings: &Settings) -> Self {
        if settings.sample.is_sampling() { Reach::EveryEntry } else { Reach::EveryAncestor }
    }
}

/// Whether a window's verdicts localise `fault`: the right service says root-cause (or, for a link, the caller
/// says network on that link), the services above it delegated toward it (as `reach` asks), and nobody else says
/// root-cause.
pub fn localized(
    topology: &Topology,
    verdicts: &BTreeMap<String, Seen>,
    fault: &Fault,
    reach: Reach,
) -> Result<(), String> {
    // Every problem of the window, not the first only: a miss reads as the whole picture.
    let mut problems = Vec::new();
    let culprit = match fault.kind {
        FaultKind::Link(_) => {
            let (from, to) = faulty_link(topology, fault).map_err(|e| e.to_string())?;
            let seen = verdicts.get(&from).ok_or("caller missing")?;
            if seen.verdict != WireVerdict::Network || seen.link.as_ref() != Some(&(from.clone(), to.clone())) {
                problems.push(format!("{from} says {:?} ({}), not network on {from}>{to}", seen.verdict, seen.reason));
            }
            from
        }
        FaultKind::Capacity(_) | FaultKind::Cpu(_) => {
            let seen = verdicts.get(&fault.service).ok_or("service missing")?;
            if seen.verdict != WireVerdict::RootCause {
                problems.push(format!("{} says {:?} ({})", fault.service, seen.verdict, seen.reason));
            }
            fault.service.clone()
        }
    };
    let ancestors = topology.ancestors(&culprit);
    // Every verdict must be about the same window.
    let windows: BTreeSet<u64> = verdicts.values().map(|seen| seen.window_id).collect();
    if windows.len() != 1 {
        problems.push(format!("verdicts from different windows: {windows:?}"));
    }
    for ancestor in &ancestors {
        let seen = verdicts.get(ancestor).ok_or("ancestor missing")?;
        let toward: BTreeSet<String> =
            topology.callees(ancestor).into_iter().filter(|c| *c == culprit || ancestors.contains(c)).collect();
        // Delegated toward the culprit, and only toward it.
        let only_toward = !seen.delegated_to.is_empty() && seen.delegated_to.iter().all(|d| toward.contains(d));
        let undecided =
            matches!(seen.verdict, WireVerdict::Healthy | WireVerdict::Idle | WireVerdict::InsufficientData);
        if reach == Reach::EveryEntry && undecided {
            continue; // held to the chains from the entries, below
        }
        if seen.verdict != WireVerdict::Delegated || !only_toward {
            // What its callers compared: why they did, or did not, delegate to it.
            let callers: Vec<String> = verdicts
                .iter()
                .filter(|(caller, _)| topology.callees(caller).contains(ancestor))
                .map(|(caller, seen)| format!("{caller} compared [{}]", seen.compared.join(", ")))
                .collect();
            problems.push(format!(
                "{ancestor} says {:?} to {:?} ({}), not delegated toward {culprit}; {}",
                seen.verdict,
                seen.delegated_to,
                seen.reason,
                callers.join("; ")
            ));
        }
    }
    if reach == Reach::EveryEntry {
        for entry in ancestors.iter().filter(|service| topology.ancestors(service).is_empty()) {
            if !delegations_reach(verdicts, entry, &culprit) {
                problems.push(format!("no chain of delegations from {entry} reaches {culprit}"));
            }
        }
    }
    for (service, seen) in verdicts {
        if seen.verdict == WireVerdict::RootCause && matches!(fault.kind, FaultKind::Link(_)) {
            problems.push(format!("{service} says root-cause for a slow link ({})", seen.reason));
        } else if seen.verdict == WireVerdict::RootCause && *service != culprit {
            problems.push(format!("{service} also says root-cause ({})", seen.reason));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Whether following `from`'s delegations, and theirs, arrives at `culprit`.
fn delegations_reach(verdicts: &BTreeMap<String, Seen>, from: &str, culprit: &str) -> bool {
    let mut seen_services = BTreeSet::new();
    let mut next = vec![from.to_owned()];
    while let Some(service) = next.pop() {
        if service == culprit {
            return true;
        }
        let Some(seen) = verdicts.get(&service) else { continue };
        if seen.verdict == WireVerdict::Delegated && seen_services.insert(service) {
            next.extend(seen.delegated_to.iter().cloned());
        }
    }
    false
}

/// The outcome of one scenario.
#[derive(Debug)]
pub struct ScenarioResult {
    /// Windows after the one the fault began in until the verdicts localised it (1 = the first full window).
    pub detected_in: Option<u32>,
    /// Services that said root-cause in the window checked last (or the detecting one).
    pub root_causes: Vec<String>,
    /// Why each window checked before the detecting one (every window, on a miss) did not localise the fault.
    pub misses: Vec<String>,
    /// Report bytes sent per report, across all agents.
    pub bytes_per_report: f64,
    /// Every service's view in the last window checked.
    pub last_verdicts: BTreeMap<String, Seen>,
}

/// Runs one scenario: start `topology`, let a warm-up window close, inject `fault` (its time is not used: the
/// matrix injects after the warm-up), and check up to `max_windows` windows after the one it began in.
pub fn run_scenario(
    topology: &Topology,
    settings: &Settings,
    fault: &Fault,
    max_windows: u32,
) -> Result<ScenarioResult, Error> {
    if matches!(fault.kind, FaultKind::Link(_)) {
        faulty_link(topology, fault)?;
    }
    let running = Running::start(topology.clone(), settings)?;
    running.wait_for_window(running.window_now());
    let outcome =
        running.inject(fault).map(|()| check_windows(&running, fault, max_windows, Reach::for_settings(settings)));
    let bytes_per_report = {
        let (reports, bytes) = running
            .views()
            .values()
            .flatten()
            .map(|view| view.reports_sent())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if reports == 0 { 0.0 } else { bytes as f64 / reports as f64 }
    };
    running.stop();
    let mut result = outcome?;
    result.bytes_per_report = bytes_per_report;
    Ok(result)
}

fn check_windows(running: &Running, fault: &Fault, max_windows: u32, reach: Reach) -> ScenarioResult {
    let injected = running.window_now();
    let mut result = ScenarioResult {
        detected_in: None,
        root_causes: Vec::new(),
        misses: Vec::new(),
        bytes_per_report: 0.0,
        last_verdicts: BTreeMap::new(),
    };
    for k in 1..=max_windows {
        running.wait_for_window(injected + u64::from(k));
        let verdicts = running.verdicts();
        result.root_causes = verdicts
            .iter()
            .filter(|(_, seen)| seen.verdict == WireVerdict::RootCause)
            .map(|(name, _)| name.clone())
            .collect();
        let outcome = localized(&running.topology, &verdicts, fault, reach);
        result.last_verdicts = verdicts;
        match outcome {
            Ok(()) => {
                result.detected_in = Some(k);
                break;
            }
            Err(why) => result.misses.push(format!("window {k}: {why}")),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(verdict: WireVerdict, delegated_to: &[&str]) -> Seen {
        Seen {
            window_id: 7,
            verdict,
            delegated_to: delegated_to.iter().map(|s| s.to_string()).collect(),
            link: None,
            reason: String::new(),
            compared: Vec::new(),
        }
    }

    /// The diamond (A calls B then C, both call D) with D's pool cut, and the four services' verdicts.
    fn diamond_with(verdicts: [(&str, Seen); 4]) -> (Topology, Fault, BTreeMap<String, Seen>) {
        let topology = matrix_topology("diamond").expect("the diamond");
        let fault = topology
            .demo
            .faults
            .iter()
            .find(|fault| fault.service == "svc-d" && fault.kind_name() == "capacity")
            .cloned()
            .expect("a capacity fault on svc-d");
        (topology, fault, verdicts.into_iter().map(|(name, seen)| (name.to_string(), seen)).collect())
    }

    #[test]
    fn a_branch_not_yet_heard_from_is_excused_only_when_every_entry_still_reaches_the_culprit() {
        use WireVerdict::{Delegated, Idle, RootCause, Saturated};
        // C has had no measured call end yet: A followed B only.
        let (topology, fault, verdicts) = diamond_with([
            ("svc-a", seen(Delegated, &["svc-b"])),
            ("svc-b", seen(Delegated, &["svc-d"])),
            ("svc-c", seen(Idle, &[])),
            ("svc-d", seen(RootCause, &[])),
        ]);
        assert!(localized(&topology, &verdicts, &fault, Reach::EveryEntry).is_ok());
        let strict = localized(&topology, &verdicts, &fault, Reach::EveryAncestor).unwrap_err();
        assert!(strict.contains("svc-c says Idle"), "{strict}");

        // The entry undecided: nothing reaches D.
        let (topology, fault, verdicts) = diamond_with([
            ("svc-a", seen(Idle, &[])),
            ("svc-b", seen(Delegated, &["svc-d"])),
            ("svc-c", seen(Delegated, &["svc-d"])),
            ("svc-d", seen(RootCause, &[])),
        ]);
        let why = localized(&topology, &verdicts, &fault, Reach::EveryEntry).unwrap_err();
        assert!(why.contains("no chain of delegations from svc-a reaches svc-d"), "{why}");

        // A chain that stops short (B acts on its own) is wrong, excused or not.
        let (topology, fault, verdicts) = diamond_with([
            ("svc-a", seen(Delegated, &["svc-b"])),
            ("svc-b", seen(Saturated, &[])),
            ("svc-c", seen(Idle, &[])),
            ("svc-d", seen(RootCause, &[])),
        ]);
        let why = localized(&topology, &verdicts, &fault, Reach::EveryEntry).unwrap_err();
        assert!(why.contains("svc-b says Saturated") && why.contains("no chain"), "{why}");
    }
}
