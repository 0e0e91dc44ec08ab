//! HPA's `behavior`, with the same shape and defaults (autoscaling/v2): per direction a stabilisation window,
//! rate policies of type Pods or Percent over a period, and which policy to select.

use std::time::Duration;

use crate::Error;

/// A rate policy: at most `value` pods, or `value` percent of the replicas at the start of the period, per
/// `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: u32,
    pub period: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Pods,
    Percent,
}

/// Which policy wins when several apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Select {
    /// The policy that allows the largest change (HPA's default).
    #[default]
    Max,
    /// The policy that allows the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// One direction's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub stabilization_window: Duration,
    pub select: Select,
    pub policies: Vec<ScalingPolicy>,
}

/// Both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behavior {
    pub scale_up: Rules,
    pub scale_down: Rules,
}

impl Default for Behavior {
    /// HPA's defaults: scale up by max(+100 %, +4 pods) every 15 s with no stabilisation; scale down by up to
    /// 100 % every 15 s after 5 minutes of stabilisation.
    fn default() -> Self {
        let period = Duration::from_secs(15);
        Self {
            scale_up: Rules {
                stabilization_window: Duration::ZERO,
                select: Select::Max,
                policies: vec![
                    ScalingPolicy { kind: PolicyKind::Pods, value: 4, period },
                    ScalingPolicy { kind: PolicyKind::Percent, value: 100, period },
                ],
            },
            scale_down: Rules {
                stabilization_window: Duration::from_secs(300),
                select: Select::Max,
                policies: vec![ScalingPolicy { kind: PolicyKind::Percent, value: 100, period }],
            },
        }
    }
}

impl Behavior {
    /// HPA's limits: stabilisation up to 1 hour, periods 1 s to 30 min, values above 0.
    pub fn validate(&self) -> Result<(), Error> {
        for (direction, rules) in [("scale-up", &self.scale_up), ("scale-down", &self.scale_down)] {
            if rules.stabilization_window > Duration::from_secs(3600) {
                return Err(Error::InvalidConfig(format!("{direction} stabilisation window over 1h")));
            }
            for policy in &rules.policies {
                if policy.value == 0 {
                    return Err(Error::InvalidConfig(format!("{direction} policy with value 0")));
                }
                if policy.period < Duration::from_secs(1) || policy.period > Duration::from_secs(1800) {
                    return Err(Error::InvalidConfig(format!("{direction} policy period outside 1s..30m")));
                }
            }
            if rules.policies.is_empty() && rules.select != Select::Disabled {
                return Err(Error::InvalidConfig(format!("{direction} has no policies")));
            }
        }
        Ok(())
    }
}
