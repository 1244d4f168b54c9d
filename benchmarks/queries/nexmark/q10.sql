-- Nexmark q10: Every bid to a file system partitioned by day and minute (CSV; Flink's Nexmark writes to a filesystem too).
-- Run after ddl.sql (the nexmark streams); `sluice bench nexmark` puts the two together.
CREATE TABLE fs_sink (auction BIGINT, bidder BIGINT, price BIGINT, dateTime TIMESTAMP(3), extra STRING,
  dt STRING, hm STRING) PARTITIONED BY (dt, hm)
WITH ('connector' = 'filesystem', 'path' = '{out}/q10', 'format' = 'csv');
INSERT INTO fs_sink
SELECT auction, bidder, price, dateTime, extra, DATE_FORMAT(dateTime, 'yyyy-MM-dd'), DATE_FORMAT(dateTime, 'HH:mm')
FROM bid;
