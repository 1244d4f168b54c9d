SELECT o.order_id, o.amount * r.rate FROM orders o JOIN rates FOR SYSTEM_TIME AS OF o.ts AS r ON o.category = r.category;
SELECT o.order_id, u.province FROM orders o LEFT JOIN users FOR SYSTEM_TIME AS OF o.proc AS u ON o.user_id = u.user_id;
