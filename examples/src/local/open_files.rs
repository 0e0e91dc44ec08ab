//! Open files: every in-flight HTTP/1 request holds a loopback connection, both of its ends in this process, so an
//! overloaded run holds thousands at once (6,253 at the peak of `chain`'s surge under `hpa-cpu`), where a shell's
//! soft limit is often 1,024. Local mode raises its soft limit to the hard one before it starts replicas.

use std::sync::OnceLock;

/// Below this limit an overloaded run, or a few runs at once, may fail to open a connection: warned about.
pub const OPEN_FILES_WANTED: u64 = 16_384;

/// Raises this process's soft limit on open files to its hard limit (on macOS, to at most `OPEN_MAX`); returns
/// the limit then in force.
pub fn raise_soft_to_hard() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// [`raise_soft_to_hard`], once per process, warning when the limit is low or cannot be raised; returns the limit
/// it left in force (`None` where it could not be read).
pub fn raise_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| match raise_soft_to_hard() {
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
