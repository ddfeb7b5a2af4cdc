-- One bounded pass of run row retention: delete retained runs finalized more than $1
-- microseconds ago ($2 runs at most), with their chain anchors and checkpoints (V036).
SELECT o_run, o_tenant, o_checkpoints, o_anchors
FROM pgcrew.delete_retained_runs($1::int8, $2::int4)
