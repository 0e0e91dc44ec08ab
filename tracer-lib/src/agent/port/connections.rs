//! The agent port's connections, bounded: at most [`MAX_CONNECTIONS`] at once (more are closed on accept), a new
//! connection must send its first request within [`FIRST_REQUEST_WITHIN`] (a client that sends only the HTTP/2
//! preface, or nothing, is closed), and a connection that sends nothing for the idle time is closed. Every close is
//! counted by reason.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

/// Told the reason of every connection closed by the port.
pub type CloseCounter = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a new connection may take to send its first request.
pub const FIRST_REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// The shortest idle time after which a connection is closed; the agent uses three windows when that is longer, so
/// a neighbour's connection survives between two reports.
pub const MIN_IDLE: Duration = Duration::from_secs(60);

/// What each request learns about its connection: a flag the port sets when a request arrives on it.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    served: Arc<AtomicBool>,
}

impl ConnectionInfo {
    /// A request arrived on this connection.
    pub fn mark_served(&self) {
        self.served.store(true, Ordering::Relaxed);
    }
}

/// A TCP connection with the port's deadlines.
pub struct GuardedStream {
    io: TcpStream,
    info: ConnectionInfo,
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
    last_read: Instant,
    metrics: CloseCounter,
    _permit: OwnedSemaphorePermit,
}

impl Connected for GuardedStream {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl GuardedStream {
    /// The deadline fired: re-arm it if the connection was active since, else say why it closes.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            if !self.info.served.load(Ordering::Relaxed) {
                return Some("no_request");
            }
            let next = self.last_read + self.idle;
            if next <= Instant::now() {
                return Some("idle");
            }
            self.deadline.as_mut().reset(next);
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.expired(cx) {
                None => Poll::Pending,
                Some(reason) => {
                    (self.metrics)(reason);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("agent port: closed ({reason})"))))
                }
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener` within the limits, with TCP_NODELAY on (or a reply's frames could wait out
/// a delayed ACK).
/// `count` is told why each connection it closes was closed.
pub fn incoming(
    listener: TcpListener,
    idle: Duration,
    count: CloseCounter,
) -> impl Stream<Item = io::Result<GuardedStream>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    futures_util::stream::unfold((listener, slots, count), move |(listener, slots, count)| async move {
        loop {
            let (io, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::debug!(%error, "agent port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                count("too_many");
                drop(io);
                continue;
            };
            let _ = io.set_nodelay(true);
            let stream = guarded(io, idle, count.clone(), permit);
            return Some((Ok(stream), (listener, slots, count)));
        }
    })
}

fn guarded(io: TcpStream, idle: Duration, metrics: CloseCounter, permit: OwnedSemaphorePermit) -> GuardedStream {
    let now = Instant::now();
    GuardedStream {
        io,
        info: ConnectionInfo { served: Arc::new(AtomicBool::new(false)) },
        deadline: Box::pin(tokio::time::sleep_until(now + FIRST_REQUEST_WITHIN)),
        idle,
        last_read: now,
        metrics,
        _permit: permit,
    }
}
