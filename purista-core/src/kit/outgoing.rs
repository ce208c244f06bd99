//! What every bridge checks and stamps on what it sends, written once.
//!
//! A bridge stamps a fresh `id`, the `timestamp` and its own `sender.instanceId` on what it
//! emits or invokes ([`stamp`]); responses get the responder's stamp ([`stamp_response`]).
//! Before anything is published, the message's family must fit the call: `emit` takes neither
//! commands (they travel through `invoke`) nor stream frames (they travel in a session);
//! `invoke` takes a command with a receiver; `open_stream` takes an open frame with a
//! correlation id and a receiver. The checks return [`BridgeError::InvalidRequest`] (400).

use crate::envelope::{Address, Envelope, MessageType, now_ms};
use crate::error::BridgeError;
use crate::ids;
use crate::stream::{FrameType, frame_type};

/// Stamps what a bridge instance sends: fresh id, current timestamp, `sender.instanceId`.
///
/// ```
/// use purista_core::{kit, Envelope, MessageType, SenderAddress};
/// let mut e = Envelope::new(MessageType::CustomMessage, SenderAddress::default());
/// let before = e.id.clone();
/// kit::stamp(&mut e, "instance-1");
/// assert_ne!(e.id, before);
/// assert_eq!(e.sender.instance_id, "instance-1");
/// ```
pub fn stamp(envelope: &mut Envelope, instance_id: &str) {
    envelope.id = ids::new_id();
    envelope.timestamp = now_ms();
    envelope.sender.instance_id.clear();
    envelope.sender.instance_id.push_str(instance_id);
}

/// Stamps a command's response as the responder's (fresh id and timestamp, the responder's
/// instance id) and fills what a handler left out: the command's correlation id and, as
/// receiver, the command's sender.
pub fn stamp_response(response: &mut Envelope, command: &Envelope, responder_instance_id: &str) {
    stamp(response, responder_instance_id);
    if response.correlation_id.is_none() {
        response.correlation_id = command.correlation_id.clone();
    }
    if response.receiver.is_none() {
        response.receiver = Some(command.sender.to_address());
    }
}

/// `emit` publishes every family but commands and stream frames.
pub fn check_emittable(envelope: &Envelope) -> Result<(), BridgeError> {
    match envelope.message_type {
        MessageType::Command => Err(BridgeError::InvalidRequest(
            "commands are sent with invoke, not emit".into(),
        )),
        MessageType::Stream => Err(BridgeError::InvalidRequest(
            "stream frames travel in a stream session, not through emit".into(),
        )),
        _ => Ok(()),
    }
}

/// `invoke` needs a command with a receiver; returns the receiver.
pub fn check_command(command: &Envelope) -> Result<&Address, BridgeError> {
    if command.message_type != MessageType::Command {
        return Err(BridgeError::InvalidRequest(format!(
            "invoke needs a command, got {}",
            command.message_type
        )));
    }
    command
        .receiver
        .as_ref()
        .ok_or_else(|| BridgeError::InvalidRequest("a command needs a receiver".into()))
}

/// The command's correlation id, made up when it has none.
pub fn correlation_id(command: &mut Envelope) -> &str {
    command.correlation_id.get_or_insert_with(ids::new_id)
}

/// `open_stream` needs an `open` stream frame with a correlation id and a receiver; returns
/// both.
pub fn check_stream_open(open: &Envelope) -> Result<(&str, &Address), BridgeError> {
    if open.message_type != MessageType::Stream {
        return Err(BridgeError::InvalidRequest(format!(
            "a stream opens with a stream frame, got {}",
            open.message_type
        )));
    }
    let Some(correlation_id) = open.correlation_id.as_deref() else {
        return Err(BridgeError::InvalidRequest(
            "a stream open frame needs a correlationId".into(),
        ));
    };
    let Some(receiver) = open.receiver.as_ref() else {
        return Err(BridgeError::InvalidRequest(
            "a stream open frame needs a receiver".into(),
        ));
    };
    if frame_type(open) != Some(FrameType::Open) {
        return Err(BridgeError::InvalidRequest(
            "a stream session starts with an open frame".into(),
        ));
    }
    Ok((correlation_id, receiver))
}

/// `service@version/target` of an address, without its instance: the label of a command or
/// stream endpoint in logs, task sets and in-flight counters.
pub fn endpoint_label(address: &Address) -> String {
    format!(
        "{}@{}/{}",
        address.service_name, address.service_version, address.service_target
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SenderAddress;

    #[test]
    fn emit_refuses_commands_and_stream_frames() {
        let sender = SenderAddress::default();
        let command = Envelope::command(
            sender.clone(),
            Address::new("a", "1", "b"),
            serde_json::Value::Null,
            serde_json::Value::Null,
        );
        assert!(matches!(
            check_emittable(&command),
            Err(BridgeError::InvalidRequest(_))
        ));
        let frame = Envelope::new(MessageType::Stream, sender.clone());
        assert!(check_emittable(&frame).is_err());
        let event = Envelope::custom(sender, "x", serde_json::Value::Null);
        assert!(check_emittable(&event).is_ok());
    }

    #[test]
    fn invoke_needs_a_command_with_a_receiver() {
        let mut command = Envelope::command(
            SenderAddress::default(),
            Address::new("a", "1", "b"),
            serde_json::Value::Null,
            serde_json::Value::Null,
        );
        assert_eq!(check_command(&command).unwrap().service_target, "b");
        command.receiver = None;
        assert!(check_command(&command).is_err());
    }

    #[test]
    fn a_response_gets_the_responders_stamp_and_the_commands_correlation() {
        let command = Envelope::command(
            SenderAddress {
                instance_id: "caller".into(),
                ..SenderAddress::default()
            },
            Address::new("a", "1", "b"),
            serde_json::Value::Null,
            serde_json::Value::Null,
        );
        let mut response = command.success_response(serde_json::json!(1), None);
        response.correlation_id = None;
        response.receiver = None;
        stamp_response(&mut response, &command, "responder");
        assert_eq!(response.sender.instance_id, "responder");
        assert_eq!(response.correlation_id, command.correlation_id);
        assert_eq!(
            response.receiver.unwrap().instance_id.as_deref(),
            Some("caller")
        );
    }
}
