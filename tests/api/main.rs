//! One integration binary: every test talks to real Redis, a real MongoDB wire server and the
//! real sensorhub process over TCP. See `helpers.rs` for how each test is isolated.

// A panic is how a test reports failure; what a test measured is printed for the CI log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod helpers;

mod all_data;
mod api_keys;
mod batches;
mod corpus;
mod external_broker;
mod faults;
mod health;
mod ingest;
mod latest;
mod log_damage;
mod malformed;
mod metrics;
mod mqtt_v311;
mod mqtt_v5;
mod ops_abuse;
mod ops_config;
mod ops_retention;
mod page;
mod payload_limit;
mod queries;
mod range;
mod raw_mqtt;
mod redis_cluster;
mod replica_set;
mod restart;
mod security;
mod simulator;
mod sparkplug;
mod startup;
mod stream;
mod templates;
mod tls;
