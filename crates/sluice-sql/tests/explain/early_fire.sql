SET 'table.exec.emit.early-fire.enabled' = 'true';
SET 'table.exec.emit.early-fire.delay' = '1 s';
SELECT TUMBLE_START(ts, INTERVAL '1' HOUR), SUM(amount) FROM orders GROUP BY TUMBLE(ts, INTERVAL '1' HOUR);
