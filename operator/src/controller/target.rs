//! A Deployment's `/scale` as the engine's [`ScaleTarget`]. The count is first read from the Deployment the
//! controller already holds (its watch cache: no request), and the write is conditional on that object's
//! resourceVersion — which `/scale` shares — so a change made since answers 409, the engine decides again, and the
//! next read is a GET of `/scale`.

use std::sync::Mutex;

use crate::{Error, engine::ScaleTarget, leadership::Leadership};
use k8s_openapi::api::{apps::v1::Deployment, autoscaling::v1::Scale};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// The replicas of a Deployment whose `spec.replicas` is absent: the API server defaults it to 1.
const DEFAULT_DEPLOYMENT_REPLICAS: i32 = 1;

/// One Deployment's `/scale`, for one reconcile.
pub struct DeploymentScale {
    api: Api<Deployment>,
    name: String,
    /// The count and resourceVersion a write is conditional on; `None` after a conflict: read afresh.
    read: Mutex<Option<(u32, Option<String>)>>,
    /// Only the leader writes: checked again right before the write.
    leader: Leadership,
}

fn replicas(count: Option<i32>, absent: i32) -> u32 {
    u32::try_from(count.unwrap_or(absent)).unwrap_or(0)
}

impl DeploymentScale {
    pub fn new(api: Api<Deployment>, deployment: &Deployment, leader: Leadership) -> Self {
        let count = replicas(deployment.spec.as_ref().and_then(|spec| spec.replicas), DEFAULT_DEPLOYMENT_REPLICAS);
        Self {
            api,
            name: deployment.name_any(),
            read: Mutex::new(Some((count, deployment.resource_version()))),
            leader,
        }
    }

    fn read(&self) -> std::sync::MutexGuard<'_, Option<(u32, Option<String>)>> {
        self.read.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The count the last read saw (what a decision was made against).
    pub fn last_read(&self) -> Option<u32> {
        self.read().as_ref().map(|(count, _)| *count)
    }
}

impl ScaleTarget for DeploymentScale {
    async fn current_replicas(&self) -> Result<u32, Error> {
        if let Some((count, _)) = self.read().as_ref() {
            return Ok(*count);
        }
        let scale: Scale = self.api.get_scale(&self.name).await?;
        // `/scale` omits a count of 0.
        let count = replicas(scale.spec.as_ref().and_then(|spec| spec.replicas), 0);
        *self.read() = Some((count, scale.metadata.resource_version));
        Ok(count)
    }

    async fn set_replicas(&self, replicas: u32) -> Result<(), Error> {
        if !self.leader.leading() {
            return Err(Error::Target("this instance no longer leads".into()));
        }
        let version = self.read().as_ref().and_then(|(_, version)| version.clone());
        let patch = json!({ "metadata": { "resourceVersion": version }, "spec": { "replicas": replicas } });
        match self.api.patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                *self.read() = None;
                Err(Error::Conflict)
            }
            Err(error) => Err(error.into()),
        }
    }
}
