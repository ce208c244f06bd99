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
//! * The list of cases exists once, in [`for_each_case!`]. [`suite!`] turns it into one test per
//!   behaviour per bridge (`default::commands::late_response_is_ignored`), [`all_cases`] into
//!   the table the capability-matrix binary runs.
//!
//! ```ignore
//! // tests/default.rs
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
pub mod runner;
pub mod support;

pub use harness::{BrokerControl, Deployment, Harness, RawPublisher, TestMode};
pub use runner::{Case, Verdict};

/// The one list of cases, by behaviour group. Calls `$callback! { [extra] group { names } … }`.
///
/// Adding a case: write `pub async fn name(h: Arc<dyn Harness>) -> Verdict` in
/// `src/cases/<group>.rs` and add its name here; every bridge's test target and the matrix
/// pick it up.
#[macro_export]
macro_rules! for_each_case {
    ($($callback:tt)::+ ! [$($extra:tt)*]) => {
        $($callback)::+ ! {
            [$($extra)*]
            envelope {
                stamps_unique_id_ms_timestamp_and_sender_instance,
                trace_principal_tenant_survive_invoke_to_response,
                trace_principal_tenant_survive_subscription_to_emit,
                unknown_fields_survive_a_round_trip,
            }
            commands {
                success_returns_the_result,
                handled_error_carries_status_message_and_data,
                unhandled_error_is_500_with_generic_text_only,
                bad_input_is_400,
                timeout_is_504_at_ttl_and_leaves_no_pending_entry,
                late_response_is_ignored,
                no_handler_is_502_fast_or_504_at_ttl,
                concurrent_invokes_never_cross_correlate,
                success_event_reaches_subscriptions,
            }
            subscriptions {
                filter_table_routes_like_the_reference_matcher,
                shared_delivers_each_message_to_exactly_one_instance,
                broadcast_delivers_each_message_to_every_instance,
                filtered_subscription_sees_commands_and_responses,
                emit_event_name_emits_exactly_one_event,
                durable_subscription_keeps_messages_while_no_consumer,
                unsettled_delivery_is_redelivered_when_its_consumer_goes_away,
            }
            outcomes {
                ack_settles_the_delivery,
                retry_up_to_max_attempts_then_dead_letter,
                delayed_retry_is_not_delivered_before_its_delay,
                drop_settles_with_a_warning,
                stop_consumer_pauses_until_resumed,
                settling_twice_is_a_typed_error,
                poison_message_does_not_stop_the_consumer,
            }
            duplicates {
                redelivered_message_id_runs_side_effect_once,
                repeated_business_key_runs_side_effect_once,
            }
            streams {
                chunks_arrive_in_order,
                exactly_one_terminal_frame,
                frames_after_the_terminal_are_ignored,
                consumer_cancel_reaches_the_producer,
                session_timeout_ends_the_session,
            }
            queues {
                lease_hides_the_job,
                unsettled_lease_reappears_after_visibility_timeout,
                lease_extension_is_capped,
                retry_backoff_stays_within_jitter_bounds,
                max_attempts_then_dead_letter_queue,
                retry_window_then_dead_letter_queue,
                fatal_failure_dead_letters_at_once,
                dead_letters_inspect_replay_purge,
                idempotency_key_returns_the_first_job_id,
                delayed_job_is_not_leased_early,
                worker_settles_jobs_through_the_service,
            }
            lifecycle {
                info_messages_arrive_in_order_with_function_metadata,
                in_flight_counts_running_handlers_by_kind,
                shutdown_waits_for_running_handlers,
                shutdown_rejects_pending_invocations_and_reports_what_still_runs,
            }
            reliability {
                connection_drop_loses_no_events,
                broker_restart_loses_no_events,
                invocations_during_an_outage_fail_or_complete_within_ttl,
            }
            strict {
                declared_capabilities_are_the_bridges_own,
                strict_start_lists_every_mismatch_in_one_error,
                non_strict_start_degrades_with_a_warning_per_mismatch,
            }
        }
    };
}

/// One test per behaviour for one bridge: `suite!(module, harness_expr)` expands to
/// `mod module { mod <group> { #[tokio::test] async fn <behaviour>() … } }`.
///
/// `harness_expr` is evaluated per test and resolved from where `suite!` is invoked. A verdict
/// of "rejected as undeclared" or "not applicable" passes and prints why. The invoking crate
/// needs `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! suite {
    ($module:ident, $harness:expr) => {
        $crate::for_each_case!($crate::__suite_tests![$module, $harness]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ([$module:ident, $harness:expr] $($group:ident { $($name:ident),* $(,)? })*) => {
        #[allow(unused_imports)]
        mod $module {
            use super::*;

            fn harness() -> ::std::sync::Arc<dyn $crate::Harness> {
                ::std::sync::Arc::new($harness)
            }

            $(
                mod $group {
                    $(
                        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        async fn $name() {
                            $crate::runner::run_test(
                                super::harness(),
                                stringify!($group),
                                stringify!($name),
                                |h| ::std::boxed::Box::pin($crate::cases::$group::$name(h)),
                            )
                            .await;
                        }
                    )*
                }
            )*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_table {
    ([] $($group:ident { $($name:ident),* $(,)? })*) => {
        vec![$($(
            $crate::runner::Case {
                group: stringify!($group),
                name: stringify!($name),
                run: |h| ::std::boxed::Box::pin($crate::cases::$group::$name(h)),
            },
        )*)*]
    };
}

/// Every case, in suite order: what the matrix binary runs.
pub fn all_cases() -> Vec<Case> {
    for_each_case!(crate::__case_table![])
}
