SELECT o.order_id, p.paid FROM orders o JOIN payments p
ON o.order_id = p.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '15' MINUTE;
