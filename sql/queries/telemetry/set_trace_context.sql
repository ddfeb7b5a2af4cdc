-- The trace context new tasks and runs default to (V027; '' = none). Set around an enqueue or
-- a submission while OpenTelemetry tracing is on, reset right after.
SELECT set_config('pgcrew.trace_context', $1::text, false)
