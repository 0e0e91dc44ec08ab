//! The annotations a user puts on a Deployment (docs/DESIGN.md §3), parsed strictly. A bad value is an error
//! that names the key, the value and what was expected; the controller then leaves that Deployment alone and
//! reports it (a Warning Event `InvalidAnnotation`), and every other Deployment goes on.

use std::{collections::BTreeMap, time::Duration};

use crate::engine::{Behavior, TargetConfig};

/// The annotation and API-group prefix.
pub const PREFIX: &str = "rootscale.dev/";

const ENABLED: &str = "rootscale.dev/enabled";
const MIN_REPLICAS: &str = "rootscale.dev/min-replicas";
const MAX_REPLICAS: &str = "rootscale.dev/max-replicas";
const SLO_LATENCY: &str = "rootscale.dev/slo-latency";
const SLO_PERCENTILE: &str = "rootscale.dev/slo-percentile";
const MODE: &str = "rootscale.dev/mode";
const PAUSED: &str = "rootscale.dev/paused";
const AGENT_PORT: &str = "rootscale.dev/agent-port";
const SCALE_DOWN_STABILIZATION: &str = "rootscale.dev/scale-down-stabilization";
const TARGET_UTILIZATION: &str = "rootscale.dev/target-utilization";

const KNOWN: [&str; 10] = [
    ENABLED,
    MIN_REPLICAS,
    MAX_REPLICAS,
    SLO_LATENCY,
    SLO_PERCENTILE,
    MODE,
    PAUSED,
    AGENT_PORT,
    SCALE_DOWN_STABILIZATION,
    TARGET_UTILIZATION,
];

/// Largest replica count accepted.
const MAX_REPLICAS_LIMIT: u32 = 10_000;

/// A bad annotation: which key, its value, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}={value:?}: {expected}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub expected: String,
}

fn bad(key: &str, value: &str, expected: &str) -> AnnotationError {
    // Values are echoed back in Events: keep them short.
    let value: String = value.chars().take(64).collect();
    AnnotationError { key: key.to_string(), value, expected: expected.to_string() }
}

/// `enforce` changes replicas; `recommend` is a dry run that records decisions only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Recommend,
}

/// A managed Deployment's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The entry service's SLO: latency at percentile.
    pub slo: Option<(Duration, f64)>,
    pub mode: Mode,
    pub paused: bool,
    pub agent_port: u16,
    pub scale_down_stabilization: Duration,
    /// Target utilisation, a fraction in (0, 1].
    pub target_utilization: f64,
}

impl Settings {
    /// The engine's view of these settings (HPA's default behaviour, with this scale-down window).
    pub fn target_config(&self) -> TargetConfig {
        let mut behavior = Behavior::default();
        behavior.scale_down.stabilization_window = self.scale_down_stabilization;
        TargetConfig { min_replicas: self.min_replicas, max_replicas: self.max_replicas, tolerance: 0.1, behavior }
    }
}

fn boolean(key: &str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value, "expected \"true\" or \"false\"")),
    }
}

fn replicas(key: &str, value: &str) -> Result<u32, AnnotationError> {
    let expected = format!("expected a whole number from 1 to {MAX_REPLICAS_LIMIT}");
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(key, value, &expected));
    }
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_REPLICAS_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad(key, value, &expected)),
    }
}

fn duration(key: &str, value: &str, max: Duration) -> Result<Duration, AnnotationError> {
    let expected = format!("expected a duration such as 200ms, 30s or 5m, at most {}", humantime::format_duration(max));
    match humantime::parse_duration(value) {
        Ok(parsed) if parsed <= max && !value.trim().is_empty() => Ok(parsed),
        _ => Err(bad(key, value, &expected)),
    }
}

/// Parses a Deployment's annotations. `Ok(None)`: not managed (`enabled` is absent or "false").
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<Settings>, AnnotationError> {
    let get = |key: &str| annotations.get(key).map(String::as_str);
    match get(ENABLED) {
        None => return Ok(None),
        Some(value) if !boolean(ENABLED, value)? => return Ok(None),
        Some(_) => {}
    }
    if let Some((key, value)) =
        annotations.iter().find(|(key, _)| key.starts_with(PREFIX) && !KNOWN.contains(&key.as_str()))
    {
        return Err(bad(key, value, &format!("not a rootscale annotation; known keys: {}", KNOWN.join(", "))));
    }
    let min_replicas = get(MIN_REPLICAS).map(|v| replicas(MIN_REPLICAS, v)).transpose()?.unwrap_or(1);
    let max_replicas = get(MAX_REPLICAS).map(|v| replicas(MAX_REPLICAS, v)).transpose()?.unwrap_or(10);
    if min_replicas > max_replicas {
        let value = get(MIN_REPLICAS).unwrap_or("1");
        return Err(bad(MIN_REPLICAS, value, &format!("must not exceed {MAX_REPLICAS} ({max_replicas})")));
    }
    let percentile = match get(SLO_PERCENTILE) {
        None => 95.0,
        Some(value) => match value.parse::<f64>() {
            Ok(p) if p.is_finite() && p > 0.0 && p <= 100.0 => p,
            _ => return Err(bad(SLO_PERCENTILE, value, "expected a percentile in (0, 100], such as 95 or 99.9")),
        },
    };
    let slo = match get(SLO_LATENCY) {
        None if get(SLO_PERCENTILE).is_some() => {
            return Err(bad(SLO_PERCENTILE, get(SLO_PERCENTILE).unwrap_or(""), "needs rootscale.dev/slo-latency too"));
        }
        None => None,
        Some(value) => {
            let latency = duration(SLO_LATENCY, value, Duration::from_secs(3600))?;
            if latency.is_zero() {
                return Err(bad(SLO_LATENCY, value, "expected a latency above zero"));
            }
            Some((latency, percentile))
        }
    };
    let mode = match get(MODE) {
        None | Some("enforce") => Mode::Enforce,
        Some("recommend") => Mode::Recommend,
        Some(value) => return Err(bad(MODE, value, "expected \"enforce\" or \"recommend\"")),
    };
    let paused = get(PAUSED).map(|v| boolean(PAUSED, v)).transpose()?.unwrap_or(false);
    let agent_port = match get(AGENT_PORT) {
        None => 9797,
        Some(value) => match value.parse::<u16>() {
            Ok(port) if port > 0 && value.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(bad(AGENT_PORT, value, "expected a port from 1 to 65535")),
        },
    };
    let scale_down_stabilization = get(SCALE_DOWN_STABILIZATION)
        .map(|v| duration(SCALE_DOWN_STABILIZATION, v, Duration::from_secs(3600)))
        .transpose()?
        .unwrap_or(Duration::from_secs(300));
    let target_utilization = match get(TARGET_UTILIZATION) {
        None => 0.7,
        Some(value) => {
            let parsed = match value.strip_suffix('%') {
                Some(percent) => percent.parse::<f64>().ok().map(|p| p / 100.0),
                None => value.parse::<f64>().ok(),
            };
            match parsed {
                Some(fraction) if fraction.is_finite() && fraction > 0.0 && fraction <= 1.0 => fraction,
                _ => {
                    return Err(bad(
                        TARGET_UTILIZATION,
                        value,
                        "expected a fraction in (0, 1] or a percentage, such as 0.7 or 70%",
                    ));
                }
            }
        }
    };
    Ok(Some(Settings {
        min_replicas,
        max_replicas,
        slo,
        mode,
        paused,
        agent_port,
        scale_down_stabilization,
        target_utilization,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_full_settings() {
        assert_eq!(parse(&annotations(&[])), Ok(None));
        assert_eq!(parse(&annotations(&[("enabled", "false"), ("max-replicas", "ten")])), Ok(None));
        let defaults = parse(&annotations(&[("enabled", "true")])).unwrap().unwrap();
        assert_eq!((defaults.min_replicas, defaults.max_replicas, defaults.agent_port), (1, 10, 9797));
        assert_eq!((defaults.mode, defaults.paused, defaults.slo), (Mode::Enforce, false, None));
        assert_eq!(defaults.scale_down_stabilization, Duration::from_secs(300));
        let full = parse(&annotations(&[
            ("enabled", "true"),
            ("min-replicas", "2"),
            ("max-replicas", "20"),
            ("slo-latency", "200ms"),
            ("slo-percentile", "99"),
            ("mode", "recommend"),
            ("paused", "true"),
            ("agent-port", "9000"),
            ("scale-down-stabilization", "2m"),
            ("target-utilization", "60%"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(full.slo, Some((Duration::from_millis(200), 99.0)));
        assert_eq!((full.mode, full.paused, full.agent_port), (Mode::Recommend, true, 9000));
        assert!((full.target_utilization - 0.6).abs() < 1e-9);
        let config = full.target_config();
        assert_eq!((config.min_replicas, config.max_replicas), (2, 20));
        assert_eq!(config.behavior.scale_down.stabilization_window, Duration::from_secs(120));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn bad_values_name_the_key_and_value() {
        let cases = [
            ("max-replicas", "ten", "rootscale.dev/max-replicas=\"ten\""),
            ("max-replicas", "0", "whole number"),
            ("max-replicas", "-3", "whole number"),
            ("mode", "yolo", "\"enforce\" or \"recommend\""),
            ("slo-latency", "fast", "duration"),
            ("slo-latency", "0ms", "above zero"),
            ("slo-percentile", "101", "percentile"),
            ("paused", "yes", "\"true\" or \"false\""),
            ("agent-port", "70000", "port"),
            ("scale-down-stabilization", "3h", "at most 1h"),
            ("target-utilization", "1.5", "fraction"),
            ("target-utilization", "NaN", "fraction"),
            ("max-replica", "5", "not a rootscale annotation"),
        ];
        for (key, value, expected) in cases {
            let mut pairs = vec![("enabled", "true"), ("slo-latency", "200ms")];
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let error = parse(&annotations(&pairs)).unwrap_err();
            assert!(error.to_string().contains(expected), "{key}={value}: {error}");
            assert!(error.key.ends_with(key) || key == "max-replica", "{error:?}");
        }
        let error =
            parse(&annotations(&[("enabled", "true"), ("min-replicas", "5"), ("max-replicas", "2")])).unwrap_err();
        assert!(error.to_string().contains("must not exceed"), "{error}");
        let error = parse(&annotations(&[("enabled", "maybe")])).unwrap_err();
        assert_eq!(error.key, "rootscale.dev/enabled");
    }
}
