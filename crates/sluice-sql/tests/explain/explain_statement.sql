EXPLAIN SELECT item, COUNT(*) FROM orders WHERE amount > 5 GROUP BY item;
