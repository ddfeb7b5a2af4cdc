-- pgcrew V052: the degradation check of every model step no longer plans itself on every call
-- (issue #23).
--
-- pgcrew.model_step_begin (V040) asks pgcrew.no_degradation_at whether the tenant's degradation
-- policy has a rule active at its budget status. That was a SQL function whose body PostgreSQL
-- cannot inline (a subquery over the rules), so each call parsed and planned the body again:
-- pg_stat_statements with nested statements, `pgcrew bench agents`: 2,000 plans in 2,000 calls,
-- 0.042 ms each against 0.007 ms of execution. The same test as a PL/pgSQL function, whose
-- expression plans the session keeps. Same arguments, result and volatility.
-- Test: kernel::degradation::the_degradation_check_plans_once_per_session.

CREATE OR REPLACE FUNCTION pgcrew.no_degradation_at(p_policy jsonb, p_status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN CASE
        WHEN p_policy IS NULL OR jsonb_typeof(p_policy) <> 'object' THEN false
        WHEN NOT p_policy ? 'rules' OR p_policy->'rules' = 'null'::jsonb THEN true
        WHEN jsonb_typeof(p_policy->'rules') <> 'array' THEN false
        ELSE NOT EXISTS (
            SELECT 1 FROM jsonb_array_elements(p_policy->'rules') rule
             WHERE coalesce(array_position(ARRAY['HEALTHY', 'WARNING', 'CRITICAL', 'EXCEEDED'],
                                           rule->>'at'), 0)
                   <= coalesce(array_position(ARRAY['HEALTHY', 'WARNING', 'CRITICAL', 'EXCEEDED'],
                                              p_status), 5))
    END;
END $$;
