//! Integration tests against a real PostgreSQL: `PGCREW_TEST_DATABASE_URL` / `DATABASE_URL`
//! when set, otherwise a throwaway cluster started by the test process. Every test gets its own
//! fresh database, so tests run in parallel.

mod common;

mod agent_drift;
mod agent_process;
mod agent_service;
mod approval;
mod bad_input;
mod bench_cli;
mod budget_edges;
mod claim_paths;
mod connection_budget;
mod coord;
mod coord_process;
mod demo;
mod doctor;
mod doctor_tls;
mod errors;
mod executor;
mod faults;
mod faults_load;
mod fuzz_smoke;
mod kernel;
mod lease_on_claim;
mod lease_run;
mod ledger_batch;
mod ledger_forgery;
mod ledger_single;
mod local_security;
mod metrics;
mod metrics_traces;
mod metrics_views;
mod mock_openai;
mod model;
mod pgbouncer;
mod proxy;
mod queue;
mod queue_edges;
mod queue_features;
mod runs;
mod runs_edges;
mod scale_bench;
mod shard;
mod skills;
mod streaming;
mod subagents;
mod submit_sql;
mod tenancy;
mod tenant_isolation;
mod tls;
mod tool_schema;
mod ui;
mod waits;
