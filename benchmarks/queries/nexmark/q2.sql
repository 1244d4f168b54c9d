-- Nexmark q2: Selection.
-- Run after ddl.sql (the nexmark streams); `sluice bench nexmark` puts the two together.
CREATE TABLE nexmark_q2 (auction BIGINT, price BIGINT)
WITH ('connector' = 'blackhole');
INSERT INTO nexmark_q2
SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0;
