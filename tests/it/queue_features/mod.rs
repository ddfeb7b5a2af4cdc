//! Queue features of issue #21: pause/resume, schedules, and their bad input.

mod ack_backlog;
mod backpressure;
mod bad_input;
mod claim_features;
mod key_limit;
mod limited_claim;
mod pause;
mod rate_limit;
mod schedules;
mod schedules_process;
