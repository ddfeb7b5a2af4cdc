-- Approve or reject a tool call waiting for approval (pgcrew.decide_approval, V020).
SELECT pgcrew.decide_approval($1::uuid, $2::text, $3::bool, $4::text, $5::text)
