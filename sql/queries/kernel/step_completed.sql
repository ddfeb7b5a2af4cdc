-- Whether a model step already has its `model_completed` event (read under the run's ledger lock).
SELECT EXISTS (SELECT 1 FROM pgcrew.events
                WHERE run_id = $1 AND step_key = $2 AND event_type = 'model_completed') AS done
