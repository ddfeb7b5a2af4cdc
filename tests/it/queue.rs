//! queue integration tests.
