//! What a service tells listeners about each command and stream it registers: the payload of
//! `infoServiceFunctionAdded`, in PURISTA's shape, so a PURISTA tool that lists functions (or
//! builds an OpenAPI document from them) sees Rust services like TypeScript ones.
//!
//! PURISTA sends the definition's metadata, `{expose: {contentTypeRequest, …, inputPayload,
//! parameter, outputPayload, deprecated}}` for a command and `{expose: {…, inputPayload,
//! parameter, chunkPayload, finalPayload, deprecated}}` for a stream, each schema a JSON Schema.
//! A definition's schemas are set as JSON values ([`Expose::input`] and friends), or, with the
//! `schemars` feature, derived from the Rust types (`CommandDef::schemas`,
//! `StreamDef::schemas`). A definition's own metadata object is merged beside `expose`.

use serde_json::{Map, Value, json};

/// The JSON Schemas a definition exposes; each is left out of the info message while unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expose {
    /// Schema of the input payload (PURISTA `inputPayload`).
    pub input: Option<Value>,
    /// Schema of the parameter (PURISTA `parameter`).
    pub parameter: Option<Value>,
    /// Schema of a command's result (`outputPayload`) or a stream's chunks (`chunkPayload`).
    pub output: Option<Value>,
    /// Schema of a stream's final value (`finalPayload`); unused for commands.
    pub final_value: Option<Value>,
    /// PURISTA's `deprecated` flag.
    pub deprecated: bool,
}

/// What kind of function an info message describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FunctionKind {
    Command,
    Stream,
}

impl Expose {
    /// The `infoServiceFunctionAdded` payload: `{expose: {…}}` plus the keys of `metadata`
    /// when it is an object (`expose` itself is never replaced).
    ///
    /// ```
    /// use purista_core::service::Expose;
    /// let expose = Expose { input: Some(serde_json::json!({"type": "string"})), ..Expose::default() };
    /// let info = expose.command_info(&serde_json::Value::Null);
    /// assert_eq!(info["expose"]["inputPayload"]["type"], "string");
    /// assert_eq!(info["expose"]["contentTypeResponse"], "application/json");
    /// assert!(info["expose"].get("outputPayload").is_none());
    /// ```
    pub fn command_info(&self, metadata: &Value) -> Value {
        self.info(FunctionKind::Command, metadata)
    }

    /// The same for a stream: chunks as `chunkPayload`, the final value as `finalPayload`.
    pub fn stream_info(&self, metadata: &Value) -> Value {
        self.info(FunctionKind::Stream, metadata)
    }

    pub(crate) fn info(&self, kind: FunctionKind, metadata: &Value) -> Value {
        let mut expose = Map::new();
        expose.insert("contentTypeRequest".into(), json!("application/json"));
        expose.insert("contentEncodingRequest".into(), json!("utf-8"));
        if kind == FunctionKind::Command {
            // A stream's response content type depends on how it is exposed; PURISTA leaves it
            // out unless set, and so do we.
            expose.insert("contentTypeResponse".into(), json!("application/json"));
        }
        expose.insert("contentEncodingResponse".into(), json!("utf-8"));
        let output_key = match kind {
            FunctionKind::Command => "outputPayload",
            FunctionKind::Stream => "chunkPayload",
        };
        for (key, schema) in [
            ("inputPayload", &self.input),
            ("parameter", &self.parameter),
            (output_key, &self.output),
        ] {
            if let Some(schema) = schema {
                expose.insert(key.into(), schema.clone());
            }
        }
        if kind == FunctionKind::Stream
            && let Some(schema) = &self.final_value
        {
            expose.insert("finalPayload".into(), schema.clone());
        }
        expose.insert("deprecated".into(), json!(self.deprecated));
        let mut info = Map::new();
        if let Value::Object(extra) = metadata {
            info.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        info.insert("expose".into(), Value::Object(expose));
        Value::Object(info)
    }
}

/// The JSON Schema of `T` (draft 2020-12, as PURISTA's own schemas are).
#[cfg(feature = "schemars")]
pub fn schema_of<T: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null)
}
