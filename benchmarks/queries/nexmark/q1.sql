-- Nexmark q1: Currency conversion (DOUBLE arithmetic; Flink's Nexmark uses DECIMAL).
-- Run after ddl.sql (the nexmark streams); `sluice bench nexmark` puts the two together.
CREATE TABLE nexmark_q1 (auction BIGINT, bidder BIGINT, price DOUBLE, dateTime TIMESTAMP(3), extra STRING)
WITH ('connector' = 'blackhole');
INSERT INTO nexmark_q1
SELECT auction, bidder, 0.908 * price AS price, dateTime, extra FROM bid;
