//! What a thread keeps for reuse: finished request contexts ([`crate::measure::context`]) and the boxes in which
//! state travels with a response, each kind in a bounded per-thread list ([`take_spare`], [`keep_spare`]).
//!
//! A call's state rides inside the response future and then the response body, and both are moved several times on
//! their way (out of the layer, into the caller's future, out of the future into the body, through the caller's
//! code). At a few hundred bytes, each move of that state was a `memcpy`; a box moves as a pointer. The thread that
//! finishes with a box keeps it, emptied, for its next call, so the steady state allocates nothing. (The server's
//! measurement is smaller and stays inline: boxed, it cost more instructions than its moves did.)

use std::{cell::RefCell, thread::LocalKey};

/// Spares a thread keeps of each kind (emptied boxes, finished request contexts); more are let go of.
pub(crate) const SPARES_PER_THREAD: usize = 64;

/// The spare boxes of one kind of state, kept per thread.
pub(crate) type Spares<T> = RefCell<Vec<Box<Option<T>>>>;

/// One of this thread's spares, if it has one.
pub(crate) fn take_spare<T: 'static>(spares: &'static LocalKey<RefCell<Vec<T>>>) -> Option<T> {
    spares.try_with(|spares| spares.try_borrow_mut().ok()?.pop()).ok().flatten()
}

/// Keeps `spare` among this thread's, up to [`SPARES_PER_THREAD`]; beyond that it is dropped.
pub(crate) fn keep_spare<T: 'static>(spares: &'static LocalKey<RefCell<Vec<T>>>, spare: T) {
    let _ = spares.try_with(|spares| {
        if let Ok(mut spares) = spares.try_borrow_mut()
            && spares.len() < SPARES_PER_THREAD
        {
            // All the room at once, the first time: the steady state never grows it.
            if spares.capacity() == 0 {
                spares.reserve_exact(SPARES_PER_THREAD);
            }
            spares.push(spare);
        }
    });
}

/// State that travels in a [`Reused`] box: names the thread-local that keeps its spare boxes.
pub(crate) trait Travelling: Sized + 'static {
    fn spares() -> &'static LocalKey<Spares<Self>>;
}

/// State in a box its thread reuses. [`Reused::end`] finishes the state where it lies, then empties the box.
pub(crate) struct Reused<T: Travelling>(Box<Option<T>>);

impl<T: Travelling> Reused<T> {
    /// Boxes `state`, in a spare box of this thread's when it has one.
    pub(crate) fn new(state: T) -> Self {
        match take_spare(T::spares()) {
            Some(mut boxed) => {
                *boxed = Some(state);
                Self(boxed)
            }
            None => Self(Box::new(Some(state))),
        }
    }

    /// The state, until it is taken.
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        Option::as_mut(&mut self.0)
    }

    /// Runs `f` on the state where it lies (no copy of it out of the box), then empties the box and keeps it for
    /// this thread's next one.
    pub(crate) fn end(mut self, f: impl FnOnce(&mut T)) {
        if let Some(state) = self.get_mut() {
            f(state);
        }
        *self.0 = None;
        keep_spare(T::spares(), self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct State(u32);

    thread_local! {
        static SPARE_STATES: Spares<State> = const { RefCell::new(Vec::new()) };
    }

    impl Travelling for State {
        fn spares() -> &'static LocalKey<Spares<Self>> {
            &SPARE_STATES
        }
    }

    /// The state's value, read as the box is ended.
    fn end(boxed: Reused<State>) -> Option<u32> {
        let mut seen = None;
        boxed.end(|state| seen = Some(state.0));
        seen
    }

    #[test]
    fn an_ended_box_is_kept_emptied_and_used_again_up_to_a_bound() {
        let mut first = Reused::new(State(1));
        let address = std::ptr::from_ref(&*first.0);
        first.get_mut().unwrap().0 += 1;
        assert_eq!(end(first), Some(2));
        assert!(SPARE_STATES.with(|spares| spares.borrow().iter().all(|boxed| boxed.is_none())));
        let second = Reused::new(State(3));
        assert_eq!(std::ptr::from_ref(&*second.0), address, "the spare box is used again");
        // More boxes than the bound come back: the rest are let go of.
        let many: Vec<_> = (0..SPARES_PER_THREAD as u32 + 10).map(|n| Reused::new(State(n))).collect();
        assert_eq!(many.into_iter().filter_map(end).count(), SPARES_PER_THREAD + 10);
        assert_eq!(end(second), Some(3));
        assert_eq!(SPARE_STATES.with(|spares| spares.borrow().len()), SPARES_PER_THREAD);
    }
}
