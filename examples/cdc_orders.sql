-- Double-11 from the order database: PostgreSQL's `orders` table is read as it changes
-- (postgres-cdc: the table's rows, then every insert, update and delete), each order is joined
-- with its customer's province (a jdbc lookup table, cached for a minute), and the GMV of paid
-- orders per province is kept up to date in a PostgreSQL table that BI reads. A refund, a
-- changed amount or a deleted order corrects the totals; checkpoints make it exactly-once.
--
-- Setup (PostgreSQL on 127.0.0.1:5432, wal_level = logical, a user with REPLICATION):
--   createdb -h 127.0.0.1 -U postgres shop
--   psql -h 127.0.0.1 -U postgres shop -c "
--     CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL,
--                          amount numeric(12, 2) NOT NULL, status text NOT NULL);
--     ALTER TABLE orders REPLICA IDENTITY FULL;
--     CREATE TABLE customers (id bigint PRIMARY KEY, province text NOT NULL);
--     CREATE TABLE gmv_by_province (province text PRIMARY KEY, orders bigint, gmv numeric(18, 2));"
-- Then:
--   sluice run examples/cdc_orders.sql
-- and change `orders` (and `customers`) while it runs.

SET 'execution.checkpointing.interval' = '5 s';
SET 'execution.checkpointing.dir' = 'file:///tmp/sluice-cdc-orders';

CREATE TABLE orders (
  id BIGINT,
  user_id BIGINT,
  amount DECIMAL(12, 2),
  status STRING,
  proc_time AS PROCTIME(),
  PRIMARY KEY (id) NOT ENFORCED
) WITH (
  'connector' = 'postgres-cdc',
  'hostname' = '127.0.0.1',
  'port' = '5432',
  'username' = 'postgres',
  'password' = '',
  'database-name' = 'shop',
  'schema-name' = 'public',
  'table-name' = 'orders',
  'slot.name' = 'sluice_cdc_orders',
  'decoding.plugin.name' = 'pgoutput'
);

CREATE TABLE customers (
  id BIGINT,
  province STRING,
  PRIMARY KEY (id) NOT ENFORCED
) WITH (
  'connector' = 'jdbc',
  'url' = 'jdbc:postgresql://127.0.0.1:5432/shop',
  'table-name' = 'customers',
  'lookup.cache' = 'PARTIAL',
  'lookup.partial-cache.max-rows' = '100000',
  'lookup.partial-cache.expire-after-write' = '1 min'
);

CREATE TABLE gmv_by_province (
  province STRING,
  orders BIGINT,
  gmv DECIMAL(18, 2),
  PRIMARY KEY (province) NOT ENFORCED
) WITH (
  'connector' = 'jdbc',
  'url' = 'jdbc:postgresql://127.0.0.1:5432/shop',
  'table-name' = 'gmv_by_province'
);

INSERT INTO gmv_by_province
SELECT COALESCE(c.province, 'unknown'), COUNT(*), SUM(o.amount)
FROM orders AS o
LEFT JOIN customers FOR SYSTEM_TIME AS OF o.proc_time AS c ON o.user_id = c.id
WHERE o.status = 'paid'
GROUP BY COALESCE(c.province, 'unknown');
