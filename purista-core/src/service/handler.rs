//! What every handler runtime shares: the `Empty` filler for handlers without input, decoding
//! input (a mismatch is a handled 400 naming the part) into the arguments of a handler with or
//! without a parameter, and the guard that turns a panic in user code into an error instead of
//! letting it reach a consumer loop.

use serde::de::{Deserialize, DeserializeOwned, Deserializer, IgnoredAny};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::envelope::Envelope;
use crate::error::HandledError;

/// Runs a handler: both the call that builds its future and the future itself are guarded, so
/// a panic anywhere in user code becomes `Err(())` instead of reaching a consumer loop.
pub(crate) async fn run_guarded<T>(
    make: impl FnOnce() -> futures::future::BoxFuture<'static, T>,
) -> Result<T, ()> {
    use futures::FutureExt;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ()),
        Err(_) => Err(()),
    }
}

/// A parameter or payload type that accepts any JSON and serializes as `{}`: for handlers that
/// take no input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Empty;

/// `{}`: an object with no properties (what [`Empty`] serializes as).
#[cfg(feature = "schemars")]
impl schemars::JsonSchema for Empty {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Empty".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "object" })
    }
}

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Empty)
    }
}

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        s.serialize_map(Some(0))?.end()
    }
}

/// Deserializes handler input; a mismatch is a handled 400 naming the part.
pub(crate) fn decode_input<T: DeserializeOwned>(v: &Value, part: &str) -> Result<T, HandledError> {
    T::deserialize(v).map_err(|e| HandledError::bad_request(format!("invalid {part}: {e}")))
}

/// The input a handler takes, decoded from a message's `{payload, parameter}`: `(I,)` for a
/// handler that ignores the parameter, `(I, P)` for one that takes it. Implemented for those
/// two tuples; you do not implement it. It is how [`CommandFn`](super::CommandFn),
/// [`StreamFn`](super::StreamFn) and [`JobFn`](super::JobFn) tell a handler's two shapes
/// apart.
pub trait HandlerArgs: Sized + Send + 'static {
    /// Decodes the parts; a mismatch is a 400 naming the part.
    fn decode(payload: &Value, parameter: &Value) -> Result<Self, HandledError>;
}

impl<I: DeserializeOwned + Send + 'static> HandlerArgs for (I,) {
    fn decode(payload: &Value, _parameter: &Value) -> Result<Self, HandledError> {
        Ok((decode_input(payload, "payload")?,))
    }
}

impl<I, P> HandlerArgs for (I, P)
where
    I: DeserializeOwned + Send + 'static,
    P: DeserializeOwned + Send + 'static,
{
    fn decode(payload: &Value, parameter: &Value) -> Result<Self, HandledError> {
        Ok((
            decode_input(payload, "payload")?,
            decode_input(parameter, "parameter")?,
        ))
    }
}

/// Splits a command's `{payload, parameter}` body (missing parts read as `null`).
pub(crate) fn split_body(e: &Envelope) -> (&Value, &Value) {
    const NULL: &Value = &Value::Null;
    match &e.payload {
        Value::Object(o) => (
            o.get("payload").unwrap_or(NULL),
            o.get("parameter").unwrap_or(NULL),
        ),
        _ => (NULL, NULL),
    }
}
