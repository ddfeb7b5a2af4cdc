//! Model port integration tests.
