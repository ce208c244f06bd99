//! The W3C trace context of one span: trace id, span id, flags and the vendors' `tracestate`,
//! and the `traceparent` text they travel as (W3C Trace Context, level 1 and 2).
//!
//! This is the identity a message carries from one unit of work to the next. Core mints it
//! itself (random ids, as OpenTelemetry's default id generator does), so propagation works
//! without any OpenTelemetry crate; with the `otel` feature the ids of the OpenTelemetry span
//! are used instead (see `otel.rs`), so what travels is what the exporter reports.

use std::fmt;
use std::sync::Arc;

use rand::Rng;

/// Bit 0 of the trace flags: the trace is sampled (recorded) upstream.
const SAMPLED: u8 = 0x01;
/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;
/// Longest `tracestate` kept (W3C: vendors must propagate at least 512 characters).
const MAX_TRACESTATE_LEN: usize = 512;

/// One span's identity in the W3C trace-context model.
///
/// ```
/// use purista_core::observe::TraceContext;
/// let parent = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None)?;
/// let child = parent.child();
/// assert_eq!(child.trace_id(), parent.trace_id());
/// assert_ne!(child.span_id(), parent.span_id());
/// assert_eq!(child.traceparent().len(), 55);
/// # Ok::<(), purista_core::observe::TraceContextError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
    trace_state: Option<Arc<str>>,
}

/// Why a `traceparent` (or its `tracestate`) was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    /// Not `version-traceid-parentid-flags` in lowercase hex of the right lengths.
    #[error("traceparent is not in W3C format")]
    Malformed,
    /// Version `ff`, which W3C forbids.
    #[error("traceparent has the forbidden version ff")]
    ForbiddenVersion,
    /// An all-zero trace id or span id, which W3C declares invalid.
    #[error("traceparent has an all-zero trace id or span id")]
    ZeroId,
}

impl TraceContext {
    /// A new trace: random trace id and span id, sampled, no `tracestate`.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        TraceContext {
            trace_id: non_zero_u128(&mut rng),
            span_id: non_zero_u64(&mut rng),
            flags: SAMPLED,
            trace_state: None,
        }
    }

    /// A child span in the same trace: same trace id, flags and `tracestate`, a new span id.
    pub fn child(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: non_zero_u64(&mut rand::rng()),
            flags: self.flags,
            trace_state: self.trace_state.clone(),
        }
    }

    /// A context from its parts (for bridging to another tracing system). `None` when an id is
    /// zero, which W3C declares invalid.
    pub fn from_parts(
        trace_id: u128,
        span_id: u64,
        flags: u8,
        trace_state: Option<&str>,
    ) -> Option<Self> {
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
            trace_state: trace_state.and_then(valid_trace_state).map(Arc::from),
        })
    }

    /// Parses a `traceparent` and, optionally, the `tracestate` beside it. A `tracestate` that
    /// is not printable ASCII or longer than 512 characters is left out (the trace goes on
    /// without it), as W3C allows.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceContextError> {
        let s = traceparent
            .trim_matches(|c| c == ' ' || c == '\t')
            .as_bytes();
        if s.len() < TRACEPARENT_LEN {
            return Err(TraceContextError::Malformed);
        }
        let version = hex_u8(&s[0..2]).ok_or(TraceContextError::Malformed)?;
        if version == 0xff {
            return Err(TraceContextError::ForbiddenVersion);
        }
        // Version 00 is exactly 55 characters; a later version may append fields after a dash.
        if (version == 0 && s.len() != TRACEPARENT_LEN)
            || (s.len() > TRACEPARENT_LEN && s[TRACEPARENT_LEN] != b'-')
        {
            return Err(TraceContextError::Malformed);
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return Err(TraceContextError::Malformed);
        }
        let trace_id = hex_u128(&s[3..35]).ok_or(TraceContextError::Malformed)?;
        let span_id = hex_u64(&s[36..52]).ok_or(TraceContextError::Malformed)?;
        let flags = hex_u8(&s[53..55]).ok_or(TraceContextError::Malformed)?;
        if trace_id == 0 || span_id == 0 {
            return Err(TraceContextError::ZeroId);
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            flags,
            trace_state: tracestate.and_then(valid_trace_state).map(Arc::from),
        })
    }

    /// The trace id.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The span id.
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// True when the trace is sampled upstream.
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The vendors' `tracestate`, passed on unchanged.
    pub fn trace_state(&self) -> Option<&str> {
        self.trace_state.as_deref()
    }

    /// The trace id as 32 lowercase hex characters (the shape PURISTA's ids have too).
    pub fn trace_id_hex(&self) -> String {
        let mut buf = [0u8; 32];
        write_hex(&self.trace_id.to_be_bytes(), &mut buf);
        ascii(&buf)
    }

    /// The span id as 16 lowercase hex characters.
    pub fn span_id_hex(&self) -> String {
        let mut buf = [0u8; 16];
        write_hex(&self.span_id.to_be_bytes(), &mut buf);
        ascii(&buf)
    }

    /// The `traceparent` text: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> String {
        let mut buf = [0u8; TRACEPARENT_LEN];
        self.write_traceparent(&mut buf);
        ascii(&buf)
    }

    /// Writes the `traceparent` text into `buf`.
    pub(crate) fn write_traceparent(&self, buf: &mut [u8; TRACEPARENT_LEN]) {
        buf[0] = b'0';
        buf[1] = b'0';
        buf[2] = b'-';
        write_hex(&self.trace_id.to_be_bytes(), &mut buf[3..35]);
        buf[35] = b'-';
        write_hex(&self.span_id.to_be_bytes(), &mut buf[36..52]);
        buf[52] = b'-';
        write_hex(&[self.flags], &mut buf[53..55]);
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.trace_state)
            .finish()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// A `tracestate` worth passing on: non-empty printable ASCII of at most 512 characters.
fn valid_trace_state(s: &str) -> Option<&str> {
    let s = s.trim_matches(|c| c == ' ' || c == '\t');
    let printable = s.bytes().all(|b| (0x20..=0x7e).contains(&b));
    (!s.is_empty() && s.len() <= MAX_TRACESTATE_LEN && printable).then_some(s)
}

fn non_zero_u128(rng: &mut impl Rng) -> u128 {
    loop {
        let v: u128 = rng.random();
        if v != 0 {
            return v;
        }
    }
}

fn non_zero_u64(rng: &mut impl Rng) -> u64 {
    loop {
        let v: u64 = rng.random();
        if v != 0 {
            return v;
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(bytes: &[u8], out: &mut [u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

/// Only ASCII was written into `buf`, so this never falls back.
fn ascii(buf: &[u8]) -> String {
    std::str::from_utf8(buf)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// One lowercase hex digit (W3C allows no uppercase).
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    Some((nibble(s[0])? << 4) | nibble(s[1])?)
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    s.iter()
        .try_fold(0u64, |acc, &c| Some((acc << 4) | u64::from(nibble(c)?)))
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, &c| Some((acc << 4) | u128::from(nibble(c)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W3C_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_round_trips() {
        let cx = TraceContext::parse(W3C_EXAMPLE, None).unwrap();
        assert_eq!(cx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id_hex(), "00f067aa0ba902b7");
        assert!(cx.is_sampled());
        assert_eq!(cx.traceparent(), W3C_EXAMPLE);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(
                TraceContext::parse(bad, None),
                Err(TraceContextError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            TraceContext::parse(
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None
            ),
            Err(TraceContextError::ForbiddenVersion)
        );
        assert_eq!(
            TraceContext::parse(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None
            ),
            Err(TraceContextError::ZeroId)
        );
        assert_eq!(
            TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                None
            ),
            Err(TraceContextError::ZeroId)
        );
    }

    #[test]
    fn a_later_version_with_more_fields_is_read_as_version_00() {
        let cx = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-later",
            None,
        )
        .unwrap();
        assert_eq!(cx.traceparent(), W3C_EXAMPLE);
    }

    #[test]
    fn unsampled_flags_are_kept() {
        let cx = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        )
        .unwrap();
        assert!(!cx.is_sampled());
        assert!(!cx.child().is_sampled());
    }

    #[test]
    fn tracestate_is_passed_on_or_left_out_when_invalid() {
        let cx = TraceContext::parse(W3C_EXAMPLE, Some("congo=t61rcWkgMzE,rojo=00f067aa")).unwrap();
        assert_eq!(
            cx.child().trace_state(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa")
        );
        let bad = TraceContext::parse(W3C_EXAMPLE, Some("bad\u{7f}state")).unwrap();
        assert_eq!(bad.trace_state(), None);
        let long = "k=".to_string() + &"v".repeat(600);
        assert_eq!(
            TraceContext::parse(W3C_EXAMPLE, Some(&long))
                .unwrap()
                .trace_state(),
            None
        );
    }

    #[test]
    fn roots_are_sampled_and_children_share_the_trace() {
        let root = TraceContext::new_root();
        assert!(root.is_sampled());
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
        let parsed = TraceContext::parse(&child.traceparent(), None).unwrap();
        assert_eq!(parsed, child);
    }
}
