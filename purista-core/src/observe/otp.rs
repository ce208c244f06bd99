//! The envelope's `otp` field: a W3C trace context in PURISTA's carrier format.
//!
//! PURISTA writes `otp` as `JSON.stringify` of a plain object into which OpenTelemetry's W3C
//! propagator injected `traceparent` and, when the span has one, `tracestate`:
//! `{"traceparent":"00-<trace id>-<span id>-<flags>"}` — compact JSON, `traceparent` first.
//! It reads `otp` by `JSON.parse` and extracts the same two keys, ignoring any other (a
//! `baggage` key, for one); `"{}"` (a service without an active span) carries no context.
//! These functions write exactly that and read it the same way (interop/trace-context has the
//! capture from real `@purista/core` the tests check against). A carrier that does not parse
//! carries no context: the receiver starts a new trace and says why at debug level, as
//! PURISTA logs and goes on.

use std::borrow::Cow;

use serde::Deserialize;

use super::trace_context::{TraceContext, TraceContextError};

/// The carrier's key for the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The carrier's key for the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// Why an `otp` carried no usable context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtpError {
    /// Not a JSON object of strings.
    #[error("otp is not a JSON object: {0}")]
    NotAnObject(String),
    /// The `traceparent` in it is not valid.
    #[error(transparent)]
    TraceParent(#[from] TraceContextError),
}

/// Writes `cx` as PURISTA writes a carrier: `{"traceparent":"…"}`, plus `"tracestate":"…"`
/// when the context has one.
///
/// ```
/// use purista_core::observe::{TraceContext, write_otp};
/// let cx = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None)?;
/// assert_eq!(
///     write_otp(&cx),
///     r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#
/// );
/// # Ok::<(), purista_core::observe::TraceContextError>(())
/// ```
pub fn write_otp(cx: &TraceContext) -> String {
    const HEAD: &str = "{\"traceparent\":\"";
    let mut traceparent = [0u8; 55];
    cx.write_traceparent(&mut traceparent);
    let mut out = String::with_capacity(HEAD.len() + traceparent.len() + 2);
    out.push_str(HEAD);
    // Only ASCII hex digits and dashes were written.
    out.push_str(std::str::from_utf8(&traceparent).unwrap_or_default());
    out.push('"');
    if let Some(state) = cx.trace_state() {
        out.push_str(",\"tracestate\":");
        // A tracestate may hold quotes and backslashes: JSON-escape it as JSON.stringify does.
        match serde_json::to_string(state) {
            Ok(quoted) => out.push_str(&quoted),
            Err(_) => out.push_str("\"\""),
        }
    }
    out.push('}');
    out
}

/// Reads a carrier as PURISTA does: `Ok(None)` when it holds no `traceparent` (`"{}"`), the
/// context when it holds a valid one, an error otherwise.
///
/// ```
/// use purista_core::observe::read_otp;
/// let cx = read_otp(r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","baggage":"k=v"}"#)?
///     .expect("a context");
/// assert_eq!(cx.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
/// assert_eq!(read_otp("{}")?, None);
/// # Ok::<(), purista_core::observe::OtpError>(())
/// ```
pub fn read_otp(otp: &str) -> Result<Option<TraceContext>, OtpError> {
    // Borrowed from `otp` unless escaped: reading a carrier allocates nothing in the usual case.
    #[derive(Deserialize)]
    struct Carrier<'a> {
        #[serde(default, borrow)]
        traceparent: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        tracestate: Option<Cow<'a, str>>,
    }
    // A struct would also read from a JSON array; a carrier is an object.
    if !otp.trim_start().starts_with('{') {
        return Err(OtpError::NotAnObject("not an object".into()));
    }
    let carrier: Carrier =
        serde_json::from_str(otp).map_err(|e| OtpError::NotAnObject(e.to_string()))?;
    let Some(traceparent) = carrier.traceparent else {
        return Ok(None);
    };
    Ok(Some(TraceContext::parse(
        &traceparent,
        carrier.tracestate.as_deref(),
    )?))
}

/// The context an envelope or job carries in `otp`, if any; an unusable carrier is logged at
/// debug level and counts as none (the receiver starts a new trace).
pub(crate) fn carried(otp: Option<&str>) -> Option<TraceContext> {
    match read_otp(otp?) {
        Ok(cx) => cx,
        Err(error) => {
            tracing::debug!(%error, "otp carries no usable trace context; starting a new trace");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracestate_is_written_after_the_traceparent_and_escaped() {
        let cx = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("a=\"q\\"),
        )
        .unwrap();
        let otp = write_otp(&cx);
        assert_eq!(
            otp,
            r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","tracestate":"a=\"q\\"}"#
        );
        assert_eq!(read_otp(&otp).unwrap(), Some(cx));
    }

    #[test]
    fn unusable_carriers_are_errors_and_carry_nothing() {
        for bad in ["", "wrong_input", "[]", "{\"traceparent\":1}", "null"] {
            assert!(
                matches!(read_otp(bad), Err(OtpError::NotAnObject(_))),
                "{bad:?}"
            );
            assert_eq!(carried(Some(bad)), None);
        }
        assert!(matches!(
            read_otp(r#"{"traceparent":"00-zz"}"#),
            Err(OtpError::TraceParent(_))
        ));
        assert_eq!(carried(None), None);
    }

    #[test]
    fn escaped_keys_and_values_are_read() {
        // JSON.stringify never escapes these, but a JSON writer may: the reading is JSON's.
        let otp = r#"{"trace\u0070arent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0\u0031"}"#;
        let cx = read_otp(otp).unwrap().unwrap();
        assert!(cx.is_sampled());
    }
}
