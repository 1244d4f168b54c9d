CREATE TABLE orders (order_id BIGINT, user_id BIGINT, item STRING, category STRING, amount DOUBLE,
  ts TIMESTAMP(3), proc AS PROCTIME(), WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH ('connector' = 'filesystem', 'path' = '/data/orders', 'format' = 'json');
CREATE TABLE payments (order_id BIGINT, paid DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
  WITH ('connector' = 'filesystem', 'path' = '/data/payments', 'format' = 'json');
CREATE TABLE users (user_id BIGINT, province STRING)
  WITH ('connector' = 'filesystem', 'path' = '/data/users', 'format' = 'json');
CREATE TABLE rates (category STRING, rate DOUBLE, ts TIMESTAMP(3),
  PRIMARY KEY (category) NOT ENFORCED, WATERMARK FOR ts AS ts)
  WITH ('connector' = 'filesystem', 'path' = '/data/rates', 'format' = 'json');
CREATE TABLE out_sink (a STRING, b BIGINT) WITH ('connector' = 'blackhole');
