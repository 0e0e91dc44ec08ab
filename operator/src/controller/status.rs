//! What a reconcile writes back: the `ScalingDecision` status, with HPA-style conditions and a bounded history.
//! Pure: built from what the reconcile saw and decided, and the previous status (for transition times).

use crate::{
    agents::Answer,
    annotations::{AnnotationError, Mode, Settings},
    crd::{Condition, HISTORY, HistoryEntry, ScalingDecisionStatus},
    engine::{Limit, Outcome, Verdict},
};

/// Verdicts by weight, when replicas disagree in equal numbers.
const PRIORITY: [Verdict; 7] = [
    Verdict::RootCause,
    Verdict::Saturated,
    Verdict::Network,
    Verdict::Delegated,
    Verdict::Idle,
    Verdict::Healthy,
    Verdict::InsufficientData,
];

/// The Deployment's verdict: the one most replicas gave (ties by weight), and where they point.
pub fn combined_verdict(answers: &[Answer]) -> (Verdict, Option<String>) {
    let mut best = (Verdict::InsufficientData, 0usize);
    for verdict in PRIORITY {
        let count = answers.iter().filter(|a| a.advice().is_some_and(|advice| advice.verdict == verdict)).count();
        if count > best.1 {
            best = (verdict, count);
        }
    }
    let mut suspects: Vec<&String> = answers
        .iter()
        .filter(|a| a.advice().is_some_and(|advice| advice.verdict == best.0))
        .filter_map(|a| a.suspect.as_ref())
        .collect();
    suspects.sort();
    let suspect = suspects
        .iter()
        .max_by_key(|candidate| suspects.iter().filter(|other| other == candidate).count())
        .map(|s| s.to_string());
    (best.0, suspect)
}

/// What one reconcile saw and did.
pub struct Observation<'a> {
    pub deployment: &'a str,
    pub settings: &'a Settings,
    pub answers: &'a [Answer],
    pub outcome: &'a Outcome,
    /// The new replica count was written to `/scale`.
    pub applied: bool,
    /// Writing it failed, and why.
    pub failed_update: Option<String>,
}

fn condition(
    previous: Option<&ScalingDecisionStatus>,
    now: &str,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == kind))
        .filter(|c| c.status == status)
        .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
    Condition { type_: kind.to_string(), status, reason: reason.to_string(), message, last_transition_time: since }
}

fn ms(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// The status after a reconcile that reached a decision.
pub fn decided(previous: Option<&ScalingDecisionStatus>, seen: &Observation<'_>, now: &str) -> ScalingDecisionStatus {
    let settings = seen.settings;
    let outcome = seen.outcome;
    let (verdict, suspect) = combined_verdict(seen.answers);
    let answered = seen.answers.iter().filter(|a| a.advice().is_some()).count();
    let observed = seen.answers.iter().filter_map(|a| a.observed_latency).max();
    let slo = settings.slo.map(|(latency, _)| latency);
    let targets = match (observed, slo) {
        (_, None) => "<none>".to_string(),
        (Some(observed), Some(slo)) => format!("{:.0}ms/{:.0}ms", ms(observed), ms(slo)),
        (None, Some(slo)) => format!("<unknown>/{:.0}ms", ms(slo)),
    };
    let dry_run = settings.mode == Mode::Recommend;
    let able = match (&seen.failed_update, settings.paused) {
        (Some(error), _) => condition(previous, now, "AbleToScale", false, "FailedUpdateScale", error.clone()),
        (None, true) => {
            condition(previous, now, "AbleToScale", true, "ReadyForNewScale", "paused: replicas are left alone".into())
        }
        (None, false) if outcome.stabilized > outcome.recommended => condition(
            previous,
            now,
            "AbleToScale",
            true,
            "ScaleDownStabilized",
            format!(
                "recent recommendations were higher than current one, applying the highest: {}",
                outcome.stabilized
            ),
        ),
        (None, false) if outcome.stabilized < outcome.recommended => condition(
            previous,
            now,
            "AbleToScale",
            true,
            "ScaleUpStabilized",
            format!("recent recommendations were lower than current one, applying the lowest: {}", outcome.stabilized),
        ),
        (None, false) if seen.applied => condition(
            previous,
            now,
            "AbleToScale",
            true,
            "SucceededRescale",
            format!("set replicas to {}", outcome.desired),
        ),
        (None, false) => condition(
            previous,
            now,
            "AbleToScale",
            true,
            "ReadyForNewScale",
            if dry_run { "recommend mode: decisions are recorded, replicas left alone".into() } else { "ready".into() },
        ),
    };
    let active = if settings.paused {
        condition(previous, now, "ScalingActive", false, "ScalingDisabled", "rootscale.dev/paused is \"true\"".into())
    } else if answered == 0 {
        let why = seen.answers.iter().filter_map(|a| a.advice.as_ref().err()).next().cloned();
        let message = why.unwrap_or_else(|| "no ready pods to ask".to_string());
        condition(previous, now, "ScalingActive", false, "FailedGetAgentRecommendation", message)
    } else {
        condition(
            previous,
            now,
            "ScalingActive",
            true,
            "ValidRecommendationFound",
            format!("{answered} of {} agents answered", seen.answers.len()),
        )
    };
    let limited = match outcome.limited {
        Some(limit) => condition(previous, now, "ScalingLimited", true, limit.as_str(), limit_message(limit, outcome)),
        None => condition(
            previous,
            now,
            "ScalingLimited",
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range".into(),
        ),
    };
    let mut history = previous.map(|p| p.history.clone()).unwrap_or_default();
    let changed = outcome.desired != outcome.current;
    if changed || previous.is_none_or(|p| p.verdict != verdict.as_str()) {
        history.insert(
            0,
            HistoryEntry {
                time: now.to_string(),
                verdict: verdict.as_str().to_string(),
                from_replicas: outcome.current,
                to_replicas: outcome.desired,
                applied: seen.applied,
                reason: outcome.reason.clone(),
            },
        );
        history.truncate(HISTORY);
    }
    ScalingDecisionStatus {
        reference: format!("Deployment/{}", seen.deployment),
        targets,
        verdict: verdict.as_str().to_string(),
        min_replicas: settings.min_replicas,
        max_replicas: settings.max_replicas,
        current_replicas: outcome.current,
        desired_replicas: outcome.desired,
        slo_ms: slo.map(ms),
        observed_ms: observed.map(ms),
        suspect,
        reason: outcome.reason.clone(),
        mode: if dry_run { "recommend" } else { "enforce" }.to_string(),
        conditions: vec![able, active, limited],
        history,
        last_decision_time: Some(now.to_string()),
        memory: previous.and_then(|p| p.memory.clone()),
    }
}

fn limit_message(limit: Limit, outcome: &Outcome) -> String {
    match limit {
        Limit::TooManyReplicas => {
            format!("the desired replica count is more than the maximum replica count ({})", outcome.desired)
        }
        Limit::TooFewReplicas => {
            format!("the desired replica count is less than the minimum replica count ({})", outcome.desired)
        }
        Limit::ScaleUpLimit => {
            format!("the desired replica count is increasing faster than the maximum scale rate ({})", outcome.desired)
        }
        Limit::ScaleDownLimit => {
            format!("the desired replica count is decreasing faster than the maximum scale rate ({})", outcome.desired)
        }
    }
}

/// The reason of `AbleToScale=False` while another autoscaler scales the same Deployment.
pub const CONFLICTING_AUTOSCALER: &str = "ConflictingAutoscaler";

/// Why a Deployment is left alone before any agent is asked: the verdict, the reason and the conditions.
struct LeftAlone {
    verdict: &'static str,
    reason: String,
    conditions: Vec<Condition>,
}

/// The status of a Deployment that is left alone before any agent is asked (zero replicas, another autoscaler):
/// the settings and counts as they are, and why.
fn left_alone(
    previous: Option<&ScalingDecisionStatus>,
    deployment: &str,
    settings: &Settings,
    current: u32,
    why: LeftAlone,
    now: &str,
) -> ScalingDecisionStatus {
    let LeftAlone { verdict, reason, conditions } = why;
    let slo = settings.slo.map(|(latency, _)| latency);
    ScalingDecisionStatus {
        reference: format!("Deployment/{deployment}"),
        targets: match slo {
            Some(slo) => format!("<unknown>/{:.0}ms", ms(slo)),
            None => "<none>".to_string(),
        },
        verdict: verdict.to_string(),
        min_replicas: settings.min_replicas,
        max_replicas: settings.max_replicas,
        current_replicas: current,
        desired_replicas: current,
        slo_ms: slo.map(ms),
        observed_ms: None,
        suspect: None,
        reason,
        mode: if settings.mode == Mode::Recommend { "recommend" } else { "enforce" }.to_string(),
        conditions,
        history: previous.map(|p| p.history.clone()).unwrap_or_default(),
        last_decision_time: Some(now.to_string()),
        memory: previous.and_then(|p| p.memory.clone()),
    }
}

/// HPA at zero replicas: scaling is disabled, nothing is asked or written (`ScalingActive=False`,
/// `ScalingDisabled`), until someone scales the Deployment up again.
pub fn disabled(
    previous: Option<&ScalingDecisionStatus>,
    deployment: &str,
    settings: &Settings,
    now: &str,
) -> ScalingDecisionStatus {
    let message = "scaling is disabled since the replica count of the target is zero".to_string();
    let conditions = vec![
        condition(previous, now, "AbleToScale", true, "SucceededGetScale", "the target's scale was read".into()),
        condition(previous, now, "ScalingActive", false, "ScalingDisabled", message.clone()),
    ];
    left_alone(previous, deployment, settings, 0, LeftAlone { verdict: "disabled", reason: message, conditions }, now)
}

/// Another autoscaler (`other`, a HorizontalPodAutoscaler) scales the same Deployment: rootscale writes nothing
/// (`AbleToScale=False`).
pub fn conflicting(
    previous: Option<&ScalingDecisionStatus>,
    deployment: &str,
    settings: &Settings,
    current: u32,
    other: &str,
    now: &str,
) -> ScalingDecisionStatus {
    let message = format!(
        "HorizontalPodAutoscaler {other} also scales this Deployment; rootscale leaves it alone until one of them is removed"
    );
    let conditions = vec![condition(previous, now, "AbleToScale", false, CONFLICTING_AUTOSCALER, message.clone())];
    let why = LeftAlone { verdict: "conflict", reason: message, conditions };
    left_alone(previous, deployment, settings, current, why, now)
}

/// The status of a Deployment whose annotations are invalid: left alone, `ScalingActive=False`.
pub fn invalid(
    previous: Option<&ScalingDecisionStatus>,
    deployment: &str,
    current: u32,
    error: &AnnotationError,
    now: &str,
) -> ScalingDecisionStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.reference = format!("Deployment/{deployment}");
    status.verdict = "invalid".to_string();
    status.current_replicas = current;
    status.desired_replicas = current;
    status.reason = error.to_string();
    status.conditions = vec![condition(previous, now, "ScalingActive", false, "InvalidAnnotation", error.to_string())];
    status.last_decision_time = Some(now.to_string());
    status
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::Advice;

    fn answer(verdict: Verdict, desired: u32, suspect: Option<&str>, observed_ms: u64) -> Answer {
        Answer {
            pod: "p".into(),
            advice: Ok(Advice { verdict, usage_ratio: f64::from(desired) }),
            observed_latency: Some(Duration::from_millis(observed_ms)),
            reason: String::new(),
            suspect: suspect.map(Into::into),
            service: None,
            delegated_to: Vec::new(),
            traffic: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            min_replicas: 1,
            max_replicas: 10,
            slo: Some((Duration::from_millis(200), 95.0)),
            mode: Mode::Enforce,
            paused: false,
            agent_port: 9797,
            scale_down_stabilization: Duration::from_secs(300),
            target_utilization: 0.7,
        }
    }

    fn outcome(current: u32, desired: u32, limited: Option<Limit>) -> Outcome {
        Outcome { current, recommended: desired, stabilized: desired, desired, limited, reason: "because".into() }
    }

    #[test]
    fn a_rescale_reads_like_hpa() {
        let answers = [
            answer(Verdict::Delegated, 2, Some("payments"), 240),
            answer(Verdict::Delegated, 2, Some("payments"), 231),
        ];
        let settings = settings();
        let outcome = outcome(2, 2, None);
        let seen = Observation {
            deployment: "web",
            settings: &settings,
            answers: &answers,
            outcome: &outcome,
            applied: false,
            failed_update: None,
        };
        let status = decided(None, &seen, "2026-11-27T10:00:00Z");
        assert_eq!((status.verdict.as_str(), status.suspect.as_deref()), ("delegated", Some("payments")));
        assert_eq!(status.targets, "240ms/200ms");
        assert_eq!(status.reference, "Deployment/web");
        let kinds: Vec<(&str, &str, &str)> =
            status.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str())).collect();
        assert_eq!(
            kinds,
            [
                ("AbleToScale", "True", "ReadyForNewScale"),
                ("ScalingActive", "True", "ValidRecommendationFound"),
                ("ScalingLimited", "False", "DesiredWithinRange")
            ]
        );
        assert_eq!(status.history.len(), 1);
        // A later rescale keeps transition times of unchanged conditions and adds to the history, newest first.
        let answers = [answer(Verdict::RootCause, 5, Some("web"), 400)];
        let outcome = self::outcome(2, 4, Some(Limit::ScaleUpLimit));
        let seen = Observation {
            deployment: "web",
            settings: &settings,
            answers: &answers,
            outcome: &outcome,
            applied: true,
            failed_update: None,
        };
        let next = decided(Some(&status), &seen, "2026-11-27T10:00:15Z");
        assert_eq!(next.conditions[0].reason, "SucceededRescale");
        assert_eq!(next.conditions[1].last_transition_time, "2026-11-27T10:00:00Z");
        assert_eq!((next.conditions[2].status.as_str(), next.conditions[2].reason.as_str()), ("True", "ScaleUpLimit"));
        assert_eq!(next.history.len(), 2);
        assert_eq!((next.history[0].from_replicas, next.history[0].to_replicas, next.history[0].applied), (2, 4, true));
    }

    #[test]
    fn the_history_is_bounded() {
        let settings = settings();
        let mut status: Option<ScalingDecisionStatus> = None;
        for i in 0..25u32 {
            let answers = [answer(Verdict::RootCause, i + 2, None, 300)];
            let outcome = outcome(i + 1, i + 2, None);
            let seen = Observation {
                deployment: "web",
                settings: &settings,
                answers: &answers,
                outcome: &outcome,
                applied: true,
                failed_update: None,
            };
            status = Some(decided(status.as_ref(), &seen, &format!("t{i}")));
        }
        let status = status.unwrap();
        assert_eq!(status.history.len(), HISTORY);
        assert_eq!(status.history[0].time, "t24");
    }

    #[test]
    fn no_answers_and_bad_annotations_say_why() {
        let settings = settings();
        let answers = [Answer::unanswered("p", "cannot reach the agent".into())];
        let outcome = outcome(3, 3, None);
        let seen = Observation {
            deployment: "web",
            settings: &settings,
            answers: &answers,
            outcome: &outcome,
            applied: false,
            failed_update: None,
        };
        let status = decided(None, &seen, "now");
        assert_eq!(status.verdict, "insufficient-data");
        assert_eq!(status.targets, "<unknown>/200ms");
        assert_eq!(
            (status.conditions[1].status.as_str(), status.conditions[1].reason.as_str()),
            ("False", "FailedGetAgentRecommendation")
        );
        let error = AnnotationError {
            key: "rootscale.dev/max-replicas".into(),
            value: "ten".into(),
            expected: "a number".into(),
        };
        let status = invalid(Some(&status), "web", 3, &error, "later");
        assert_eq!(status.verdict, "invalid");
        assert_eq!(
            (status.conditions[0].type_.as_str(), status.conditions[0].reason.as_str()),
            ("ScalingActive", "InvalidAnnotation")
        );
        assert!(status.conditions[0].message.contains("max-replicas"));
    }
}
