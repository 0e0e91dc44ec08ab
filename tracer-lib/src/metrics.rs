//! Prometheus exposition of a service's last closed window and of the tracer's counters, through
//! prometheus-client. Register [`WindowCollector`] in the agent's registry; every scrape reads the latest window.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{aggregate::histogram::Histogram, tracer::Tracer};

const QUANTILES: [(f64, &str); 3] = [(50.0, "0.5"), (95.0, "0.95"), (99.0, "0.99")];

/// Encodes the tracer's last closed window on every scrape.
#[derive(Debug)]
pub struct WindowCollector {
    tracer: Tracer,
}

impl WindowCollector {
    pub fn new(tracer: Tracer) -> Self {
        Self { tracer }
    }
}

/// Registers the tracer's metrics (all prefixed `rootscale_`) in `registry`.
pub fn register(registry: &mut Registry, tracer: &Tracer) {
    registry.register_collector(Box::new(WindowCollector::new(tracer.clone())));
}

/// The tracer's metrics as Prometheus text, for a `/metrics` handler.
pub fn encode_text(tracer: &Tracer) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    register(&mut registry, tracer);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug + Send + Sync + 'static>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, V)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value.clone()).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn quantiles<'a>(
    samples: &mut Vec<(Vec<(&'a str, String)>, f64)>,
    labels: &[(&'a str, String)],
    histogram: &Histogram,
) {
    for (percentile, quantile) in QUANTILES {
        if let Some(us) = histogram.percentile_us(percentile) {
            let mut labels = labels.to_vec();
            labels.push(("quantile", quantile.to_string()));
            samples.push((labels, us as f64 / 1e6));
        }
    }
}

impl Collector for WindowCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let service = self.tracer.service().to_string();
        let counters = self.tracer.counters();
        let losses = self.tracer.losses();
        use std::sync::atomic::Ordering::Relaxed;
        counter(
            &mut encoder,
            "rootscale_malformed_headers",
            "In-band headers that failed strict parsing and were ignored.",
            &[
                (
                    vec![("service", service.clone()), ("header", "rootscale-caller".into())],
                    counters.malformed_caller.load(Relaxed),
                ),
                (
                    vec![("service", service.clone()), ("header", "rootscale-timing".into())],
                    counters.malformed_timing.load(Relaxed),
                ),
            ],
        )?;
        if let Some(rejections) = self.tracer.rejections() {
            use crate::identity::{HeaderRole, Rejection};
            let samples: Vec<_> = [HeaderRole::Caller, HeaderRole::Timing]
                .into_iter()
                .flat_map(|role| Rejection::ALL.into_iter().map(move |reason| (role, reason)))
                .map(|(role, reason)| {
                    let labels = vec![
                        ("service", service.clone()),
                        ("header", format!("rootscale-{}", role.as_str())),
                        ("reason", reason.as_str().to_string()),
                    ];
                    (labels, rejections.get(role, reason))
                })
                .collect();
            counter(
                &mut encoder,
                "rootscale_unverified_headers",
                "In-band headers without a valid membership proof, taken as outside traffic, by reason.",
                &samples,
            )?;
        }
        counter(
            &mut encoder,
            "rootscale_lost_records",
            "Requests or calls not aggregated: late for a closed window, or in a window nobody closed.",
            &[
                (vec![("service", service.clone()), ("reason", "late".into())], losses.late.load(Relaxed)),
                (vec![("service", service.clone()), ("reason", "unclosed".into())], losses.unclosed.load(Relaxed)),
            ],
        )?;
        let Some(window) = self.tracer.last_window() else {
            return Ok(());
        };
        let stats = &window.stats;
        let base = vec![("service", service.clone())];
        gauge(
            &mut encoder,
            "rootscale_window_id",
            "Id of the last closed window (unix ms / window ms).",
            &[(base.clone(), stats.window_id)],
        )?;
        gauge(
            &mut encoder,
            "rootscale_window_seconds",
            "Window length.",
            &[(base.clone(), window.window_ms as f64 / 1e3)],
        )?;
        gauge(
            &mut encoder,
            "rootscale_window_requests",
            "Requests served in the last closed window.",
            &[(base.clone(), stats.requests)],
        )?;
        gauge(
            &mut encoder,
            "rootscale_window_errors",
            "Failed requests in the last closed window.",
            &[(base.clone(), stats.errors)],
        )?;
        gauge(
            &mut encoder,
            "rootscale_window_edge_overflow",
            "Requests or calls in the last closed window whose edge did not fit under the edge cap.",
            &[
                (vec![("service", service.clone()), ("direction", "inbound".into())], stats.inbound_overflow),
                (vec![("service", service.clone()), ("direction", "outbound".into())], stats.outbound_overflow),
            ],
        )?;
        let mut latency = Vec::new();
        for (measure, histogram) in [
            ("total", &stats.total),
            ("busy", &stats.busy),
            ("cpu_wait", &stats.cpu_wait),
            ("local_wait", &stats.local_wait),
            ("downstream", &stats.downstream),
        ] {
            quantiles(&mut latency, &[("service", service.clone()), ("measure", measure.into())], histogram);
        }
        gauge(
            &mut encoder,
            "rootscale_window_latency_seconds",
            "Per-request time at quantiles over the last closed window.",
            &latency,
        )?;

        let mut edge_requests = Vec::new();
        let mut edge_latency = Vec::new();
        for (caller, edge) in &stats.inbound {
            edge_requests.push((
                vec![("service", service.clone()), ("direction", "inbound".into()), ("peer", caller.to_string())],
                edge.requests,
            ));
        }
        for (callee, edge) in &stats.outbound {
            edge_requests.push((
                vec![("service", service.clone()), ("direction", "outbound".into()), ("peer", callee.to_string())],
                edge.calls,
            ));
            for (measure, histogram) in
                [("client_total", &edge.client_total), ("net_wait", &edge.net_wait), ("remote_wait", &edge.remote_wait)]
            {
                quantiles(
                    &mut edge_latency,
                    &[("service", service.clone()), ("callee", callee.to_string()), ("measure", measure.into())],
                    histogram,
                );
            }
        }
        gauge(&mut encoder, "rootscale_edge_requests", "Requests per edge in the last closed window.", &edge_requests)?;
        gauge(
            &mut encoder,
            "rootscale_edge_latency_seconds",
            "Outbound call time at quantiles over the last closed window.",
            &edge_latency,
        )?;
        Ok(())
    }
}
