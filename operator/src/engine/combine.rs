//! From one answer per pod to one recommended count for the Deployment, with HPA's pod accounting
//! (`pkg/controller/podautoscaler/replica_calculator.go`, docs/DESIGN.md §3).
//!
//! Each ready replica's agent answers with its verdict and its usage ratio — its own load over the target
//! utilisation. As in HPA, the Deployment's ratio is the mean over the ready replicas that answered, the tolerance
//! applies to that ratio before any rounding, and the new count is the ratio times the pods it was measured on,
//! rounded up: replicas that are not ready yet carried none of the load, so they do not multiply it.
//! - A scale-up counts replicas that did not answer, and pods not ready or still starting, as using 0 % of the
//!   target; a scale-down counts replicas that did not answer as using 100 % and leaves unready pods out. If that
//!   moves the ratio into the tolerance band, or across 1, nothing changes.
//! - rootscale's rule gates the direction: only a majority of the ready replicas saying `root-cause` or
//!   `saturated` scales up (a hot replica that is not the bottleneck is not scaled), and only replicas that all
//!   say `idle` scale down.

/// A replica's verdict, as its agent gave it: the agents' own type.
pub use rootscale_tracer::decide::Verdict;

/// One ready replica's answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Advice {
    pub verdict: Verdict,
    /// The replica's utilisation over the target utilisation (HPA's usage ratio): 1 is on target.
    pub usage_ratio: f64,
}

/// A Deployment's pods, grouped as HPA groups them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pods<'a> {
    /// One entry per ready replica that was asked: its answer, or `None` when it gave none (missing).
    pub ready: &'a [Option<Advice>],
    /// Pods that exist but are not ready, or became ready too recently for their agent's window to show their
    /// load: 0 % on a scale-up, left out of a scale-down.
    pub unready: u32,
}

/// What the pods say together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Combined {
    /// The count the pods ask for (before HPA's behaviour); `current` when they ask for no change.
    pub desired: u32,
    pub reason: String,
}

/// Largest count a recommendation may reach; anything above is clamped (the bounds come later anyway).
const MAX_RECOMMENDED: f64 = 100_000.0;

/// Combines the answers of the pods of a Deployment that has `current` replicas (its spec), with `tolerance` on
/// the usage ratio (HPA: 0.1).
pub fn combine(current: u32, tolerance: f64, pods: Pods<'_>) -> Combined {
    let hold = |reason: String| Combined { desired: current, reason };
    let known: Vec<Advice> =
        pods.ready.iter().flatten().copied().filter(|advice| advice.verdict != Verdict::InsufficientData).collect();
    let missing = pods.ready.len() - known.len();
    if known.is_empty() {
        return hold(format!("none of {} ready replicas gave a usable answer", pods.ready.len()));
    }
    let sum: f64 = known.iter().map(|advice| advice.usage_ratio).sum();
    let ratio = sum / known.len() as f64;
    let pressing = known.iter().filter(|a| matches!(a.verdict, Verdict::RootCause | Verdict::Saturated)).count();
    let within = |ratio: f64| (ratio - 1.0).abs() <= tolerance + 1e-9;
    let measured = format!("usage {:.0}% of target over {} replica(s)", ratio * 100.0, known.len());
    let scale_up = ratio > 1.0 && pressing * 2 > pods.ready.len();
    let scale_down = ratio < 1.0 && known.iter().all(|a| a.verdict == Verdict::Idle);
    if !scale_up && !scale_down {
        let why = if ratio > 1.0 {
            format!("{pressing} of {} ready replicas say root-cause or saturated: no majority", pods.ready.len())
        } else if ratio < 1.0 {
            "not every replica is idle".to_string()
        } else {
            "on target".to_string()
        };
        return hold(format!("{measured}; {why}"));
    }
    // HPA: missing pods count as 100 % on the way down, 0 % on the way up; unready pods 0 % on the way up.
    let (filled_sum, counted) = if scale_up {
        (sum, known.len() + missing + pods.unready as usize)
    } else {
        (sum + missing as f64, known.len() + missing)
    };
    let filled = filled_sum / counted as f64;
    // Every pod that counts answered: the ratio stands as measured.
    let all_answered = missing == 0 && (scale_down || pods.unready == 0);
    if all_answered {
        if within(ratio) {
            return hold(format!("{measured}; within the {:.0}% tolerance", tolerance * 100.0));
        }
    } else if within(filled) || (ratio > 1.0) != (filled > 1.0) {
        return hold(format!(
            "{measured}; {:.0}% counting {missing} unanswered and {} unready pod(s): within the tolerance",
            filled * 100.0,
            if scale_up { pods.unready } else { 0 },
        ));
    }
    let recommended = (filled * counted as f64 - 1e-9).ceil().clamp(1.0, MAX_RECOMMENDED) as u32;
    // A ratio above 1 never asks for fewer, below 1 never for more.
    if (scale_up && recommended < current) || (scale_down && recommended > current) {
        return hold(format!("{measured}; {recommended} replicas would go the other way"));
    }
    let counted_note = if counted == known.len() { String::new() } else { format!(" (counting {counted} pods)") };
    let direction = if scale_up { "root-cause or saturated" } else { "idle" };
    Combined {
        desired: recommended,
        reason: format!(
            "{pressing_or_all} of {} ready replicas {direction}; {measured}{counted_note}: {recommended} replicas",
            pods.ready.len(),
            pressing_or_all = if scale_up { pressing } else { known.len() },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advice(verdict: Verdict, usage_ratio: f64) -> Option<Advice> {
        Some(Advice { verdict, usage_ratio })
    }

    /// (name, current, ready answers, unready pods, expected desired)
    type Case = (&'static str, u32, Vec<Option<Advice>>, u32, u32);

    #[test]
    fn the_table() {
        use Verdict::*;
        let cases: Vec<Case> = vec![
            (
                "1.07x holds (tolerance before rounding)",
                2,
                vec![advice(RootCause, 1.07), advice(RootCause, 1.07)],
                0,
                2,
            ),
            ("1.11x scales", 2, vec![advice(RootCause, 1.11), advice(RootCause, 1.11)], 0, 3),
            (
                "the mean over every ready replica",
                3,
                vec![advice(RootCause, 2.0), advice(RootCause, 3.0), advice(Healthy, 1.0)],
                0,
                6,
            ),
            (
                "minority root-cause: no change",
                3,
                vec![advice(RootCause, 3.0), advice(Healthy, 1.0), advice(Healthy, 1.0)],
                0,
                3,
            ),
            ("saturated counts like root-cause", 2, vec![advice(Saturated, 2.0), advice(Saturated, 2.0)], 0, 4),
            ("hot but healthy: not the bottleneck", 2, vec![advice(Healthy, 3.0), advice(Healthy, 3.0)], 0, 2),
            // 2 ready at 2x, 2 new pods not ready: (2 + 2 + 0 + 0) / 4 = 1.0, inside the band — no second step.
            ("unready pods count 0 on the way up", 4, vec![advice(RootCause, 2.0), advice(RootCause, 2.0)], 2, 4),
            (
                "still hot with unready pods: scale by all pods",
                4,
                vec![advice(RootCause, 4.0), advice(RootCause, 4.0)],
                2,
                8,
            ),
            (
                "missing answers count 0 on the way up and against the majority",
                4,
                vec![advice(RootCause, 3.0), advice(RootCause, 3.0), None],
                0,
                6,
            ),
            (
                "missing answers break a majority",
                4,
                vec![advice(RootCause, 3.0), advice(RootCause, 3.0), None, None],
                0,
                4,
            ),
            (
                "all idle: down to the ratio",
                4,
                vec![advice(Idle, 0.4), advice(Idle, 0.4), advice(Idle, 0.4), advice(Idle, 0.4)],
                0,
                2,
            ),
            (
                "one not idle: no scale-down",
                4,
                vec![advice(Idle, 0.2), advice(Idle, 0.2), advice(Healthy, 0.9), advice(Idle, 0.2)],
                0,
                4,
            ),
            // (0.2 + 0.2 + 1.0) / 3 = 0.47: ceil(0.47 × 3) = 2.
            ("missing answers count 100% on the way down", 4, vec![advice(Idle, 0.2), advice(Idle, 0.2), None], 0, 2),
            ("unready pods are left out of a scale-down", 4, vec![advice(Idle, 0.25), advice(Idle, 0.25)], 2, 1),
            ("insufficient-data is missing", 2, vec![advice(Idle, 0.5), advice(InsufficientData, 0.0)], 0, 2),
            ("no answers at all", 2, vec![], 0, 2),
            ("only missing answers", 2, vec![None, None], 0, 2),
            (
                "root-cause under target never asks for fewer",
                5,
                vec![advice(RootCause, 0.5), advice(RootCause, 0.5)],
                0,
                5,
            ),
        ];
        for (name, current, ready, unready, desired) in cases {
            let combined = combine(current, 0.1, Pods { ready: &ready, unready });
            assert_eq!(combined.desired, desired, "{name}: {}", combined.reason);
        }
    }
}
