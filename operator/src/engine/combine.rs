//! From one answer per ready replica to one desired count for the Deployment.
//!
//! Every replica answers for the whole Deployment, as if each replica carried its load (docs/DESIGN.md §1.5), so the
//! Deployment's demand is the mean of the answers: the replicas' shares summed.

/// A replica's verdict, as its agent gave it: the agents' own type.
pub use rootscale_tracer::decide::Verdict;

/// One replica's answer; `None` in the slice given to [`combine`] means its agent could not be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advice {
    pub verdict: Verdict,
    /// Replicas the Deployment needs, by this replica's load.
    pub desired_replicas: u32,
}

/// What the replicas say together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Combined {
    /// The count the replicas ask for (before HPA's behaviour); `current` when they ask for no change.
    pub desired: u32,
    /// Some answers were missing or `insufficient-data`: never scale down.
    pub missing_data: bool,
    pub reason: String,
}

/// Combines the answers of the ready replicas of a Deployment that has `current` replicas.
pub fn combine(current: u32, answers: &[Option<Advice>]) -> Combined {
    let known: Vec<Advice> =
        answers.iter().flatten().copied().filter(|advice| advice.verdict != Verdict::InsufficientData).collect();
    let missing = answers.len() - known.len();
    let missing_data = missing > 0 || answers.is_empty();
    let mean_demand = |advices: &[Advice]| -> u32 {
        let sum: u64 = advices.iter().map(|a| u64::from(a.desired_replicas)).sum();
        u32::try_from(sum.div_ceil(advices.len().max(1) as u64)).unwrap_or(u32::MAX)
    };
    let pressing: Vec<Advice> =
        known.iter().copied().filter(|a| matches!(a.verdict, Verdict::RootCause | Verdict::Saturated)).collect();
    // A majority of all ready replicas (missing ones count against it).
    if !answers.is_empty() && pressing.len() * 2 > answers.len() {
        let desired = mean_demand(&pressing).max(current);
        return Combined {
            desired,
            missing_data,
            reason: format!(
                "{} of {} replicas say root-cause or saturated; their demand is {desired} replicas",
                pressing.len(),
                answers.len()
            ),
        };
    }
    if !missing_data && known.iter().all(|a| a.verdict == Verdict::Idle) {
        let desired = mean_demand(&known).min(current);
        return Combined {
            desired,
            missing_data,
            reason: format!("all {} replicas are idle; their demand is {desired} replicas", known.len()),
        };
    }
    let reason = if missing_data {
        format!("{missing} of {} replicas gave no usable answer", answers.len())
    } else {
        "no majority for a change".to_string()
    };
    Combined { desired: current, missing_data, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advice(verdict: Verdict, desired: u32) -> Option<Advice> {
        Some(Advice { verdict, desired_replicas: desired })
    }

    /// (name, current replicas, answers, expected desired, expected missing data)
    type Case = (&'static str, u32, Vec<Option<Advice>>, u32, bool);

    #[test]
    fn the_table() {
        use Verdict::*;
        let cases: Vec<Case> = vec![
            (
                "majority root-cause: mean demand",
                3,
                vec![advice(RootCause, 6), advice(RootCause, 9), advice(Healthy, 3)],
                8,
                false,
            ),
            (
                "minority root-cause: no change",
                3,
                vec![advice(RootCause, 9), advice(Healthy, 3), advice(Healthy, 3)],
                3,
                false,
            ),
            ("saturated counts like root-cause", 2, vec![advice(Saturated, 4), advice(Saturated, 4)], 4, false),
            (
                "missing answers count against a majority",
                4,
                vec![advice(RootCause, 8), advice(RootCause, 8), None, None],
                4,
                true,
            ),
            ("scale up despite a missing answer", 3, vec![advice(RootCause, 6), advice(RootCause, 6), None], 6, true),
            (
                "all idle: scale down to their demand",
                4,
                vec![advice(Idle, 2), advice(Idle, 1), advice(Idle, 2), advice(Idle, 2)],
                2,
                false,
            ),
            (
                "one not idle: no scale-down",
                4,
                vec![advice(Idle, 1), advice(Idle, 1), advice(Healthy, 4), advice(Idle, 1)],
                4,
                false,
            ),
            ("idle but one missing: no scale-down", 3, vec![advice(Idle, 1), advice(Idle, 1), None], 3, true),
            ("insufficient-data is missing data", 2, vec![advice(Idle, 1), advice(InsufficientData, 2)], 2, true),
            ("no answers at all", 2, vec![], 2, true),
            ("root-cause never asks for fewer", 5, vec![advice(RootCause, 2), advice(RootCause, 2)], 5, false),
        ];
        for (name, current, answers, desired, missing) in cases {
            let combined = combine(current, &answers);
            assert_eq!((combined.desired, combined.missing_data), (desired, missing), "{name}: {}", combined.reason);
        }
    }
}
