//! What happens during a run: the load's rate over time and the faults injected on a schedule, as written on the
//! command line (`--rate 100,300@20s`, `--inject catalog=cpu:4@15s`, a fault that ends: `catalog=cpu:4@15s-45s`)
//! or in a topology's `demo:` section.

use std::{fmt, str::FromStr, time::Duration};

use crate::local::topology::valid_name;

/// The longest run, and so the latest time anything may be scheduled.
pub const MAX_TIME: Duration = Duration::from_secs(3600);

/// What a fault does to a service.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultKind {
    /// Each replica's worker pool shrinks to 1/factor of its slots (at least one).
    Capacity(f64),
    /// Each request needs factor times the CPU time.
    Cpu(f64),
    /// Every call into the service takes this much longer on the way in (outside the service's own clock).
    Link(Duration),
}

/// `SERVICE=KIND:FACTOR@TIME`, or `SERVICE=KIND:FACTOR@FROM-UNTIL` for a fault that ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub service: String,
    pub kind: FaultKind,
    /// When, from the start of the load.
    pub at: Duration,
    /// When it ends, if it does.
    pub until: Option<Duration>,
}

impl Fault {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            FaultKind::Capacity(_) => "capacity",
            FaultKind::Cpu(_) => "cpu",
            FaultKind::Link(_) => "link",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match self.kind {
            FaultKind::Capacity(factor) | FaultKind::Cpu(factor) => format!("{factor}"),
            FaultKind::Link(delay) => humantime::format_duration(delay).to_string(),
        };
        write!(f, "{}={}:{}@{}", self.service, self.kind_name(), value, humantime::format_duration(self.at))?;
        match self.until {
            Some(until) => write!(f, "-{}", humantime::format_duration(until)),
            None => Ok(()),
        }
    }
}

fn time(text: &str, what: &str) -> Result<Duration, String> {
    let parsed =
        humantime::parse_duration(text.trim()).map_err(|e| format!("{what} `{text}` is not a time like 15s ({e})"))?;
    if parsed > MAX_TIME {
        return Err(format!("{what} {text} is after the longest run ({MAX_TIME:?})"));
    }
    Ok(parsed)
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let shape =
            "expected SERVICE=KIND:VALUE@TIME or @FROM-UNTIL, e.g. catalog=cpu:4@15s or payments=link:30ms@20s-50s";
        let (service, rest) = text.split_once('=').ok_or_else(|| format!("fault `{text}`: {shape}"))?;
        let (what, at) = rest.split_once('@').ok_or_else(|| format!("fault `{text}`: no @TIME; {shape}"))?;
        let (kind, value) = what.split_once(':').ok_or_else(|| format!("fault `{text}`: no :VALUE; {shape}"))?;
        if !valid_name(service) {
            return Err(format!("fault `{text}`: `{service}` is not a service name"));
        }
        let factor = || -> Result<f64, String> {
            let factor: f64 = value.parse().map_err(|_| format!("fault `{text}`: factor `{value}` is not a number"))?;
            if !(factor.is_finite() && factor > 1.0 && factor <= 100.0) {
                return Err(format!("fault `{text}`: factor {factor} is not in (1, 100]"));
            }
            Ok(factor)
        };
        let kind = match kind {
            "capacity" => FaultKind::Capacity(factor()?),
            "cpu" => FaultKind::Cpu(factor()?),
            "link" => {
                let delay = time(value, "link delay").map_err(|e| format!("fault `{text}`: {e}"))?;
                if delay.is_zero() || delay > Duration::from_secs(10) {
                    return Err(format!("fault `{text}`: link delay {value} is not in (0, 10s]"));
                }
                FaultKind::Link(delay)
            }
            other => return Err(format!("fault `{text}`: unknown kind `{other}` (capacity, cpu, link)")),
        };
        let (at, until) = match at.split_once('-') {
            Some((from, until)) => (from, Some(until)),
            None => (at, None),
        };
        let at = time(at, "fault time").map_err(|e| format!("fault `{text}`: {e}"))?;
        let until =
            until.map(|until| time(until, "fault end")).transpose().map_err(|e| format!("fault `{text}`: {e}"))?;
        if until.is_some_and(|until| until <= at) {
            return Err(format!("fault `{text}`: it must end after it starts"));
        }
        Ok(Fault { service: service.to_string(), kind, at, until })
    }
}

/// The load's rate over time: `150` (constant) or `100,300@20s,100@40s` (a rate, then changes at times).
#[derive(Clone, Debug, PartialEq)]
pub struct RateSchedule {
    /// (from, requests per second), sorted by time, the first at zero.
    pub steps: Vec<(Duration, f64)>,
}

impl RateSchedule {
    pub fn constant(rate: f64) -> Self {
        Self { steps: vec![(Duration::ZERO, rate)] }
    }

    /// The rate at `elapsed`.
    pub fn rate_at(&self, elapsed: Duration) -> f64 {
        self.steps.iter().take_while(|(from, _)| *from <= elapsed).last().map_or(0.0, |(_, rate)| *rate)
    }
}

impl FromStr for RateSchedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(',').collect();
        if parts.len() > 64 {
            return Err(format!("rate schedule has {} steps; at most 64", parts.len()));
        }
        let mut steps = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            let (rate, from) = match part.split_once('@') {
                Some((rate, at)) => (rate, time(at, "rate change time")?),
                None if index == 0 => (*part, Duration::ZERO),
                None => return Err(format!("rate step `{part}` needs @TIME (only the first may omit it)")),
            };
            let rate: f64 = rate.trim().parse().map_err(|_| format!("rate `{rate}` is not a number"))?;
            if !(rate.is_finite() && (0.0..=10_000.0).contains(&rate)) {
                return Err(format!("rate {rate} is not in [0, 10000] requests per second"));
            }
            if let Some((last, _)) = steps.last()
                && from <= *last
            {
                return Err(format!("rate step `{part}` is not after the one before it"));
            }
            steps.push((from, rate));
        }
        if steps.first().is_none_or(|(from, _)| !from.is_zero()) {
            return Err("the first rate must start at 0s".into());
        }
        Ok(Self { steps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_strictly() {
        let fault: Fault = "catalog=cpu:4@15s".parse().unwrap();
        assert_eq!(
            fault,
            Fault { service: "catalog".into(), kind: FaultKind::Cpu(4.0), at: Duration::from_secs(15), until: None }
        );
        assert_eq!(fault.to_string(), "catalog=cpu:4@15s");
        let ending: Fault = "catalog=capacity:3@15s-45s".parse().unwrap();
        assert_eq!((ending.at, ending.until), (Duration::from_secs(15), Some(Duration::from_secs(45))));
        assert_eq!(ending.to_string(), "catalog=capacity:3@15s-45s");
        let link: Fault = "db=link:30ms@1m".parse().unwrap();
        assert_eq!(link.kind, FaultKind::Link(Duration::from_millis(30)));
        for (bad, why) in [
            ("catalog", "expected SERVICE=KIND"),
            ("catalog=cpu:4", "no @TIME"),
            ("catalog=cpu@4s", "no :VALUE"),
            ("Catalog=cpu:4@1s", "not a service name"),
            ("catalog=cpu:0.5@1s", "not in (1, 100]"),
            ("catalog=cpu:NaN@1s", "not in (1, 100]"),
            ("catalog=cpu:x@1s", "not a number"),
            ("catalog=heat:2@1s", "unknown kind `heat`"),
            ("catalog=link:2@1s", "not a time"),
            ("catalog=cpu:2@2h", "after the longest run"),
            ("catalog=cpu:2@20s-10s", "end after it starts"),
            ("catalog=cpu:2@20s-soon", "fault end `soon`"),
        ] {
            let error = bad.parse::<Fault>().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn rate_schedules() {
        let schedule: RateSchedule = "100,300@20s,50@40s".parse().unwrap();
        assert_eq!(schedule.rate_at(Duration::from_secs(5)), 100.0);
        assert_eq!(schedule.rate_at(Duration::from_secs(20)), 300.0);
        assert_eq!(schedule.rate_at(Duration::from_secs(59)), 50.0);
        assert_eq!("150".parse::<RateSchedule>().unwrap(), RateSchedule::constant(150.0));
        for (bad, why) in [
            ("100,300", "needs @TIME"),
            ("100@5s", "start at 0s"),
            ("100,300@20s,50@10s", "not after"),
            ("-1", "not in [0, 10000]"),
            ("fast", "not a number"),
        ] {
            let error = bad.parse::<RateSchedule>().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
