-- Nexmark q6: Average selling price per seller over its last 10 auctions. Flink cannot run it (an OVER on an updating input); the published text also selects B.dateTime without grouping by it, which is not valid SQL, so this orders by the auction's expiry.
-- Run after ddl.sql (the nexmark streams); `sluice bench nexmark` puts the two together.
CREATE TABLE nexmark_q6 (seller BIGINT, avg_price DOUBLE)
WITH ('connector' = 'blackhole');
INSERT INTO nexmark_q6
SELECT Q.seller,
  AVG(Q.final) OVER (PARTITION BY Q.seller ORDER BY Q.expires, Q.id ROWS BETWEEN 10 PRECEDING AND CURRENT ROW)
FROM (
  SELECT MAX(B.price) AS final, A.id, A.seller, A.expires
  FROM auction AS A, bid AS B
  WHERE A.id = B.auction AND B.dateTime BETWEEN A.dateTime AND A.expires
  GROUP BY A.id, A.seller, A.expires
) Q;
