use rootscale_examples::local::{SHIPPED, cluster::Cluster, load::Load, scenario::RateSchedule, topology::Topology};
use rootscale_tracer::aggregate::histogram::Histogram;
use std::time::Duration;
fn p(h: Option<&rootscale_proto::v1::Histogram>, q: f64) -> f64 {
    h.and_then(|h| Histogram::from_proto(h).ok()).and_then(|h| h.percentile_us(q)).unwrap_or(0) as f64 / 1000.0
}
fn main() {
    let name = std::env::args().nth(1).unwrap_or("shop".into());
    let rate: f64 = std::env::args().nth(2).map(|r| r.parse().unwrap()).unwrap_or(150.0);
    let text = SHIPPED.iter().find(|(n, _)| *n == name).unwrap().1;
    let topology = Topology::parse(text, "x").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let cluster = Cluster::start(topology.clone(), Duration::from_secs(1), Default::default(), 1).unwrap();
    let load = Load::start(rt.handle(), cluster.entry_registry().unwrap(), RateSchedule::constant(rate), 1);
    std::thread::sleep(Duration::from_secs(6));
    for spec in &topology.services {
        for r in cluster.replica_info(&spec.name) {
            let s = r.view.snapshot();
            let Some(w) = s.last_window else { continue };
            println!(
                "{} req={} total p50/p95 {:.1}/{:.1} local {:.1}/{:.1} busy {:.1} cpu_wait {:.1}",
                spec.name,
                w.requests,
                p(w.total.as_ref(), 50.0),
                p(w.total.as_ref(), 95.0),
                p(w.local_wait.as_ref(), 50.0),
                p(w.local_wait.as_ref(), 95.0),
                p(w.busy.as_ref(), 95.0),
                p(w.cpu_wait.as_ref(), 95.0)
            );
            for e in &w.outbound {
                println!(
                    "   -> {} calls={} client p50/p95 {:.1}/{:.1} remote {:.1}/{:.1} net {:.1}/{:.1}",
                    e.callee,
                    e.calls,
                    p(e.client_total.as_ref(), 50.0),
                    p(e.client_total.as_ref(), 95.0),
                    p(e.remote_total.as_ref(), 50.0),
                    p(e.remote_total.as_ref(), 95.0),
                    p(e.net_wait.as_ref(), 50.0),
                    p(e.net_wait.as_ref(), 95.0)
                );
            }
        }
    }
    load.stop();
    cluster.stop();
}
