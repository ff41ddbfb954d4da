pub mod broker;
pub mod domain;
pub mod journal;
pub mod metrics;
