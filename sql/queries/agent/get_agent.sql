-- One agent definition by name.
SELECT name, description, model, system_prompt, tools, max_tokens, temperature, max_iterations,
       on_capability_denied
  FROM pgcrew.agents WHERE name = $1
