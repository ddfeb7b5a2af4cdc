//! The distributed core: instance registration and heartbeats, the leader lease, leader-only
//! maintenance, LISTEN/NOTIFY fan-out, and the [`Client`](client::Client) that runs them.

pub mod client;
pub mod instance;
pub mod leader;
pub mod maintenance;
pub mod notify;
mod session;
