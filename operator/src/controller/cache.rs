//! What the watches keep, so a reconcile reads without asking the API: pods, the operator's own `ScalingDecision`s
//! (the previous status, with the engine's memory), and HorizontalPodAutoscalers (another autoscaler on the same
//! Deployment). `run.rs` starts the watches; tests fill the stores by hand.

use std::sync::Arc;

use k8s_openapi::api::{autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
    runtime::reflector::{ObjectRef, Store},
};

use crate::crd::ScalingDecision;

/// The watches' stores.
#[derive(Clone)]
pub struct Cache {
    /// One store per watched namespace (or one for all).
    pub pods: Vec<Store<Pod>>,
    pub decisions: Vec<Store<ScalingDecision>>,
    pub autoscalers: Vec<Store<HorizontalPodAutoscaler>>,
}

/// Whether a store has listed everything once (a reconcile on a half-filled cache would see pods missing).
fn listed<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures_util::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|ready| ready.is_ok())
}

impl Cache {
    pub fn ready(&self) -> bool {
        self.pods.iter().all(listed) && self.decisions.iter().all(listed) && self.autoscalers.iter().all(listed)
    }

    /// The Deployment's pods: in its namespace, matching its selector.
    pub fn pods_of(&self, namespace: &str, selector: &Selector) -> Vec<Arc<Pod>> {
        self.pods
            .iter()
            .flat_map(|store| {
                store.state_filter(|pod| {
                    pod.metadata.namespace.as_deref() == Some(namespace) && selector.matches(pod.labels())
                })
            })
            .collect()
    }

    pub fn decision(&self, namespace: &str, name: &str) -> Option<Arc<ScalingDecision>> {
        let key = ObjectRef::new(name).within(namespace);
        self.decisions.iter().find_map(|store| store.get(&key))
    }

    /// A HorizontalPodAutoscaler (an HPA of its own, or the one a KEDA ScaledObject made) that scales the same
    /// Deployment.
    pub fn other_autoscaler(&self, namespace: &str, name: &str) -> Option<String> {
        self.autoscalers.iter().find_map(|store| {
            store
                .find(|hpa| {
                    let target = hpa.spec.as_ref().map(|spec| &spec.scale_target_ref);
                    hpa.metadata.namespace.as_deref() == Some(namespace)
                        && target.is_some_and(|target| {
                            target.kind == "Deployment"
                                && target.name == name
                                && target.api_version.as_deref().is_none_or(|version| version.starts_with("apps/"))
                        })
                })
                .map(|hpa| hpa.name_any())
        })
    }
}
