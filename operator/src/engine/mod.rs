//! The decision engine: from one recommendation per ready replica to a new replica count, with HPA's behaviour.
//!
//! 1. [`combine`]: the replicas' answers become one desired count. A root-cause or saturated majority scales up
//!    by the summed demand; a scale-down needs every replica idle; missing answers never allow a scale-down.
//! 2. [`Engine::decide`]: HPA's rules on top — no change inside the tolerance band, stabilisation (the highest
//!    recent recommendation before scaling down, the lowest before scaling up), rate policies of type Pods or
//!    Percent over their periods with select Max / Min / Disabled, and min/max bounds.
//! 3. [`ScaleTarget`]: what the engine drives — a Deployment's `/scale` here, local replicas in the demo.

mod behavior;
mod combine;
mod decide;
mod target;

pub use behavior::{Behavior, PolicyKind, Rules, ScalingPolicy, Select};
pub use combine::{Advice, Combined, Verdict, combine};
pub use decide::{Engine, Limit, Outcome, TargetConfig};
pub use target::ScaleTarget;
