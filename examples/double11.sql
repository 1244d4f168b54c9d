-- The Double-11 sales dashboard: the job `sluice demo` runs.
-- Event time runs 100x faster than the wall clock, so a 5-minute window closes every 3 seconds.

-- The open window's partial GMV is shown every second, and replaced by its final value.
SET 'table.exec.emit.early-fire.enabled' = 'true';
SET 'table.exec.emit.early-fire.delay' = '1 s';

CREATE TABLE orders (
  order_id BIGINT,
  user_id BIGINT,
  item_id BIGINT,
  category STRING,
  province STRING,
  amount DOUBLE,
  quantity INT,
  event_time TIMESTAMP(3),
  WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND
) WITH (
  'connector' = 'ecommerce',
  'rows-per-second' = '20000',
  'speed-up' = '100'
);

-- GMV per 5-minute window: partial every second, final once the watermark passes the window's end.
CREATE TABLE gmv_per_window (window_start TIMESTAMP(3), window_end TIMESTAMP(3), gmv DOUBLE, orders BIGINT)
WITH ('connector' = 'memory');

INSERT INTO gmv_per_window
SELECT TUMBLE_START(event_time, INTERVAL '5' MINUTE), TUMBLE_END(event_time, INTERVAL '5' MINUTE),
       SUM(amount), COUNT(*)
FROM orders
GROUP BY TUMBLE(event_time, INTERVAL '5' MINUTE);

-- The running total: an updating result, retracted and replaced as orders arrive.
CREATE TABLE gmv_total (gmv DOUBLE, orders BIGINT, buyers BIGINT) WITH ('connector' = 'memory');

INSERT INTO gmv_total
SELECT SUM(amount), COUNT(*), COUNT(DISTINCT user_id) FROM orders;

CREATE TABLE gmv_by_category (category STRING, gmv DOUBLE) WITH ('connector' = 'memory');

INSERT INTO gmv_by_category
SELECT category, SUM(amount) FROM orders GROUP BY category;

CREATE TABLE gmv_by_province (province STRING, gmv DOUBLE, orders BIGINT) WITH ('connector' = 'memory');

INSERT INTO gmv_by_province
SELECT province, SUM(amount), COUNT(*) FROM orders GROUP BY province;
