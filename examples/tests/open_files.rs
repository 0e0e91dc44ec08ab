//! Local mode and this machine's limit on open files. In a test binary of its own: the tests change the whole
//! process's limit, one at a time.

use std::sync::Mutex;

use rlimit::Resource;
use rootscale_examples::local::{
    SHIPPED,
    cluster::{Cluster, LocalTarget},
    open_files::raise_soft_to_hard,
    policy::Policy,
    run::RunConfig,
    topology::Topology,
};
use rootscale_operator::engine::ScaleTarget;

static SERIAL: Mutex<()> = Mutex::new(());
/// Linux's "too many open files".
const EMFILE: i32 = 24;
/// The soft limit the second test lowers to before it uses up the files.
const LOW_LIMIT: u64 = 4096;

#[test]
fn a_low_soft_limit_is_raised_to_the_hard_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_, hard) = Resource::NOFILE.get().unwrap();
    // As a shell's default leaves it (1,024 is common), lower still so the raise is seen whatever the hard limit.
    let low = hard.min(256);
    Resource::NOFILE.set(low, hard).unwrap();
    assert_eq!(Resource::NOFILE.get().unwrap().0, low);
    // The uncached raise: `Cluster::start` in the other test may have used the once-per-process one already.
    let limit = raise_soft_to_hard().expect("the limit could be raised");
    let (soft, hard_after) = Resource::NOFILE.get().unwrap();
    assert_eq!(hard_after, hard, "the hard limit is not touched");
    assert_eq!(soft, limit, "the limit returned is the one in force");
    // Linux raises to the hard limit; macOS caps it at OPEN_MAX, still above the low one here.
    assert!(soft > low || hard == low, "the soft limit stayed at {soft}");
    if cfg!(target_os = "linux") {
        assert_eq!(soft, hard);
    }
}

/// A scaling the machine cannot carry out is counted, with its error, so a benchmark run that had one is not
/// mistaken for a measure of the policy.
#[test]
fn a_scaling_this_machine_cannot_carry_out_is_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let shop = Topology::parse(SHIPPED[0].1, "shop.yaml").unwrap();
    // A run's replicas as the demo starts them (its window, seed and a mesh key of its own).
    let config = RunConfig::new(shop.clone(), Policy::Rootscale).unwrap().cluster();
    let cluster = Cluster::start(shop, &config).unwrap();
    let target = LocalTarget { cluster: cluster.clone(), service: "catalog".into() };
    runtime.block_on(target.set_replicas(2)).expect("a replica starts with files to spare");
    assert_eq!(cluster.failed_scalings(), (0, None));
    // Leave no file to open: hold every descriptor the soft limit still allows, so the next replica cannot open
    // what it needs (its runtime's, its listener's).
    // Under a low limit, so that takes a few thousand files whatever the machine's hard limit.
    let (soft, hard) = Resource::NOFILE.get().unwrap();
    Resource::NOFILE.set(soft.min(LOW_LIMIT), hard).unwrap();
    let mut held = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) if held.len() < LOW_LIMIT as usize => held.push(file),
            Ok(_) => break false,
            Err(error) => break error.raw_os_error() == Some(EMFILE),
        }
    };
    let refused = runtime.block_on(target.set_replicas(6));
    drop(held);
    Resource::NOFILE.set(soft, hard).unwrap();
    assert!(exhausted, "could not use up the open files");
    assert!(refused.is_err(), "scaled with no file to open");
    let (failed, first) = cluster.failed_scalings();
    assert_eq!(failed, 1);
    let first = first.expect("the error is kept");
    assert!(first.starts_with("catalog to 6: ") && first.contains("open files"), "{first}");
    cluster.stop();
}
