//! Marks any future — a database query, a cache lookup, a call over a protocol rootscale does not speak — as a
//! downstream call of the current request, so the time spent in it counts as downstream (waiting on that
//! dependency) rather than as the service's own local wait.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use crate::{
    measure::{client::Call, clock},
    tracer::Tracer,
};

/// A named non-HTTP dependency. Made by [`Tracer::dependency`].
#[derive(Clone, Debug)]
pub struct Dependency {
    tracer: Tracer,
    name: Arc<str>,
}

impl Dependency {
    pub(crate) fn new(tracer: Tracer, name: Arc<str>) -> Self {
        Self { tracer, name }
    }

    /// Times `future` as a call to this dependency.
    pub fn wrap<F: Future>(&self, future: F) -> DependencyCall<F> {
        DependencyCall { inner: future, call: None, started: false, dependency: self.clone(), is_error: |_| false }
    }

    /// Times `future` as a call to this dependency, counting an `Err` output as an error.
    pub fn wrap_result<F, T, E>(&self, future: F) -> DependencyCall<F>
    where
        F: Future<Output = Result<T, E>>,
    {
        DependencyCall { inner: future, call: None, started: false, dependency: self.clone(), is_error: Result::is_err }
    }
}

pin_project_lite::pin_project! {
    /// A future timed as a call to a [`Dependency`]. The call starts at the first poll.
    pub struct DependencyCall<F: Future> {
        #[pin]
        inner: F,
        call: Option<Call>,
        // The first poll started the call (or left it out of the sample): never start it twice.
        started: bool,
        dependency: Dependency,
        is_error: fn(&F::Output) -> bool,
    }

    impl<F: Future> PinnedDrop for DependencyCall<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(clock::now(), true);
            }
        }
    }
}

impl<F: Future> Future for DependencyCall<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !*this.started {
            *this.started = true;
            *this.call = Call::start_named(&this.dependency.tracer, &this.dependency.name);
        }
        let output = ready!(this.inner.poll(cx));
        if let Some(call) = this.call.take() {
            call.finish(clock::now(), (this.is_error)(&output));
        }
        Poll::Ready(output)
    }
}
