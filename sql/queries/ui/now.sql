-- The database's time (every age the console shows is measured against it).
SELECT now()
