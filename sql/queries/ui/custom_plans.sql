-- The console's filtered lists (`$n IS NULL OR column = $n`) are planned for the filters given
-- each time: a generic plan of such a statement cannot use the indexes of the filters set.
SET LOCAL plan_cache_mode = force_custom_plan
