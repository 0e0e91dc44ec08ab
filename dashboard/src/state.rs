//! The dashboard's memory: a bounded history of frames and events, and the fan-out of updates to open pages.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::model::{Event, Frame};

/// Frames kept: at one a second, ten minutes.
const FRAMES: usize = 600;
/// Services and edges kept across all frames: the history shortens as the graph grows (at a thousand services,
/// a minute), so its memory stays bounded whatever the number of services (about 20 MB at a few hundred bytes each).
const FRAME_ITEMS: usize = 60_000;
/// Events kept.
const EVENTS: usize = 1000;
/// Updates a slow page may fall behind by before it is told to reload the state.
const BACKLOG: usize = 256;

/// An update for open pages.
#[derive(Clone, Debug)]
pub enum Update {
    Frame(Arc<Frame>),
    Event(Arc<Event>),
}

/// What `GET api/state` answers.
#[derive(Clone, Debug, Serialize)]
pub struct StateView {
    pub title: String,
    /// `kubernetes` or `local`.
    pub source: String,
    pub frames: Vec<Arc<Frame>>,
    pub events: Vec<Arc<Event>>,
}

struct Inner {
    title: String,
    source: String,
    frames: Mutex<VecDeque<Arc<Frame>>>,
    events: Mutex<VecDeque<Arc<Event>>>,
    updates: broadcast::Sender<Update>,
}

/// A dashboard: cheap to clone, shared by whoever feeds it and the HTTP server.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

fn push<T>(queue: &Mutex<VecDeque<T>>, item: T, limit: usize) {
    let mut queue = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if queue.len() == limit {
        queue.pop_front();
    }
    queue.push_back(item);
}

impl Dashboard {
    /// `title` heads the page; `source` says where the data comes from (`kubernetes`, `local`).
    pub fn new(title: &str, source: &str) -> Self {
        let (updates, _) = broadcast::channel(BACKLOG);
        Self {
            inner: Arc::new(Inner {
                title: title.to_string(),
                source: source.to_string(),
                frames: Mutex::new(VecDeque::new()),
                events: Mutex::new(VecDeque::new()),
                updates,
            }),
        }
    }

    /// A new picture of the services.
    pub fn publish(&self, frame: Frame) {
        let frame = Arc::new(frame);
        {
            let mut frames = self.inner.frames.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let items = |frame: &Frame| frame.services.len() + frame.edges.len();
            let mut kept: usize = frames.iter().map(|frame| items(frame)).sum::<usize>() + items(&frame);
            // The newest frame always stays, whatever its size.
            while !frames.is_empty() && (frames.len() >= FRAMES || kept > FRAME_ITEMS) {
                if let Some(oldest) = frames.pop_front() {
                    kept -= items(&oldest);
                }
            }
            frames.push_back(frame.clone());
        }
        // No page open is not an error.
        let _ = self.inner.updates.send(Update::Frame(frame));
    }

    /// A timeline entry.
    pub fn record(&self, event: Event) {
        let event = Arc::new(event);
        push(&self.inner.events, event.clone(), EVENTS);
        let _ = self.inner.updates.send(Update::Event(event));
    }

    /// Everything kept.
    pub fn state(&self) -> StateView {
        let frames = self.inner.frames.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        StateView { title: self.inner.title.clone(), source: self.inner.source.clone(), frames, events }
    }

    /// The latest frame.
    pub fn latest(&self) -> Option<Arc<Frame>> {
        self.inner.frames.lock().unwrap_or_else(|p| p.into_inner()).back().cloned()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.inner.updates.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventKind;

    #[test]
    fn history_is_bounded_and_updates_reach_subscribers() {
        let dashboard = Dashboard::new("t", "local");
        let mut updates = dashboard.subscribe();
        for _ in 0..FRAMES + 5 {
            dashboard.publish(Frame::default());
        }
        dashboard.record(Event::new(EventKind::Scale, "db", "db 1 -> 2", "root cause"));
        let state = dashboard.state();
        assert_eq!((state.frames.len(), state.events.len()), (FRAMES, 1));
        // The subscriber fell behind by more than the backlog: it is told so.
        assert!(matches!(updates.try_recv(), Err(broadcast::error::TryRecvError::Lagged(_))));
    }

    #[test]
    fn a_large_graph_keeps_a_shorter_history() {
        let dashboard = Dashboard::new("t", "kubernetes");
        let big = Frame { services: vec![crate::model::ServiceView::default(); 1000], ..Frame::default() };
        for _ in 0..200 {
            dashboard.publish(big.clone());
        }
        let kept = dashboard.state().frames.len();
        assert_eq!(kept, FRAME_ITEMS / 1000, "{kept} frames of a thousand services");
        let huge = Frame { services: vec![crate::model::ServiceView::default(); FRAME_ITEMS + 1], ..Frame::default() };
        dashboard.publish(huge);
        assert_eq!(dashboard.state().frames.len(), 1, "the newest frame stays alone");
    }
}
