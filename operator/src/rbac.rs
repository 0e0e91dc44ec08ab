//! Every Kubernetes API call the operator makes, and where. The Helm chart grants exactly these (CI renders the
//! chart and compares its rules with `rootscale-operator api-calls`), and the end-to-end test checks that the
//! operator made no call outside this list.

/// (API group, resource, verb, who makes it).
pub const API_CALLS: &[(&str, &str, &str, &str)] = &[
    ("apps", "deployments", "list", "the controller's watcher (run.rs)"),
    ("apps", "deployments", "watch", "the controller's watcher (run.rs)"),
    ("apps", "deployments/scale", "get", "reconcile: the current replicas again after a conflicting write"),
    ("apps", "deployments/scale", "patch", "reconcile: the new replicas"),
    ("", "pods", "list", "the pods' watch: which pods to ask (run.rs)"),
    ("", "pods", "watch", "the pods' watch: which pods to ask (run.rs)"),
    ("autoscaling", "horizontalpodautoscalers", "list", "the HPAs' watch: another autoscaler on a Deployment (run.rs)"),
    (
        "autoscaling",
        "horizontalpodautoscalers",
        "watch",
        "the HPAs' watch: another autoscaler on a Deployment (run.rs)",
    ),
    ("events.k8s.io", "events", "create", "reconcile: Events on the Deployment"),
    ("events.k8s.io", "events", "patch", "kube's Recorder: a repeated Event's series"),
    ("rootscale.dev", "scalingdecisions", "list", "the decisions' watch: the previous status (run.rs)"),
    ("rootscale.dev", "scalingdecisions", "watch", "the decisions' watch: the previous status (run.rs)"),
    ("rootscale.dev", "scalingdecisions", "create", "reconcile: server-side apply of a new ScalingDecision"),
    ("rootscale.dev", "scalingdecisions", "patch", "reconcile: server-side apply"),
    ("rootscale.dev", "scalingdecisions/status", "patch", "reconcile: server-side apply of the status"),
    ("coordination.k8s.io", "leases", "get", "leader election (kube-lease-manager)"),
    ("coordination.k8s.io", "leases", "create", "leader election (kube-lease-manager)"),
    ("coordination.k8s.io", "leases", "patch", "leader election (kube-lease-manager)"),
    ("coordination.k8s.io", "leases", "list", "the Lease's watch: the fence on every write (leadership.rs)"),
    ("coordination.k8s.io", "leases", "watch", "the Lease's watch: the fence on every write (leadership.rs)"),
];

/// Calls on the list that a short test run may not make: they happen only in circumstances the tests do not
/// reach (an Event repeated within five minutes, a write that meets a change made since the read).
pub const RARE_CALLS: &[(&str, &str, &str)] =
    &[("events.k8s.io", "events", "patch"), ("apps", "deployments/scale", "get")];

/// The call an HTTP request to the API is: (group, resource with subresource, verb).
pub fn classify(method: &str, path_and_query: &str) -> Option<(String, String, String)> {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match *parts.first()? {
        "api" => ("", parts.get(2..)?),
        "apis" => (*parts.get(1)?, parts.get(3..)?),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let resource = match rest {
        [resource] | [resource, _] => resource.to_string(),
        [resource, _, subresource] => format!("{resource}/{subresource}"),
        _ => return None,
    };
    let named = rest.len() >= 2;
    let verb = match (method, named) {
        ("GET", false) if query.split('&').any(|p| p == "watch=true") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    Some((group.to_string(), resource, verb.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_calls() {
        let cases = [
            (
                "GET",
                "/apis/apps/v1/namespaces/shop/deployments?&watch=true&resourceVersion=5",
                ("apps", "deployments", "watch"),
            ),
            ("GET", "/apis/apps/v1/namespaces/shop/deployments?&limit=500", ("apps", "deployments", "list")),
            ("PATCH", "/apis/apps/v1/namespaces/shop/deployments/web/scale", ("apps", "deployments/scale", "patch")),
            ("GET", "/api/v1/namespaces/shop/pods?&labelSelector=app%3Dweb", ("", "pods", "list")),
            ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", ("events.k8s.io", "events", "create")),
            (
                "PATCH",
                "/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web/status?&force=true",
                ("rootscale.dev", "scalingdecisions/status", "patch"),
            ),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases/rootscale-operator",
                ("coordination.k8s.io", "leases", "get"),
            ),
        ];
        for (method, path, (group, resource, verb)) in cases {
            assert_eq!(classify(method, path), Some((group.into(), resource.into(), verb.into())), "{method} {path}");
        }
    }
}
