//! Agents (being built by issue 8).
