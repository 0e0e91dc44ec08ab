//! Whether this instance may write. Two replicas of the operator share a `Lease`; the lease library says when this
//! one holds it, but it keeps saying so while its renewals fail (a partition, an API server that stopped
//! answering), and meanwhile another instance may take the expired lease. So every write is fenced by a local
//! deadline as well: the last time this instance saw the Lease renewed in its own name, plus the lease's duration,
//! less a margin for clocks and the watch's delay. Checked right before each write (`/scale`, status, Events).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

/// The Lease both instances compete for.
pub const LEASE_NAME: &str = "rootscale-operator";
/// How long a lease lasts without renewal (the holder renews a third of it before the end).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// The share of the lease's duration kept as a margin before the local deadline.
const MARGIN_DIVISOR: u32 = 5;

/// Whether this instance leads, and until when it may act on it.
#[derive(Clone, Debug)]
pub enum Leadership {
    /// No election: always (`--no-leader-election`, tests).
    Always,
    /// Elected through the Lease.
    Elected {
        /// The lease library's view.
        holder: watch::Receiver<bool>,
        /// Until when this instance may act: the fence.
        until: Arc<Mutex<Option<Instant>>>,
    },
}

impl Leadership {
    /// Whether this instance may write now.
    pub fn leading(&self) -> bool {
        match self {
            Leadership::Always => true,
            Leadership::Elected { holder, until } => {
                let until = *until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                *holder.borrow() && until.is_some_and(|until| Instant::now() < until)
            }
        }
    }

    /// Elected through `holder` (the lease library's view), fenced by a watch on the Lease in `api` renewed in
    /// `identity`'s name, with leases of `duration`; the watch stops when `stop` turns true.
    pub fn elected(
        holder: watch::Receiver<bool>,
        api: Api<Lease>,
        identity: String,
        duration: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        let until = Arc::new(Mutex::new(None));
        let fence = until.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
        tokio::spawn(async move {
            let leases = watcher(api, config).default_backoff().applied_objects();
            let mut leases = std::pin::pin!(leases);
            loop {
                let next = tokio::select! {
                    next = leases.next() => next,
                    _ = stop.wait_for(|stop| *stop) => return,
                };
                match next {
                    Some(Ok(lease)) if lease.metadata.name.as_deref() == Some(LEASE_NAME) => {
                        let ours = lease.spec.as_ref().and_then(|spec| spec.holder_identity.as_deref())
                            == Some(identity.as_str());
                        let deadline = ours.then(|| Instant::now() + duration - duration / MARGIN_DIVISOR);
                        *fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = deadline;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => tracing::warn!(%error, "the Lease's watch failed; retrying"),
                    None => return,
                }
            }
        });
        Leadership::Elected { holder, until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_saying_so_is_not_enough_past_the_deadline() {
        let (_sender, holder) = watch::channel(true);
        let until = Arc::new(Mutex::new(None));
        let leadership = Leadership::Elected { holder, until: until.clone() };
        assert!(!leadership.leading(), "no renewal seen yet");
        *until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(10));
        assert!(leadership.leading());
        *until.lock().unwrap() = Some(Instant::now() - Duration::from_millis(1));
        assert!(!leadership.leading(), "past the deadline, whatever the library says");
        assert!(Leadership::Always.leading());
    }
}
