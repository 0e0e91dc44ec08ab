//! The decision engine: from one recommendation per ready replica to a new replica count, with HPA's behaviour.
//!
//! 1. [`combine`]: the pods' answers become one recommended count, with HPA's pod accounting and its tolerance on
//!    the usage ratio. A root-cause or saturated majority scales up; a scale-down needs every answer idle.
//! 2. [`Engine::decide`]: HPA's rules on top — stabilisation (the highest recent recommendation before scaling
//!    down, the lowest before scaling up), rate policies of type Pods or Percent over their periods with select
//!    Max / Min / Disabled, and min/max bounds.
//! 3. [`ScaleTarget`]: what the engine drives — a Deployment's `/scale` here, local replicas in the demo.

mod behavior;
mod combine;
mod decide;
mod memory;
mod target;

pub use behavior::{Behavior, PolicyKind, Rules, ScalingPolicy, Select};
pub use combine::{Advice, Combined, Pods, Verdict, combine};
pub use decide::{Engine, Limit, MAX_SCALE_ATTEMPTS, Outcome, Run, TargetConfig};
pub use memory::{MAX_REMEMBERED, Memory, Remembered};
pub use target::ScaleTarget;
