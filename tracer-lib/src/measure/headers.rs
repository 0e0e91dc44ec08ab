//! The in-band wire format: `rootscale-caller` on requests and `rootscale-timing` on responses (or gRPC trailers).
//!
//! Both come from the network and are parsed strictly: a fixed field order, no unknown or repeated fields, bounded
//! lengths, names of DNS-label characters, decimal numbers without signs. Anything else is rejected whole, so a
//! caller can count it and carry on as if the header were absent.
//!
//! ```text
//! rootscale-caller: s=checkout;a=127.0.0.7:9797;i=56;p=n3QxIT0tDu8vY7Ge
//! rootscale-timing: v=1;s=payments;t=41873;w=40211;k=l;at=payments;a=127.0.0.9:9797;i=56;p=Qb1k-7Xc_2mWdP0a
//! rootscale-timing: v=1;s=cart;t=23011;w=20950;k=n;at=cart>redis-proxy
//! ```
//! `t` is the responder's total and `w` the largest wait in its subtree, both in microseconds; `k` is the wait's
//! kind (`l` local, `n` network) and `at` where it was (a service, or `caller>callee` for a link). With a mesh key,
//! `i` (the window's tag) and `p` (the membership proof, 16 base64url characters; see [`crate::identity::proof`])
//! end both headers; a header is only believed when its proof verifies.

use std::{cell::RefCell, ops::Range, sync::Arc};

use http::{HeaderName, HeaderValue};

use crate::{
    identity::proof::{PROOF_TEXT, WINDOW_TAG_MODULUS},
    measure::{
        record::{Wait, WaitPoint},
        sample::MAX_SAMPLE_EVERY,
    },
};

/// Request header naming the calling service and its agent.
pub const CALLER_HEADER: HeaderName = HeaderName::from_static("rootscale-caller");
/// Response header (gRPC: trailer) carrying the responder's timing.
pub const TIMING_HEADER: HeaderName = HeaderName::from_static("rootscale-timing");

/// Longest service name accepted (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;
/// Longest agent address accepted (`host:port`).
pub const MAX_AGENT_ADDR: usize = 100;
/// Longest header value accepted: room for the longest valid timing header (two names of 63 in `at`, a 100-byte
/// agent address, 12-digit numbers, the window id and the proof) with a margin.
pub const MAX_HEADER_LEN: usize = 480;
/// Durations above this (about 11.5 days in µs) are refused as absurd.
pub const MAX_DURATION_US: u64 = 999_999_999_999;

/// Why a header value was refused. Kept small: the reason is counted and logged at debug level, never returned to
/// the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header value is longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("expected field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` is malformed")]
    BadField(&'static str),
    #[error("unknown timing header version")]
    Version,
    #[error("unexpected trailing data")]
    Trailing,
}

/// The bytes a service name may hold, as a table: every header read checks several names, byte by byte.
static NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.');
        b += 1;
    }
    table
};

fn is_name_byte(b: u8) -> bool {
    NAME_BYTES[usize::from(b)]
}

fn valid_name_bytes(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= MAX_SERVICE_NAME && name.iter().all(|&b| is_name_byte(b))
}

/// A service name is 1–63 characters of `[A-Za-z0-9._-]`.
pub fn valid_service_name(name: &str) -> bool {
    valid_name_bytes(name.as_bytes())
}

fn valid_agent_bytes(addr: &[u8]) -> bool {
    if addr.is_empty() || addr.len() > MAX_AGENT_ADDR {
        return false;
    }
    let Some(colon) = addr.iter().rposition(|&b| b == b':') else {
        return false;
    };
    let (host, port) = (&addr[..colon], &addr[colon + 1..]);
    if port.first() == Some(&b'0') {
        return false; // no leading zeros, and no port 0
    }
    let mut port_value = 0u32;
    for &digit in port {
        if !digit.is_ascii_digit() {
            return false;
        }
        port_value = port_value * 10 + u32::from(digit - b'0');
        if port_value > u32::from(u16::MAX) {
            return false;
        }
    }
    if port.is_empty() || port_value == 0 {
        return false;
    }
    match host {
        [b'[', inner @ .., b']'] => {
            std::str::from_utf8(inner).is_ok_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok())
        }
        // A host name or IPv4 address: labels of letters, digits and inner hyphens, joined by single dots.
        _ => host.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                && label.first() != Some(&b'-')
                && label.last() != Some(&b'-')
        }),
    }
}

/// An agent address is `host:port`: a host of `[A-Za-z0-9.-]`, or an IPv6 literal in brackets, and a port 1–65535.
pub fn valid_agent_addr(addr: &str) -> bool {
    valid_agent_bytes(addr.as_bytes())
}

/// A cursor over `key=value;key=value` with a fixed key order. Every value is checked against a character class
/// of visible ASCII before use, so a value that passes is valid UTF-8.
struct Fields<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Fields<'a> {
    fn new(raw: &'a HeaderValue) -> Result<Self, HeaderError> {
        let bytes = raw.as_bytes();
        if bytes.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        Ok(Self { bytes, position: 0 })
    }

    fn at_end(&self) -> bool {
        self.position == self.bytes.len()
    }

    fn peek_is(&self, key: &[u8]) -> bool {
        let rest = &self.bytes[self.position..];
        rest.len() > key.len() && rest.starts_with(key) && rest[key.len()] == b'='
    }

    /// The next field, which must be `key`: the byte range of its value in the header.
    fn expect(&mut self, key: &'static str) -> Result<Range<usize>, HeaderError> {
        if !self.peek_is(key.as_bytes()) {
            return Err(HeaderError::MissingField(key));
        }
        let start = self.position + key.len() + 1;
        let end = self.bytes[start..].iter().position(|&b| b == b';').map_or(self.bytes.len(), |i| start + i);
        if end + 1 == self.bytes.len() {
            // A trailing `;` with nothing after it.
            return Err(HeaderError::Trailing);
        }
        self.position = (end + 1).min(self.bytes.len());
        Ok(start..end)
    }

    fn value(&self, range: &Range<usize>) -> &'a [u8] {
        &self.bytes[range.clone()]
    }

    /// The next field as a name (a service name).
    fn name(&mut self, key: &'static str) -> Result<Range<usize>, HeaderError> {
        let range = self.expect(key)?;
        if valid_name_bytes(self.value(&range)) { Ok(range) } else { Err(HeaderError::BadField(key)) }
    }

    /// The next field as an agent address.
    fn agent(&mut self, key: &'static str) -> Result<Range<usize>, HeaderError> {
        let range = self.expect(key)?;
        if valid_agent_bytes(self.value(&range)) { Ok(range) } else { Err(HeaderError::BadField(key)) }
    }

    /// The end of a header: the optional agent address and the optional `i=<window tag>;p=<proof>` pair, which
    /// must end the value. Positions in the result are relative to where the end begins.
    fn claim_end(&mut self) -> Result<ClaimEnd, HeaderError> {
        let origin = self.position;
        let agent = if self.peek_is(b"a") { Some(self.agent("a")?) } else { None };
        let proof = self.proof()?;
        if !self.at_end() {
            return Err(HeaderError::Trailing);
        }
        Ok(ClaimEnd {
            agent: agent.map(|range| Span::from(&range, origin)),
            // The tag was checked below its modulus, 256.
            proof: proof.map(|(tag, range)| (u16::try_from(tag).unwrap_or(u16::MAX), Span::from(&range, origin))),
        })
    }

    /// The end of a header as [`Fields::claim_end`] reads it, unless `recognize` knows these exact bytes (with the
    /// service they follow) from an earlier header: then they are not read again.
    fn claim_end_recognizing(
        &mut self,
        service: &Range<usize>,
        recognize: impl FnOnce(&[u8], &[u8]) -> Option<ClaimEnd>,
    ) -> Result<(ClaimEnd, bool), HeaderError> {
        let end = &self.bytes[self.position..];
        // A known end's bytes were checked when it was first read: nothing in it needs reading again.
        if let Some(known) = recognize(self.value(service), end) {
            self.position = self.bytes.len();
            return Ok((known, true));
        }
        Ok((self.claim_end()?, false))
    }

    /// The optional `i=<window tag>;p=<proof>` pair that ends a header: the window's tag and the proof's text.
    fn proof(&mut self) -> Result<Option<(u64, Range<usize>)>, HeaderError> {
        if !self.peek_is(b"i") {
            return Ok(None);
        }
        // The window's tag: 1–3 digits, no leading zero, below the tag's modulus.
        let rest = &self.bytes[self.position + 2..];
        let digits = rest.iter().take(4).take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 3 || (digits > 1 && rest[0] == b'0') {
            return Err(HeaderError::BadField("i"));
        }
        let window_id = rest[..digits].iter().fold(0u64, |value, digit| value * 10 + u64::from(digit - b'0'));
        if window_id >= WINDOW_TAG_MODULUS {
            return Err(HeaderError::BadField("i"));
        }
        if rest.get(digits) != Some(&b';') {
            return Err(HeaderError::MissingField("p"));
        }
        self.position += 2 + digits + 1;
        // The proof is the last field and has a fixed length: no need to scan for the next `;`.
        let rest = &self.bytes[self.position..];
        if rest.len() != 2 + PROOF_TEXT || !rest.starts_with(b"p=") {
            return Err(if self.peek_is(b"p") { HeaderError::BadField("p") } else { HeaderError::MissingField("p") });
        }
        // Its characters are checked with the proof itself (a text that is not base64url never verifies,
        // and is counted as a bad proof), so a member's header is not read twice.
        let proof = self.position + 2..self.bytes.len();
        self.position = self.bytes.len();
        Ok(Some((window_id, proof)))
    }

    /// A timing header's wait point, `k=l;at=<service>` or `k=n;at=<from>><to>`: where the name is, and for a link
    /// where the callee's is.
    fn wait_point(&mut self) -> Result<(Range<usize>, Option<Range<usize>>), HeaderError> {
        let kind = self.expect("k")?;
        let at_range = self.expect("at")?;
        let at_value = self.value(&at_range);
        match self.value(&kind) {
            b"l" if valid_name_bytes(at_value) => Ok((at_range, None)),
            b"n" => {
                let split = at_value.iter().position(|&b| b == b'>').ok_or(HeaderError::BadField("at"))?;
                let (from, to) = (&at_value[..split], &at_value[split + 1..]);
                if !valid_name_bytes(from) || !valid_name_bytes(to) {
                    return Err(HeaderError::BadField("at"));
                }
                let split = at_range.start + split;
                Ok((at_range.start..split, Some(split + 1..at_range.end)))
            }
            b"l" => Err(HeaderError::BadField("at")),
            _ => Err(HeaderError::BadField("k")),
        }
    }

    /// The next field as a whole number (a duration in microseconds, a window id): 1–12 decimal digits.
    fn micros(&mut self, key: &'static str) -> Result<u64, HeaderError> {
        let range = self.expect(key)?;
        let digits = self.value(&range);
        if digits.is_empty() || digits.len() > 12 || (digits.len() > 1 && digits[0] == b'0') {
            return Err(HeaderError::BadField(key));
        }
        digits.iter().try_fold(0u64, |value, &digit| {
            if digit.is_ascii_digit() {
                Ok(value * 10 + u64::from(digit - b'0'))
            } else {
                Err(HeaderError::BadField(key))
            }
        })
    }
}

/// The text of a field range already checked against a visible-ASCII character class. Read on every request (the
/// caller's name and agent go into the window), so it checks for ASCII, a few word-wide compares, rather than
/// decoding UTF-8 byte by byte.
fn field_str<'h>(raw: &'h HeaderValue, range: &Range<usize>) -> &'h str {
    let bytes = raw.as_bytes().get(range.clone()).unwrap_or_default();
    if !bytes.is_ascii() {
        return ""; // never: every field was checked against an ASCII class
    }
    // SAFETY: `bytes` was just checked to be ASCII, and every ASCII byte sequence is valid UTF-8.
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

/// Where a field lies in a header, in bytes. A header is at most [`MAX_HEADER_LEN`] long, so 16 bits hold any place
/// in it, and the parsed headers that travel with every request and call stay a quarter the size of `usize` ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u16,
    end: u16,
}

impl Span {
    /// `range` less `origin`. Ranges come from [`Fields`], within a header of at most [`MAX_HEADER_LEN`] bytes.
    fn from(range: &Range<usize>, origin: usize) -> Self {
        let place = |at: usize| u16::try_from(at.saturating_sub(origin)).unwrap_or(u16::MAX);
        Self { start: place(range.start), end: place(range.end) }
    }

    /// The byte range, `origin` on.
    fn at(self, origin: usize) -> Range<usize> {
        origin + usize::from(self.start)..origin + usize::from(self.end)
    }
}

const _: () = assert!(MAX_HEADER_LEN <= u16::MAX as usize);

/// Where the fields that end a header lie — the agent address and the membership proof (the window's tag, and the
/// proof's text) — relative to the start of that end. The same bytes always make the same claim, so a reader who
/// has checked them once can recognise them by comparison ([`crate::identity::believed`]). A timing header's wait
/// point, just before its end, is not part of it: a service in the middle of the graph names its own wait in one
/// response and a callee's in the next, and remembering each would crowd out the ends that do repeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimEnd {
    agent: Option<Span>,
    /// The window's tag (below `WINDOW_TAG_MODULUS`, 256) and where the proof's text is.
    proof: Option<(u16, Span)>,
}

/// A header's claim, with the end's fields placed in it: `end_at` is where the end begins.
#[derive(Clone, Debug)]
struct Claimed {
    service: Span,
    end_at: u16,
    end: ClaimEnd,
}

impl Claimed {
    fn new(service: &Range<usize>, end_at: usize, end: ClaimEnd) -> Self {
        Self { service: Span::from(service, 0), end_at: u16::try_from(end_at).unwrap_or(u16::MAX), end }
    }

    /// A span of the end, placed in the header.
    fn shift(&self, span: Span) -> Range<usize> {
        span.at(usize::from(self.end_at))
    }

    fn service<'h>(&self, raw: &'h HeaderValue) -> &'h str {
        field_str(raw, &self.service.at(0))
    }

    fn agent<'h>(&self, raw: &'h HeaderValue) -> Option<&'h str> {
        self.end.agent.map(|span| field_str(raw, &self.shift(span)))
    }

    fn proof<'h>(&self, raw: &'h HeaderValue) -> Option<(u64, &'h [u8])> {
        self.end.proof.map(|(tag, span)| (u64::from(tag), raw.as_bytes().get(self.shift(span)).unwrap_or_default()))
    }

    fn claimed<'h>(&self, raw: &'h HeaderValue) -> (&'h [u8], &'h [u8]) {
        let bytes = raw.as_bytes();
        (bytes.get(self.service.at(0)).unwrap_or_default(), self.agent(raw).map_or(&[][..], str::as_bytes))
    }

    fn end_bytes<'h>(&self, raw: &'h HeaderValue) -> &'h [u8] {
        raw.as_bytes().get(usize::from(self.end_at)..).unwrap_or_default()
    }
}

/// A parsed `rootscale-caller` header. Borrows nothing: it keeps the header value (a cheap reference-counted
/// clone) and the positions of its fields, so the request path does not allocate.
#[derive(Clone, Debug)]
pub struct CallerHeader {
    raw: HeaderValue,
    claim: Claimed,
    /// `None` for `u=1`: the caller left this request out of its sample, so the callee leaves it out too; else the
    /// number of requests this one stands for (`w=N`, 1 without it; see [`crate::measure::sample`]).
    weight: Option<u32>,
}

/// What a caller header was read as, without its bytes: what a thread keeps to know the same bytes again.
#[derive(Clone, Debug)]
pub(crate) struct CallerReading {
    claim: Claimed,
    weight: Option<u32>,
}

impl CallerHeader {
    /// What this header was read as.
    pub(crate) fn reading(&self) -> CallerReading {
        CallerReading { claim: self.claim.clone(), weight: self.weight }
    }

    /// The header `raw`, read before as `reading`: `raw` must be the very bytes that were read then.
    pub(crate) fn read_before(raw: &HeaderValue, reading: &CallerReading) -> Self {
        Self { raw: raw.clone(), claim: reading.claim.clone(), weight: reading.weight }
    }

    pub fn parse(raw: &HeaderValue) -> Result<Self, HeaderError> {
        Self::parse_recognizing(raw, |_, _| None).map(|(header, _)| header)
    }

    /// Parses `raw`, taking the fields of its end from `recognize` (given the service and the end's bytes) when it
    /// knows them; says whether it did.
    pub fn parse_recognizing(
        raw: &HeaderValue,
        recognize: impl FnOnce(&[u8], &[u8]) -> Option<ClaimEnd>,
    ) -> Result<(Self, bool), HeaderError> {
        let mut fields = Fields::new(raw)?;
        let service = fields.name("s")?;
        // The mark sits before the claim's end, so the end's bytes (and what a reader remembers of them) are the
        // same whether the request was sampled or not.
        let weight = if fields.peek_is(b"u") {
            let mark = fields.expect("u")?;
            if fields.value(&mark) != b"1" {
                return Err(HeaderError::BadField("u"));
            }
            None
        } else if fields.peek_is(b"w") {
            // 2 to the largest rate, no leading zero: a weight of 1 is said by leaving the field out.
            let field = fields.expect("w")?;
            let digits = fields.value(&field);
            let weight = (digits.len() <= 4 && digits.first().is_some_and(|d| (b'1'..=b'9').contains(d)))
                .then(|| std::str::from_utf8(digits).ok()?.parse::<u32>().ok())
                .flatten()
                .filter(|weight| (2..=MAX_SAMPLE_EVERY).contains(weight))
                .ok_or(HeaderError::BadField("w"))?;
            Some(weight)
        } else {
            Some(1)
        };
        let end_at = fields.position;
        let (end, recognized) = fields.claim_end_recognizing(&service, recognize)?;
        Ok((Self { raw: raw.clone(), claim: Claimed::new(&service, end_at, end), weight }, recognized))
    }

    /// Whether the caller left this request out of its sample.
    pub fn unsampled(&self) -> bool {
        self.weight.is_none()
    }

    /// How many requests this one stands for, if the caller measured it (`None`: left out of the sample).
    pub fn weight(&self) -> Option<u32> {
        self.weight
    }

    /// The window's tag (its id modulo `WINDOW_TAG_MODULUS`) and the proof text the header ends with, if any.
    pub fn proof(&self) -> Option<(u64, &[u8])> {
        self.claim.proof(&self.raw)
    }

    /// What the header claims, as bytes, for checking its proof: the service, and the agent (empty if none).
    pub fn claimed(&self) -> (&[u8], &[u8]) {
        self.claim.claimed(&self.raw)
    }

    /// The header's end (agent and proof) as bytes, and its fields: what a reader remembers to recognise it.
    pub fn end(&self) -> (&[u8], &ClaimEnd) {
        (self.claim.end_bytes(&self.raw), &self.claim.end)
    }

    pub fn service(&self) -> &str {
        self.claim.service(&self.raw)
    }

    pub fn agent(&self) -> Option<&str> {
        self.claim.agent(&self.raw)
    }

    /// The header a service sends on its outbound requests.
    pub fn encode(service: &str, agent: Option<&str>) -> HeaderValue {
        Self::encode_with_proof(service, agent, "", Some(1))
    }

    /// The header with `proof_fields` (`;i=…;p=…`, or empty) at its end, for a request measured with `weight`
    /// (`w=N` unless 1), or marked `u=1` when it was left out of the sample (`None`).
    pub fn encode_with_proof(
        service: &str,
        agent: Option<&str>,
        proof_fields: &str,
        weight: Option<u32>,
    ) -> HeaderValue {
        let mut value = String::with_capacity(18 + service.len() + agent.map_or(0, str::len) + proof_fields.len());
        value.push_str("s=");
        value.push_str(service);
        match weight {
            None => value.push_str(";u=1"),
            Some(1) => {}
            Some(weight) => {
                value.push_str(";w=");
                value.push_str(&weight.to_string());
            }
        }
        if let Some(agent) = agent {
            value.push_str(";a=");
            value.push_str(agent);
        }
        value.push_str(proof_fields);
        // Callers validate names and addresses before building the header; fall back to a bare name otherwise.
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("s=invalid"))
    }
}

/// A parsed `rootscale-timing` header. Like [`CallerHeader`] it keeps the header value and field positions, so
/// reading a callee's timing allocates nothing; [`Timing::largest_wait`] makes an owned copy when one is needed.
#[derive(Clone, Debug)]
pub struct Timing {
    raw: HeaderValue,
    claim: Claimed,
    /// The responder's `total`, µs.
    pub total_us: u64,
    /// The largest wait in the responder's subtree, µs.
    pub wait_us: u64,
    /// Where that wait was: the service (local) or the caller of the link (net).
    at: Span,
    /// For a net wait, the callee of the link.
    at_to: Option<Span>,
}

impl Timing {
    pub fn parse(raw: &HeaderValue) -> Result<Self, HeaderError> {
        Self::parse_recognizing(raw, |_, _| None).map(|(timing, _)| timing)
    }

    /// Parses `raw`, taking the fields of its end from `recognize` (given the service and the end's bytes) when it
    /// knows them; says whether it did.
    pub fn parse_recognizing(
        raw: &HeaderValue,
        recognize: impl FnOnce(&[u8], &[u8]) -> Option<ClaimEnd>,
    ) -> Result<(Self, bool), HeaderError> {
        let mut fields = Fields::new(raw)?;
        let version = fields.expect("v")?;
        if fields.value(&version) != b"1" {
            return Err(HeaderError::Version);
        }
        let service = fields.name("s")?;
        let total_us = fields.micros("t")?;
        let wait_us = fields.micros("w")?;
        // The largest wait in a subtree is part of the responder's total; a larger one is a lie or a bug.
        if wait_us > total_us {
            return Err(HeaderError::BadField("w"));
        }
        let (at, at_to) = fields.wait_point()?;
        let end_at = fields.position;
        let (end, recognized) = fields.claim_end_recognizing(&service, recognize)?;
        let claim = Claimed::new(&service, end_at, end);
        let (at, at_to) = (Span::from(&at, 0), at_to.map(|to| Span::from(&to, 0)));
        Ok((Self { raw: raw.clone(), claim, total_us, wait_us, at, at_to }, recognized))
    }

    /// The window's tag (its id modulo `WINDOW_TAG_MODULUS`) and the proof text the header ends with, if any.
    pub fn proof(&self) -> Option<(u64, &[u8])> {
        self.claim.proof(&self.raw)
    }

    /// What the header claims, as bytes, for checking its proof: the service, and the agent (empty if none).
    pub fn claimed(&self) -> (&[u8], &[u8]) {
        self.claim.claimed(&self.raw)
    }

    /// The header's end (agent and proof) as bytes, and its fields: what a reader remembers to recognise it.
    pub fn end(&self) -> (&[u8], &ClaimEnd) {
        (self.claim.end_bytes(&self.raw), &self.claim.end)
    }

    fn slice(&self, span: Span) -> &str {
        field_str(&self.raw, &span.at(0))
    }

    /// The responding service.
    pub fn service(&self) -> &str {
        self.claim.service(&self.raw)
    }

    /// The responder's agent, if it announced one.
    pub fn agent(&self) -> Option<&str> {
        self.claim.agent(&self.raw)
    }

    /// Where the largest wait in the responder's subtree was.
    pub fn wait_point(&self) -> WaitPointRef<'_> {
        match self.at_to {
            None => WaitPointRef::Local(self.slice(self.at)),
            Some(to) => WaitPointRef::Net { from: self.slice(self.at), to: self.slice(to) },
        }
    }

    /// An owned copy of the largest wait.
    pub fn largest_wait(&self) -> Wait {
        Wait { point: self.wait_point().to_owned(), us: self.wait_us }
    }
}

/// A borrowed [`WaitPoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPointRef<'a> {
    Local(&'a str),
    Net { from: &'a str, to: &'a str },
}

impl WaitPointRef<'_> {
    /// The owned point, its names shared with the last ones this thread made (see [`shared_name`]).
    pub fn to_owned(self) -> WaitPoint {
        match self {
            WaitPointRef::Local(service) => WaitPoint::Local { service: shared_name(service) },
            WaitPointRef::Net { from, to } => WaitPoint::Net { from: shared_name(from), to: shared_name(to) },
        }
    }
}

/// Names one thread keeps at once (more take turns): a service's own and those of the few callees it calls.
const SHARED_NAMES_PER_THREAD: usize = 8;

thread_local! {
    static SHARED_NAMES: RefCell<([Option<Arc<str>>; SHARED_NAMES_PER_THREAD], usize)> =
        const { RefCell::new(([const { None }; SHARED_NAMES_PER_THREAD], 0)) };
}

/// `name` as a shared string: the same one this thread made last time, when it is still among the last few, so a
/// call's wait point costs no allocation in the steady state; a new one otherwise.
fn shared_name(name: &str) -> Arc<str> {
    SHARED_NAMES
        .try_with(|names| {
            let mut names = names.try_borrow_mut().ok()?;
            let (kept, next) = &mut *names;
            if let Some(found) = kept.iter().flatten().find(|kept| ***kept == *name) {
                return Some(found.clone());
            }
            let made: Arc<str> = name.into();
            kept[*next] = Some(made.clone());
            *next = (*next + 1) % SHARED_NAMES_PER_THREAD;
            Some(made)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| name.into())
}

impl WaitPoint {
    pub fn as_ref(&self) -> WaitPointRef<'_> {
        match self {
            WaitPoint::Local { service } => WaitPointRef::Local(service),
            WaitPoint::Net { from, to } => WaitPointRef::Net { from, to },
        }
    }
}

/// Writes one service's timing headers. The parts that never change (version, name, agent) are prepared once, so
/// the request path only writes two numbers and the wait point.
#[derive(Clone, Debug)]
pub struct TimingEncoder {
    /// `v=1;s=<service>;t=`
    prefix: Vec<u8>,
    /// `;k=l;at=<service>`: this service's own local wait, the common case.
    own_local: Vec<u8>,
    /// `;a=<agent>`, or empty.
    suffix: Vec<u8>,
}

impl TimingEncoder {
    /// `service` and `agent` must already be valid (the tracer checks them): the headers are made without `http`'s
    /// check (see `with_header_buffer`), so only the tracer makes an encoder.
    pub(crate) fn new(service: &str, agent: Option<&str>) -> Self {
        Self {
            prefix: format!("v=1;s={service};t=").into_bytes(),
            own_local: format!(";k=l;at={service}").into_bytes(),
            suffix: agent.map(|agent| format!(";a={agent}").into_bytes()).unwrap_or_default(),
        }
    }

    /// The header for a response whose total was `total_us` and whose largest wait is `wait_us` at `point`
    /// (`None`: this service's own local wait), ended by `proof_fields` (`;i=…;p=…`, or empty). Writes only what
    /// [`Timing::parse`] accepts: the wait is capped at the total, and a point with a name that is not a valid
    /// service name is replaced by this service.
    pub(crate) fn encode(
        &self,
        total_us: u64,
        wait_us: u64,
        point: Option<WaitPointRef<'_>>,
        proof_fields: &[u8],
    ) -> Option<HeaderValue> {
        let total_us = total_us.min(MAX_DURATION_US);
        let wait_us = wait_us.min(total_us);
        let point = point.filter(|point| match point {
            WaitPointRef::Local(service) => valid_service_name(service),
            WaitPointRef::Net { from, to } => valid_service_name(from) && valid_service_name(to),
        });
        let longest = self.prefix.len()
            + self.own_local.len()
            + self.suffix.len()
            + proof_fields.len()
            + 2 * MAX_SERVICE_NAME
            + 64;
        with_header_buffer(longest, |value| {
            self.write(value, total_us, wait_us, point, proof_fields);
        })
    }

    fn write(
        &self,
        value: &mut bytes::BytesMut,
        total_us: u64,
        wait_us: u64,
        point: Option<WaitPointRef<'_>>,
        proof_fields: &[u8],
    ) {
        let mut buffer = itoa::Buffer::new();
        value.extend_from_slice(&self.prefix);
        value.extend_from_slice(buffer.format(total_us).as_bytes());
        value.extend_from_slice(b";w=");
        value.extend_from_slice(buffer.format(wait_us).as_bytes());
        match point {
            None => value.extend_from_slice(&self.own_local),
            Some(WaitPointRef::Local(service)) => {
                value.extend_from_slice(b";k=l;at=");
                value.extend_from_slice(service.as_bytes());
            }
            Some(WaitPointRef::Net { from, to }) => {
                value.extend_from_slice(b";k=n;at=");
                value.extend_from_slice(from.as_bytes());
                value.extend_from_slice(b">");
                value.extend_from_slice(to.as_bytes());
            }
        }
        value.extend_from_slice(&self.suffix);
        value.extend_from_slice(proof_fields);
    }
}

/// Bytes of the block each thread cuts its timing headers from: about 40 headers.
const HEADER_BLOCK_BYTES: usize = 4096;

thread_local! {
    /// This thread's block: headers are cut off its front and share it (reference-counted), so that writing one
    /// allocates nothing; once every header cut from it has been dropped, the block is reused from its start.
    static HEADER_BLOCK: RefCell<bytes::BytesMut> = RefCell::new(bytes::BytesMut::new());
}

/// A header value of at most `longest` bytes, written by `write` into this thread's block. A new block is allocated
/// only when the current one is full and a header cut from it is still alive (or, on re-entry, a buffer of its own).
fn with_header_buffer(longest: usize, write: impl FnOnce(&mut bytes::BytesMut)) -> Option<HeaderValue> {
    let mut write = Some(write);
    let from_block = HEADER_BLOCK
        .try_with(|block| {
            let mut block = block.try_borrow_mut().ok()?;
            if block.capacity() < longest {
                // Reclaims the block when nothing cut from it is alive; else allocates a fresh one.
                block.reserve(HEADER_BLOCK_BYTES.max(longest));
            }
            (write.take()?)(&mut block);
            Some(block.split().freeze())
        })
        .ok()
        .flatten();
    // Re-entered, or the thread is being torn down: a buffer of its own.
    let value = from_block.or_else(|| {
        let mut own = bytes::BytesMut::with_capacity(longest);
        (write.take()?)(&mut own);
        Some(own.freeze())
    })?;
    if cfg!(debug_assertions) {
        // Tests run in debug: there every header is checked, and one with a byte a header may not hold is refused.
        return HeaderValue::from_maybe_shared(value).ok();
    }
    // SAFETY: not a memory-safety contract (a `HeaderValue` holds any bytes soundly), but broken it would let a
    // CR or LF into a response head (header injection over HTTP/1, a protocol error over HTTP/2). The caller
    // promises bytes a header may hold, which `http` would otherwise check byte by byte on every response. The only
    // writer of these bytes, `TimingEncoder::write`, writes only visible ASCII: its prefix, own-local part and
    // suffix are built from a service name and an agent address the tracer checked when it was built; the numbers
    // are decimal digits; a wait point's names pass `valid_service_name` in `TimingEncoder::encode` first; the
    // proof fields are `;i=<digits>;p=<base64url>` (`identity::proof::proof_fields`). The test
    // `every_timing_header_shape_is_a_valid_header_value` checks each shape against `http`'s own check.
    Some(unsafe { HeaderValue::from_maybe_shared_unchecked(value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn caller_round_trip() {
        let header = CallerHeader::encode("checkout", Some("127.0.3.7:9797"));
        let parsed = CallerHeader::parse(&header).unwrap();
        assert_eq!(parsed.service(), "checkout");
        assert_eq!(parsed.agent(), Some("127.0.3.7:9797"));
        let bare = CallerHeader::parse(&hv("s=web")).unwrap();
        assert_eq!((bare.service(), bare.agent()), ("web", None));
        assert!(CallerHeader::parse(&hv("s=web;a=[::1]:9797")).is_ok());
    }

    #[test]
    fn sampling_marks_sit_before_the_claims_end_and_are_only_u_equals_1_or_a_weight() {
        let proof = "Zm9yZ2VkcHJvb2Zz";
        let proof_fields = format!(";i=5;p={proof}");
        let encode = |weight| CallerHeader::encode_with_proof("web", Some("127.0.0.7:9797"), &proof_fields, weight);
        let (sampled, unsampled, weighted) = (encode(Some(1)), encode(None), encode(Some(16)));
        assert_eq!(sampled, format!("s=web;a=127.0.0.7:9797;i=5;p={proof}").as_str());
        assert_eq!(unsampled, format!("s=web;u=1;a=127.0.0.7:9797;i=5;p={proof}").as_str());
        assert_eq!(weighted, format!("s=web;w=16;a=127.0.0.7:9797;i=5;p={proof}").as_str());
        let parsed = [sampled, unsampled, weighted].map(|value| CallerHeader::parse(&value).unwrap());
        assert_eq!(parsed.each_ref().map(CallerHeader::weight), [Some(1), None, Some(16)]);
        assert!(!parsed[0].unsampled() && parsed[1].unsampled() && !parsed[2].unsampled());
        // The same claim, the same end: the proof and a reader's memory of it do not depend on the mark.
        for marked in &parsed[1..] {
            assert_eq!(parsed[0].claimed(), marked.claimed());
            assert_eq!(parsed[0].end(), marked.end());
            assert_eq!(parsed[0].proof(), marked.proof());
        }
        assert!(CallerHeader::parse(&hv("s=web;u=1")).unwrap().unsampled());
        assert_eq!(CallerHeader::parse(&hv("s=web;w=1024")).unwrap().weight(), Some(1024));
        for bad in [
            "s=web;u=0",
            "s=web;u=",
            "s=web;u=11",
            "s=web;u=1;u=1",
            "s=web;a=h:1;u=1",
            "u=1;s=web",
            "s=web;u=1;",
            "s=web;w=1",
            "s=web;w=0",
            "s=web;w=016",
            "s=web;w=1025",
            "s=web;w=99999",
            "s=web;w=",
            "s=web;w=+16",
            "s=web;w=16;u=1",
            "s=web;u=1;w=16",
            "s=web;a=h:1;w=16",
        ] {
            assert!(CallerHeader::parse(&hv(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timing_round_trip() {
        let wait = Wait { point: WaitPoint::Net { from: "cart".into(), to: "redis".into() }, us: 20_950 };
        let encoder = TimingEncoder::new("cart", Some("127.0.0.1:9000"));
        let header = encoder.encode(23_011, wait.us, Some(wait.point.as_ref()), b"").unwrap();
        assert_eq!(header, "v=1;s=cart;t=23011;w=20950;k=n;at=cart>redis;a=127.0.0.1:9000");
        let parsed = Timing::parse(&header).unwrap();
        assert_eq!(parsed.total_us, 23_011);
        assert_eq!(parsed.service(), "cart");
        assert_eq!(parsed.largest_wait(), wait);
        assert_eq!(parsed.agent(), Some("127.0.0.1:9000"));
        let own = TimingEncoder::new("web", None).encode(5, 4, None, b"").unwrap();
        assert_eq!(own, "v=1;s=web;t=5;w=4;k=l;at=web");
        let parsed = Timing::parse(&own).unwrap();
        assert_eq!((parsed.wait_point(), parsed.agent()), (WaitPointRef::Local("web"), None));
        let other = TimingEncoder::new("web", None).encode(5, 4, Some(WaitPointRef::Local("db")), b"").unwrap();
        assert_eq!(other, "v=1;s=web;t=5;w=4;k=l;at=db");
    }

    #[test]
    fn a_recognised_timing_end_reads_the_same_as_a_parsed_one() {
        // What a reader remembers of a parsed header (its end's bytes and fields) lets it read the next header with
        // the same end without parsing that end: both readings must agree, whatever comes before the end.
        let encoder = TimingEncoder::new("cart", Some("127.0.0.1:9000"));
        let proof = format!(";i=7;p={}", "A".repeat(crate::identity::proof::PROOF_TEXT));
        let proof = proof.as_bytes();
        for point in [None, Some(WaitPointRef::Local("db")), Some(WaitPointRef::Net { from: "cart", to: "redis" })] {
            let first = encoder.encode(900, 400, point, proof).unwrap();
            let (parsed, recognized) = Timing::parse_recognizing(&first, |_, _| None).unwrap();
            assert!(!recognized);
            let (end, fields) = parsed.end();
            let (end, fields) = (end.to_vec(), fields.clone());
            let next = encoder.encode(12_345, 6_789, point, proof).unwrap();
            let (known, recognized) = Timing::parse_recognizing(&next, |service, bytes| {
                (service == b"cart" && bytes == end.as_slice()).then(|| fields.clone())
            })
            .unwrap();
            assert!(recognized, "{next:?}");
            let fresh = Timing::parse(&next).unwrap();
            assert_eq!((known.total_us, known.wait_us), (12_345, 6_789));
            assert_eq!((known.total_us, known.wait_us), (fresh.total_us, fresh.wait_us));
            assert_eq!(known.wait_point(), fresh.wait_point());
            assert_eq!(known.wait_point(), point.unwrap_or(WaitPointRef::Local("cart")));
            assert_eq!((known.service(), known.agent()), (fresh.service(), fresh.agent()));
            assert_eq!((known.proof(), known.claimed()), (fresh.proof(), fresh.claimed()));
            // The wait point is read from each header, never taken from the remembered end.
            for other in [WaitPointRef::Local("search"), WaitPointRef::Net { from: "cart", to: "search" }] {
                let header = encoder.encode(5, 4, Some(other), proof).unwrap();
                let (read, recognized) = Timing::parse_recognizing(&header, |service, bytes| {
                    (service == b"cart" && bytes == end.as_slice()).then(|| fields.clone())
                })
                .unwrap();
                assert!(recognized);
                assert_eq!(read.wait_point(), other);
            }
        }
    }

    #[test]
    fn every_timing_header_shape_is_a_valid_header_value() {
        // Release builds make timing headers without `http`'s check: each shape the encoder writes must pass it.
        let proof = crate::identity::proof::proof_fields(
            &crate::identity::keys::MeshKeys::parse("0123456789abcdefghijklmnopqrstuvwxyzABCD").unwrap(),
            crate::identity::proof::HeaderRole::Timing,
            &crate::identity::proof::Claim { service: b"cart", agent: b"127.0.0.1:9000", window_id: 1_234_567 },
        );
        let name = "a".repeat(MAX_SERVICE_NAME);
        let points = [
            None,
            Some(WaitPointRef::Local("db")),
            Some(WaitPointRef::Local(&name)),
            Some(WaitPointRef::Net { from: "cart", to: "redis.v2_x-1" }),
            // Names a header may not hold are replaced by the service's own.
            Some(WaitPointRef::Local("bad name\r\n")),
            Some(WaitPointRef::Net { from: "c\u{7f}", to: "é" }),
        ];
        for encoder in [TimingEncoder::new(&name, Some("[::1]:65535")), TimingEncoder::new("web", None)] {
            for point in points {
                for proof in [&b""[..], proof.as_bytes()] {
                    for (total, wait) in [(0, 0), (5, 4), (u64::MAX, u64::MAX)] {
                        let header = encoder.encode(total, wait, point, proof).unwrap();
                        assert_eq!(HeaderValue::from_bytes(header.as_bytes()).ok().as_ref(), Some(&header));
                        assert!(Timing::parse(&header).is_ok(), "{header:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        let long = format!("s={}", "a".repeat(MAX_HEADER_LEN));
        let proof = "Zm9yZ2VkcHJvb2Zz";
        let short_proof = format!("s=web;i=5;p={}", &proof[1..]);
        let (no_window, leading_zero) = (format!("s=web;p={proof}"), format!("s=web;i=05;p={proof}"));
        let (after_proof, before_agent) = (format!("s=web;i=5;p={proof};a=h:1"), format!("s=web;i=5;p={proof}"));
        let (big_tag, long_tag) = (format!("s=web;i=256;p={proof}"), format!("s=web;i=1000;p={proof}"));
        let bad_callers = [
            "",
            "s=",
            "a=1.2.3.4:5",
            "s=web;",
            "s=web;a=",
            "s=web;a=host",
            "s=web;a=host:0",
            "s=web;a=host:99999",
            "s=web;x=1",
            "s=web;a=h:1;a=h:2",
            "S=web",
            "s=we b",
            "s=web,a=h:1",
            "s=😀",
            long.as_str(),
            "s=ab/cd",
            "s=web;a=[zz]:80",
            "s=web;i=5",
            "s=web;i=5;p=",
            short_proof.as_str(),
            no_window.as_str(),
            leading_zero.as_str(),
            after_proof.as_str(),
            big_tag.as_str(),
            long_tag.as_str(),
        ];
        let with_proof = CallerHeader::parse(&hv(&before_agent)).unwrap();
        assert_eq!(with_proof.proof(), Some((5, proof.as_bytes())));
        for bad in bad_callers {
            if let Ok(value) = HeaderValue::from_bytes(bad.as_bytes()) {
                assert!(CallerHeader::parse(&value).is_err(), "accepted caller {bad:?}");
            }
        }
        let bad_timings = [
            "v=2;s=a;t=1;w=1;k=l;at=a",
            "v=1;s=a;t=-1;w=1;k=l;at=a",
            "v=1;s=a;t=1;w=1;k=x;at=a",
            "v=1;s=a;t=1;w=1;k=n;at=a",
            "v=1;s=a;t=1;w=1;k=l;at=a>b",
            "v=1;s=a;t=1;w=1;k=l",
            "v=1;s=a;t=1e3;w=1;k=l;at=a",
            "v=1;s=a;t=9999999999999;w=1;k=l;at=a",
            "v=1;s=a;t=1;w=1;k=l;at=a;a=h:1;z=1",
            "v=1;s=a;w=1;t=1;k=l;at=a",
            "v=1;s=a;t=+1;w=1;k=l;at=a",
            "v=1;s=a;t=1;w=1;k=l;at=a;",
            "v=1;s=a;t=1;w=1;k=l;at=a;a=",
            "v=1;s=a;t=1;w=1;k=n;at=a>",
            "v=1;s=a;t=1;w=1;k=n;at=>b",
            "v=1;s=a;t=1;w=1;k=n;at=a>b>c",
            "v=1;s=a;t=;w=1;k=l;at=a",
            "v=1;s=a;t=1;w=1;k=;at=a",
            "v=1;s=a;t=1;w=1;k=ll;at=a",
            "v=1;;s=a;t=1;w=1;k=l;at=a",
            "v=1 ;s=a;t=1;w=1;k=l;at=a",
            "v=1;s=a;t=5;w=6;k=l;at=a",
            "v=1;s=a;t=05;w=1;k=l;at=a",
            "v=1;s=a;t=5;w=1;k=l;at=a;a=h:080",
            "v=1;s=a;t=5;w=1;k=l;at=a;a=-:80",
            "v=1;s=a;t=5;w=1;k=l;at=a;a=..:80",
            "v=1;s=a;t=5;w=1;k=l;at=a;a=h..x:80",
        ];
        for bad in bad_timings {
            assert!(Timing::parse(&hv(bad)).is_err(), "accepted timing {bad:?}");
        }
        let timing = format!("v=1;s=a;t=5;w=1;k=l;at=a;a=127.0.0.1:9;i=7;p={proof}");
        assert_eq!(Timing::parse(&hv(&timing)).unwrap().proof(), Some((7, proof.as_bytes())));
        for bad in [
            format!("v=1;s=a;t=5;w=1;k=l;at=a;i=7;p={proof};a=127.0.0.1:9"),
            "v=1;s=a;t=5;w=1;k=l;at=a;i=7".to_string(),
        ] {
            assert!(Timing::parse(&hv(&bad)).is_err(), "accepted timing {bad:?}");
        }
        let non_ascii = HeaderValue::from_bytes(b"v=1;s=\xff;t=1;w=1;k=l;at=a").unwrap();
        assert_eq!(Timing::parse(&non_ascii).unwrap_err(), HeaderError::BadField("s"));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic generator (xorshift) over header-legal bytes and mutations of valid headers.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = b"v=1;s=cart;t=23011;w=20950;k=n;at=cart>redis;a=127.0.0.1:9000".to_vec();
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..(next() % 4 + 1) {
                let position = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[position] = (next() % 95 + 32) as u8,
                    1 => {
                        bytes.remove(position);
                    }
                    _ => bytes.insert(position, (next() % 95 + 32) as u8),
                }
                if bytes.is_empty() {
                    bytes.push(b'v');
                }
            }
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let _ = Timing::parse(&value);
                let _ = CallerHeader::parse(&value);
            }
        }
    }

    #[test]
    fn a_wait_points_names_are_shared_with_the_last_ones_made() {
        let first = WaitPointRef::Net { from: "svc-a", to: "svc-b" }.to_owned();
        let again = WaitPointRef::Local("svc-b").to_owned();
        let (WaitPoint::Net { to, .. }, WaitPoint::Local { service }) = (&first, &again) else { unreachable!() };
        assert!(Arc::ptr_eq(to, service), "the same name is not made twice");
        assert_eq!(&**service, "svc-b");
        // More names than the thread keeps: still right, just made anew.
        for n in 0..3 * SHARED_NAMES_PER_THREAD {
            let name = format!("svc-{n}");
            assert_eq!(WaitPointRef::Local(&name).to_owned(), WaitPoint::Local { service: name.as_str().into() });
        }
    }
}
