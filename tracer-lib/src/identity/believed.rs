//! Header ends this thread has lately read and believed.
//!
//! A member's caller header is the same bytes all window long, and so is the end of its timing header (the agent
//! address and the proof, after the numbers and the wait point). So each thread reads and checks an end once — the address parsed, the
//! proof looked up or computed — and afterwards knows the same bytes again by comparing them: no parse, no proof
//! check, no shared memory. Only believed ends are kept, and only for the windows their proof is good in; a refused
//! header goes the long way every time, so every refusal is counted.
//!
//! A caller header is also kept whole, in its two forms (measured, and left out of the sample), for the window it
//! was read in: the same bytes again are the same caller, known by one compare, without reading the fields before
//! its end.

use std::{
    cell::RefCell,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    identity::proof::{HeaderRole, WINDOW_SKEW},
    measure::headers::{CallerReading, ClaimEnd, MAX_HEADER_LEN},
};

/// Ends one thread keeps at once (more take turns): a thread usually reads one caller and a few callees.
const PER_THREAD: usize = 4;

struct Believed {
    reader: Reader,
    /// The window the end's proof was made in; `None` without a mesh key, when the end proves nothing and only its
    /// parse is remembered.
    window_id: Option<u64>,
    service: Box<[u8]>,
    end: Box<[u8]>,
    fields: ClaimEnd,
}

struct Recent {
    entries: [Option<Believed>; PER_THREAD],
    next: usize,
}

thread_local! {
    static RECENT: RefCell<Recent> = const { RefCell::new(Recent { entries: [const { None }; PER_THREAD], next: 0 }) };
}

/// Whole caller headers one thread keeps at once: one caller's measured and left-out forms.
const WHOLE_PER_THREAD: usize = 2;

/// A caller header this thread read and believed, whole.
struct WholeCaller {
    reader: Reader,
    /// The window it was read in (`None` without a mesh key): a later window reads it again.
    now_window: Option<u64>,
    /// Its bytes; the buffer is kept when another header takes the place, so taking turns allocates nothing.
    bytes: Vec<u8>,
    reading: CallerReading,
}

struct RecentCallers {
    entries: [Option<WholeCaller>; WHOLE_PER_THREAD],
    next: usize,
}

thread_local! {
    static RECENT_CALLERS: RefCell<RecentCallers> =
        const { RefCell::new(RecentCallers { entries: [const { None }; WHOLE_PER_THREAD], next: 0 }) };
}

static NEXT_READER: AtomicU64 = AtomicU64::new(1);

/// A new id for a tracer that reads headers: what one tracer believed is not taken as believed by another.
pub(crate) fn new_reader_id() -> u64 {
    NEXT_READER.fetch_add(1, Ordering::Relaxed)
}

/// Who believes: a tracer (its id, and the generation of its keys: ends believed under older keys are checked
/// again) reading one kind of header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reader {
    pub id: u64,
    pub generation: u64,
    pub role: HeaderRole,
}

impl Reader {
    /// The fields of `end` (following `service`) if this thread believed these bytes for this reader, in a window
    /// within the proofs' skew of `now_window` (`None`: no mesh key, no window to be in).
    pub fn recall(&self, now_window: Option<u64>, service: &[u8], end: &[u8]) -> Option<ClaimEnd> {
        RECENT.with(|recent| {
            let recent = recent.try_borrow().ok()?;
            recent.entries.iter().flatten().find_map(|entry| {
                let current = match (entry.window_id, now_window) {
                    (Some(made), Some(now)) => made.abs_diff(now) <= WINDOW_SKEW,
                    (None, None) => true,
                    _ => false,
                };
                (entry.reader == *self && current && *entry.end == *end && *entry.service == *service)
                    .then(|| entry.fields.clone())
            })
        })
    }

    /// What the caller header `bytes` was read as, if this thread believed these very bytes for this reader in the
    /// window `now_window` (`None`: no mesh key).
    pub fn recall_caller(&self, now_window: Option<u64>, bytes: &[u8]) -> Option<CallerReading> {
        RECENT_CALLERS.with(|recent| {
            let recent = recent.try_borrow().ok()?;
            recent.entries.iter().flatten().find_map(|entry| {
                (entry.reader == *self && entry.now_window == now_window && *entry.bytes == *bytes)
                    .then(|| entry.reading.clone())
            })
        })
    }

    /// Keeps the caller header `bytes`, believed by this reader in `now_window`, as read as `reading`.
    pub fn remember_caller(&self, now_window: Option<u64>, bytes: &[u8], reading: CallerReading) {
        if bytes.len() > MAX_HEADER_LEN {
            return; // never: a longer header is refused before it is read
        }
        RECENT_CALLERS.with(|recent| {
            let Ok(mut recent) = recent.try_borrow_mut() else { return };
            let next = recent.next;
            recent.next = (next + 1) % WHOLE_PER_THREAD;
            let slot = &mut recent.entries[next];
            let mut buffer = slot.take().map(|old| old.bytes).unwrap_or_else(|| Vec::with_capacity(MAX_HEADER_LEN));
            buffer.clear();
            buffer.extend_from_slice(bytes);
            *slot = Some(WholeCaller { reader: *self, now_window, bytes: buffer, reading });
        });
    }

    /// Keeps `end` (following `service`, its proof made in `window_id`) as believed by this reader on this thread.
    pub fn remember(&self, window_id: Option<u64>, service: &[u8], end: &[u8], fields: &ClaimEnd) {
        RECENT.with(|recent| {
            let Ok(mut recent) = recent.try_borrow_mut() else { return };
            let next = recent.next;
            recent.entries[next] = Some(Believed {
                reader: *self,
                window_id,
                service: service.into(),
                end: end.into(),
                fields: fields.clone(),
            });
            recent.next = (next + 1) % PER_THREAD;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::headers::CallerHeader;

    fn reader(id: u64, generation: u64, role: HeaderRole) -> Reader {
        Reader { id, generation, role }
    }

    #[test]
    fn an_end_is_recalled_only_by_its_reader_for_its_bytes_and_windows() {
        let fields = ClaimEnd::default();
        let caller = reader(new_reader_id(), 0, HeaderRole::Caller);
        caller.remember(Some(40), b"cart", b"a=127.0.0.1:9;i=40;p=AAAAAAAAAAAAAAAA", &fields);
        let end = &b"a=127.0.0.1:9;i=40;p=AAAAAAAAAAAAAAAA"[..];
        assert_eq!(caller.recall(Some(40), b"cart", end), Some(fields.clone()));
        assert_eq!(caller.recall(Some(41), b"cart", end), Some(fields.clone()), "one window of skew");
        assert_eq!(caller.recall(Some(42), b"cart", end), None, "two windows on");
        assert_eq!(caller.recall(None, b"cart", end), None, "a keyed end needs a window");
        assert_eq!(caller.recall(Some(40), b"carts", end), None, "another service");
        assert_eq!(caller.recall(Some(40), b"cart", &end[1..]), None, "other bytes");
        assert_eq!(reader(caller.id, 1, HeaderRole::Caller).recall(Some(40), b"cart", end), None, "new keys");
        assert_eq!(reader(caller.id, 0, HeaderRole::Timing).recall(Some(40), b"cart", end), None, "another role");
        assert_eq!(reader(new_reader_id(), 0, HeaderRole::Caller).recall(Some(40), b"cart", end), None);
        // Other ends take turns with it: after PER_THREAD more, it is gone.
        for n in 0..PER_THREAD {
            caller.remember(None, format!("s{n}").as_bytes(), b"", &fields);
        }
        assert_eq!(caller.recall(Some(40), b"cart", end), None);
        assert_eq!(caller.recall(None, b"s0", b""), Some(fields));
    }

    fn weight_read(reading: Option<CallerReading>, bytes: &'static [u8]) -> Option<Option<u32>> {
        let raw = http::HeaderValue::from_static(std::str::from_utf8(bytes).unwrap());
        reading.map(|reading| CallerHeader::read_before(&raw, &reading).weight())
    }

    #[test]
    fn a_whole_caller_header_is_recalled_only_by_its_reader_for_its_bytes_in_its_window() {
        let measured = &b"s=cart;w=16;a=127.0.0.1:9;i=40;p=AAAAAAAAAAAAAAAA"[..];
        let left_out = &b"s=cart;u=1;a=127.0.0.1:9;i=40;p=AAAAAAAAAAAAAAAA"[..];
        let read = |bytes: &'static [u8]| {
            CallerHeader::parse(&http::HeaderValue::from_static(std::str::from_utf8(bytes).unwrap())).unwrap().reading()
        };
        let caller = reader(new_reader_id(), 0, HeaderRole::Caller);
        caller.remember_caller(Some(40), measured, read(measured));
        caller.remember_caller(Some(40), left_out, read(left_out));
        assert_eq!(weight_read(caller.recall_caller(Some(40), measured), measured), Some(Some(16)));
        assert_eq!(weight_read(caller.recall_caller(Some(40), left_out), left_out), Some(None));
        assert!(caller.recall_caller(Some(41), measured).is_none(), "read again in the next window");
        assert!(caller.recall_caller(None, measured).is_none(), "a keyed header needs its window");
        assert!(caller.recall_caller(Some(40), &measured[1..]).is_none(), "other bytes");
        assert!(reader(caller.id, 1, HeaderRole::Caller).recall_caller(Some(40), measured).is_none(), "new keys");
        assert!(reader(new_reader_id(), 0, HeaderRole::Caller).recall_caller(Some(40), measured).is_none());
        // A third header takes the place of the oldest.
        caller.remember_caller(None, b"s=web", read(b"s=web"));
        assert!(caller.recall_caller(Some(40), measured).is_none());
        assert!(caller.recall_caller(Some(40), left_out).is_some());
        assert_eq!(weight_read(caller.recall_caller(None, b"s=web"), b"s=web"), Some(Some(1)));
    }
}
