//! One integration binary: every test talks to real Redis, a real MongoDB wire server and the
//! real sensorhub process over TCP. See `helpers.rs` for how each test is isolated.

mod helpers;

mod all_data;
mod ingest;
mod latest;
mod malformed;
mod range;
mod simulator;
mod startup;
