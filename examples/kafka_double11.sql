-- Double-11 on Kafka: orders arrive on a Kafka topic; the job keeps the GMV of each 5-minute
-- window and the running totals per category, and serves them from Redis (for a dashboard) and
-- an upsert-kafka topic (for other services).
--
-- Run it with a Kafka broker on 127.0.0.1:9092 (topics `orders` and `gmv_by_category`, the
-- latter compacted) and Redis on 127.0.0.1:6379:
--   sluice run examples/kafka_double11.sql
-- Checkpoints make it exactly-once: a killed run, started again, resumes where the last
-- checkpoint left it, and every sink below shows each order once.

SET 'execution.checkpointing.interval' = '10 s';
SET 'execution.checkpointing.dir' = 'file:///tmp/sluice-kafka-double11';

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
  'connector' = 'kafka',
  'topic' = 'orders',
  'properties.bootstrap.servers' = '127.0.0.1:9092',
  'properties.group.id' = 'double11',
  'scan.startup.mode' = 'earliest-offset',
  'format' = 'json'
);

-- GMV per 5-minute window, final once the watermark passes the window's end: one Redis hash
-- field per window.
CREATE TABLE gmv_per_window (window_start STRING, gmv DOUBLE) WITH (
  'connector' = 'redis',
  'url' = 'redis://127.0.0.1:6379/0',
  'command' = 'hset',
  'key' = 'double11:gmv_per_window',
  'field' = '{window_start}',
  'value' = 'gmv',
  'sink.delivery-guarantee' = 'exactly-once',
  'sink.transactional-id-prefix' = 'double11'
);

INSERT INTO gmv_per_window
SELECT DATE_FORMAT(window_start, 'yyyy-MM-dd HH:mm'), SUM(amount)
FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '5' MINUTE))
GROUP BY window_start, window_end;

-- Running totals per category: an updating result. In Redis, one hash field per category,
-- rewritten as orders arrive.
CREATE TABLE category_totals_redis (category STRING, gmv DOUBLE) WITH (
  'connector' = 'redis',
  'url' = 'redis://127.0.0.1:6379/0',
  'command' = 'hset',
  'key' = 'double11:gmv_by_category',
  'field' = '{category}',
  'value' = 'gmv',
  'sink.delivery-guarantee' = 'exactly-once',
  'sink.transactional-id-prefix' = 'double11'
);

INSERT INTO category_totals_redis
SELECT category, SUM(amount) FROM orders GROUP BY category;

-- The same totals, with order and buyer counts, as an upsert-kafka topic keyed by category.
CREATE TABLE category_totals (
  category STRING,
  gmv DOUBLE,
  orders BIGINT,
  buyers BIGINT,
  PRIMARY KEY (category) NOT ENFORCED
) WITH (
  'connector' = 'upsert-kafka',
  'topic' = 'gmv_by_category',
  'properties.bootstrap.servers' = '127.0.0.1:9092',
  'key.format' = 'json',
  'value.format' = 'json',
  'sink.delivery-guarantee' = 'exactly-once',
  'sink.transactional-id-prefix' = 'double11-categories'
);

INSERT INTO category_totals
SELECT category, SUM(amount), COUNT(*), COUNT(DISTINCT user_id) FROM orders GROUP BY category;
