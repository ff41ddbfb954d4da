//! One integration binary: every test talks to real Redis, a real MongoDB wire server and the
//! real sensorhub process over TCP. See `helpers.rs` for how each test is isolated.

// A panic is how a test reports failure; what a test measured is printed for the CI log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod helpers;

mod all_data;
mod corpus;
mod faults;
mod ingest;
mod latest;
mod malformed;
mod page;
mod queries;
mod range;
mod simulator;
mod startup;
mod stream;
