INSERT INTO out_sink SELECT u.province, o.order_id FROM orders o JOIN users u ON o.user_id = u.user_id
WHERE UPPER(o.item) <> 'X' AND o.amount > 10;
