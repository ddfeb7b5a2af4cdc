-- Whether pgcrew.tasks has a usable GIN index on payload (valid, ready, not partial; either
-- jsonb opclass answers @>): the console's payload filter then searches every task through it.
SELECT EXISTS (
    SELECT 1
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_am am ON am.oid = c.relam
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = 'payload'
     WHERE i.indrelid = 'pgcrew.tasks'::regclass
       AND am.amname = 'gin'
       AND i.indisvalid AND i.indisready
       AND i.indpred IS NULL
       AND a.attnum = ANY (i.indkey))
