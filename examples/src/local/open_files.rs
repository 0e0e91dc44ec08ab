//! Open files: every in-flight HTTP/1 request holds a loopback connection, both of its ends in this process, so an
//! overloaded run holds thousands at once (6,253 at the peak of `chain`'s surge under `hpa-cpu`), where a shell's
//! soft limit is often 1,024. Like Go's runtime, local mode raises its soft limit to the hard one before a run.

use std::sync::OnceLock;

/// Below this limit an overloaded run, or a few runs at once, may fail to open a connection: warned about.
pub const OPEN_FILES_WANTED: u64 = 16_384;

/// Raises this process's soft limit on open files to its hard limit, once; returns the limit then in force
/// (`None` where it cannot be read).
pub fn raise_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            if limit < OPEN_FILES_WANTED {
                tracing::warn!(
                    limit,
                    wanted = OPEN_FILES_WANTED,
                    "open files are limited: an overloaded run holds a connection per request in flight and may \
                     fail to start one; raise the hard limit (`ulimit -Hn`)"
                );
            }
            Some(limit)
        }
        Err(error) => {
            tracing::warn!(%error, "could not raise the limit on open files");
            None
        }
    })
}
