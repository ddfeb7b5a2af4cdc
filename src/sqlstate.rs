//! The SQLSTATE codes pgcrew matches on, in one place: its own `PCxxx` codes (raised by the
//! functions and triggers in `sql/`) and the standard PostgreSQL codes the error mappers read.
//!
//! Each constant is a `&str` so it can stand in a `match` on `DbError::code().code()`.

/// PC001: the run's lease is held by another instance (or expired).
pub const LEASE_LOST: &str = "PC001";
/// PC002: the run does not exist.
pub const RUN_NOT_FOUND: &str = "PC002";
/// PC003: the run's ledger is closed (the run finished).
pub const LEDGER_CLOSED: &str = "PC003";
/// PC004: a ledger row written outside pgcrew (a forged or replaced head).
pub const LEDGER_TAMPERED: &str = "PC004";
/// PC005: a plain SQL write to a ledger head, a chain anchor or a run's lock key (only pgcrew's functions write them).
pub const LEDGER_WRITE_REFUSED: &str = "PC005";
/// PC006: an illegal run state transition (`pgcrew.finish_run`, V025); DETAIL is the run's state.
pub const ILLEGAL_RUN_TRANSITION: &str = "PC006";
/// PC010: the tenant does not exist (tenant roles, V010).
pub const UNKNOWN_TENANT: &str = "PC010";
/// PC020: a malformed acknowledgement batch (`pgcrew.ack_tasks`, V011).
pub const BAD_ACK: &str = "PC020";
/// PC021: a task payload over its cap (`pgcrew.enqueue_task`, V011).
pub const PAYLOAD_TOO_LARGE: &str = "PC021";
/// PC022: a task delay too long (`pgcrew.enqueue_task`, V011).
pub const DELAY_TOO_LONG: &str = "PC022";
/// PC023: `pgcrew.claim_tasks` called outside READ COMMITTED (V011).
pub const CLAIM_ISOLATION: &str = "PC023";
/// PC024: a task whose parent was discarded or cancelled cannot be retried (V011).
pub const PARENT_FINISHED: &str = "PC024";
/// PC030: an invalid money amount or token count (`pgcrew.money_amount`, V012).
pub const INVALID_AMOUNT: &str = "PC030";
/// PC040: a run input over its database cap; DETAIL is `{"field", "size", "limit"}`.
pub const TOO_LARGE: &str = "PC040";
/// PC041: the run is finished; DETAIL is its state.
pub const RUN_FINISHED: &str = "PC041";
/// PC050: the run is waiting for another signal (`pgcrew.signal_run`, V020); DETAIL is its name.
pub const WAITING_FOR_OTHER_SIGNAL: &str = "PC050";
/// PC051: the step is not waiting for approval, or is already decided (`pgcrew.decide_approval`).
pub const NOT_WAITING_FOR_APPROVAL: &str = "PC051";
/// PC052: the run waits at another step than the one resolving it (`pgcrew.wait_step`).
pub const WAIT_STEP_MISMATCH: &str = "PC052";
/// PC060: the agent is not registered (`pgcrew.submit_run`, V019).
pub const UNKNOWN_AGENT: &str = "PC060";
/// PC070: a sub-agent cycle (`pgcrew.set_subagents`, `pgcrew.start_child_run`, V021).
pub const SUBAGENT_CYCLE: &str = "PC070";
/// PC071: a sub-agent over the depth limit (`pgcrew.start_child_run`, V021).
pub const SUBAGENT_DEPTH: &str = "PC071";
/// PC072: a sub-agent budget the parent's remaining run budget cannot cover; DETAIL is
/// `{"limit_usd", "spent_usd", "reserved_usd", "requested_usd"}` (`pgcrew.start_child_run`, V021).
pub const SUBAGENT_BUDGET: &str = "PC072";
/// PC100: pausing a queue that is unknown (`pgcrew.pause_queue`, V028).
pub const UNKNOWN_QUEUE: &str = "PC100";
/// PC101: an invalid schedule: time zone, interval, misfire policy (`pgcrew.schedules`, V028).
pub const INVALID_SCHEDULE: &str = "PC101";
/// PC102: the schedule does not exist (`pgcrew.fire_schedule`, `pgcrew.set_schedule_enabled`).
pub const UNKNOWN_SCHEDULE: &str = "PC102";
/// PC103: an invalid rate limit: rate not above 0, burst below 1, unknown scope (V028).
pub const INVALID_RATE_LIMIT: &str = "PC103";

/// 08000 connection_exception.
pub const CONNECTION_EXCEPTION: &str = "08000";
/// 08003 connection_does_not_exist.
pub const CONNECTION_DOES_NOT_EXIST: &str = "08003";
/// 08006 connection_failure.
pub const CONNECTION_FAILURE: &str = "08006";
/// 22004 null_value_not_allowed.
pub const NULL_VALUE_NOT_ALLOWED: &str = "22004";
/// 22008 datetime_field_overflow.
pub const DATETIME_FIELD_OVERFLOW: &str = "22008";
/// 22023 invalid_parameter_value.
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// 23502 not_null_violation.
pub const NOT_NULL_VIOLATION: &str = "23502";
/// 23503 foreign_key_violation.
pub const FOREIGN_KEY_VIOLATION: &str = "23503";
/// 23505 unique_violation.
pub const UNIQUE_VIOLATION: &str = "23505";
/// 23514 check_violation (also the run state machine's illegal transition).
pub const CHECK_VIOLATION: &str = "23514";
/// 26000 invalid_sql_statement_name (a prepared statement missing on the server).
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
/// 28000 invalid_authorization_specification.
pub const INVALID_AUTHORIZATION: &str = "28000";
/// 28P01 invalid_password.
pub const INVALID_PASSWORD: &str = "28P01";
/// 3D000 invalid_catalog_name (the database does not exist).
pub const INVALID_CATALOG_NAME: &str = "3D000";
/// 3F000 invalid_schema_name.
pub const INVALID_SCHEMA_NAME: &str = "3F000";
/// 40001 serialization_failure.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// 40P01 deadlock_detected.
pub const DEADLOCK_DETECTED: &str = "40P01";
/// 42501 insufficient_privilege.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// 42883 undefined_function.
pub const UNDEFINED_FUNCTION: &str = "42883";
/// 42P01 undefined_table.
pub const UNDEFINED_TABLE: &str = "42P01";
/// 42P05 duplicate_prepared_statement.
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
/// 55000 object_not_in_prerequisite_state.
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// 55P03 lock_not_available.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// 57014 query_canceled (`statement_timeout`, or `pg_cancel_backend`).
pub const QUERY_CANCELED: &str = "57014";
/// 57P01 admin_shutdown.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// 57P02 crash_shutdown.
pub const CRASH_SHUTDOWN: &str = "57P02";
/// 57P03 cannot_connect_now.
pub const CANNOT_CONNECT_NOW: &str = "57P03";

/// PC130: a tenant transfer function was called outside a transaction marked by
/// `pgcrew.begin_tenant_transfer` (V032).
pub const NOT_IN_TENANT_TRANSFER: &str = "PC130";
/// PC131: a tenant still has unfinished tasks or runs and cannot be deleted by a transfer (V032).
pub const TENANT_NOT_DRAINED: &str = "PC131";

/// PC180: starting a pending run would pass its tenant's `max_concurrent_runs`; DETAIL is
/// `running,limit,tenant` and nothing was written (`pgcrew.start_run_fenced`, V040).
pub const RUN_ADMISSION_LIMIT: &str = "PC180";
/// PC181: a model step's `model_completed` was found recorded by a writer that did not take the
/// run's ledger lock; the settlement was undone (`pgcrew.model_step_end`, V040).
pub const STEP_RECORDED_MEANWHILE: &str = "PC181";

/// The SQLSTATE of a driver error that carries a server response.
pub fn of(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}
