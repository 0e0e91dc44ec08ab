//! Local mode on the dashboard: each second of a run becomes a frame (the services, their calls, the delegation
//! path), and its faults, root causes found and scaling actions become timeline entries.

use rootscale_dashboard::{Dashboard, EdgeView, Event, EventKind, Frame, ServiceView};

use crate::local::{
    policy::Action,
    run::{Detection, Tick},
    scenario::{Fault, FaultKind},
    topology::Topology,
};

/// Feeds a [`Dashboard`] from a run's ticks.
pub struct Live {
    pub dashboard: Dashboard,
    topology: Topology,
    faults: Vec<Fault>,
    /// Faults already on the timeline, and root causes already announced.
    faults_shown: usize,
    found_shown: Vec<bool>,
}

fn describe(fault: &Fault) -> String {
    match fault.kind {
        FaultKind::Capacity(factor) => format!("{}: worker pool ÷ {factor}", fault.service),
        FaultKind::Cpu(factor) => format!("{}: CPU per request × {factor}", fault.service),
        FaultKind::Link(delay) => {
            format!("{}: calls into it {} slower", fault.service, humantime::format_duration(delay))
        }
    }
}

impl Live {
    pub fn new(topology: &Topology, faults: &[Fault]) -> Self {
        let mut faults = faults.to_vec();
        faults.sort_by_key(|fault| fault.at);
        Self {
            dashboard: Dashboard::new(&format!("local mode: {}", topology.name), "local"),
            topology: topology.clone(),
            found_shown: vec![false; faults.len()],
            faults,
            faults_shown: 0,
        }
    }

    /// One second of the run.
    pub fn on_tick(&mut self, tick: &Tick, actions: &[Action], detections: &[Detection]) {
        while self.faults_shown < self.faults.len() && self.faults[self.faults_shown].at.as_secs() <= tick.t {
            let fault = &self.faults[self.faults_shown];
            self.dashboard.record(Event::new(EventKind::Fault, &fault.service, describe(fault), fault.to_string()));
            self.faults_shown += 1;
        }
        for (index, detection) in detections.iter().enumerate() {
            if let (Some(at), Some(shown)) = (detection.detected_at_s, self.found_shown.get_mut(index))
                && !*shown
            {
                *shown = true;
                let service = self.faults.get(index).map_or("", |f| f.service.as_str());
                let row = tick.services.iter().find(|row| row.name == service);
                let text = format!("{service}: root cause found {:.0} s after the fault", at as f64 - detection.at_s);
                let reason = row.map(|r| format!("{} {}", r.verdict, r.detail)).unwrap_or_default();
                self.dashboard.record(Event::new(EventKind::Decision, service, text, reason));
            }
        }
        for action in actions {
            self.dashboard.record(Event::new(
                EventKind::Scale,
                &action.service,
                format!("{} {} → {} replicas", action.service, action.from, action.to),
                action.reason.clone(),
            ));
        }
        self.dashboard.publish(self.frame(tick));
    }

    fn frame(&self, tick: &Tick) -> Frame {
        let topology = &self.topology;
        let services = tick
            .services
            .iter()
            .map(|row| ServiceView {
                name: row.name.clone(),
                group: topology.name.clone(),
                replicas: row.replicas,
                desired: None,
                verdict: row.verdict.clone(),
                detail: row.detail.clone(),
                delegated_to: row.delegated_to.clone(),
                latency_ms: row.latency_ms,
                target_ms: Some(row.budget_ms),
                local_wait_ms: row.local_wait_ms,
                net_wait_ms: row.net_wait_ms,
                remote_wait_ms: row.remote_wait_ms,
                rps: row.rps,
            })
            .collect();
        // Every call of the topology, with the rate the callers' agents saw.
        let edges = topology
            .services
            .iter()
            .flat_map(|spec| topology.callees(&spec.name).into_iter().map(move |callee| (spec.name.clone(), callee)))
            .map(|(from, to)| {
                let rps = tick
                    .services
                    .iter()
                    .find(|row| row.name == from)
                    .and_then(|row| row.calls.get(&to))
                    .copied()
                    .unwrap_or(0.0);
                EdgeView { from, to, rps }
            })
            .collect();
        Frame::new(services, edges, vec![topology.entry.clone()])
    }
}
