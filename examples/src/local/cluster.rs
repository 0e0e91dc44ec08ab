//! The running topology: every service's replicas and its registry (what callers balance over), faults applied
//! to services, and [`LocalTarget`] — the operator's `ScaleTarget` for a local service, which starts replicas and
//! drains them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use rootscale_tracer::{AgentView, SampleRate, decide::AggregationMode, identity::KeyRing};
use tokio::sync::watch;

use crate::local::{
    Error,
    balance::Replicas,
    replica::{CpuModel, Replica, ReplicaConfig, ServiceControl, Usage},
    scenario::{Fault, FaultKind},
    topology::Topology,
};

/// How long a stopping replica may take to finish its requests.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// One service: its replicas and the registry its callers balance over.
struct Service {
    config: ReplicaConfig,
    registry: watch::Sender<Replicas>,
    replicas: Mutex<Vec<Replica>>,
    next_id: AtomicU32,
}

/// What the demo reads about one replica.
#[derive(Clone)]
pub struct ReplicaInfo {
    pub id: u32,
    pub addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub view: AgentView,
    pub usage: Arc<Usage>,
}

/// Every service of a topology, running.
pub struct Cluster {
    pub topology: Topology,
    services: BTreeMap<String, Service>,
    /// Replica stops in progress (drains run off the control loop).
    draining: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The mesh key its replicas prove membership with; the policy asks them as the operator with it.
    pub mesh_keys: Arc<KeyRing>,
    /// Scalings this machine could not carry out (a replica that could not start: out of open files, ports…),
    /// and the first one's error. A run with any measured the machine, not the policy.
    failed_scalings: Mutex<(u64, Option<String>)>,
}

/// How every replica of a cluster runs, beyond its service's spec.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The agents' window.
    pub window: Duration,
    pub mode: AggregationMode,
    pub seed: u64,
    pub cpu_model: CpuModel,
    /// The mesh key every replica proves its membership with.
    pub mesh_keys: Arc<KeyRing>,
    /// Which requests the replicas measure (`ROOTSCALE_SAMPLE`).
    pub sample: SampleRate,
}

impl Cluster {
    /// Starts each service's initial replicas.
    pub fn start(topology: Topology, config: &ClusterConfig) -> Result<Arc<Self>, Error> {
        let ClusterConfig { window, mode, seed, cpu_model, ref mesh_keys, sample } = *config;
        super::open_files::raise_limit();
        let registries: BTreeMap<String, (watch::Sender<Replicas>, watch::Receiver<Replicas>)> = topology
            .services
            .iter()
            .map(|spec| {
                let (sender, receiver) = watch::channel(Replicas::new());
                (spec.name.clone(), (sender, receiver))
            })
            .collect();
        let mut services = BTreeMap::new();
        for (index, spec) in topology.services.iter().enumerate() {
            let callees = topology
                .callees(&spec.name)
                .into_iter()
                .filter_map(|callee| {
                    let protocol = topology.spec(&callee)?.protocol;
                    Some((callee.clone(), (protocol, registries.get(&callee)?.1.clone())))
                })
                .collect();
            let config = ReplicaConfig {
                spec: spec.clone(),
                control: Arc::new(ServiceControl::default()),
                slo: (spec.name == topology.entry).then_some((topology.slo, topology.slo_percentile)),
                window,
                mode,
                callees,
                seed: seed.wrapping_mul(1_000_003).wrapping_add(index as u64 * 7919),
                cpu_model,
                mesh_keys: mesh_keys.clone(),
                sample,
            };
            let registry = registries.get(&spec.name).ok_or(Error::Start("registry missing".into()))?.0.clone();
            services.insert(
                spec.name.clone(),
                Service { config, registry, replicas: Mutex::new(Vec::new()), next_id: AtomicU32::new(0) },
            );
        }
        let mesh_keys = mesh_keys.clone();
        let cluster = Arc::new(Self {
            topology,
            services,
            draining: Mutex::new(Vec::new()),
            mesh_keys,
            failed_scalings: Mutex::new((0, None)),
        });
        for spec in &cluster.topology.services {
            cluster.scale(&spec.name, spec.replicas)?;
        }
        Ok(cluster)
    }

    fn service(&self, name: &str) -> Result<&Service, Error> {
        self.services.get(name).ok_or_else(|| Error::Scenario(format!("no service `{name}`")))
    }

    /// The entry's registry, for the load generator.
    pub fn entry_registry(&self) -> Result<watch::Receiver<Replicas>, Error> {
        Ok(self.service(&self.topology.entry)?.registry.subscribe())
    }

    /// Replicas `name` has now (what a Deployment's spec would say).
    pub fn replicas(&self, name: &str) -> u32 {
        self.services.get(name).map_or(0, |s| s.registry.borrow().len() as u32)
    }

    /// The live replicas of `name`.
    pub fn replica_info(&self, name: &str) -> Vec<ReplicaInfo> {
        let Some(service) = self.services.get(name) else { return Vec::new() };
        let replicas = service.replicas.lock().unwrap_or_else(|p| p.into_inner());
        replicas
            .iter()
            .map(|r| ReplicaInfo {
                id: r.id,
                addr: r.addr,
                agent_addr: r.agent_addr,
                view: r.view.clone(),
                usage: r.usage.clone(),
            })
            .collect()
    }

    /// Starts or drains replicas of `name` until it has `target`. Blocks while new replicas start; drains run
    /// in the background (a stopping replica is out of the registry at once).
    pub fn scale(&self, name: &str, target: u32) -> Result<(), Error> {
        let service = self.service(name)?;
        let mut replicas = service.replicas.lock().unwrap_or_else(|p| p.into_inner());
        while (replicas.len() as u32) < target {
            let id = service.next_id.fetch_add(1, Ordering::Relaxed);
            let mut config = service.config.clone();
            config.seed = config.seed.wrapping_add(u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let replica = Replica::start(id, config)?;
            service.registry.send_modify(|live| {
                live.insert(id, replica.addr);
            });
            replicas.push(replica);
        }
        while (replicas.len() as u32) > target.max(1) {
            let Some(replica) = replicas.pop() else { break };
            // Out of every caller's balancer first; then drain.
            service.registry.send_modify(|live| {
                live.remove(&replica.id);
            });
            let drain = std::thread::Builder::new()
                .name(format!("drain-{name}-{}", replica.id))
                .spawn(move || replica.stop(DRAIN_DEADLINE))
                .map_err(|e| Error::Start(e.to_string()))?;
            self.draining.lock().unwrap_or_else(|p| p.into_inner()).push(drain);
        }
        Ok(())
    }

    fn note_failed_scaling(&self, error: &str) {
        let mut failed = self.failed_scalings.lock().unwrap_or_else(|p| p.into_inner());
        failed.0 += 1;
        failed.1.get_or_insert_with(|| error.to_string());
    }

    /// How many scalings this machine could not carry out, and the first one's error.
    pub fn failed_scalings(&self) -> (u64, Option<String>) {
        self.failed_scalings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Crashes every replica of `name` at once: no drain, and they stay in the registry, so callers go on dialing
    /// addresses nobody listens on, as when pods die before their endpoints are updated.
    pub fn crash(&self, name: &str) -> Result<(), Error> {
        let service = self.service(name)?;
        let replicas = std::mem::take(&mut *service.replicas.lock().unwrap_or_else(|p| p.into_inner()));
        for replica in replicas {
            replica.stop(Duration::ZERO);
        }
        Ok(())
    }

    /// Applies a fault to every replica of its service, now and later.
    pub fn inject(&self, fault: &Fault) -> Result<(), Error> {
        let control = &self.service(&fault.service)?.config.control;
        match fault.kind {
            FaultKind::Capacity(factor) => control.divide_capacity(factor),
            FaultKind::Cpu(factor) => control.multiply_cpu(factor),
            FaultKind::Link(delay) => control.delay_link(delay),
        }
        Ok(())
    }

    /// Ends `fault`: its service is as it was before.
    pub fn heal(&self, fault: &Fault) -> Result<(), Error> {
        let control = &self.service(&fault.service)?.config.control;
        match fault.kind {
            FaultKind::Capacity(_) => control.divide_capacity(1.0),
            FaultKind::Cpu(_) => control.multiply_cpu(1.0),
            FaultKind::Link(_) => control.delay_link(Duration::ZERO),
        }
        Ok(())
    }

    /// Stops everything: drains in progress finish, the rest stop at once.
    pub fn stop(&self) {
        for service in self.services.values() {
            service.registry.send_replace(Replicas::new());
            let replicas = std::mem::take(&mut *service.replicas.lock().unwrap_or_else(|p| p.into_inner()));
            for replica in replicas {
                replica.stop(Duration::from_secs(2));
            }
        }
        for drain in std::mem::take(&mut *self.draining.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = drain.join();
        }
    }
}

/// The operator's [`ScaleTarget`](rootscale_operator::engine::ScaleTarget) for one local service.
pub struct LocalTarget {
    pub cluster: Arc<Cluster>,
    pub service: String,
}

impl rootscale_operator::engine::ScaleTarget for LocalTarget {
    async fn current_replicas(&self) -> Result<u32, rootscale_operator::Error> {
        Ok(self.cluster.replicas(&self.service))
    }

    async fn set_replicas(&self, replicas: u32) -> Result<(), rootscale_operator::Error> {
        let (cluster, service) = (self.cluster.clone(), self.service.clone());
        let scaled = tokio::task::spawn_blocking(move || cluster.scale(&service, replicas))
            .await
            .map_err(|e| e.to_string())
            .and_then(|scaled| scaled.map_err(|e| e.to_string()));
        scaled.map_err(|error| {
            self.cluster.note_failed_scaling(&format!("{} to {replicas}: {error}", self.service));
            rootscale_operator::Error::Target(error)
        })
    }
}
