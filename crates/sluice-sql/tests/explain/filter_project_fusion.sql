-- The WHERE and the SELECT both call UPPER(item): fused, the call is made once per row.
-- LOWER(category) is only on the right of the AND, so the filter may skip it: not shared.
INSERT INTO out_sink SELECT UPPER(item), order_id FROM orders
WHERE UPPER(item) <> 'X' AND LOWER(category) = 'shoes';
