//! `rootscale-proxy inject`: adds the sidecar to the workloads of a Kubernetes manifest, in the spirit of
//! `linkerd inject`. Every pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod) gets:
//!
//! - the proxy as a native sidecar (an init container with `restartPolicy: Always`, Kubernetes 1.29 and later),
//!   with the agent's and the proxy's settings, its ports, a readiness probe on the inbound port (not on the
//!   agent: the application's traffic must not wait on rootscale) and a locked-down security context;
//! - `HTTP_PROXY` / `NO_PROXY` (both spellings) on the application container, so its HTTP/1.1 calls go through the
//!   proxy;
//! - the application's port name moved to the proxy's inbound port, so Services that target the port by name reach
//!   the proxy first (a Service that targets the number must be changed by hand: `inject` says so);
//! - `rootscale.dev/enabled` and `rootscale.dev/agent-port` on the workload (unless already set), and
//!   `rootscale.dev/proxy: injected` on the pod template.
//!
//! Input is untrusted: bounded in size and documents, parsed strictly, and an error names the document and what was
//! wrong. Injecting twice changes nothing; a pod that already runs an agent on the agent's port is refused. Other
//! kinds pass through unchanged (comments are not kept).

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// The largest manifest read.
pub const MAX_INPUT_BYTES: usize = 4 * 1024 * 1024;
/// The most documents in one manifest.
pub const MAX_DOCUMENTS: usize = 1000;
/// The sidecar container's name.
pub const CONTAINER: &str = "rootscale-proxy";
/// The image `inject` uses unless told otherwise.
pub const DEFAULT_IMAGE: &str = "ghcr.io/rootscale/rootscale-proxy:0.1.0";
/// The proxy's inbound port in a pod.
pub const INBOUND_PORT: u16 = 4143;
/// The proxy's outbound (HTTP proxy) port in a pod.
pub const OUTBOUND_PORT: u16 = 4140;
/// The agent's port, as for a linked service.
pub const AGENT_PORT: u16 = 9797;

/// What to inject.
#[derive(Clone, Debug)]
pub struct Options {
    pub image: String,
    /// The application container, by name (default: the first container).
    pub container: Option<String>,
    /// The application's port (default: the container's first declared port).
    pub app_port: Option<u16>,
    /// `ROOTSCALE_PROXY_ROUTES` for the sidecar, if any.
    pub routes: Option<String>,
    /// The Secret holding the mesh key (key `mesh-key`), mounted into the sidecar, if any.
    pub mesh_key_secret: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self { image: DEFAULT_IMAGE.to_string(), container: None, app_port: None, routes: None, mesh_key_secret: None }
    }
}

/// The injected manifest, and warnings for the person running the command.
#[derive(Debug, Default)]
pub struct Injected {
    pub manifest: String,
    pub warnings: Vec<String>,
}

/// Injects the sidecar into every workload of `manifest`.
pub fn inject(manifest: &str, options: &Options) -> Result<Injected, String> {
    if manifest.len() > MAX_INPUT_BYTES {
        return Err(format!("the manifest is {} bytes; at most {MAX_INPUT_BYTES}", manifest.len()));
    }
    if let Some(routes) = &options.routes {
        crate::config::Routes::parse(routes).map_err(|e| format!("--route: {e}"))?;
    }
    let mut out = Injected::default();
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(manifest).enumerate() {
        if index >= MAX_DOCUMENTS {
            return Err(format!("more than {MAX_DOCUMENTS} documents"));
        }
        let mut value = Value::deserialize(document).map_err(|e| format!("document {}: {e}", index + 1))?;
        if value.is_null() {
            continue;
        }
        inject_document(&mut value, options, &mut out.warnings).map_err(|e| format!("document {}: {e}", index + 1))?;
        documents.push(serde_yaml::to_string(&value).map_err(|e| format!("document {}: {e}", index + 1))?);
    }
    out.manifest = documents.join("---\n");
    Ok(out)
}

fn key(name: &str) -> Value {
    Value::String(name.to_string())
}

/// The mapping at `path` under `value`, if every step is a mapping.
fn mapping_at<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Mapping> {
    let mut at = value;
    for step in path {
        at = at.as_mapping_mut()?.get_mut(*step)?;
    }
    at.as_mapping_mut()
}

/// The mapping at `key` in `map`, made if missing; an error if it is something else.
fn child<'a>(map: &'a mut Mapping, name: &str, what: &str) -> Result<&'a mut Mapping, String> {
    let entry = map.entry(key(name)).or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut().ok_or_else(|| format!("{what} is not a mapping"))
}

fn list<'a>(map: &'a mut Mapping, name: &str, what: &str) -> Result<&'a mut Vec<Value>, String> {
    let entry = map.entry(key(name)).or_insert_with(|| Value::Sequence(Vec::new()));
    if entry.is_null() {
        *entry = Value::Sequence(Vec::new());
    }
    entry.as_sequence_mut().ok_or_else(|| format!("{what} is not a list"))
}

fn inject_document(document: &mut Value, options: &Options, warnings: &mut Vec<String>) -> Result<(), String> {
    let kind = document.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let name =
        document.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("(unnamed)").to_string();
    let template: &[&str] = match kind.as_str() {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "Pod" => &[],
        _ => return Ok(()),
    };
    let what = format!("{kind} {name}");
    let pod = if template.is_empty() { document.as_mapping_mut() } else { mapping_at(document, template) }
        .ok_or_else(|| format!("{what} has no pod template"))?;
    let injected = inject_pod(pod, &name, options, warnings).map_err(|e| format!("{what}: {e}"))?;
    if injected && kind != "Pod" {
        let root = document.as_mapping_mut().ok_or_else(|| format!("{what} is not a mapping"))?;
        let annotations = child(child(root, "metadata", "metadata")?, "annotations", "metadata.annotations")?;
        for (name, value) in
            [("rootscale.dev/enabled", "true".to_string()), ("rootscale.dev/agent-port", AGENT_PORT.to_string())]
        {
            annotations.entry(key(name)).or_insert(Value::String(value));
        }
    }
    Ok(())
}

/// Injects into one pod (a template, or a Pod); whether it did (false: already injected).
fn inject_pod(
    pod: &mut Mapping,
    workload: &str,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<bool, String> {
    // The service's name: the pod's `app.kubernetes.io/name` label, as the chart's examples use, else the workload's.
    let labelled =
        pod.get("metadata").and_then(|m| m.get("labels")).and_then(|l| l.get("app.kubernetes.io/name")).is_some();
    let service = if labelled {
        "valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app.kubernetes.io/name']\"}}".to_string()
    } else {
        format!("value: {}", serde_yaml::to_string(workload).map_err(|e| e.to_string())?.trim())
    };
    let spec = pod.get_mut("spec").and_then(Value::as_mapping_mut).ok_or("no pod spec")?;
    let named = |containers: Option<&Value>, name: &str| {
        containers
            .and_then(Value::as_sequence)
            .is_some_and(|list| list.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(name)))
    };
    if named(spec.get("initContainers"), CONTAINER) || named(spec.get("containers"), CONTAINER) {
        return Ok(false);
    }
    let containers = spec.get_mut("containers").and_then(Value::as_sequence_mut).ok_or("no containers")?;
    let index = match &options.container {
        Some(wanted) => containers
            .iter()
            .position(|c| c.get("name").and_then(Value::as_str) == Some(wanted.as_str()))
            .ok_or_else(|| format!("no container `{wanted}`"))?,
        None => 0,
    };
    let app = containers.get_mut(index).and_then(Value::as_mapping_mut).ok_or("no containers")?;
    let app_name = app.get("name").and_then(Value::as_str).unwrap_or("(unnamed)").to_string();
    let ports = app.get("ports").and_then(Value::as_sequence).cloned().unwrap_or_default();
    let port_number =
        |port: &Value| port.get("containerPort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok());
    if ports.iter().any(|port| port_number(port) == Some(AGENT_PORT)) {
        return Err(format!(
            "container `{app_name}` already listens on {AGENT_PORT}, the agent's port: a service linked with rootscale needs no proxy"
        ));
    }
    let app_port = match options.app_port {
        Some(port) => port,
        None => ports
            .first()
            .and_then(port_number)
            .ok_or_else(|| format!("container `{app_name}` declares no port: say which with --app-port"))?,
    };
    // The application's port name moves to the proxy, so Services that target it by name go through the proxy.
    let mut moved_name = None;
    if let Some(list) = app.get_mut("ports").and_then(Value::as_sequence_mut) {
        for port in list.iter_mut().filter(|port| port_number(port) == Some(app_port)) {
            if let Some(map) = port.as_mapping_mut() {
                moved_name = map.remove("name").and_then(|name| name.as_str().map(str::to_string));
            }
        }
    }
    if moved_name.is_none() {
        warnings.push(format!(
            "{workload}: port {app_port} of `{app_name}` has no name; point its Services' targetPort at {INBOUND_PORT} (or name the port and target the name) so callers go through the proxy"
        ));
    }
    let env = list(app, "env", "the application's env")?;
    let proxy_url = format!("http://127.0.0.1:{OUTBOUND_PORT}");
    for (name, value) in [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("NO_PROXY", "localhost,127.0.0.1,::1"),
        ("no_proxy", "localhost,127.0.0.1,::1"),
    ] {
        if !env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(name)) {
            env.push(yaml(&format!("{{name: {name}, value: \"{value}\"}}"))?);
        }
    }
    let sidecar = sidecar(options, app_port, moved_name.as_deref(), &service)?;
    list(spec, "initContainers", "initContainers")?.push(sidecar);
    if let Some(secret) = &options.mesh_key_secret {
        let volume = format!("{{name: {MESH_KEY_VOLUME}, secret: {{secretName: {}}}}}", quoted(secret)?);
        list(spec, "volumes", "volumes")?.push(yaml(&volume)?);
    }
    let annotations = child(child(pod, "metadata", "the pod's metadata")?, "annotations", "the pod's annotations")?;
    annotations.insert(key("rootscale.dev/proxy"), key("injected"));
    Ok(true)
}

/// The volume the mesh key is mounted from.
const MESH_KEY_VOLUME: &str = "rootscale-mesh-key";
/// Where the sidecar finds the mesh key.
const MESH_KEY_DIR: &str = "/etc/rootscale/mesh-key";

/// `text` as one YAML scalar.
fn quoted(text: &str) -> Result<String, String> {
    Ok(serde_yaml::to_string(text).map_err(|e| e.to_string())?.trim().to_string())
}

fn yaml(text: &str) -> Result<Value, String> {
    serde_yaml::from_str(text).map_err(|e| format!("internal template: {e}"))
}

fn sidecar(options: &Options, app_port: u16, port_name: Option<&str>, service: &str) -> Result<Value, String> {
    let inbound_name = port_name.unwrap_or("rootscale-in");
    let mut extra_env = String::new();
    if let Some(routes) = &options.routes {
        extra_env.push_str(&format!("\n  - {{name: ROOTSCALE_PROXY_ROUTES, value: {}}}", quoted(routes)?));
    }
    let mut mounts = String::new();
    if options.mesh_key_secret.is_some() {
        extra_env.push_str(&format!("\n  - {{name: ROOTSCALE_MESH_KEY_FILE, value: {MESH_KEY_DIR}/mesh-key}}"));
        mounts = format!("volumeMounts:\n  - {{name: {MESH_KEY_VOLUME}, mountPath: {MESH_KEY_DIR}, readOnly: true}}\n");
    }
    let image = quoted(&options.image)?;
    yaml(&format!(
        "name: {CONTAINER}
image: {image}
restartPolicy: Always
args: [run]
ports:
  - {{name: {inbound_name}, containerPort: {INBOUND_PORT}}}
  - {{name: rootscale, containerPort: {AGENT_PORT}}}
env:
  - name: ROOTSCALE_SERVICE
    {service}
  - name: POD_IP
    valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
  - {{name: ROOTSCALE_PROXY_APP, value: \"127.0.0.1:{app_port}\"}}
  - {{name: ROOTSCALE_PROXY_INBOUND, value: \"0.0.0.0:{INBOUND_PORT}\"}}
  - {{name: ROOTSCALE_PROXY_OUTBOUND, value: \"127.0.0.1:{OUTBOUND_PORT}\"}}{extra_env}
{mounts}readinessProbe:
  tcpSocket: {{port: {INBOUND_PORT}}}
resources:
  requests: {{cpu: 10m, memory: 32Mi}}
  limits: {{memory: 128Mi}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities: {{drop: [ALL]}}
  seccompProfile: {{type: RuntimeDefault}}
"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: payments
spec:
  selector: {matchLabels: {app.kubernetes.io/name: payments}}
  template:
    metadata:
      labels: {app.kubernetes.io/name: payments}
    spec:
      containers:
        - name: app
          image: example/payments:1
          ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: payments}
spec:
  selector: {app.kubernetes.io/name: payments}
  ports: [{port: 80, targetPort: http}]
";

    fn parse(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text).map(|d| Value::deserialize(d).unwrap()).collect()
    }

    #[test]
    fn a_deployment_gets_the_sidecar_and_its_port_name_and_a_service_is_left_alone() {
        let injected = inject(PLAIN, &Options::default()).unwrap();
        assert!(injected.warnings.is_empty(), "{:?}", injected.warnings);
        let documents = parse(&injected.manifest);
        assert_eq!(documents.len(), 2);
        let spec = &documents[0]["spec"]["template"]["spec"];
        let sidecar = &spec["initContainers"][0];
        assert_eq!(sidecar["name"], key(CONTAINER));
        assert_eq!(sidecar["restartPolicy"], key("Always"));
        assert_eq!(sidecar["ports"][0]["name"], key("http"), "the name moved to the proxy");
        assert_eq!(sidecar["ports"][0]["containerPort"].as_u64(), Some(u64::from(INBOUND_PORT)));
        let env: Vec<&str> = sidecar["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(env.contains(&"ROOTSCALE_PROXY_APP") && env.contains(&"ROOTSCALE_SERVICE"), "{env:?}");
        assert_eq!(sidecar["env"][2]["value"], key("127.0.0.1:8080"));
        let app = &spec["containers"][0];
        assert!(app["ports"][0].get("name").is_none());
        let app_env: Vec<&str> = app["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert_eq!(app_env, ["HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"]);
        assert_eq!(documents[0]["metadata"]["annotations"]["rootscale.dev/enabled"], key("true"));
        assert_eq!(documents[0]["spec"]["template"]["metadata"]["annotations"]["rootscale.dev/proxy"], key("injected"));
        assert_eq!(documents[1], parse(PLAIN)[1], "a Service passes through unchanged");
        let with_key =
            inject(PLAIN, &Options { mesh_key_secret: Some("rootscale-mesh-key".into()), ..Options::default() })
                .unwrap();
        let keyed = &parse(&with_key.manifest)[0]["spec"]["template"]["spec"];
        assert_eq!(keyed["volumes"][0]["secret"]["secretName"], key("rootscale-mesh-key"));
        assert_eq!(keyed["initContainers"][0]["volumeMounts"][0]["mountPath"], key(MESH_KEY_DIR));
        // Twice is once.
        let again = inject(&injected.manifest, &Options::default()).unwrap();
        assert_eq!(parse(&again.manifest), documents);
    }

    #[test]
    fn every_pod_template_kind_is_found() {
        let pod = "{containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}";
        for (kind, path) in [
            ("StatefulSet", vec!["spec", "template", "spec"]),
            ("Job", vec!["spec", "template", "spec"]),
            ("CronJob", vec!["spec", "jobTemplate", "spec", "template", "spec"]),
            ("Pod", vec!["spec"]),
        ] {
            let mut text = format!("kind: {kind}\nmetadata: {{name: w}}\n");
            let nested = path[..path.len() - 1]
                .iter()
                .rev()
                .fold(format!("spec: {pod}"), |inner, step| format!("{step}: {{{inner}}}"));
            text.push_str(&nested);
            let injected = inject(&text, &Options::default()).unwrap();
            let mut value = parse(&injected.manifest).remove(0);
            let spec = mapping_at(&mut value, &path).unwrap_or_else(|| panic!("{kind}: {}", injected.manifest));
            assert!(spec.contains_key("initContainers"), "{kind}");
            let service = &spec["initContainers"][0]["env"][0];
            assert_eq!(
                (&service["name"], &service["value"]),
                (&key("ROOTSCALE_SERVICE"), &key("w")),
                "{kind}: no label, the workload's name"
            );
            assert_eq!(injected.warnings.len(), 1, "{kind}: the unnamed port is reported");
        }
    }

    #[test]
    fn bad_input_is_refused_with_what_was_wrong() {
        for (text, options, why) in [
            (
                "kind: Deployment\nmetadata: {name: w}\nspec: {template: {spec: {containers: [{name: app, image: x}]}}}",
                Options::default(),
                "declares no port",
            ),
            ("kind: Deployment\nmetadata: {name: w}\nspec: {}", Options::default(), "Deployment w has no pod template"),
            (
                "kind: Deployment\nmetadata: {name: w}\nspec: {template: {spec: {containers: [{name: app, image: x, ports: [{containerPort: 9797}]}]}}}",
                Options::default(),
                "needs no proxy",
            ),
            (
                "kind: Pod\nspec: {containers: [{name: app, image: x}]}",
                Options { container: Some("web".into()), ..Options::default() },
                "no container `web`",
            ),
            ("kind: [unclosed", Options::default(), "document 1"),
            (PLAIN, Options { routes: Some("x".into()), ..Options::default() }, "--route"),
        ] {
            let error = inject(text, &options).unwrap_err();
            assert!(error.contains(why), "{text}: {error}");
        }
        assert!(inject(&"#".repeat(MAX_INPUT_BYTES + 1), &Options::default()).unwrap_err().contains("bytes"));
    }
}
