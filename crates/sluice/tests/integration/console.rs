//! The console in a real browser (Debian's Chromium through `web/tests/driver.mjs`), against
//! `sluice serve`: a tenant's owner logs in with a password, writes SQL in the editor
//! (validation marks the error's position, a preview runs a query over the stream), creates
//! materialized views from it, sees them running with rows per second, their dataflow graph and
//! checkpoints, builds a screen from the console and opens it, where orders written into the
//! source show as exact totals within 2 s, then stops a pipeline and logs out. Each page's
//! screenshot is saved (`SLUICE_SCREENSHOTS`, or `sluice-screenshots` in the temp folder).
//! The REST calls the console makes are checked here too.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::big_screen::{expected, screenshots, write_orders, Browser};
use crate::serve::Serve;

const MINUTE: Duration = Duration::from_secs(60);

fn ok(answer: Value) {
    assert_eq!(answer["ok"], true, "{answer}");
}

impl Browser {
    fn shot(&mut self, name: &str) {
        let path = screenshots().join(name);
        ok(self.call(json!({ "shot": path, "full": true }), MINUTE));
    }
}

/// Writes a file of 100 orders every 100 ms until `stop`; returns the totals and the count.
fn keep_writing(
    dir: &Path,
    from: i64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<([f64; 5], i64)> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut totals = [0.0; 5];
        let mut next = from;
        while !stop.load(Ordering::SeqCst) {
            write_orders(
                &dir,
                &format!("live-{next}.json"),
                next..next + 100,
                &mut totals,
            );
            next += 100;
            std::thread::sleep(Duration::from_millis(100));
        }
        (totals, next - from)
    })
}

#[test]
fn the_console_logs_in_writes_sql_creates_pipelines_and_a_screen_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    serve.admin().exec(
        "CREATE TENANT shop;
         CREATE USER shop_owner WITH PASSWORD 'shop-pw' IN TENANT shop ROLE owner",
    );
    let orders_dir = serve.files("shop").join("orders");
    let mut totals = [0.0; 5];
    write_orders(&orders_dir, "a.json", 0..2_000, &mut totals);

    // REST first: login, who am I, logout; a wrong password and an unknown user look alike.
    let (st, body) = serve.http(
        "POST",
        "/v1/login",
        None,
        Some(json!({ "user": "shop_owner", "password": "shop-pw" })),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        (&body["tenant"], &body["role"], &body["admin"]),
        (&json!("shop"), &json!("owner"), &json!(false))
    );
    let token = body["token"].as_str().unwrap().to_string();
    let (st, me) = serve.http("GET", "/v1/me", Some(&token), None);
    assert_eq!((st, &me["user"]), (200, &json!("shop_owner")));
    let (wrong, body_wrong) = serve.http(
        "POST",
        "/v1/login",
        None,
        Some(json!({ "user": "shop_owner", "password": "nope" })),
    );
    let (unknown, body_unknown) = serve.http(
        "POST",
        "/v1/login",
        None,
        Some(json!({ "user": "nobody", "password": "nope" })),
    );
    assert_eq!((wrong, unknown), (401, 401));
    assert_eq!(body_wrong, body_unknown);
    let (st, _) = serve.http("POST", "/v1/logout", Some(&token), None);
    assert_eq!(st, 200);
    let (st, _) = serve.http("GET", "/v1/me", Some(&token), None);
    assert_eq!(st, 401, "a logged-out token is revoked");

    // Validation plans without creating anything, and points into the text it was given.
    let (st, body) = serve.http(
        "POST",
        "/v1/login",
        None,
        Some(json!({ "user": "shop_owner", "password": "shop-pw" })),
    );
    assert_eq!(st, 200);
    let rest_token = body["token"].as_str().unwrap().to_string();
    let ddl = "SET 'execution.checkpointing.interval' = '200 ms';
CREATE TABLE orders (order_id BIGINT, province STRING, amount DOUBLE)
  WITH ('connector' = 'filesystem', 'path' = 'orders', 'format' = 'json',
        'source.monitor-interval' = '100 ms')";
    let script = format!(
        "{ddl};\nSHOW TABLES;\nSELECT province, SUM(amount) AS gmv FROM orders GROUP BY province"
    );
    let (st, body) = serve.http(
        "POST",
        "/v1/validate",
        Some(&rest_token),
        Some(json!({ "sql": script })),
    );
    assert_eq!(st, 200, "{body}");
    let kinds: Vec<&str> = body["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["SET", "CREATE TABLE", "SHOW TABLES", "SELECT"]);
    assert!(
        body["plan"].as_str().unwrap().contains("GroupAggregate"),
        "{body}"
    );
    let (_, tables) = serve.http("GET", "/v1/tables", Some(&rest_token), None);
    assert_eq!(tables["tables"], json!([]), "validation created nothing");
    let bad = format!("{ddl};\nSELECT provnce FROM orders");
    let (st, body) = serve.http(
        "POST",
        "/v1/validate",
        Some(&rest_token),
        Some(json!({ "sql": bad })),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("provnce"),
        "{body}"
    );
    // A preview runs one query; what writes is refused before anything runs.
    let (st, body) = serve.http(
        "POST",
        "/v1/preview",
        Some(&rest_token),
        Some(json!({ "sql": format!("{ddl};\nINSERT INTO orders SELECT * FROM orders") })),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("run it instead"),
        "{body}"
    );

    let mut browser = Browser::start();
    let base = format!("http://127.0.0.1:{}", serve.http);
    ok(browser.call(json!({ "open": format!("{base}/") }), MINUTE));
    browser.wait(json!({ "#login h1": "Sluice console" }), 30_000);
    browser.shot("console-login.png");
    ok(browser.call(
        json!({ "fill": "#login input[name=user]", "text": "shop_owner" }),
        MINUTE,
    ));
    ok(browser.call(
        json!({ "fill": "#login input[name=password]", "text": "wrong" }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#login button" }), MINUTE));
    browser.wait(
        json!({ "#login .msg.error": "the user name or the password is wrong" }),
        10_000,
    );
    ok(browser.call(
        json!({ "fill": "#login input[name=password]", "text": "shop-pw" }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#login button" }), MINUTE));
    browser.wait(json!({ "#who": "shop_owner · shop · owner" }), 10_000);

    // The editor: the tables, then a query with a typo, whose position is marked.
    ok(browser.call(json!({ "goto": "#/sql" }), MINUTE));
    browser.wait(json!({ "#editor .cm-content": "~" }), 10_000);
    ok(browser.call(
        json!({ "fill": "#editor .cm-content", "text": ddl }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#run" }), MINUTE));
    browser.wait(json!({ "#sql-status": { "ok": true } }), 30_000);
    ok(browser.call(
        json!({ "fill": "#editor .cm-content", "text": "SELECT provnce, SUM(amount)\nFROM orders GROUP BY provnce" }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#validate" }), MINUTE));
    browser.wait(
        json!({ "#sql-status": { "ok": false }, ".cm-lintRange-error": "provnce" }),
        30_000,
    );
    // The preview: the query over the stream, for a few seconds, in a process of its own.
    ok(browser.call(
        json!({ "fill": "#editor .cm-content", "text": "SELECT COUNT(*) AS orders, SUM(amount) AS gmv FROM orders" }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#preview-run" }), MINUTE));
    let gmv: f64 = totals.iter().sum();
    browser.wait(
        json!({ "#preview": { "columns": ["orders", "gmv"], "rows": [[2000, gmv]] } }),
        60_000,
    );
    ok(browser.call(json!({ "click": "#explain" }), MINUTE));
    browser.wait(json!({ "#plan": "~GroupAggregate" }), 30_000);
    browser.shot("console-sql.png");

    // Two materialized views, created from the editor.
    for (name, query) in [
        (
            "total",
            "SELECT SUM(amount) AS gmv, COUNT(*) AS orders FROM orders",
        ),
        (
            "by_province",
            "SELECT province, SUM(amount) AS gmv FROM orders GROUP BY province",
        ),
    ] {
        ok(browser.call(json!({ "goto": "#/sql" }), MINUTE));
        browser.wait(json!({ "#editor .cm-content": "~" }), 10_000);
        ok(browser.call(
            json!({ "fill": "#editor .cm-content", "text": query }),
            MINUTE,
        ));
        ok(browser.call(json!({ "fill": "#pipeline-name", "text": name }), MINUTE));
        ok(browser.call(json!({ "click": "#as-view" }), MINUTE));
        ok(browser.call(json!({ "click": "#create" }), MINUTE));
        browser.wait(json!({ "#pipeline-head": { "status": "running" } }), 60_000);
    }

    // Running, with rows per second, while orders keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(&orders_dir, 1_000_000, stop.clone());
    ok(browser.call(json!({ "goto": "#/pipelines" }), MINUTE));
    browser.wait(
        json!({
            "tr[data-pipeline=total]": { "status": "running", "rows_in_per_second": ">0" },
            "tr[data-pipeline=by_province]": { "status": "running", "rows_in_per_second": ">0" },
        }),
        30_000,
    );
    browser.shot("console-pipelines.png");
    // Its page: the dataflow graph with the aggregation's state, checkpoints, the charts.
    ok(browser.call(json!({ "goto": "#/pipelines/by_province" }), MINUTE));
    browser.wait(
        json!({
            "#pipeline-head": { "status": "running", "checkpoints": ">0" },
            "#graph svg .node": "~Scan orders",
            "#graph svg": "~GroupAggregate",
            "#operators": "~hash[province",
            "#checkpoint-table": "~epoch",
            "#chart-throughput": { "samples": ">0" },
            "#logs": "~",
        }),
        30_000,
    );
    browser.shot("console-pipeline.png");
    stop.store(true, Ordering::SeqCst);
    let (more, count) = writer.join().unwrap();
    for (t, m) in totals.iter_mut().zip(more) {
        *t += m;
    }
    let mut orders = 2_000 + count;

    // The per-operator figures come from the running process: state on the aggregation.
    let (st, stats) = serve.http(
        "GET",
        "/v1/pipelines/by_province/stats",
        Some(&rest_token),
        None,
    );
    assert_eq!(st, 200);
    let nodes = stats["stats"]["graph"]["nodes"].as_array().unwrap();
    let agg = nodes
        .iter()
        .find(|n| n["label"] == "GroupAggregate")
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(agg["state_keys"].as_u64().unwrap() >= 4, "{agg}");
    let scan = nodes
        .iter()
        .find(|n| n["label"].as_str().unwrap().starts_with("Scan orders"))
        .unwrap();
    assert_eq!(agg["inputs"], json!([scan["id"]]), "{stats}");
    let (st, hist) = serve.http(
        "GET",
        "/v1/pipelines/by_province/history",
        Some(&rest_token),
        None,
    );
    assert_eq!(st, 200);
    assert!(
        hist["samples"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["rows_in_per_second"].as_f64().unwrap() > 0.0),
        "{hist}"
    );

    // A screen, built with the console's form, saved and opened.
    ok(browser.call(json!({ "goto": "#/screens" }), MINUTE));
    ok(browser.call(json!({ "fill": "#new-screen", "text": "sales" }), MINUTE));
    ok(browser.call(json!({ "click": "#create-screen" }), MINUTE));
    browser.wait(json!({ "#screen-msg": "~is new" }), 10_000);
    for (kind, view, title, fields) in [
        ("ticker", "total", "GMV", vec![("column", "gmv")]),
        ("number", "total", "Orders", vec![("column", "orders")]),
        (
            "map",
            "by_province",
            "By province",
            vec![("name", "province"), ("value", "gmv")],
        ),
    ] {
        ok(browser.call(json!({ "select": "#widget-type", "value": kind }), MINUTE));
        ok(browser.call(json!({ "select": "#widget-view", "value": view }), MINUTE));
        browser.wait(
            json!({ format!("select[data-field={}]", fields[0].0): format!("~{}", fields[0].1) }),
            10_000,
        );
        for (field, column) in fields {
            ok(browser.call(
                json!({ "select": format!("select[data-field={field}]"), "value": column }),
                MINUTE,
            ));
        }
        if kind == "ticker" {
            ok(browser.call(
                json!({ "fill": "input[data-field=prefix]", "text": "¥" }),
                MINUTE,
            ));
        }
        ok(browser.call(json!({ "fill": "#widget-title", "text": title }), MINUTE));
        ok(browser.call(json!({ "click": "#add-widget" }), MINUTE));
    }
    ok(browser.call(json!({ "click": "#save-screen" }), MINUTE));
    browser.wait(json!({ "#screen-msg": { "saved": true } }), 10_000);
    browser.shot("console-screen-editor.png");
    let (st, saved) = serve.http("GET", "/v1/screens/sales", Some(&rest_token), None);
    assert_eq!(st, 200);
    assert_eq!(
        saved["screen"]["widgets"][2],
        json!({ "type": "map", "title": "By province", "view": "by_province",
                "name": "province", "value": "gmv" })
    );

    // The screen, in the same tab (the console's token), follows new orders exactly.
    ok(browser.call(json!({ "visit": format!("{base}/screen/sales") }), MINUTE));
    browser.wait(expected(&totals, orders), 60_000);
    write_orders(&orders_dir, "b.json", 5_000..6_000, &mut totals);
    orders += 1_000;
    let took = browser.wait(expected(&totals, orders), 2_000);
    eprintln!("console-made screen: orders to screen in {took} ms");
    browser.shot("console-screen.png");

    // Tables and views: the view's rows, live.
    ok(browser.call(
        json!({ "visit": format!("{base}/console#/views/by_province") }),
        MINUTE,
    ));
    browser.wait(json!({ "#view-rows": { "rows": 5 } }), 30_000);
    write_orders(&orders_dir, "c.json", 6_000..6_010, &mut totals);
    browser.wait(json!({ "#view-changes": "~+U" }), 10_000);
    browser.shot("console-view.png");
    ok(browser.call(json!({ "goto": "#/admin" }), MINUTE));
    browser.wait(json!({ "#quotas": "~shop" }), 10_000);
    browser.shot("console-admin.png");

    // Stop a pipeline from the list; then log out.
    ok(browser.call(json!({ "dialogs": "" }), MINUTE));
    ok(browser.call(json!({ "goto": "#/pipelines" }), MINUTE));
    ok(browser.call(
        json!({ "click": "tr[data-pipeline=total] button[data-action=stop]" }),
        MINUTE,
    ));
    browser.wait(
        json!({ "tr[data-pipeline=total]": { "status": "stopped" } }),
        60_000,
    );
    let (_, p) = serve.http("GET", "/v1/pipelines/total", Some(&rest_token), None);
    assert_eq!(p["status"], "stopped", "{p}");
    // The rest of its lifecycle: resume from the checkpoint, rescale (the prompt answers 2),
    // and drop (a view's pipeline goes with its view).
    ok(browser.call(
        json!({ "click": "tr[data-pipeline=total] button[data-action=start]" }),
        MINUTE,
    ));
    browser.wait(
        json!({ "tr[data-pipeline=total]": { "status": "running", "parallelism": 1 } }),
        60_000,
    );
    ok(browser.call(json!({ "dialogs": "2" }), MINUTE));
    ok(browser.call(
        json!({ "click": "tr[data-pipeline=total] button[data-action=rescale]" }),
        MINUTE,
    ));
    browser.wait(
        json!({ "tr[data-pipeline=total]": { "status": "running", "parallelism": 2 } }),
        60_000,
    );
    // Resumed and rescaled from its checkpoints: the totals are still exact.
    let gmv: f64 = totals.iter().sum();
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let (_, rows) = serve.http("GET", "/v1/views/total/rows", Some(&rest_token), None);
        if rows["rows"][0][0].as_f64() == Some(gmv) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rows}: want gmv {gmv}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(browser.call(
        json!({ "click": "tr[data-pipeline=total] button[data-action=drop]" }),
        MINUTE,
    ));
    browser.wait(
        json!({ "#pipelines-msg": "total: drop done", "#pipelines": { "names": ["by_province"] } }),
        30_000,
    );
    let (st, _) = serve.http("GET", "/v1/views/total/rows", Some(&rest_token), None);
    assert_eq!(st, 404, "the view went with its pipeline");
    ok(browser.call(json!({ "click": "#logout" }), MINUTE));
    browser.wait(json!({ "#login h1": "Sluice console" }), 10_000);

    // Another tenant's owner, logged in, sees none of the shop's pipelines, views or screens.
    serve.admin().exec(
        "CREATE TENANT rival;
         CREATE USER rival_owner WITH PASSWORD 'rival-pw' IN TENANT rival ROLE owner",
    );
    ok(browser.call(
        json!({ "fill": "#login input[name=user]", "text": "rival_owner" }),
        MINUTE,
    ));
    ok(browser.call(
        json!({ "fill": "#login input[name=password]", "text": "rival-pw" }),
        MINUTE,
    ));
    ok(browser.call(json!({ "click": "#login button" }), MINUTE));
    browser.wait(
        json!({ "#who": "rival_owner · rival · owner", "#pipelines": "~No pipelines yet" }),
        10_000,
    );
    ok(browser.call(json!({ "goto": "#/catalog" }), MINUTE));
    browser.wait(json!({ "#page": "~Nothing yet" }), 10_000);
    ok(browser.call(json!({ "goto": "#/screens" }), MINUTE));
    browser.wait(json!({ "#page": "~No screens yet" }), 10_000);
    ok(browser.call(json!({ "goto": "#/views/by_province" }), MINUTE));
    browser.wait(
        json!({ "#page .failure": "~'by_province' does not exist" }),
        10_000,
    );
    ok(browser.call(json!({ "click": "#logout" }), MINUTE));
    browser.wait(json!({ "#login h1": "Sluice console" }), 10_000);

    let answer = browser.call(json!({ "errors": true }), Duration::from_secs(10));
    let errors: Vec<String> = serde_json::from_value(answer["errors"].clone()).unwrap();
    // The failed login and the typo answered 401 and 400 on purpose, and the new screen's
    // editor found no screen of that name (404); nothing else failed.
    let unexpected: Vec<&String> = errors
        .iter()
        .filter(|e| {
            let on_purpose = e.contains("/v1/login")
                || e.contains("/v1/validate")
                || (e.starts_with("HTTP 404") && e.ends_with("/v1/screens/sales"))
                // The rival's look at the shop's view.
                || (e.starts_with("HTTP 404") && e.ends_with("/v1/sql"));
            !on_purpose
        })
        .collect();
    assert!(unexpected.is_empty(), "{errors:?}");
}
