//! tenancy integration tests.
