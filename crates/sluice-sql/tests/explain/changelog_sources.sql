-- A debezium-json table is an updating input (its scan emits +I, -U/+U, -D); an upsert-kafka
-- table's scan is followed by ChangelogNormalize, which keeps each key's last row.
CREATE TABLE cdc_orders (order_id BIGINT, amount DOUBLE, category STRING)
WITH ('connector' = 'filesystem', 'path' = '/tmp/cdc', 'format' = 'debezium-json');
CREATE TABLE latest_prices (item STRING, price DOUBLE, PRIMARY KEY (item) NOT ENFORCED)
WITH ('connector' = 'upsert-kafka', 'topic' = 'prices', 'properties.bootstrap.servers' = 'localhost:9092',
  'key.format' = 'json', 'value.format' = 'json');
SELECT category, SUM(amount) FROM cdc_orders GROUP BY category;
SELECT COUNT(*), MAX(price) FROM latest_prices;
