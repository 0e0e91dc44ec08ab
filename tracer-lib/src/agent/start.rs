//! Starting an agent: its own thread and runtime, its port bound, the service's tracer built, and the tasks that
//! close windows, run each window's steps and serve the port. Says at start, in one line, what is left open.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::{oneshot, watch};

use crate::{
    Error, Tracer,
    agent::{
        Agent, port,
        settings::AgentBuilder,
        state::{self, AgentState},
    },
    decide::Capacity,
    exchange::sender::Sender,
    measure::headers::valid_agent_addr,
};

/// What an agent with these settings leaves open, in one line, or `None` when nothing is.
pub(crate) fn what_is_open(builder: &AgentBuilder) -> Option<String> {
    let mut open = Vec::new();
    if builder.mesh_keys.is_none() {
        open.push(
            "no mesh key: any HTTP client can name itself in rootscale-caller, be dialled and receive timings, and \
             any callee can name an address to dial",
        );
    }
    match (&builder.tls, &builder.token, &builder.mesh_keys) {
        (None, None, None) => open.push(
            "no TLS, token or key on the agent port: anyone who reaches it can ask it \
                                         anything, send reports and change its settings",
        ),
        (None, Some(_), _) => open.push("no TLS: the agent token travels in clear text"),
        (None, None, Some(_)) => open.push("no TLS: reports and answers travel in clear text (proved, not hidden)"),
        (Some(_), _, _) => {}
    }
    (!open.is_empty()).then(|| format!("rootscale agent security: {}", open.join("; ")))
}

impl AgentBuilder {
    /// Binds the agent's port, builds the service's tracer and starts the agent on a thread of its own, so a
    /// service that saturates its own runtime cannot starve the agent that is to report it.
    pub async fn start(self) -> Result<Agent, Error> {
        self.check()?;
        // Measured on the caller's runtime: the service's own CPU, not the agent's thread.
        let mut capacity = Capacity::detect(self.concurrency, self.pool_scope);
        if let Some(cores) = self.cpu_cores {
            capacity.cores = cores;
        }
        // Without a key, outsiders can steer the agent: a warning. With a key but no TLS, what is left open is
        // confidentiality on the wire — said at info level, so a loopback demo of many replicas is not a wall of
        // warnings.
        match what_is_open(&self) {
            Some(open) if self.mesh_keys.is_none() => tracing::warn!(service = %self.service, "{open}"),
            Some(open) => tracing::info!(service = %self.service, "{open}"),
            None => tracing::info!(service = %self.service, "rootscale agent security: mesh key and TLS on"),
        }
        let (ready, started) = oneshot::channel();
        let (stop, stopped) = watch::channel(false);
        let (finished, done) = oneshot::channel();
        let thread = std::thread::Builder::new().name(format!("rootscale-agent-{}", self.service));
        thread
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(Error::Config(format!("cannot start the agent's runtime: {error}"))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut stopped_after = stopped.clone();
                    match self.launch(capacity, stopped).await {
                        Ok((tracer, state, local_addr, tasks)) => {
                            let _ = ready.send(Ok((tracer, state, local_addr)));
                            crate::agent::stop_requested(&mut stopped_after).await;
                            for task in tasks {
                                let _ = task.await;
                            }
                        }
                        Err(error) => {
                            let _ = ready.send(Err(error));
                        }
                    }
                });
                let _ = finished.send(());
            })
            .map_err(|error| Error::Config(format!("cannot start the agent's thread: {error}")))?;
        let (tracer, state, local_addr) =
            started.await.map_err(|_| Error::Config("the agent's thread ended while starting".into()))??;
        Ok(Agent { tracer, state, local_addr, stop, done })
    }

    /// Runs on the agent's own runtime: binds, builds the tracer, spawns the window closer, the window task and the
    /// port.
    async fn launch(
        self,
        capacity: Capacity,
        stopped: watch::Receiver<bool>,
    ) -> Result<(Tracer, Arc<AgentState>, SocketAddr, Vec<tokio::task::JoinHandle<()>>), Error> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|error| Error::Bind { addr: self.listen, error })?;
        let local_addr = listener.local_addr().map_err(|error| Error::Bind { addr: self.listen, error })?;
        let advertise = match &self.advertise {
            Some(addr) => addr.clone(),
            None if local_addr.ip().is_unspecified() => format!("127.0.0.1:{}", local_addr.port()),
            None => local_addr.to_string(),
        };
        if !valid_agent_addr(&advertise) {
            return Err(Error::InvalidAgentAddress(advertise));
        }
        let mut tracer =
            Tracer::builder(self.service.clone()).agent_addr(advertise.clone()).window(self.window).sample(self.sample);
        if let Some(observer) = &self.observer {
            tracer = tracer.observer(observer.clone());
        }
        if let Some(keys) = &self.mesh_keys {
            tracer = tracer.mesh_keys(keys.clone());
        }
        let tracer = tracer.build()?;
        let tls = match &self.tls {
            Some(files) => Some(port::Tls::load(files)?),
            None => None,
        };
        let sender = Sender::new(
            self.exchange_timeout,
            self.token.as_deref(),
            tls.as_ref().map(port::Tls::client),
            self.mesh_keys.clone(),
        )?;
        let state = Arc::new(AgentState::new(tracer.clone(), &self, advertise.clone(), capacity, sender));
        let mut tasks = Vec::new();
        let closer = tracer.run_window_closer();
        let mut closer_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = closer => {}
                () = crate::agent::stop_requested(&mut closer_stopped) => {}
            }
        }));
        tasks.push(tokio::spawn(state::run_windows(state.clone(), stopped.clone())));
        let access = port::Access {
            token: self.token.clone(),
            tls,
            keys: self.mesh_keys.clone(),
            operator_identity: self.operator_identity.clone(),
        };
        let server = port::serve(state.clone(), listener, access, self.extra_metrics.clone(), stopped)?;
        tasks.push(tokio::spawn(server));
        tracing::info!(service = %self.service, agent = %advertise, %local_addr, "rootscale agent started");
        Ok((tracer, state, local_addr, tasks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyRing, MeshKeys};

    #[test]
    fn the_start_line_says_what_is_open() {
        let open = what_is_open(&AgentBuilder::new("svc")).unwrap();
        assert!(open.contains("no mesh key") && open.contains("change its settings"), "{open}");
        let keys = Arc::new(KeyRing::fixed(MeshKeys::parse("0123456789abcdefghijklmnopqrstuvwxyzABCD").unwrap()));
        let keyed = what_is_open(&AgentBuilder::new("svc").mesh_keys(keys.clone())).unwrap();
        assert!(!keyed.contains("no mesh key") && keyed.contains("clear text"), "{keyed}");
        let tls = crate::agent::TlsFiles { cert: "c".into(), key: "k".into(), ca: "a".into(), server_name: None };
        assert_eq!(what_is_open(&AgentBuilder::new("svc").mesh_keys(keys).tls(tls)), None);
    }
}
