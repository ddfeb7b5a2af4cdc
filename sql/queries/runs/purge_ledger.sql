-- Retention: remove a finished run's events, artifacts and summaries, keeping its chain anchor.
SELECT o_last_seq, o_last_hash, o_event_count, o_reason, o_purged_at, o_events, o_artifacts,
       o_summaries
FROM pgcrew.purge_run_ledger($1::uuid, $2::text)
