-- The Double-11 big screen's materialized views: what `sluice serve --demo` (and
-- `sluice demo --web`) creates in tenant `double11`, and what examples/screens/double11.json binds.
-- Each view is a pipeline of its own over the same generated orders (the generator is
-- deterministic, so every pipeline reads the same rows). Views change at each checkpoint.

SET 'execution.checkpointing.interval' = '500 ms';

CREATE TABLE orders (
  order_id BIGINT,
  user_id BIGINT,
  item_id BIGINT,
  category STRING,
  province STRING,
  amount DOUBLE,
  quantity INT,
  event_time TIMESTAMP(3),
  -- When the source read the order: the end-to-end delay is measured from it.
  ingest AS PROCTIME(),
  WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND
) WITH (
  'connector' = 'ecommerce',
  'rows-per-second' = '2000',
  'speed-up' = '10'
);

-- Total sales, orders, buyers and the latest event time.
CREATE MATERIALIZED VIEW gmv_total AS
SELECT SUM(amount) AS gmv, COUNT(*) AS orders, COUNT(DISTINCT user_id) AS buyers,
       MAX(event_time) AS last_event
FROM orders;

CREATE MATERIALIZED VIEW gmv_by_category AS
SELECT category, SUM(amount) AS gmv FROM orders GROUP BY category;

CREATE MATERIALIZED VIEW gmv_by_province AS
SELECT province, SUM(amount) AS gmv, COUNT(DISTINCT user_id) AS buyers
FROM orders GROUP BY province;

-- GMV per event-time minute; the open minute updates as its orders arrive.
CREATE MATERIALIZED VIEW gmv_per_minute AS
SELECT DATE_FORMAT(event_time, 'yyyy-MM-dd HH:mm') AS minute, SUM(amount) AS gmv
FROM orders GROUP BY DATE_FORMAT(event_time, 'yyyy-MM-dd HH:mm');

-- The ten items with the most sales (Top-N over an updating aggregate).
CREATE MATERIALIZED VIEW top_items AS
SELECT item, gmv FROM (
  SELECT item, gmv, ROW_NUMBER() OVER (ORDER BY gmv DESC) AS rn
  FROM (SELECT CONCAT('item ', CAST(item_id AS STRING)) AS item, SUM(amount) AS gmv
        FROM orders GROUP BY item_id)
) WHERE rn <= 10;

-- The end-to-end delay probe: the ingestion stamps of every 100th order, the latest 50 kept
-- (Top-N, so the view stays small). The screen's delay widget compares each new one with the
-- time it shows it. Each source batch brings far fewer than 50 samples here, so every sampled
-- order is inserted into the view, and so measured, before it is pushed out.
CREATE MATERIALIZED VIEW delay_probe AS
SELECT order_id, ingest_ms FROM (
  SELECT order_id, ingest_ms, ROW_NUMBER() OVER (ORDER BY ingest_ms DESC, order_id DESC) AS rn
  FROM (SELECT order_id, CAST(ingest AS BIGINT) AS ingest_ms FROM orders WHERE MOD(order_id, 100) = 0)
) WHERE rn <= 50;
