-- Register (or update) a skill definition.
INSERT INTO pgcrew.skills (name, description, instructions, tools)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE
   SET description = EXCLUDED.description, instructions = EXCLUDED.instructions,
       tools = EXCLUDED.tools, updated_at = now()
