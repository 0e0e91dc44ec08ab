//! Which pods of a Deployment to ask: its label selector as a list query, and its ready pods' agent addresses.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};

/// The Deployment's selector as a label-selector string for a list call, or `None` if it has none (a Deployment
/// without a selector is invalid; never select every pod in the namespace).
pub fn selector(deployment: &Deployment) -> Option<String> {
    let selector = &deployment.spec.as_ref()?.selector;
    let mut terms: Vec<String> =
        selector.match_labels.iter().flatten().map(|(key, value)| format!("{key}={value}")).collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        terms.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            "DoesNotExist" => format!("!{}", expression.key),
            _ => return None,
        });
    }
    (!terms.is_empty()).then(|| terms.join(","))
}

/// Ready pods (Running, condition `Ready=True`, not being deleted, with an IP) and their agents' addresses.
pub fn ready_agents(pods: &[Pod], agent_port: u16) -> Vec<(String, SocketAddr)> {
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let running = status.phase.as_deref() == Some("Running");
            let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
            let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
            (running && ready).then(|| (pod.metadata.name.clone().unwrap_or_default(), SocketAddr::new(ip, agent_port)))
        })
        .collect()
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

    fn pod(name: &str, phase: &str, ready: &str, ip: Option<&str>, deleting: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_running_pods_with_an_ip_are_asked() {
        let pods = [
            pod("ready", "Running", "True", Some("10.0.0.5"), false),
            pod("not-ready", "Running", "False", Some("10.0.0.6"), false),
            pod("pending", "Pending", "True", Some("10.0.0.7"), false),
            pod("no-ip", "Running", "True", None, false),
            pod("bad-ip", "Running", "True", Some("not-an-ip"), false),
            pod("terminating", "Running", "True", Some("10.0.0.8"), true),
            pod("v6", "Running", "True", Some("fd00::1"), false),
        ];
        let agents = ready_agents(&pods, 9797);
        let names: Vec<String> = agents.iter().map(|(name, addr)| format!("{name}@{addr}")).collect();
        assert_eq!(names, ["ready@10.0.0.5:9797", "v6@[fd00::1]:9797"]);
    }

    #[test]
    fn the_selector_becomes_a_list_query() {
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "checkout".to_string())].into()),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "tier".into(),
                        operator: "In".into(),
                        values: Some(vec!["web".into(), "api".into()]),
                    }]),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(selector(&deployment).as_deref(), Some("app=checkout,tier in (web,api)"));
        if let Some(spec) = deployment.spec.as_mut() {
            spec.selector = LabelSelector::default();
        }
        assert_eq!(selector(&deployment), None, "an empty selector must not select every pod");
    }
}
