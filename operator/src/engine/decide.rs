//! HPA's behaviour on top of the combined recommendation (autoscaling/v2, `pkg/controller/podautoscaler`):
//! stabilisation windows, rate policies over their periods, and min/max bounds — in that order, with HPA's
//! arithmetic (a Percent scale-up rounds up, a Percent scale-down limit truncates). The tolerance applies earlier,
//! to the usage ratio ([`combine`]).

use std::time::{Duration, Instant};

use crate::{
    Error,
    engine::{
        behavior::{Behavior, PolicyKind, Rules, Select},
        combine::{Pods, combine},
        target::ScaleTarget,
    },
};

/// A managed target's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetConfig {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// No change while the usage ratio is within 1 ± tolerance (HPA: 0.1).
    pub tolerance: f64,
    pub behavior: Behavior,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self { min_replicas: 1, max_replicas: 10, tolerance: 0.1, behavior: Behavior::default() }
    }
}

impl TargetConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.min_replicas == 0 {
            return Err(Error::InvalidConfig("min replicas must be at least 1".into()));
        }
        if self.min_replicas > self.max_replicas {
            return Err(Error::InvalidConfig(format!(
                "min replicas {} above max replicas {}",
                self.min_replicas, self.max_replicas
            )));
        }
        if !(self.tolerance.is_finite() && (0.0..1.0).contains(&self.tolerance)) {
            return Err(Error::InvalidConfig(format!("tolerance {} is not in [0, 1)", self.tolerance)));
        }
        self.behavior.validate()
    }
}

/// Why the result differs from the recommendation (HPA's `ScalingLimited` reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    TooFewReplicas,
    TooManyReplicas,
    ScaleUpLimit,
    ScaleDownLimit,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::TooFewReplicas => "TooFewReplicas",
            Limit::TooManyReplicas => "TooManyReplicas",
            Limit::ScaleUpLimit => "ScaleUpLimit",
            Limit::ScaleDownLimit => "ScaleDownLimit",
        }
    }
}

/// One decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub current: u32,
    /// What the pods asked for (the tolerance applied to their usage ratio).
    pub recommended: u32,
    /// After stabilisation.
    pub stabilized: u32,
    /// After rate policies and bounds: what to apply.
    pub desired: u32,
    pub limited: Option<Limit>,
    pub reason: String,
}

/// The per-target memory HPA keeps: recent recommendations (for stabilisation) and scale events (for rate
/// policies). It can be handed to a successor ([`Engine::memory`], [`Engine::restored`]).
#[derive(Debug, Default)]
pub struct Engine {
    pub(super) recommendations: Vec<Stamped>,
    pub(super) scale_ups: Vec<Stamped>,
    pub(super) scale_downs: Vec<Stamped>,
}

/// A remembered count, with when: the engine's clock, and the wall clock's Unix second (for a successor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamped {
    pub at: Instant,
    pub unix: u64,
    pub value: u32,
}

impl Stamped {
    fn now(at: Instant, value: u32) -> Self {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { at, unix, value }
    }
}

/// Replicas added (or removed) by events within `period` before `now`.
fn change_in_period(events: &[Stamped], now: Instant, period: Duration) -> u32 {
    events.iter().filter(|event| now.saturating_duration_since(event.at) < period).map(|event| event.value).sum()
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    fn scale_up_limit(&self, now: Instant, current: u32, rules: &Rules) -> u32 {
        let (mut result, pick): (i64, fn(i64, i64) -> i64) = match rules.select {
            Select::Disabled => return current,
            Select::Min => (i64::MAX, i64::min),
            Select::Max => (i64::MIN, i64::max),
        };
        for policy in &rules.policies {
            let added = i64::from(change_in_period(&self.scale_ups, now, policy.period));
            let deleted = i64::from(change_in_period(&self.scale_downs, now, policy.period));
            let start = i64::from(current) - added + deleted;
            let proposed = match policy.kind {
                PolicyKind::Pods => start + i64::from(policy.value),
                PolicyKind::Percent => (start as f64 * (1.0 + f64::from(policy.value) / 100.0)).ceil() as i64,
            };
            result = pick(result, proposed);
        }
        result.clamp(0, i64::from(u32::MAX)) as u32
    }

    fn scale_down_limit(&self, now: Instant, current: u32, rules: &Rules) -> u32 {
        // For a scale-down, "the largest change" is the smallest replica count.
        let (mut result, pick): (i64, fn(i64, i64) -> i64) = match rules.select {
            Select::Disabled => return current,
            Select::Min => (i64::MIN, i64::max),
            Select::Max => (i64::MAX, i64::min),
        };
        for policy in &rules.policies {
            let added = i64::from(change_in_period(&self.scale_ups, now, policy.period));
            let deleted = i64::from(change_in_period(&self.scale_downs, now, policy.period));
            let start = i64::from(current) - added + deleted;
            let proposed = match policy.kind {
                PolicyKind::Pods => start - i64::from(policy.value),
                PolicyKind::Percent => (start as f64 * (1.0 - f64::from(policy.value) / 100.0)) as i64,
            };
            result = pick(result, proposed);
        }
        result.clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Decides the new replica count for a target that has `current` replicas (its spec), given its pods' answers.
    /// Records the recommendation for stabilisation; call [`Engine::record_scale`] once a change has been applied.
    pub fn decide(&mut self, now: Instant, config: &TargetConfig, current: u32, pods: Pods<'_>) -> Outcome {
        let combined = combine(current, config.tolerance, pods);
        self.decide_from(now, config, current, combined.desired, combined.reason)
    }

    /// The same rules for a replica count recommended by something other than the agents — the demo's HPA
    /// baselines compute HPA's formula on a metric (tolerance included) and hand the result here, so every policy
    /// goes through the same behaviour.
    pub fn decide_recommended(
        &mut self,
        now: Instant,
        config: &TargetConfig,
        current: u32,
        recommended: u32,
        reason: String,
    ) -> Outcome {
        self.decide_from(now, config, current, recommended, reason)
    }

    fn decide_from(
        &mut self,
        now: Instant,
        config: &TargetConfig,
        current: u32,
        recommended: u32,
        mut reason: String,
    ) -> Outcome {
        let behavior = &config.behavior;
        // Outside the bounds: come back inside first (HPA does the same before looking at metrics).
        if current > config.max_replicas || current < config.min_replicas {
            let desired = current.clamp(config.min_replicas, config.max_replicas);
            let limited = if current > config.max_replicas { Limit::TooManyReplicas } else { Limit::TooFewReplicas };
            return Outcome {
                current,
                recommended: desired,
                stabilized: desired,
                desired,
                limited: Some(limited),
                reason: format!("{current} replicas is outside {}..={}", config.min_replicas, config.max_replicas),
            };
        }
        // Stabilisation: the lowest recommendation in the scale-up window, the highest in the scale-down window.
        let horizon = behavior.scale_up.stabilization_window.max(behavior.scale_down.stabilization_window);
        self.recommendations.retain(|past| now.saturating_duration_since(past.at) <= horizon);
        let mut up = recommended;
        let mut down = recommended;
        for past in &self.recommendations {
            let age = now.saturating_duration_since(past.at);
            if age < behavior.scale_up.stabilization_window {
                up = up.min(past.value);
            }
            if age < behavior.scale_down.stabilization_window {
                down = down.max(past.value);
            }
        }
        self.recommendations.push(Stamped::now(now, recommended));
        let stabilized = current.max(up).min(down);
        if stabilized != recommended {
            reason = format!("{reason}; stabilised at {stabilized} (recent recommendations)");
        }
        // Rate policies and bounds.
        let mut limited = None;
        let desired = if stabilized > current {
            let limit = self.scale_up_limit(now, current, &behavior.scale_up).max(current);
            let (ceiling, why) = if config.max_replicas > limit {
                (limit, Limit::ScaleUpLimit)
            } else {
                (config.max_replicas, Limit::TooManyReplicas)
            };
            if stabilized > ceiling {
                limited = Some(why);
                ceiling
            } else {
                stabilized
            }
        } else if stabilized < current {
            let limit = self.scale_down_limit(now, current, &behavior.scale_down).min(current);
            let (floor, why) = if config.min_replicas < limit {
                (limit, Limit::ScaleDownLimit)
            } else {
                (config.min_replicas, Limit::TooFewReplicas)
            };
            if stabilized < floor {
                limited = Some(why);
                floor
            } else {
                stabilized
            }
        } else {
            current
        };
        if let Some(limit) = limited {
            reason = format!("{reason}; limited to {desired} ({})", limit.as_str());
        }
        Outcome { current, recommended, stabilized, desired, limited, reason }
    }

    /// A change from `from` to `to` replicas was applied at `now` (rate policies count it).
    pub fn record_scale(&mut self, now: Instant, from: u32, to: u32) {
        self.scale_ups.retain(|event| now.saturating_duration_since(event.at) <= SCALE_EVENTS_KEPT);
        self.scale_downs.retain(|event| now.saturating_duration_since(event.at) <= SCALE_EVENTS_KEPT);
        if to > from {
            self.scale_ups.push(Stamped::now(now, to - from));
        } else if from > to {
            self.scale_downs.push(Stamped::now(now, from - to));
        }
    }

    /// Reads the target, decides, and (when `act`) applies a change and records it. A write that meets a change
    /// made since the read ([`Error::Conflict`]) is decided again on fresh state, up to [`MAX_SCALE_ATTEMPTS`]
    /// times. A failed read is an error; a failed write is reported in the result, with the decision.
    pub async fn run(
        &mut self,
        now: Instant,
        config: &TargetConfig,
        target: &impl ScaleTarget,
        pods: Pods<'_>,
        act: bool,
    ) -> Result<Run, Error> {
        let mut attempt = 1;
        loop {
            let current = target.current_replicas().await?;
            let outcome = self.decide(now, config, current, pods);
            if !act || outcome.desired == current {
                return Ok(Run { outcome, applied: false, failed: None });
            }
            match target.set_replicas(outcome.desired).await {
                Ok(()) => {
                    self.record_scale(now, current, outcome.desired);
                    return Ok(Run { outcome, applied: true, failed: None });
                }
                Err(Error::Conflict) if attempt < MAX_SCALE_ATTEMPTS => attempt += 1,
                Err(error) => {
                    let failed = Some(format!("failed to set replicas to {}: {error}", outcome.desired));
                    return Ok(Run { outcome, applied: false, failed });
                }
            }
        }
    }
}

/// Scale events are kept this long: HPA's longest policy period.
pub const SCALE_EVENTS_KEPT: Duration = Duration::from_secs(1800);

/// Writes tried before giving up on conflicts.
pub const MAX_SCALE_ATTEMPTS: u32 = 3;

/// What [`Engine::run`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub outcome: Outcome,
    /// The new count was written.
    pub applied: bool,
    /// Writing it failed, and why.
    pub failed: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        behavior::ScalingPolicy,
        combine::{Advice, Verdict},
    };

    /// `replicas` ready replicas that all say `verdict` and ask, by HPA's formula, for `desired` replicas.
    fn all(verdict: Verdict, desired: u32, replicas: u32) -> Vec<Option<Advice>> {
        vec![Some(Advice { verdict, usage_ratio: f64::from(desired) / f64::from(replicas) }); replicas as usize]
    }

    fn ready(answers: &[Option<Advice>]) -> Pods<'_> {
        Pods { ready: answers, unready: 0 }
    }

    fn config(min: u32, max: u32) -> TargetConfig {
        TargetConfig { min_replicas: min, max_replicas: max, ..TargetConfig::default() }
    }

    #[test]
    fn tolerance_band() {
        let mut engine = Engine::new();
        let now = Instant::now();
        // 10 → 11 is within 10 %: no change. 10 → 12 is not.
        assert_eq!(engine.decide(now, &config(1, 50), 10, ready(&all(Verdict::RootCause, 11, 10))).desired, 10);
        assert_eq!(engine.decide(now, &config(1, 50), 10, ready(&all(Verdict::RootCause, 12, 10))).desired, 12);
    }

    #[test]
    fn scale_up_is_rate_limited_like_hpa() {
        let mut engine = Engine::new();
        let start = Instant::now();
        let config = config(1, 100);
        // From 2, max(+100 %, +4 pods) per 15 s: at most 6.
        let outcome = engine.decide(start, &config, 2, ready(&all(Verdict::RootCause, 40, 2)));
        assert_eq!((outcome.desired, outcome.limited), (6, Some(Limit::ScaleUpLimit)));
        engine.record_scale(start, 2, 6);
        // 5 s later, still in the same period: the period started at 2, so the limit is still 6.
        let later = start + Duration::from_secs(5);
        assert_eq!(engine.decide(later, &config, 6, ready(&all(Verdict::RootCause, 40, 6))).desired, 6);
        // After the period: from 6, +100 % → 12.
        let next = start + Duration::from_secs(16);
        assert_eq!(engine.decide(next, &config, 6, ready(&all(Verdict::RootCause, 40, 6))).desired, 12);
    }

    #[test]
    fn scale_down_waits_for_the_highest_recommendation_in_the_window() {
        let mut engine = Engine::new();
        let start = Instant::now();
        let config = config(1, 20);
        assert_eq!(engine.decide(start, &config, 8, ready(&all(Verdict::RootCause, 8, 8))).desired, 8);
        // Idle now, asking for 2: the recommendation of 8 from a minute ago holds it at 8 for 5 minutes.
        let minute = start + Duration::from_secs(60);
        let outcome = engine.decide(minute, &config, 8, ready(&all(Verdict::Idle, 2, 8)));
        assert_eq!((outcome.recommended, outcome.desired), (2, 8));
        // Past the window (only idle recommendations left in it): down to 2.
        let later = start + Duration::from_secs(301);
        assert_eq!(engine.decide(later, &config, 8, ready(&all(Verdict::Idle, 2, 8))).desired, 2);
    }

    #[test]
    fn bounds() {
        let mut engine = Engine::new();
        let now = Instant::now();
        let outcome = engine.decide(now, &config(2, 5), 4, ready(&all(Verdict::RootCause, 9, 4)));
        assert_eq!((outcome.desired, outcome.limited), (5, Some(Limit::TooManyReplicas)));
        let relaxed = TargetConfig {
            behavior: Behavior {
                scale_down: Rules { stabilization_window: Duration::ZERO, ..Behavior::default().scale_down },
                ..Behavior::default()
            },
            ..config(2, 5)
        };
        let outcome = engine.decide(now, &relaxed, 4, ready(&all(Verdict::Idle, 1, 4)));
        assert_eq!((outcome.desired, outcome.limited), (2, Some(Limit::TooFewReplicas)));
        // Already outside: come back in.
        assert_eq!(engine.decide(now, &config(2, 5), 9, ready(&[])).desired, 5);
        assert_eq!(engine.decide(now, &config(2, 5), 1, ready(&[])).desired, 2);
    }

    #[test]
    fn a_missing_answer_counts_as_on_target_for_a_scale_down() {
        let mut engine = Engine::new();
        let now = Instant::now();
        let relaxed = TargetConfig {
            behavior: Behavior {
                scale_down: Rules { stabilization_window: Duration::ZERO, ..Behavior::default().scale_down },
                ..Behavior::default()
            },
            ..config(1, 10)
        };
        let mut answers = all(Verdict::Idle, 1, 4);
        answers[2] = None;
        // Three idle replicas at 25 % of target, one unanswered taken as 100 %: (0.75 + 1) / 4 → 2 replicas, not 1.
        assert_eq!(engine.decide(now, &relaxed, 4, ready(&answers)).desired, 2);
        assert_eq!(engine.decide(now, &relaxed, 4, ready(&all(Verdict::Idle, 1, 4))).desired, 1);
        let none = [None, None, None, None];
        assert_eq!(engine.decide(now, &relaxed, 4, ready(&none)).desired, 4, "no answer at all holds");
    }

    #[test]
    fn percent_scale_down_truncates_and_select_min_picks_the_smaller_change() {
        let mut engine = Engine::new();
        let now = Instant::now();
        let period = Duration::from_secs(60);
        let rules = Rules {
            stabilization_window: Duration::ZERO,
            select: Select::Min,
            policies: vec![
                ScalingPolicy { kind: PolicyKind::Percent, value: 30, period },
                ScalingPolicy { kind: PolicyKind::Pods, value: 1, period },
            ],
        };
        let config =
            TargetConfig { behavior: Behavior { scale_down: rules.clone(), ..Behavior::default() }, ..config(1, 20) };
        // From 10: Percent 30 → 7, Pods 1 → 9; Min selects the smaller change, 9.
        assert_eq!(engine.decide(now, &config, 10, ready(&all(Verdict::Idle, 1, 10))).desired, 9);
        let max = TargetConfig {
            behavior: Behavior { scale_down: Rules { select: Select::Max, ..rules.clone() }, ..Behavior::default() },
            ..config.clone()
        };
        // Max selects the larger change: 10 × 0.7 = 7.
        assert_eq!(Engine::new().decide(now, &max, 10, ready(&all(Verdict::Idle, 1, 10))).desired, 7);
        let disabled = TargetConfig {
            behavior: Behavior { scale_down: Rules { select: Select::Disabled, ..rules }, ..Behavior::default() },
            ..config
        };
        assert_eq!(Engine::new().decide(now, &disabled, 10, ready(&all(Verdict::Idle, 1, 10))).desired, 10);
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(config(5, 2).validate().is_err());
        assert!(config(0, 2).validate().is_err());
        assert!(TargetConfig { tolerance: f64::NAN, ..config(1, 2) }.validate().is_err());
        assert!(config(1, 10).validate().is_ok());
    }

    struct Local(std::sync::Mutex<u32>);

    impl ScaleTarget for Local {
        async fn current_replicas(&self) -> Result<u32, Error> {
            Ok(*self.0.lock().unwrap())
        }
        async fn set_replicas(&self, replicas: u32) -> Result<(), Error> {
            *self.0.lock().unwrap() = replicas;
            Ok(())
        }
    }

    #[test]
    fn the_engine_drives_a_scale_target() {
        let target = Local(std::sync::Mutex::new(2));
        let mut engine = Engine::new();
        let run = futures_executor(engine.run(
            Instant::now(),
            &config(1, 10),
            &target,
            ready(&all(Verdict::RootCause, 5, 2)),
            true,
        ));
        assert_eq!(run.unwrap().outcome.desired, 5);
        assert_eq!(*target.0.lock().unwrap(), 5);
    }

    /// Polls a future that never waits (the local target answers at once).
    fn futures_executor<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
        }
    }
}
