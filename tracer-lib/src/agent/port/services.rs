//! The agent's two gRPC services: `Neighbor.Exchange` (a neighbour's report) and `Advisor` (the operator's
//! questions). Each checks who is calling ([`super::access`]) before it reads anything, then hands the work to the
//! agent's state. Neither ever answers INTERNAL, OUT_OF_RANGE or RESOURCE_EXHAUSTED: those codes come only from
//! tonic's decoding, which the port turns into INVALID_ARGUMENT ([`super::refused`]).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::Stream;
use rootscale_proto::v1::{self as proto, advisor_server::Advisor, neighbor_server::Neighbor};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    agent::{port::access::Access, state::AgentState},
    decide::{Slo, inputs::SettingsUpdate},
    exchange::report::validate,
    measure::headers::MAX_DURATION_US,
};

/// Replica counts above this are absurd.
const MAX_REPLICAS: u32 = 100_000;
/// `Advisor.Watch` streams open at once: the operator's leader, a dashboard, a tool. More are refused.
const MAX_WATCHERS: usize = 8;

pub(crate) struct NeighborService {
    pub state: Arc<AgentState>,
    pub access: Access,
}

#[tonic::async_trait]
impl Neighbor for NeighborService {
    async fn exchange(&self, request: Request<proto::NeighborReport>) -> Result<Response<proto::NeighborAck>, Status> {
        if let Err(status) = self.access.check_report(&request) {
            self.state.metrics.received("unauthenticated");
            tracing::debug!(from = %request.get_ref().from_service, "refused an unauthenticated report");
            return Err(status);
        }
        let report = request.into_inner();
        let valid = match validate(&report, self.state.window_ms) {
            Ok(valid) => valid,
            Err(error) => {
                self.state.metrics.received("invalid");
                tracing::debug!(%error, from = %report.from_service, "refused a report");
                return Err(Status::invalid_argument(error.to_string()));
            }
        };
        let window_id = valid.window_id;
        let (accepted, onward) = self.state.on_report(valid);
        if !onward.is_empty() {
            let state = self.state.clone();
            tokio::spawn(async move { state.send(onward).await });
        }
        Ok(Response::new(proto::NeighborAck { service: self.state.service.clone(), window_id, accepted }))
    }
}

pub(crate) struct AdvisorService {
    pub state: Arc<AgentState>,
    pub access: Access,
    /// `Watch` streams open now.
    pub watchers: Arc<AtomicUsize>,
    /// Turns true when the agent stops: every `Watch` stream ends then.
    pub stopped: watch::Receiver<bool>,
}

/// One open `Watch` stream, counted until it is dropped.
struct Watcher(Arc<AtomicUsize>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type NeedsReplicasStream = Pin<Box<dyn Stream<Item = Result<proto::NeedsReplicas, Status>> + Send>>;

/// The settings a question asks for; an empty (zero) field asks for nothing.
fn settings_update(request: &proto::RecommendRequest) -> Result<SettingsUpdate, Status> {
    let percentile = if request.slo_percentile == 0.0 { 95.0 } else { request.slo_percentile };
    if !(percentile.is_finite() && percentile > 0.0 && percentile <= 100.0) {
        return Err(Status::invalid_argument(format!("slo_percentile {} is not in (0, 100]", request.slo_percentile)));
    }
    let target = request.target_utilization;
    if !(target.is_finite() && (0.0..=1.0).contains(&target)) {
        return Err(Status::invalid_argument(format!("target_utilization {target} is not in (0, 1]")));
    }
    if request.slo_latency_us > MAX_DURATION_US {
        return Err(Status::invalid_argument(format!("slo_latency_us {} is absurd", request.slo_latency_us)));
    }
    if request.current_replicas > MAX_REPLICAS {
        return Err(Status::invalid_argument(format!("current_replicas {} is absurd", request.current_replicas)));
    }
    Ok(SettingsUpdate {
        slo: (request.slo_latency_us > 0).then_some(Slo { latency_us: request.slo_latency_us, percentile }),
        current_replicas: (request.current_replicas > 0).then_some(request.current_replicas),
        target_utilization: (target > 0.0).then_some(target),
    })
}

impl AdvisorService {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.state.metrics.refused_call(reason);
        status
    }
}

#[tonic::async_trait]
impl Advisor for AdvisorService {
    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::RecommendResponse>, Status> {
        let asker =
            self.access.asker(&request, "Recommend").map_err(|status| self.refuse("unauthenticated", status))?;
        let update = settings_update(request.get_ref()).map_err(|status| self.refuse("invalid", status))?;
        Ok(Response::new(self.state.advise(&update, asker)))
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::SnapshotResponse>, Status> {
        self.access.asker(&request, "Snapshot").map_err(|status| self.refuse("unauthenticated", status))?;
        Ok(Response::new(self.state.snapshot()))
    }

    type WatchStream = NeedsReplicasStream;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<NeedsReplicasStream>, Status> {
        self.access.asker(&request, "Watch").map_err(|status| self.refuse("unauthenticated", status))?;
        let open = self.watchers.fetch_add(1, Ordering::AcqRel);
        let watcher = Watcher(self.watchers.clone());
        if open >= MAX_WATCHERS {
            return Err(self.refuse("too_many_watchers", Status::unavailable("too many watchers; try again later")));
        }
        let watch = request.get_ref();
        tracing::debug!(namespace = %watch.namespace, deployment = %watch.deployment, "a watcher joined");
        let news = self.state.watch_needs_replicas();
        let service = self.state.service.clone();
        let stopped = self.stopped.clone();
        let stream = futures_util::stream::unfold((news, stopped, watcher), move |(mut news, mut stopped, watcher)| {
            let service = service.clone();
            async move {
                loop {
                    tokio::select! {
                        changed = news.changed() => changed.ok()?,
                        () = crate::agent::stop_requested(&mut stopped) => return None,
                    }
                    let Some(latest) = *news.borrow_and_update() else { continue };
                    let message = proto::NeedsReplicas {
                        service: service.clone(),
                        window_id: latest.window_id,
                        verdict: latest.verdict.to_proto() as i32,
                        desired_replicas: latest.desired_replicas,
                    };
                    return Some((Ok(message), (news, stopped, watcher)));
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_question_asks_for_nothing_and_absurd_ones_are_refused() {
        assert_eq!(settings_update(&proto::RecommendRequest::default()).unwrap(), SettingsUpdate::default());
        let asked = settings_update(&proto::RecommendRequest {
            slo_latency_us: 200_000,
            current_replicas: 3,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(asked.slo, Some(Slo { latency_us: 200_000, percentile: 95.0 }));
        assert_eq!((asked.current_replicas, asked.target_utilization), (Some(3), None));
        for bad in [
            proto::RecommendRequest { slo_percentile: 101.0, ..Default::default() },
            proto::RecommendRequest { target_utilization: f64::NAN, ..Default::default() },
            proto::RecommendRequest { target_utilization: 1.5, ..Default::default() },
            proto::RecommendRequest { current_replicas: MAX_REPLICAS + 1, ..Default::default() },
            proto::RecommendRequest { slo_latency_us: MAX_DURATION_US + 1, ..Default::default() },
        ] {
            let status = settings_update(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
