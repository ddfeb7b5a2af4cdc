-- Enqueue one task without dependencies or unique key where statements go out unnamed (behind
-- PgBouncer in transaction mode, or on a plain tokio-postgres client or transaction):
-- queue/enqueue_simple.sql's statement as the body of pgcrew.enqueue_simple (V049), whose plan
-- stays in the server session; sent itself, it would be parsed and planned on every call.
-- Parameters and row as queue/enqueue_simple.sql's.
SELECT * FROM pgcrew.enqueue_simple($1::text, $2::text, $3::text, $4::uuid, $5::smallint,
                                    $6::jsonb, $7::bigint, $8::timestamptz, $9::integer)
