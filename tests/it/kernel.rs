//! Kernel and agent integration tests.
