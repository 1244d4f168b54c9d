SELECT category, COUNT(*), SUM(amount), COUNT(DISTINCT user_id) FROM orders GROUP BY category;
