//! runs integration tests.
