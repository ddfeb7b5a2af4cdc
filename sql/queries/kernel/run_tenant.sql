-- A run's tenant and state.
SELECT tenant_id, state FROM pgcrew.runs WHERE id = $1
