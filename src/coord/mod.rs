//! The distributed core below the client: instance registration and heartbeats, the leader
//! lease, the leader-only maintenance runner, LISTEN/NOTIFY fan-out, and what background
//! services are given ([`service::ServiceContext`]). The client (`Client`) that runs
//! them sits above: nothing here imports it.

pub mod instance;
pub mod leader;
pub mod leader_history;
pub mod maintenance;
pub mod notify;
pub mod service;
pub(crate) mod session;
pub mod source;

/// The old path of [`DbSource`](source::DbSource) (the client moved to the top of the crate).
#[doc(hidden)]
pub mod client {
    pub use super::source::DbSource;
}
