-- Which of the built-in maintenance steps have work (NULL: the term no longer holds). V041.
SELECT pgcrew.maintenance_due($1, $2, $3, $4, $5, $6, $7, $8)
