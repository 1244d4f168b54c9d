SELECT * FROM (SELECT category, item, amount,
  ROW_NUMBER() OVER (PARTITION BY category ORDER BY amount DESC) AS rn FROM orders) WHERE rn <= 3;
