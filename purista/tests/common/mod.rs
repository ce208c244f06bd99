//! What the facade's gated integration tests (`amqp`, `interop`) share: their harness.
// Each target uses part of it.
#![allow(dead_code)]

pub mod runner;
