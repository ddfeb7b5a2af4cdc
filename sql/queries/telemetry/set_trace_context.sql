-- The trace context new tasks and runs default to (V027; '' = none), for the session ($2 false)
-- or the transaction ($2 true). Set around an enqueue or a submission while OpenTelemetry
-- tracing is on.
SELECT set_config('pgcrew.trace_context', $1::text, $2::bool)
