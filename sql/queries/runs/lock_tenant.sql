-- Serialise run admission for one tenant (count + transition).
SELECT pg_advisory_xact_lock(1885827700, hashtext($1::text))
