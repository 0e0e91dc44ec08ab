//! Client-side load balancing over a service's replicas: a registry of the live replicas, a discovery stream
//! that turns its changes into `tower::discover::Change`s, and a power-of-two-choices balancer
//! (`tower::balance::p2c`, least pending requests) behind a buffer, so many requests share one balancer.
//!
//! A replica leaves the registry before it is drained: every balancer drops it before its next dispatch, so no
//! new request reaches a replica that is about to stop.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{Request, Response, Uri, uri::Scheme};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tower::{
    BoxError, Service, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{CompleteOnResponse, PendingRequestsDiscover},
    util::BoxCloneSyncService,
};

/// The live replicas of a service: id → address. Published by the cluster, read by every caller's balancer.
pub type Replicas = BTreeMap<u32, SocketAddr>;

/// Requests a balancer queues while it has no replica ready.
const QUEUE: usize = 4096;

/// A balanced client: cheap to clone, shares one balancer.
pub type Balanced<Req, Resp> = BoxCloneSyncService<Req, Resp, CallError>;

/// Why a balanced call failed. A concrete type rather than `BoxError`, which trips the compiler's `Send` checks
/// of the async handlers that await these calls.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallError(String);

fn call_error(error: BoxError) -> CallError {
    CallError(error.to_string())
}

/// Turns a registry's successive values into inserts and removals of replicas.
pub struct Discovery<S, F> {
    updates: WatchStream<Replicas>,
    known: Replicas,
    pending: VecDeque<Change<u32, S>>,
    connect: F,
}

impl<S, F> Discovery<S, F>
where
    F: Fn(SocketAddr) -> Result<S, BoxError>,
{
    pub fn new(registry: watch::Receiver<Replicas>, connect: F) -> Self {
        Self { updates: WatchStream::new(registry), known: Replicas::new(), pending: VecDeque::new(), connect }
    }

    fn diff(&mut self, replicas: Replicas) {
        for (id, addr) in &self.known {
            if replicas.get(id) != Some(addr) {
                self.pending.push_back(Change::Remove(*id));
            }
        }
        for (id, addr) in &replicas {
            if self.known.get(id) != Some(addr) {
                match (self.connect)(*addr) {
                    Ok(service) => self.pending.push_back(Change::Insert(*id, service)),
                    Err(error) => tracing::warn!(%addr, %error, "cannot make a client for a replica; skipped"),
                }
            }
        }
        self.known = replicas;
    }
}

impl<S, F> Stream for Discovery<S, F>
where
    S: Unpin,
    F: Fn(SocketAddr) -> Result<S, BoxError> + Unpin,
{
    type Item = Result<Change<u32, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match this.updates.poll_next_unpin(cx) {
                Poll::Ready(Some(replicas)) => this.diff(replicas),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A p2c balancer over the replicas in `registry`, each reached through the client `connect` makes. Must be
/// called inside a Tokio runtime (the buffer's worker runs there).
pub fn balanced<S, Req, F>(registry: watch::Receiver<Replicas>, connect: F) -> Balanced<Req, S::Response>
where
    S: Service<Req> + Send + Unpin + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Req: Send + 'static,
    F: Fn(SocketAddr) -> Result<S, BoxError> + Send + Unpin + 'static,
{
    let discover = PendingRequestsDiscover::new(Discovery::new(registry, connect), CompleteOnResponse::default());
    let balance = Balance::new(discover);
    BoxCloneSyncService::new(Buffer::new(balance, QUEUE).map_err(call_error))
}

/// One HTTP replica: a hyper client whose requests (with bodies of type `B`) are sent to that replica's address.
#[derive(Clone)]
pub struct HttpReplica<B = Empty<Bytes>> {
    client: Client<HttpConnector, B>,
    addr: SocketAddr,
}

impl<B> HttpReplica<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn connect(addr: SocketAddr) -> Result<Self, BoxError> {
        Ok(Self { client: Client::builder(TokioExecutor::new()).build_http(), addr })
    }
}

impl<B> Service<Request<B>> for HttpReplica<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let client = self.client.clone();
        let addr = self.addr;
        Box::pin(async move {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
            *request.uri_mut() =
                Uri::builder().scheme(Scheme::HTTP).authority(addr.to_string()).path_and_query(path).build()?;
            Ok(client.request(request).await?)
        })
    }
}

/// One gRPC replica: a lazily connected channel to its address.
pub fn grpc_replica(addr: SocketAddr) -> Result<tonic::transport::Channel, BoxError> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

/// A balanced HTTP client over a service's replicas.
pub fn http_client(registry: watch::Receiver<Replicas>) -> Balanced<Request<Empty<Bytes>>, Response<Incoming>> {
    balanced(registry, HttpReplica::connect)
}

/// A balanced gRPC client over a service's replicas.
pub fn grpc_client(
    registry: watch::Receiver<Replicas>,
) -> Balanced<Request<tonic::body::Body>, Response<tonic::body::Body>> {
    balanced(registry, |addr| grpc_replica(addr).map(|channel| channel.map_err(BoxError::from)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn discovery_inserts_and_removes_as_the_registry_changes() {
        let (sender, receiver) = watch::channel(Replicas::new());
        let mut discovery = Discovery::new(receiver, |addr: SocketAddr| Ok::<_, BoxError>(addr.port()));
        let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        sender.send_replace(Replicas::from([(1, a), (2, b)]));
        let mut seen = Vec::new();
        for _ in 0..2 {
            match discovery.next().await.unwrap().unwrap() {
                Change::Insert(id, port) => seen.push((id, port)),
                Change::Remove(id) => panic!("removed {id}"),
            }
        }
        assert_eq!(seen, vec![(1, 1001), (2, 1002)]);
        sender.send_replace(Replicas::from([(2, b)]));
        assert!(matches!(discovery.next().await.unwrap().unwrap(), Change::Remove(1)));
    }
}
