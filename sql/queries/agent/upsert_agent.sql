-- Register (or update) an agent definition.
INSERT INTO pgcrew.agents (name, description, model, system_prompt, tools, max_tokens, temperature,
                           max_iterations, on_capability_denied, replay_policy, skills)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (name) DO UPDATE
   SET description = EXCLUDED.description, model = EXCLUDED.model,
       system_prompt = EXCLUDED.system_prompt, tools = EXCLUDED.tools,
       max_tokens = EXCLUDED.max_tokens, temperature = EXCLUDED.temperature,
       max_iterations = EXCLUDED.max_iterations,
       on_capability_denied = EXCLUDED.on_capability_denied,
       replay_policy = EXCLUDED.replay_policy, skills = EXCLUDED.skills, updated_at = now()
