CREATE VIEW per_minute AS SELECT window_start, order_id, SUM(paid) AS paid
  FROM TABLE(TUMBLE(TABLE payments, DESCRIPTOR(ts), INTERVAL '1' MINUTE)) GROUP BY window_start, window_end, order_id;
SELECT * FROM per_minute WHERE paid > 100;
SELECT * FROM per_minute WHERE paid < 10;
