//! Stream equals batch: each query runs through Sluice on a bounded, out-of-order input; its
//! folded changelog must equal DataFusion's batch answer over the same rows, with 1, 2 and 4
//! workers.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_common::ChangeBatch;
use sluice_engine::JobOptions;

const ROWS: usize = 20_000;

fn orders_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("user_id", DataType::Int64, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("province", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, true),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ]))
}

/// Orders about 50 ms apart in event time, 10% of them up to 3 s late (the watermark allows 5 s).
fn orders(seed: u64) -> RecordBatch {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cats = ["apparel", "books", "electronics", "food", "home"];
    let provs = [
        "Guangdong",
        "Zhejiang",
        "Jiangsu",
        "Gansu",
        "Beijing",
        "Hubei",
    ];
    let start = 1_794_355_200_000i64; // 2026-11-11 00:00:00
    let mut id = vec![];
    let mut user = vec![];
    let mut cat = vec![];
    let mut prov = vec![];
    let mut amount = vec![];
    let mut ts = vec![];
    for i in 0..ROWS {
        id.push(i as i64);
        user.push(rng.random_range(1..400i64));
        cat.push(cats[rng.random_range(0..cats.len())]);
        prov.push(provs[rng.random_range(0..provs.len())]);
        // Cents, so float sums are exact enough to compare after rounding.
        amount.push(if rng.random_bool(0.02) {
            None
        } else {
            Some(rng.random_range(1..100_000i64) as f64 / 100.0)
        });
        let mut t = start + i as i64 * 50;
        if rng.random_bool(0.1) {
            t -= rng.random_range(0..3000);
        }
        ts.push(t);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(id)),
        Arc::new(Int64Array::from(user)),
        Arc::new(StringArray::from(cat)),
        Arc::new(StringArray::from(prov)),
        Arc::new(Float64Array::from(amount)),
        Arc::new(TimestampMillisecondArray::from(ts)),
    ];
    RecordBatch::try_new(orders_schema(), columns).unwrap()
}

fn users_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("credit", DataType::Float64, false),
    ]))
}

/// Users 1..500, every fourth one missing: orders (users 1..400) of missing users and users
/// without orders (400..500) both exist, so outer joins pad on both sides.
fn users() -> RecordBatch {
    let ids: Vec<i64> = (1..500).filter(|i| i % 4 != 3).collect();
    let names: Vec<String> = ids.iter().map(|i| format!("user{i}")).collect();
    let credit: Vec<f64> = ids.iter().map(|i| (i * 37 % 1000) as f64).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(StringArray::from(names)),
        Arc::new(Float64Array::from(credit)),
    ];
    RecordBatch::try_new(users_schema(), columns).unwrap()
}

use crate::common;
use common::{render, run_job, Folded};

fn sorted(rows: BTreeMap<Vec<String>, i64>) -> Vec<Vec<String>> {
    let mut out = vec![];
    for (row, n) in rows {
        assert!(
            n > 0,
            "row {row:?} was retracted more often than inserted ({n})"
        );
        for _ in 0..n {
            out.push(row.clone());
        }
    }
    out.sort();
    out
}

fn ddl(path: &std::path::Path) -> String {
    format!(
        "CREATE TABLE orders (order_id BIGINT, user_id BIGINT, category STRING, province STRING, amount DOUBLE, \
         event_time TIMESTAMP(3), WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json'); \
         CREATE TABLE users (user_id BIGINT, name STRING, credit DOUBLE) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json'); \
         CREATE TABLE order_versions (order_id BIGINT, user_id BIGINT, category STRING, province STRING, \
         amount DOUBLE, event_time TIMESTAMP(3), PRIMARY KEY (user_id) NOT ENFORCED, \
         WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');",
        path.join("orders").display(),
        path.join("users").display(),
        path.join("orders").display()
    )
}

fn write_json(path: &std::path::Path, batch: &RecordBatch) {
    let mut buf = vec![];
    sluice_connectors::format::encode_json(&ChangeBatch::inserts(batch.clone()), &mut buf).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, buf).unwrap();
}

/// Runs `stream_sql` in Sluice and `batch_sql` in DataFusion over the same rows and compares.
fn check(stream_sql: &str, batch_sql: &str) {
    let data = orders(7);
    let dir = tempfile::tempdir().unwrap();
    // Two files, so workers read different splits.
    for (i, part) in [
        data.slice(0, ROWS / 2),
        data.slice(ROWS / 2, ROWS - ROWS / 2),
    ]
    .iter()
    .enumerate()
    {
        write_json(&dir.path().join(format!("orders/orders-{i}.json")), part);
    }
    write_json(&dir.path().join("users/users.json"), &users());
    let expected = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = SessionContext::new();
            let table = MemTable::try_new(orders_schema(), vec![vec![data.clone()]]).unwrap();
            ctx.register_table("orders", Arc::new(table)).unwrap();
            let table = MemTable::try_new(users_schema(), vec![vec![users()]]).unwrap();
            ctx.register_table("users", Arc::new(table)).unwrap();
            let batches = ctx.sql(batch_sql).await.unwrap().collect().await.unwrap();
            let mut rows = vec![];
            for b in &batches {
                rows.extend(render(b));
            }
            rows.sort();
            rows
        })
    };
    assert!(
        !expected.is_empty(),
        "the batch answer is empty: the test would prove nothing"
    );
    for workers in [1, 2, 4] {
        let script = format!("{}\n{stream_sql};", ddl(dir.path()));
        let plan = sluice_sql::plan_script(&script).unwrap_or_else(|e| panic!("{e}"));
        let folded = Arc::new(Folded::rounded());
        let options = JobOptions {
            workers,
            ..Default::default()
        };
        let summary = run_job(
            plan,
            options,
            folded.clone(),
            std::time::Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            summary.late_rows_dropped, 0,
            "disorder is within the watermark bound"
        );
        // However many times a query reads a table, its rows are read once (shared scans).
        for (table, n) in &summary.rows_read {
            let rows = match table.as_str() {
                "users" => users().num_rows(),
                _ => ROWS,
            };
            assert_eq!(*n, rows as u64, "rows read from {table} for: {stream_sql}");
        }
        let got = sorted(folded.take(0));
        assert_eq!(
            got.len(),
            expected.len(),
            "row count with {workers} workers for: {stream_sql}"
        );
        if got != expected {
            let missing: Vec<_> = expected
                .iter()
                .filter(|r| !got.contains(r))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|r| !expected.contains(r))
                .take(5)
                .collect();
            panic!("with {workers} workers for: {stream_sql}\nmissing {missing:?}\nunexpected {extra:?}");
        }
    }
}

#[test]
fn projection_and_filter() {
    let q = "SELECT order_id, amount * 2 AS doubled, CASE WHEN amount > 500 THEN 'big' ELSE 'small' END AS size, \
             CAST(user_id AS STRING) AS u FROM orders \
             WHERE category IN ('apparel', 'books') AND amount BETWEEN 10 AND 800 AND province LIKE 'G%'";
    check(q, q);
}

#[test]
fn tumbling_window_legacy_syntax() {
    check(
        "SELECT TUMBLE_START(event_time, INTERVAL '5' MINUTE) AS ws, TUMBLE_END(event_time, INTERVAL '5' MINUTE) AS we, \
         category, SUM(amount) AS total, COUNT(*) AS n, COUNT(amount) AS priced, AVG(amount) AS avg_amount, \
         MIN(amount) AS lo, MAX(amount) AS hi, COUNT(DISTINCT user_id) AS buyers, \
         COUNT(*) FILTER (WHERE amount > 500) AS big \
         FROM orders GROUP BY TUMBLE(event_time, INTERVAL '5' MINUTE), category HAVING COUNT(*) > 10",
        "SELECT date_bin(INTERVAL '5 minutes', event_time, TIMESTAMP '1970-01-01') AS ws, \
         date_bin(INTERVAL '5 minutes', event_time, TIMESTAMP '1970-01-01') + INTERVAL '5 minutes' AS we, \
         category, SUM(amount), COUNT(*), COUNT(amount), AVG(amount), MIN(amount), MAX(amount), COUNT(DISTINCT user_id), \
         COUNT(*) FILTER (WHERE amount > 500) \
         FROM orders GROUP BY 1, 2, category HAVING COUNT(*) > 10",
    );
}

#[test]
fn hopping_window_tvf() {
    check(
        "SELECT window_start, window_end, COUNT(*) AS n, SUM(amount) AS total \
         FROM TABLE(HOP(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE, INTERVAL '3' MINUTE)) \
         GROUP BY window_start, window_end",
        "SELECT ws, ws + INTERVAL '3 minutes', COUNT(*), SUM(amount) FROM ( \
           SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, amount FROM orders \
           UNION ALL SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') - INTERVAL '1 minute', amount FROM orders \
           UNION ALL SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') - INTERVAL '2 minutes', amount FROM orders) \
         GROUP BY ws",
    );
}

/// A hopping window per key is aggregated in panes (one state update per row; a window merges
/// its panes when it fires): every kind of aggregate merges exactly, COUNT(DISTINCT) included.
#[test]
fn hopping_window_tvf_per_key() {
    let hop = |col: &str| {
        format!(
            "SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') - INTERVAL '{col} minutes' AS ws, \
             category, amount, user_id FROM orders"
        )
    };
    check(
        "SELECT window_start, window_end, category, COUNT(*) AS n, SUM(amount) AS total, \
         MIN(amount) AS lo, MAX(amount) AS hi, AVG(amount) AS mean, COUNT(DISTINCT user_id) AS users, \
         COUNT(*) FILTER (WHERE amount > 500) AS big \
         FROM TABLE(HOP(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE, INTERVAL '3' MINUTE)) \
         GROUP BY window_start, window_end, category",
        &format!(
            "SELECT ws, ws + INTERVAL '3 minutes', category, COUNT(*), SUM(amount), MIN(amount), MAX(amount), \
             AVG(amount), COUNT(DISTINCT user_id), COUNT(*) FILTER (WHERE amount > 500) FROM ( \
               {} UNION ALL {} UNION ALL {}) \
             GROUP BY ws, category",
            hop("0"),
            hop("1"),
            hop("2")
        ),
    );
}

#[test]
fn tumbling_window_tvf_with_union_and_view() {
    check(
        "CREATE VIEW big AS SELECT * FROM orders WHERE amount > 700; \
         CREATE VIEW small AS SELECT * FROM orders WHERE amount < 10; \
         CREATE VIEW both_ends AS SELECT * FROM big UNION ALL SELECT * FROM small; \
         SELECT window_start, province, COUNT(*) AS n \
         FROM TABLE(TUMBLE(TABLE both_ends, DESCRIPTOR(event_time), INTERVAL '2' MINUTE)) \
         GROUP BY window_start, window_end, province",
        "SELECT date_bin(INTERVAL '2 minutes', event_time, TIMESTAMP '1970-01-01'), province, COUNT(*) \
         FROM orders WHERE amount > 700 OR amount < 10 GROUP BY 1, province",
    );
}

#[test]
fn updating_group_by() {
    let q = "SELECT category, province, COUNT(*) AS n, SUM(amount) AS total, MIN(amount) AS lo, MAX(amount) AS hi, \
             COUNT(DISTINCT user_id) AS buyers FROM orders GROUP BY category, province";
    check(q, q);
}

#[test]
fn aggregate_over_a_retracting_input() {
    let q = "SELECT cnt, COUNT(*) AS users FROM (SELECT user_id, COUNT(*) AS cnt FROM orders GROUP BY user_id) GROUP BY cnt";
    check(q, q);
}

#[test]
fn min_max_over_a_retracting_input() {
    let q =
        "SELECT MIN(total) AS lo, MAX(total) AS hi, COUNT(*) AS groups, SUM(n) AS rows_seen FROM \
             (SELECT user_id, SUM(amount) AS total, COUNT(*) AS n FROM orders GROUP BY user_id)";
    check(q, q);
}

#[test]
fn inner_join_with_a_non_equi_condition() {
    let q = "SELECT o.order_id, o.amount, u.name FROM orders o JOIN users u \
             ON o.user_id = u.user_id AND o.amount < u.credit";
    check(q, q);
}

#[test]
fn left_and_right_outer_joins() {
    let q = "SELECT o.order_id, u.user_id, u.name FROM orders o LEFT JOIN users u ON o.user_id = u.user_id \
             WHERE o.category = 'books'";
    check(q, q);
    let q = "SELECT o.order_id, u.user_id, u.name FROM orders o RIGHT JOIN users u \
             ON o.user_id = u.user_id AND o.province = 'Gansu'";
    check(q, q);
}

#[test]
fn full_outer_join_of_an_updating_aggregate() {
    // Every order changes its user's total: the join retracts and re-emits joined rows, and pads
    // the users without orders and the totals of users who are missing.
    let q = "SELECT t.user_id, t.total, t.n, u.user_id AS uid, u.name FROM \
             (SELECT user_id, SUM(amount) AS total, COUNT(*) AS n FROM orders GROUP BY user_id) t \
             FULL JOIN users u ON t.user_id = u.user_id";
    check(q, q);
}

#[test]
fn aggregate_over_a_join() {
    let q = "SELECT u.name, COUNT(*) AS n, SUM(o.amount) AS total FROM orders o JOIN users u \
             ON o.user_id = u.user_id GROUP BY u.name";
    check(q, q);
}

#[test]
fn interval_joins() {
    // Orders of the same user within 10 s after each other (a self-join), inner and outer.
    let q = "SELECT a.order_id, b.order_id AS next_id FROM orders a JOIN orders b \
             ON a.user_id = b.user_id AND a.order_id <> b.order_id \
             AND b.event_time BETWEEN a.event_time AND a.event_time + INTERVAL '10' SECOND";
    check(q, q);
    let q = "SELECT a.order_id, b.order_id AS next_id FROM orders a LEFT JOIN orders b \
             ON a.user_id = b.user_id AND a.order_id <> b.order_id \
             AND b.event_time >= a.event_time - INTERVAL '2' SECOND AND b.event_time < a.event_time + INTERVAL '3' SECOND";
    check(q, q);
}

#[test]
fn window_join_of_two_window_aggregations() {
    // Nexmark q8's shape: per window, users who bought books and who bought food.
    check(
        "SELECT b.user_id, b.window_start, b.books, f.food FROM \
           (SELECT user_id, window_start, window_end, COUNT(*) AS books \
            FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE)) \
            WHERE category = 'books' GROUP BY user_id, window_start, window_end) b \
         FULL JOIN \
           (SELECT user_id, window_start, window_end, COUNT(*) AS food \
            FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE)) \
            WHERE category = 'food' GROUP BY user_id, window_start, window_end) f \
         ON b.user_id = f.user_id AND b.window_start = f.window_start AND b.window_end = f.window_end",
        "SELECT b.user_id, b.ws, b.books, f.food FROM \
           (SELECT user_id, date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, COUNT(*) AS books \
            FROM orders WHERE category = 'books' GROUP BY 1, 2) b \
         FULL JOIN \
           (SELECT user_id, date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, COUNT(*) AS food \
            FROM orders WHERE category = 'food' GROUP BY 1, 2) f \
         ON b.user_id = f.user_id AND b.ws = f.ws",
    );
}

#[test]
fn self_join_of_a_hop_window_aggregation() {
    // Nexmark q5's shape: the categories with the most orders per hopping window. Both sides
    // are the same aggregation, computed once and read twice.
    let counts = "SELECT window_start, window_end, category, COUNT(*) AS n \
         FROM TABLE(HOP(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE, INTERVAL '3' MINUTE)) \
         GROUP BY window_start, window_end, category";
    let batch_counts = "SELECT ws, category, COUNT(*) AS n FROM ( \
           SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, category FROM orders \
           UNION ALL SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') - INTERVAL '1 minute', category FROM orders \
           UNION ALL SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') - INTERVAL '2 minutes', category FROM orders) \
         GROUP BY ws, category";
    check(
        &format!(
            "SELECT a.window_start, a.category, a.n FROM ({counts}) a \
             JOIN (SELECT window_start, window_end, MAX(n) AS maxn FROM ({counts}) \
                   GROUP BY window_start, window_end) m \
             ON a.window_start = m.window_start AND a.window_end = m.window_end AND a.n = m.maxn"
        ),
        &format!(
            "SELECT a.ws, a.category, a.n FROM ({batch_counts}) a \
             JOIN (SELECT ws, MAX(n) AS maxn FROM ({batch_counts}) GROUP BY ws) m \
             ON a.ws = m.ws AND a.n = m.maxn"
        ),
    );
}

#[test]
fn rows_joined_with_their_window_maximum() {
    // Nexmark q7's shape: the largest orders per tumbling window. The two sides read different
    // columns of the table through one reader.
    check(
        "SELECT b.window_start, b.order_id, b.user_id, b.amount \
         FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE)) b \
         JOIN (SELECT window_start, window_end, MAX(amount) AS top \
               FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE)) \
               GROUP BY window_start, window_end) m \
         ON b.window_start = m.window_start AND b.window_end = m.window_end AND b.amount = m.top",
        "SELECT b.ws, b.order_id, b.user_id, b.amount FROM \
           (SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, order_id, user_id, amount FROM orders) b \
         JOIN (SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, MAX(amount) AS top \
               FROM orders GROUP BY 1) m \
         ON b.ws = m.ws AND b.amount = m.top",
    );
}

#[test]
fn top_n_per_partition() {
    // Append-only input: the best three orders per category.
    let q = "SELECT category, order_id, amount, rn FROM (SELECT category, order_id, amount, \
             ROW_NUMBER() OVER (PARTITION BY category ORDER BY amount DESC, order_id) AS rn \
             FROM orders WHERE amount IS NOT NULL) WHERE rn <= 3";
    check(q, q);
    // Updating input: the two busiest users per province, as their counts change.
    let q = "SELECT province, user_id, cnt, rn FROM (SELECT province, user_id, cnt, \
             ROW_NUMBER() OVER (PARTITION BY province ORDER BY cnt DESC, user_id) AS rn \
             FROM (SELECT province, user_id, COUNT(*) AS cnt FROM orders GROUP BY province, user_id)) \
             WHERE rn <= 2";
    check(q, q);
}

#[test]
fn window_top_n() {
    check(
        "SELECT window_start, category, n, rn FROM (SELECT window_start, category, n, \
           ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY n DESC, category) AS rn FROM \
           (SELECT window_start, window_end, category, COUNT(*) AS n \
            FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE)) \
            GROUP BY window_start, window_end, category)) WHERE rn <= 2",
        "SELECT ws, category, n, rn FROM (SELECT ws, category, n, \
           ROW_NUMBER() OVER (PARTITION BY ws ORDER BY n DESC, category) AS rn FROM \
           (SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01') AS ws, category, COUNT(*) AS n \
            FROM orders GROUP BY 1, category)) WHERE rn <= 2",
    );
}

#[test]
fn deduplication_keeps_the_first_and_the_last_row() {
    // Keep-first on event time: append-only, emitted as the watermark passes each key's first row.
    let q = "SELECT user_id, event_time FROM (SELECT user_id, event_time, \
             ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY event_time) AS rn FROM orders) WHERE rn = 1";
    check(q, q);
    // Keep-last: updating.
    let q = "SELECT user_id, event_time FROM (SELECT user_id, event_time, \
             ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY event_time DESC) AS rn FROM orders) WHERE rn = 1";
    check(q, q);
}

#[test]
fn over_aggregates() {
    // ROWS frames depend on the order of rows with equal times: this data has none per user.
    let data = orders(7);
    let users = data
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let times = data
        .column(5)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 0..data.num_rows() {
        assert!(
            seen.insert((users.value(i), times.value(i))),
            "a user has two orders at one time"
        );
    }
    let q = "SELECT order_id, SUM(amount) OVER w AS s, COUNT(*) OVER w AS c, MIN(amount) OVER w AS lo \
             FROM orders WINDOW w AS (PARTITION BY user_id ORDER BY event_time ROWS BETWEEN 2 PRECEDING AND CURRENT ROW)";
    check(q, q);
    // RANGE frames include rows of the same time (peers).
    let q = "SELECT order_id, \
             SUM(amount) OVER (PARTITION BY category ORDER BY event_time RANGE BETWEEN INTERVAL '10' SECOND PRECEDING AND CURRENT ROW) AS s, \
             MAX(amount) OVER (PARTITION BY category ORDER BY event_time RANGE BETWEEN INTERVAL '10' SECOND PRECEDING AND CURRENT ROW) AS hi, \
             AVG(amount) OVER (PARTITION BY category ORDER BY event_time RANGE BETWEEN INTERVAL '10' SECOND PRECEDING AND CURRENT ROW) AS av \
             FROM orders";
    check(q, q);
    // The default frame: everything up to the current row's time.
    let q = "SELECT order_id, COUNT(*) OVER (PARTITION BY province ORDER BY event_time) AS running FROM orders";
    check(q, q);
}

#[test]
fn lookup_join_against_a_file_table() {
    check(
        "SELECT o.order_id, o.amount, u.name, u.credit FROM (SELECT *, PROCTIME() AS pt FROM orders) o \
         LEFT JOIN users FOR SYSTEM_TIME AS OF o.pt AS u ON o.user_id = u.user_id WHERE o.province <> 'Gansu'",
        "SELECT o.order_id, o.amount, u.name, u.credit FROM orders o \
         LEFT JOIN users u ON o.user_id = u.user_id WHERE o.province <> 'Gansu'",
    );
}

#[test]
fn count_distinct_with_filters_per_minute() {
    // Nexmark q15's shape: totals and distinct counts, overall and per price rank.
    check(
        "SELECT DATE_FORMAT(event_time, 'yyyy-MM-dd HH:mm') AS day, COUNT(*) AS total, \
         COUNT(*) FILTER (WHERE amount < 100) AS cheap, COUNT(*) FILTER (WHERE amount >= 100 AND amount < 800) AS mid, \
         COUNT(DISTINCT user_id) AS users, COUNT(DISTINCT user_id) FILTER (WHERE amount < 100) AS cheap_users, \
         COUNT(DISTINCT category) FILTER (WHERE amount >= 800) AS rich_categories \
         FROM orders GROUP BY DATE_FORMAT(event_time, 'yyyy-MM-dd HH:mm')",
        "SELECT to_char(event_time, '%Y-%m-%d %H:%M') AS day, COUNT(*), \
         COUNT(*) FILTER (WHERE amount < 100), COUNT(*) FILTER (WHERE amount >= 100 AND amount < 800), \
         COUNT(DISTINCT user_id), COUNT(DISTINCT user_id) FILTER (WHERE amount < 100), \
         COUNT(DISTINCT category) FILTER (WHERE amount >= 800) \
         FROM orders GROUP BY to_char(event_time, '%Y-%m-%d %H:%M')",
    );
}

#[test]
fn event_time_temporal_join() {
    // Each order with its user's latest order at that time (itself included): the orders as a
    // versioned table keyed by user.
    check(
        "SELECT o.order_id, v.order_id AS latest, v.amount FROM orders o \
         JOIN order_versions FOR SYSTEM_TIME AS OF o.event_time AS v ON o.user_id = v.user_id",
        "SELECT order_id, latest, amount FROM (SELECT o.order_id, v.order_id AS latest, v.amount, \
           ROW_NUMBER() OVER (PARTITION BY o.order_id ORDER BY v.event_time DESC) AS rn \
           FROM orders o JOIN orders v ON o.user_id = v.user_id AND v.event_time <= o.event_time) WHERE rn = 1",
    );
}

#[test]
fn over_aggregates_on_an_updating_input() {
    // Every order changes its user's total; the frames (the three users before, by id) follow.
    let q = "SELECT province, user_id, total, \
             AVG(total) OVER (PARTITION BY province ORDER BY user_id ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS avg4, \
             MAX(n) OVER (PARTITION BY province ORDER BY user_id ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS most \
             FROM (SELECT province, user_id, SUM(amount) AS total, COUNT(*) AS n FROM orders GROUP BY province, user_id)";
    check(q, q);
    let q = "SELECT category, user_id, n, SUM(n) OVER (PARTITION BY category ORDER BY n DESC, user_id) AS running \
             FROM (SELECT category, user_id, COUNT(*) AS n FROM orders GROUP BY category, user_id)";
    check(q, q);
}
