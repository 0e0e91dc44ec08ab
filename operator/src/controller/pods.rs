//! Which pods of a Deployment to ask: those its label selector matches, grouped as HPA groups them —
//! ready ones (asked), unready or starting ones (counted) — with their agents' addresses.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::core::Selector;

/// The Deployment's selector, or `None` if it has none or cannot be read (a Deployment without a selector is
/// invalid; never select every pod in the namespace).
pub fn selector(deployment: &Deployment) -> Option<Selector> {
    let selector = &deployment.spec.as_ref()?.selector;
    let empty = selector.match_labels.as_ref().is_none_or(|labels| labels.is_empty())
        && selector.match_expressions.as_ref().is_none_or(|expressions| expressions.is_empty());
    if empty {
        return None;
    }
    Selector::try_from(selector.clone()).ok()
}

/// A pod whose Ready condition turned true this recently, within its start-up, is still starting: its agent's
/// window may cover time before it served anything (HPA's initial readiness delay).
pub const STARTING_READY_FOR: Duration = Duration::from_secs(30);
/// How long after its start a pod may still be starting (HPA's CPU initialisation period).
pub const STARTUP_PERIOD: Duration = Duration::from_secs(300);

/// A Deployment's pods as HPA groups them for a recommendation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodGroups {
    /// Ready pods (Running, `Ready=True`, not starting, with an IP) and their agents' addresses: the ones asked.
    pub ready: Vec<(String, SocketAddr)>,
    /// Pods that exist but are not ready, or still starting: 0 % of the target on a scale-up.
    pub unready: u32,
}

/// Groups `pods` at `now`: pods being deleted and pods that have ended (Failed, Succeeded) are left out.
pub fn group(pods: &[&Pod], agent_port: u16, now: Timestamp) -> PodGroups {
    let mut groups = PodGroups::default();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(status) = pod.status.as_ref() else {
            groups.unready += 1;
            continue;
        };
        if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
            continue;
        }
        let running = status.phase.as_deref() == Some("Running");
        let ready = status.conditions.iter().flatten().find(|c| c.type_ == "Ready" && c.status == "True");
        let ip: Option<IpAddr> = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok());
        let since = |time: Option<&Time>| time.map(|t| now.duration_since(t.0).unsigned_abs());
        let starting = ready.is_some_and(|ready| {
            let started_ago = since(status.start_time.as_ref());
            let ready_ago = since(ready.last_transition_time.as_ref());
            started_ago.is_some_and(|ago| ago < STARTUP_PERIOD) && ready_ago.is_some_and(|ago| ago < STARTING_READY_FOR)
        });
        match ip {
            Some(ip) if running && ready.is_some() && !starting => {
                groups.ready.push((pod.metadata.name.clone().unwrap_or_default(), SocketAddr::new(ip, agent_port)));
            }
            _ => groups.unready += 1,
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::DeploymentSpec,
            core::v1::{PodCondition, PodStatus},
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta, Time},
    };

    use super::*;

    fn at(seconds_ago: i64) -> Option<Time> {
        Some(Time(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(seconds_ago)))
    }

    /// A pod started `started` seconds ago whose Ready condition last changed `ready_for` seconds ago.
    fn pod(
        name: &str,
        phase: &str,
        ready: &str,
        ip: Option<&str>,
        deleting: bool,
        started: i64,
        ready_for: i64,
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                start_time: at(started),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_transition_time: at(ready_for),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pods_are_grouped_as_hpa_groups_them() {
        let old = 3600;
        let pods = [
            pod("ready", "Running", "True", Some("127.0.0.5"), false, old, old),
            pod("not-ready", "Running", "False", Some("127.0.0.6"), false, old, 10),
            pod("pending", "Pending", "False", None, false, 5, 5),
            pod("no-ip", "Running", "True", None, false, old, old),
            pod("bad-ip", "Running", "True", Some("not-an-ip"), false, old, old),
            pod("terminating", "Running", "True", Some("127.0.0.8"), true, old, old),
            pod("failed", "Failed", "False", Some("127.0.0.9"), false, old, old),
            pod("v6", "Running", "True", Some("::ffff:127.0.0.12"), false, old, old),
            // Ready 10 s ago, 20 s after its start: still starting. Ready 10 s ago an hour after its start (it came
            // back from a failed probe): not starting, its agent has been counting all along.
            pod("starting", "Running", "True", Some("127.0.0.10"), false, 30, 10),
            pod("came-back", "Running", "True", Some("127.0.0.11"), false, old, 10),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let groups = group(&refs, 9797, Timestamp::now());
        let names: Vec<String> = groups.ready.iter().map(|(name, addr)| format!("{name}@{addr}")).collect();
        assert_eq!(names, ["ready@127.0.0.5:9797", "v6@[::ffff:127.0.0.12]:9797", "came-back@127.0.0.11:9797"]);
        // not-ready, pending, no-ip, bad-ip, starting.
        assert_eq!(groups.unready, 5);
    }

    #[test]
    fn the_selector_matches_labels_and_expressions() {
        use kube::core::SelectorExt;
        let expression = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "checkout".to_string())].into()),
                    match_expressions: Some(vec![
                        expression("tier", "In", &["web", "api"]),
                        expression("canary", "DoesNotExist", &[]),
                        expression("zone", "NotIn", &["b"]),
                    ]),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let matching = selector(&deployment).unwrap();
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(matching.matches(&labels(&[("app", "checkout"), ("tier", "api"), ("zone", "a")])));
        assert!(!matching.matches(&labels(&[("app", "checkout"), ("tier", "db")])), "In");
        assert!(!matching.matches(&labels(&[("app", "checkout"), ("tier", "web"), ("canary", "1")])), "DoesNotExist");
        assert!(!matching.matches(&labels(&[("app", "checkout"), ("tier", "web"), ("zone", "b")])), "NotIn");
        assert!(!matching.matches(&labels(&[("app", "cart"), ("tier", "web")])), "matchLabels");
        if let Some(spec) = deployment.spec.as_mut() {
            spec.selector = LabelSelector::default();
        }
        assert!(selector(&deployment).is_none(), "an empty selector must not select every pod");
    }
}
