//! A stub of a pod's agent for the operator's tests and benchmarks: one `RecommendResponse` for every question,
//! the times it was asked, and no pushes (the tests drive reconciles themselves).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use rootscale_proto::v1::{
    NeedsReplicas, RecommendRequest, RecommendResponse, SnapshotRequest, SnapshotResponse, WatchRequest,
    advisor_server::{Advisor, AdvisorServer},
};

/// Answers every `Recommend` with `answer`.
#[derive(Clone)]
pub struct FixedAdvisor {
    pub answer: RecommendResponse,
    /// When it was asked, in order.
    pub asked: Arc<Mutex<Vec<Instant>>>,
}

impl FixedAdvisor {
    pub fn new(answer: RecommendResponse) -> Self {
        Self { answer, asked: Arc::default() }
    }

    /// Serves it on a free loopback port; where.
    pub async fn serve(self) -> SocketAddr {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = tonic::transport::Server::builder().add_service(AdvisorServer::new(self));
        tokio::spawn(server.serve_with_incoming(incoming));
        addr
    }
}

#[tonic::async_trait]
impl Advisor for FixedAdvisor {
    async fn recommend(
        &self,
        _: tonic::Request<RecommendRequest>,
    ) -> Result<tonic::Response<RecommendResponse>, tonic::Status> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
        Ok(tonic::Response::new(self.answer.clone()))
    }

    async fn snapshot(
        &self,
        _: tonic::Request<SnapshotRequest>,
    ) -> Result<tonic::Response<SnapshotResponse>, tonic::Status> {
        Ok(tonic::Response::new(SnapshotResponse::default()))
    }

    type WatchStream = futures_util::stream::Pending<Result<NeedsReplicas, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Ok(tonic::Response::new(futures_util::stream::pending()))
    }
}
