//! The durable kernel (being built by issue 8).
