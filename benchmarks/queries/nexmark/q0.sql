-- Nexmark q0: Pass-through: every bid, unchanged.
-- Run after ddl.sql (the nexmark streams); `sluice bench nexmark` puts the two together.
CREATE TABLE nexmark_q0 (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING, dateTime TIMESTAMP(3), extra STRING)
WITH ('connector' = 'blackhole');
INSERT INTO nexmark_q0
SELECT auction, bidder, price, channel, url, dateTime, extra FROM bid;
