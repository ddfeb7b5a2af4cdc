-- Register (or update) a tool definition.
INSERT INTO pgcrew.tools (name, description, input_schema, requires_capability)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE
   SET description = EXCLUDED.description, input_schema = EXCLUDED.input_schema,
       requires_capability = EXCLUDED.requires_capability, updated_at = now()
