//! The gRPC face of the double: the `kubemq` crate's generated `Kubemq` server trait, each call
//! checked for the auth token and validated the way KubeMQ validates it, then handed to the
//! pattern's state ([`super::pubsub`], [`super::requests`], [`super::queues`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kubemq::proto::kubemq::kubemq_server::{Kubemq, KubemqServer};
use kubemq::proto::kubemq::{
    self as pb, AckAllQueueMessagesRequest, AckAllQueueMessagesResponse, Empty, Event,
    EventReceive, PingResult, QueueMessage, QueueMessagesBatchRequest, QueueMessagesBatchResponse,
    QueuesDownstreamRequest, QueuesDownstreamRequestType as Down, QueuesDownstreamResponse,
    QueuesUpstreamRequest, QueuesUpstreamResponse, ReceiveQueueMessagesRequest,
    ReceiveQueueMessagesResponse, Request, Response, SendQueueMessageResult,
    StreamQueueMessagesRequest, StreamQueueMessagesResponse, Subscribe, subscribe::SubscribeType,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic012::{Status, Streaming};

use super::State;
use super::queues::{Hold, Settle};
use super::wildcard;

/// Largest gRPC message the double takes and sends: the KubeMQ SDKs' default send limit.
const MAX_MESSAGE_BYTES: usize = 100 * 1024 * 1024;

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The tonic service of the double.
pub(crate) fn server(state: Arc<State>) -> KubemqServer<DoubleService> {
    KubemqServer::new(DoubleService { state })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) struct DoubleService {
    state: Arc<State>,
}

impl DoubleService {
    fn authorize<T>(&self, request: &tonic012::Request<T>) -> Result<(), Status> {
        let Some(token) = &self.state.auth_token else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if given == Some(token.as_str()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid or missing auth token"))
        }
    }
}

pub(crate) fn check_channel(channel: &str, wildcards_allowed: bool) -> Result<(), Status> {
    if channel.is_empty() {
        return Err(Status::invalid_argument("channel cannot be empty"));
    }
    if channel.contains(' ') {
        return Err(Status::invalid_argument(
            "channel cannot contain whitespace",
        ));
    }
    if !wildcards_allowed && wildcard::has_wildcards(channel) {
        return Err(Status::invalid_argument(
            "wildcards are allowed only in events subscriptions",
        ));
    }
    Ok(())
}

fn send_event(state: &State, event: Event) -> Result<pb::Result, Status> {
    check_channel(&event.channel, false)?;
    if event.metadata.is_empty() && event.body.is_empty() {
        return Err(Status::invalid_argument("event must have metadata or body"));
    }
    let event_id = if event.event_id.is_empty() {
        super::new_id()
    } else {
        event.event_id
    };
    let received = EventReceive {
        event_id: event_id.clone(),
        channel: event.channel,
        metadata: event.metadata,
        body: event.body,
        timestamp: super::pubsub::now_ns(),
        sequence: 0,
        tags: event.tags,
    };
    if event.store {
        state.pubsub.publish_stored(received);
    } else {
        state.pubsub.publish_event(received);
    }
    Ok(pb::Result {
        event_id,
        sent: true,
        error: String::new(),
    })
}

fn tonic12_response<T: Send + 'static>(
    rx: mpsc::Receiver<Result<T, Status>>,
) -> tonic012::Response<Out<T>> {
    tonic012::Response::new(Box::pin(ReceiverStream::new(rx)))
}

#[tonic012::async_trait]
impl Kubemq for DoubleService {
    async fn send_event(
        &self,
        request: tonic012::Request<Event>,
    ) -> Result<tonic012::Response<pb::Result>, Status> {
        self.authorize(&request)?;
        send_event(&self.state, request.into_inner()).map(tonic012::Response::new)
    }

    type SendEventsStreamStream = Out<pb::Result>;

    async fn send_events_stream(
        &self,
        request: tonic012::Request<Streaming<Event>>,
    ) -> Result<tonic012::Response<Self::SendEventsStreamStream>, Status> {
        self.authorize(&request)?;
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(event)) = incoming.message().await {
                let store = event.store;
                let id = event.event_id.clone();
                let answer = match send_event(&state, event) {
                    Ok(r) => r,
                    Err(status) => pb::Result {
                        event_id: id,
                        sent: false,
                        error: status.message().to_string(),
                    },
                };
                // Plain events are answered only when they fail, store events always.
                if (store || !answer.sent) && tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic012::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeToEventsStream = Out<EventReceive>;

    async fn subscribe_to_events(
        &self,
        request: tonic012::Request<Subscribe>,
    ) -> Result<tonic012::Response<Self::SubscribeToEventsStream>, Status> {
        self.authorize(&request)?;
        let subscribe = request.into_inner();
        if subscribe.client_id.is_empty() {
            return Err(Status::invalid_argument("client id cannot be empty"));
        }
        let rx = match SubscribeType::try_from(subscribe.subscribe_type_data) {
            Ok(SubscribeType::Events) => {
                check_channel(&subscribe.channel, true)?;
                self.state.pubsub.subscribe_events(&subscribe)
            }
            Ok(SubscribeType::EventsStore) => {
                check_channel(&subscribe.channel, false)?;
                self.state.pubsub.subscribe_store(&subscribe)?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "subscribe type must be events or events store",
                ));
            }
        };
        Ok(tonic012::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeToRequestsStream = Out<Request>;

    async fn subscribe_to_requests(
        &self,
        request: tonic012::Request<Subscribe>,
    ) -> Result<tonic012::Response<Self::SubscribeToRequestsStream>, Status> {
        self.authorize(&request)?;
        let subscribe = request.into_inner();
        if subscribe.client_id.is_empty() {
            return Err(Status::invalid_argument("client id cannot be empty"));
        }
        check_channel(&subscribe.channel, false)?;
        let kind = match SubscribeType::try_from(subscribe.subscribe_type_data) {
            Ok(SubscribeType::Commands) => pb::request::RequestType::Command as i32,
            Ok(SubscribeType::Queries) => pb::request::RequestType::Query as i32,
            _ => {
                return Err(Status::invalid_argument(
                    "subscribe type must be commands or queries",
                ));
            }
        };
        let rx = self
            .state
            .requests
            .subscribe(&subscribe.channel, &subscribe.group, kind);
        Ok(tonic012::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn send_request(
        &self,
        request: tonic012::Request<Request>,
    ) -> Result<tonic012::Response<Response>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        check_channel(&request.channel, false)?;
        let kind = pb::request::RequestType::try_from(request.request_type_data);
        if !matches!(
            kind,
            Ok(pb::request::RequestType::Command | pb::request::RequestType::Query)
        ) {
            return Err(Status::invalid_argument(
                "request type must be command or query",
            ));
        }
        self.state
            .requests
            .send(request)
            .await
            .map(tonic012::Response::new)
    }

    async fn send_response(
        &self,
        request: tonic012::Request<Response>,
    ) -> Result<tonic012::Response<Empty>, Status> {
        self.authorize(&request)?;
        self.state.requests.respond(request.into_inner())?;
        Ok(tonic012::Response::new(Empty {}))
    }

    async fn send_queue_message(
        &self,
        request: tonic012::Request<QueueMessage>,
    ) -> Result<tonic012::Response<SendQueueMessageResult>, Status> {
        self.authorize(&request)?;
        Ok(tonic012::Response::new(
            self.state.queues.send(request.into_inner()),
        ))
    }

    async fn send_queue_messages_batch(
        &self,
        request: tonic012::Request<QueueMessagesBatchRequest>,
    ) -> Result<tonic012::Response<QueueMessagesBatchResponse>, Status> {
        self.authorize(&request)?;
        let batch = request.into_inner();
        let results: Vec<SendQueueMessageResult> = batch
            .messages
            .into_iter()
            .map(|m| self.state.queues.send(m))
            .collect();
        Ok(tonic012::Response::new(QueueMessagesBatchResponse {
            batch_id: batch.batch_id,
            have_errors: results.iter().any(|r| r.is_error),
            results,
        }))
    }

    async fn receive_queue_messages(
        &self,
        request: tonic012::Request<ReceiveQueueMessagesRequest>,
    ) -> Result<tonic012::Response<ReceiveQueueMessagesResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let mut response = ReceiveQueueMessagesResponse {
            request_id: r.request_id.clone(),
            is_peak: r.is_peak,
            ..Default::default()
        };
        if let Err(status) = check_channel(&r.channel, false) {
            response.is_error = true;
            response.error = status.message().to_string();
            return Ok(tonic012::Response::new(response));
        }
        let max = r.max_number_of_messages.max(1) as usize;
        let messages = if r.is_peak {
            self.state.queues.peek(&r.channel, max)
        } else {
            let wait = Duration::from_secs(r.wait_time_seconds.max(0) as u64);
            self.state.queues.take(&r.channel, max, wait, None).await
        };
        response.messages_received = messages.len() as i32;
        response.messages = messages;
        Ok(tonic012::Response::new(response))
    }

    type StreamQueueMessageStream = Out<StreamQueueMessagesResponse>;

    async fn stream_queue_message(
        &self,
        request: tonic012::Request<Streaming<StreamQueueMessagesRequest>>,
    ) -> Result<tonic012::Response<Self::StreamQueueMessageStream>, Status> {
        self.authorize(&request)?;
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(super::lease_stream::serve(self.state.clone(), incoming, tx));
        Ok(tonic12_response(rx))
    }

    async fn ack_all_queue_messages(
        &self,
        request: tonic012::Request<AckAllQueueMessagesRequest>,
    ) -> Result<tonic012::Response<AckAllQueueMessagesResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let mut response = AckAllQueueMessagesResponse {
            request_id: r.request_id,
            ..Default::default()
        };
        match check_channel(&r.channel, false) {
            Ok(()) => response.affected_messages = self.state.queues.ack_all(&r.channel),
            Err(s) => {
                response.is_error = true;
                response.error = s.message().to_string();
            }
        }
        Ok(tonic012::Response::new(response))
    }

    async fn ping(
        &self,
        _request: tonic012::Request<Empty>,
    ) -> Result<tonic012::Response<PingResult>, Status> {
        // KubeMQ answers pings without the auth token (its SDKs send none with a ping).
        let now = super::pubsub::now_ns();
        Ok(tonic012::Response::new(PingResult {
            host: "purista-kubemq-double".into(),
            version: "double".into(),
            server_start_time: self.state.started_at / 1_000_000_000,
            server_up_time_seconds: (now - self.state.started_at) / 1_000_000_000,
        }))
    }

    type QueuesDownstreamStream = Out<QueuesDownstreamResponse>;

    async fn queues_downstream(
        &self,
        request: tonic012::Request<Streaming<QueuesDownstreamRequest>>,
    ) -> Result<tonic012::Response<Self::QueuesDownstreamStream>, Status> {
        self.authorize(&request)?;
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut transactions: Vec<String> = Vec::new();
            let mut polls = tokio::task::JoinSet::new();
            while let Ok(Some(r)) = incoming.message().await {
                let kind =
                    Down::try_from(r.request_type_data).unwrap_or(Down::PollRequestTypeUnknown);
                let hold = Hold::Transaction(r.ref_transaction_id.clone());
                let range: Vec<u64> = r.sequence_range.iter().map(|s| *s as u64).collect();
                match kind {
                    Down::Get => {
                        let txn = super::new_id();
                        transactions.push(txn.clone());
                        let state = state.clone();
                        let tx = tx.clone();
                        polls.spawn(async move {
                            let mut answer = QueuesDownstreamResponse {
                                transaction_id: txn.clone(),
                                ref_request_id: r.request_id.clone(),
                                request_type_data: r.request_type_data,
                                ..Default::default()
                            };
                            if let Err(s) = check_channel(&r.channel, false) {
                                answer.is_error = true;
                                answer.error = s.message().to_string();
                            } else if r.max_items <= 0 {
                                answer.is_error = true;
                                answer.error = "max items must be greater than 0".into();
                            } else {
                                let wait = Duration::from_millis(r.wait_timeout.max(0) as u64);
                                let hold = (!r.auto_ack).then_some(Hold::Transaction(txn));
                                answer.messages = state
                                    .queues
                                    .take(&r.channel, r.max_items as usize, wait, hold)
                                    .await;
                                answer.transaction_complete =
                                    r.auto_ack || answer.messages.is_empty();
                            }
                            let _ = tx.send(Ok(answer)).await;
                        });
                    }
                    Down::AckAll => {
                        state.queues.settle(&hold, None, &Settle::Ack);
                    }
                    Down::AckRange => {
                        state.queues.settle(&hold, Some(&range), &Settle::Ack);
                    }
                    Down::NAckAll => {
                        state.queues.settle(&hold, None, &Settle::Reject);
                    }
                    Down::NAckRange => {
                        state.queues.settle(&hold, Some(&range), &Settle::Reject);
                    }
                    Down::ReQueueAll | Down::ReQueueRange
                        if check_channel(&r.re_queue_channel, false).is_ok() =>
                    {
                        let which = (kind == Down::ReQueueRange).then_some(&range[..]);
                        state.queues.settle(
                            &hold,
                            which,
                            &Settle::Move(r.re_queue_channel.clone()),
                        );
                    }
                    Down::CloseByClient => break,
                    // Status requests, and anything unknown, are answered with nothing held.
                    _ => {}
                }
            }
            polls.abort_all();
            for txn in transactions {
                state
                    .queues
                    .settle(&Hold::Transaction(txn), None, &Settle::Reject);
            }
        });
        Ok(tonic012::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type QueuesUpstreamStream = Out<QueuesUpstreamResponse>;

    async fn queues_upstream(
        &self,
        request: tonic012::Request<Streaming<QueuesUpstreamRequest>>,
    ) -> Result<tonic012::Response<Self::QueuesUpstreamStream>, Status> {
        self.authorize(&request)?;
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(r)) = incoming.message().await {
                let results: Vec<SendQueueMessageResult> = r
                    .messages
                    .into_iter()
                    .map(|m| state.queues.send(m))
                    .collect();
                let answer = QueuesUpstreamResponse {
                    ref_request_id: r.request_id,
                    results,
                    is_error: false,
                    error: String::new(),
                };
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic012::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
