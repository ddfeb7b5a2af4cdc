-- bench observability: $1 tenants with a 100 USD budget, spent 0..99 USD.
INSERT INTO pgcrew.tenants (id, budget_usd_limit, spent_usd)
SELECT 'tenant-' || i, 100, i % 100
  FROM generate_series(1, $1::int) i
