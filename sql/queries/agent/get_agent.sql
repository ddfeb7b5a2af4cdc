-- One agent definition by name.
SELECT name, description, model, system_prompt, tools, max_tokens, temperature, max_iterations,
       on_capability_denied, replay_policy, skills
  FROM pgcrew.agents WHERE name = $1
