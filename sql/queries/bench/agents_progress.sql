-- `pgcrew bench agents`: runs not finished yet (every phase starts with none; the partial
-- index on active runs answers it).
SELECT count(*) FROM pgcrew.runs WHERE state IN ('pending', 'running')
