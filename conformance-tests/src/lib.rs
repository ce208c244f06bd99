//! # purista-conformance
//!
//! The one suite every purista-rs bridge must pass (DESIGN §5), in the manner of Watermill's
//! `TestPubSub`: a bridge hands over a [`Harness`] — its declared capabilities, a factory that
//! makes N bridge instances on one broker, optional broker-control hooks — and the suite runs
//! every behaviour against it.
//!
//! * A capability the bridge declares runs its behaviour cases. A capability it does not
//!   declare runs the strict check instead: a strict start must be refused naming the need, a
//!   non-strict start must succeed with a warning ([`gate`]).
//! * Each case gets a fresh deployment under a unique resource prefix, subscribes before it
//!   publishes, waits on conditions with deadlines, de-duplicates by message id where the bridge
//!   is at-least-once, and removes what it created ([`env`](mod@env), [`support`]).
//! * The list of cases exists once, in [`all_cases`], each with what it [`plan::Requires`].
//!   Each bridge's test target is `suite!(<bridge>, <harness>)`: one test per case
//!   (`default::commands::late_response_is_ignored`) under the suite's own test harness
//!   ([`runner::run_suite`]), which lists a case that cannot run here as *ignored* with its
//!   reason, and names a case that proves a strict-check rejection after what it proves. The
//!   capability-matrix binary runs the same table.
//!
//! ```ignore
//! // tests/default.rs (a `[[test]]` target with `harness = false`)
//! purista_conformance::suite!(default, purista_conformance::harnesses::DefaultHarness::new());
//! ```

#![warn(missing_docs)]

pub mod cases;
#[cfg(feature = "testcontainers")]
pub mod containers;
pub mod env;
pub mod gate;
pub mod harness;
pub mod harnesses;
pub mod logs;
pub mod matrix;
pub mod plan;
pub mod results;
pub mod runner;
pub mod support;

pub use harness::{BrokerControl, Deployment, Harness, Offer, RawPublisher, TestMode, Workload};
pub use runner::{Case, Verdict};

/// The suite of one bridge as a test target's `main`: `suite!(module, harness_expr)`. The
/// target needs `harness = false` in `Cargo.toml`; see [`runner::run_suite`].
#[macro_export]
macro_rules! suite {
    ($module:ident, $harness:expr) => {
        fn main() -> ::std::process::ExitCode {
            $crate::runner::run_suite(stringify!($module), ::std::sync::Arc::new($harness))
        }
    };
}

/// Builds the case table: `group { name: requires, … }` → `Vec<Case>`.
macro_rules! case_table {
    ($($group:ident { $($name:ident : $requires:expr),* $(,)? })*) => {
        vec![$($(
            $crate::runner::Case {
                group: stringify!($group),
                name: stringify!($name),
                requires: || {
                    #[allow(unused_imports)]
                    use purista_core::Need::*;
                    #[allow(unused_imports)]
                    use $crate::plan::{needs, nothing};
                    $requires
                },
                run: |h| ::std::boxed::Box::pin($crate::cases::$group::$name(h)),
            },
        )*)*]
    };
}

/// Every case, in suite order, with what it requires: the one list the test targets and the
/// matrix binary run.
///
/// Adding a case: write `pub async fn name(h: Arc<dyn Harness>)` in `src/cases/<group>.rs`
/// and add `name: <requires>` here; every bridge's test target and the matrix pick it up.
pub fn all_cases() -> Vec<Case> {
    case_table! {
        envelope {
            stamps_unique_id_ms_timestamp_and_sender_instance: needs(&[SharedSubscription]),
            trace_principal_tenant_survive_invoke_to_response: needs(&[Commands]),
            trace_principal_tenant_survive_subscription_to_emit: needs(&[SharedSubscription]),
            unknown_fields_survive_a_round_trip: needs(&[SharedSubscription]),
            metadata_of_each_message_arrives_as_its_own: needs(&[SharedSubscription]),
        }
        commands {
            success_returns_the_result: needs(&[Commands]),
            handled_error_carries_status_message_and_data: needs(&[Commands]),
            unhandled_error_is_500_with_generic_text_only: needs(&[Commands]),
            bad_input_is_400: needs(&[Commands]),
            timeout_is_504_at_ttl_and_leaves_no_pending_entry: needs(&[Commands]),
            late_response_is_ignored: needs(&[Commands]),
            no_handler_is_502_fast_or_504_at_ttl: needs(&[Commands]),
            concurrent_invokes_never_cross_correlate: needs(&[Commands]),
            success_event_reaches_subscriptions: needs(&[Commands, SharedSubscription]),
        }
        routing {
            filter_table_routes_like_the_reference_matcher:
                needs(&[ComplexFilter, SharedSubscription]).raw_publisher(),
            random_filters_route_like_the_reference_matcher:
                needs(&[ComplexFilter, BroadcastSubscription]).raw_publisher(),
        }
        subscriptions {
            shared_delivers_each_message_to_exactly_one_instance: needs(&[SharedSubscription]),
            broadcast_delivers_each_message_to_every_instance: needs(&[BroadcastSubscription]),
            filtered_subscription_sees_commands_and_responses:
                needs(&[Commands, ComplexFilter, SharedSubscription]),
            emit_event_name_emits_exactly_one_event: needs(&[SharedSubscription]),
            durable_subscription_keeps_messages_while_no_consumer:
                needs(&[SharedSubscription, DurableSubscription]),
            unsettled_delivery_is_redelivered_when_its_consumer_goes_away:
                needs(&[SharedSubscription, AtLeastOnce]),
        }
        concurrency {
            concurrent_publishers_into_many_instances_deliver_the_exact_set:
                needs(&[SharedSubscription]),
            retry_under_load_acks_the_exact_set:
                needs(&[ManualAck, SharedSubscription, BoundedRetry { max_attempts: 2 }]),
            subscriptions_set_up_while_publishing_get_everything_after_their_start:
                needs(&[SharedSubscription]),
            two_services_sharing_one_event_each_handle_every_message_once:
                needs(&[SharedSubscription]),
            prefetch_bounds_the_handlers_running_at_once:
                needs(&[ManualAck, SharedSubscription]),
        }
        churn {
            a_consumer_leaving_with_prefetched_messages_loses_none:
                needs(&[ManualAck, SharedSubscription]),
            an_emit_that_returned_is_delivered_after_an_immediate_shutdown:
                needs(&[SharedSubscription]),
            a_shared_subscription_survives_its_instances_shutting_down_together:
                needs(&[SharedSubscription]),
            an_unregistered_subscription_instance_gets_nothing_more: needs(&[SharedSubscription]),
            an_unregistered_command_server_serves_nothing_more: needs(&[Commands]),
            an_unregistered_stream_producer_serves_nothing_more: needs(&[Streams]),
        }
        outcomes {
            ack_settles_the_delivery: needs(&[ManualAck, SharedSubscription]),
            retry_up_to_max_attempts_then_dead_letter: needs(&[
                ManualAck,
                SharedSubscription,
                BoundedRetry { max_attempts: 3 },
                DeadLetter,
            ]),
            delayed_retry_is_not_delivered_before_its_delay: needs(&[
                ManualAck,
                SharedSubscription,
                BoundedRetry { max_attempts: 2 },
                DelayedRetry { delay_ms: 300 },
            ]),
            drop_settles_with_a_warning: needs(&[ManualAck, SharedSubscription]),
            stop_consumer_pauses_until_resumed:
                needs(&[ManualAck, SharedSubscription, PauseResume]),
            settling_twice_is_a_typed_error: needs(&[ManualAck, SharedSubscription]),
            poison_message_does_not_stop_the_consumer: needs(&[ManualAck, SharedSubscription]),
        }
        duplicates {
            redelivered_message_id_runs_side_effect_once:
                needs(&[SharedSubscription]).raw_publisher(),
            repeated_business_key_runs_side_effect_once: needs(&[SharedSubscription]),
        }
        streams {
            chunks_arrive_in_order: needs(&[Streams]),
            exactly_one_terminal_frame: needs(&[Streams]),
            frames_after_the_terminal_are_ignored: needs(&[Streams]),
            consumer_cancel_reaches_the_producer: needs(&[Streams]),
            session_timeout_ends_the_session: needs(&[Streams]),
            a_producer_ignoring_the_deadline_is_stopped: needs(&[Streams]),
            a_reader_that_stops_reading_holds_or_fails_the_producer: needs(&[Streams]),
        }
        queues {
            lease_hides_the_job: nothing().queue_bridge(),
            unsettled_lease_reappears_after_visibility_timeout: nothing().queue_bridge(),
            lease_extension_is_capped: needs(&[QueueLeaseExtension]).queue_bridge(),
            retry_backoff_stays_within_jitter_bounds: nothing().queue_bridge(),
            max_attempts_then_dead_letter_queue: nothing().queue_bridge(),
            retry_window_then_dead_letter_queue: nothing().queue_bridge(),
            fatal_failure_dead_letters_at_once: nothing().queue_bridge(),
            dead_letters_inspect_replay_purge: needs(&[QueueDeadLetterOps]).queue_bridge(),
            idempotency_key_returns_the_first_job_id: needs(&[QueueIdempotency]).queue_bridge(),
            delayed_job_is_not_leased_early: needs(&[QueueDelayedDelivery]).queue_bridge(),
            worker_settles_jobs_through_the_service: nothing().queue_bridge(),
            a_job_runs_in_the_flow_that_enqueued_it: needs(&[Commands]).queue_bridge(),
        }
        observability {
            one_request_is_one_trace_across_instances:
                needs(&[Commands, SharedSubscription]),
            retries_and_dead_letters_stay_in_the_trace: needs(&[
                ManualAck,
                SharedSubscription,
                BoundedRetry { max_attempts: 2 },
                DeadLetter,
            ]),
            a_job_continues_the_trace_of_the_command_that_enqueued_it:
                needs(&[Commands]).queue_bridge(),
        }
        limits {
            a_body_at_the_declared_limit_arrives_and_one_byte_more_is_400:
                needs(&[SharedSubscription]).payload_limit(),
            an_oversized_invocation_is_400_whether_or_not_anyone_serves_it:
                needs(&[Commands]).payload_limit(),
            metadata_at_the_declared_limit_arrives_and_one_byte_more_is_400:
                needs(&[SharedSubscription]).metadata_limit(),
            oversized_metadata_fields_are_400_at_the_caller_and_cost_no_reconnect:
                needs(&[SharedSubscription]).metadata_limit(),
            a_message_at_the_metadata_limit_is_retried_and_dead_lettered_without_a_reconnect:
                needs(&[
                    ManualAck,
                    SharedSubscription,
                    BoundedRetry { max_attempts: 2 },
                    DeadLetter,
                ])
                .metadata_limit(),
        }
        lifecycle {
            info_messages_arrive_in_order_with_function_metadata:
                needs(&[Commands, ComplexFilter, SharedSubscription]),
            in_flight_counts_running_handlers_by_kind: needs(&[Commands, SharedSubscription]),
            shutdown_waits_for_running_handlers: needs(&[Commands]),
            shutdown_rejects_pending_invocations_and_reports_what_still_runs: needs(&[Commands]),
            a_failed_start_leaves_nothing_registered: needs(&[Commands, SharedSubscription]),
        }
        reliability {
            connection_drop_loses_no_events:
                needs(&[SharedSubscription, DurableSubscription, AtLeastOnce]).broker_control(),
            broker_restart_loses_no_events:
                needs(&[SharedSubscription, DurableSubscription, AtLeastOnce]).broker_control(),
            two_faults_in_one_run_lose_no_events:
                needs(&[SharedSubscription, DurableSubscription, AtLeastOnce]).broker_control(),
            invocations_during_an_outage_fail_or_complete_within_ttl:
                needs(&[Commands]).broker_control(),
            a_command_cut_off_mid_handling_is_not_run_twice: needs(&[Commands]).broker_control(),
            queue_jobs_survive_broker_faults: nothing().queue_bridge().broker_control(),
            health_turns_unhealthy_during_an_outage_and_back: nothing().broker_control(),
        }
        strict {
            declared_capabilities_are_the_bridges_own: nothing(),
            strict_start_lists_every_mismatch_in_one_error: nothing(),
            non_strict_start_degrades_with_a_warning_per_mismatch: nothing(),
        }
    }
}
