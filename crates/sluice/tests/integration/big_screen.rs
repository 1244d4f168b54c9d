//! The big screen in a real browser: Debian's Chromium, driven by playwright-core through
//! `web/tests/driver.mjs`, against `sluice serve`. A tenant's screen follows the orders written
//! into its source to the exact totals within 2 s, survives a server restart without counting
//! anything twice, counts province names the map does not know, and is invisible to another
//! tenant. The screens' REST checks are here too.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde_json::{json, Value};

use crate::serve::Serve;

/// A headless Chromium behind `web/tests/driver.mjs` (one JSON command per line).
pub(crate) struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
}

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

impl Browser {
    pub(crate) fn start() -> Browser {
        let web = web_dir();
        assert!(
            web.join("node_modules/playwright-core").exists(),
            "no playwright-core in {}: `bash .ci/run` installs it (npm ci in web/)",
            web.display()
        );
        let chromium =
            std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium}: `bash .ci/run` installs it (apt-get install chromium)"
        );
        let mut child = Command::new("node")
            .arg(web.join("tests/driver.mjs"))
            .current_dir(&web)
            .env("SLUICE_CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs web/tests/driver.mjs");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Browser {
            child,
            stdin,
            answers,
        }
    }

    /// Sends a command; its answer, which must come within `limit`.
    pub(crate) fn call(&mut self, command: Value, limit: Duration) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        let line = self.answers.recv_timeout(limit).unwrap_or_else(|e| {
            panic!("the browser did not answer {command} within {limit:?}: {e}")
        });
        serde_json::from_str(&line).unwrap()
    }

    /// Waits until the page shows `expect` (see driver.mjs); how long it took, in ms.
    pub(crate) fn wait(&mut self, expect: Value, ms: u64) -> u64 {
        let answer = self.call(
            json!({ "wait": expect, "ms": ms }),
            Duration::from_millis(ms + 30_000),
        );
        assert_eq!(answer["ok"], true, "{answer}");
        answer["ms"].as_u64().unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number as the page writes it: thousands separators and two decimals (en-US).
fn money(v: f64) -> String {
    let cents = (v * 100.0).round() as i64;
    let (whole, frac) = (cents / 100, cents % 100);
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("¥{grouped}.{frac:02}")
}

const PROVINCES: [(&str, &str); 5] = [
    ("Guangdong", "广东"),
    ("Zhejiang", "浙江"),
    ("Beijing", "北京"),
    ("Sichuan", "四川"),
    ("Atlantis", ""),
];

/// Orders `from..to` as JSON lines in `dir/name` (renamed into place whole); adds each one's
/// amount to `totals` (by province) and returns nothing else. Amounts are quarters, so every
/// sum is exact in binary floating point and the page's numbers can be compared exactly.
pub(crate) fn write_orders(
    dir: &Path,
    name: &str,
    ids: std::ops::Range<i64>,
    totals: &mut [f64; 5],
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for i in ids {
        let p = (i * 7 % 5) as usize;
        let amount = 1.0 + (i % 40) as f64 * 0.25;
        totals[p] += amount;
        text.push_str(&format!(
            "{{\"order_id\": {i}, \"province\": \"{}\", \"amount\": {amount}}}\n",
            PROVINCES[p].0
        ));
    }
    let tmp = dir.parent().unwrap().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// What the screen must show for `totals` after `orders` orders.
pub(crate) fn expected(totals: &[f64; 5], orders: i64) -> Value {
    let gmv: f64 = totals.iter().sum();
    let map: serde_json::Map<String, Value> = PROVINCES
        .iter()
        .zip(totals)
        .filter(|((_, feature), _)| !feature.is_empty())
        .map(|((_, feature), v)| (feature.to_string(), json!(v)))
        .collect();
    json!({
        "#w0": { "value": gmv },
        "#w0 .value": money(gmv),
        "#w1": { "value": orders },
        "#w2": { "values": map, "unmapped": ["Atlantis"] },
    })
}

pub(crate) fn screenshots() -> PathBuf {
    let dir = std::env::var_os("SLUICE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sluice-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_big_screen_follows_orders_exactly_in_a_browser_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path());
    let (pg_port, http_port) = (serve.pg, serve.http);
    serve.admin().exec(
        "CREATE TENANT shop; CREATE TENANT rival;
         CREATE USER shop_owner WITH PASSWORD 'shop-pw' IN TENANT shop ROLE owner;
         CREATE USER rival_owner WITH PASSWORD 'rival-pw' IN TENANT rival ROLE owner",
    );
    let shop = serve.connect("shop_owner", "shop-pw").unwrap();
    let rival = serve.connect("rival_owner", "rival-pw").unwrap();
    let shop_token = shop.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let rival_token = rival.rows("CREATE TOKEN").unwrap()[0][1].clone();
    let orders_dir = serve.files("shop").join("orders");
    let mut totals = [0.0; 5];
    write_orders(&orders_dir, "a.json", 0..5_000, &mut totals);
    shop.exec(
        "SET 'execution.checkpointing.interval' = '200 ms';
         CREATE TABLE orders (order_id BIGINT, province STRING, amount DOUBLE, ingest AS PROCTIME())
           WITH ('connector' = 'filesystem', 'path' = 'orders', 'format' = 'json',
                 'source.monitor-interval' = '100 ms');
         CREATE MATERIALIZED VIEW probe AS
           SELECT order_id, ingest_ms FROM (
             SELECT order_id, ingest_ms, ROW_NUMBER() OVER (ORDER BY order_id DESC) AS rn
             FROM (SELECT order_id, CAST(ingest AS BIGINT) AS ingest_ms FROM orders
                   WHERE MOD(order_id, 100) = 0))
           WHERE rn <= 100;
         CREATE MATERIALIZED VIEW total AS SELECT SUM(amount) AS gmv, COUNT(*) AS orders FROM orders;
         CREATE MATERIALIZED VIEW by_province AS
           SELECT province, SUM(amount) AS gmv FROM orders GROUP BY province",
    );
    let screen = json!({
        "title": "Shop sales",
        "widgets": [
            { "type": "ticker", "title": "GMV", "view": "total", "column": "gmv", "prefix": "¥" },
            { "type": "number", "title": "Orders", "view": "total", "column": "orders" },
            { "type": "map", "title": "By province", "view": "by_province", "name": "province", "value": "gmv" },
            { "type": "rate", "title": "Orders / s", "view": "total", "column": "orders" },
            { "type": "freshness", "title": "Delay", "view": "total", "time": "orders" },
            { "type": "delay", "title": "End-to-end delay", "view": "probe", "time": "ingest_ms" }
        ]
    });

    // REST: a screen is checked against the tenant's views, and only its tenant sees it.
    let (st, body) = serve.http(
        "PUT",
        "/v1/screens/sales",
        Some(&shop_token),
        Some(screen.clone()),
    );
    assert_eq!(st, 200, "{body}");
    let mut bad = screen.clone();
    bad["widgets"][0]["column"] = json!("revenue");
    let (st, body) = serve.http("PUT", "/v1/screens/bad", Some(&shop_token), Some(bad));
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no column 'revenue'"),
        "{body}"
    );
    let mut bad = screen.clone();
    bad["widgets"][1]["view"] = json!("nowhere");
    let (st, body) = serve.http("PUT", "/v1/screens/bad", Some(&shop_token), Some(bad));
    assert!(
        st == 404
            && body["message"]
                .as_str()
                .unwrap()
                .contains("'nowhere' does not exist"),
        "{st} {body}"
    );
    let (st, body) = serve.http("GET", "/v1/screens", Some(&shop_token), None);
    assert_eq!((st, body["screens"].clone()), (200, json!(["sales"])));
    let (st, body) = serve.http("GET", "/v1/screens", Some(&rival_token), None);
    assert_eq!((st, body["screens"].clone()), (200, json!([])));
    let (st, _) = serve.http("GET", "/v1/screens/sales", Some(&rival_token), None);
    assert_eq!(st, 404);
    let (st, _) = serve.http("GET", "/v1/screens/sales", None, None);
    assert_eq!(st, 401);
    // Another tenant cannot write over it either: its PUT makes its own (or fails on views).
    let (st, _) = serve.http(
        "PUT",
        "/v1/screens/sales",
        Some(&rival_token),
        Some(screen.clone()),
    );
    assert_eq!(st, 404);

    // A read-only share token (for a wall display that cannot log in): its screen and the views
    // that screen shows, nothing else.
    let (st, body) = serve.http("POST", "/v1/screens/sales/share", Some(&shop_token), None);
    assert_eq!(st, 200, "{body}");
    let share = body["token"].as_str().unwrap().to_string();
    let mut totals_only = screen.clone();
    totals_only["widgets"] = json!([screen["widgets"][0].clone()]);
    let (st, body) = serve.http(
        "PUT",
        "/v1/screens/totals",
        Some(&shop_token),
        Some(totals_only),
    );
    assert_eq!(st, 200, "{body}");
    let (st, body) = serve.http("POST", "/v1/screens/totals/share", Some(&shop_token), None);
    assert_eq!(st, 200, "{body}");
    let totals_share = body["token"].as_str().unwrap().to_string();
    for (method, path, token, want) in [
        ("GET", "/v1/screens/sales", &share, 200),
        ("GET", "/v1/views/total/rows", &share, 200),
        ("GET", "/v1/views/by_province/rows", &share, 200),
        ("GET", "/v1/screens/totals", &share, 403),
        ("GET", "/v1/views/by_province/rows", &totals_share, 403),
        ("GET", "/v1/screens", &share, 401),
        ("GET", "/v1/pipelines", &share, 401),
        ("DELETE", "/v1/screens/sales", &share, 401),
        ("POST", "/v1/screens/sales/share", &share, 401),
    ] {
        let (st, body) = serve.http(method, path, Some(token), None);
        assert_eq!(st, want, "{method} {path}: {body}");
    }
    let (st, _) = serve.http(
        "PUT",
        "/v1/screens/sales",
        Some(&share),
        Some(screen.clone()),
    );
    assert_eq!(st, 401);
    // A token for another screen made from this one's secret opens nothing.
    let forged = share.replace(".sales.", ".totals.");
    let (st, _) = serve.http("GET", "/v1/screens/totals", Some(&forged), None);
    assert_eq!(st, 401);

    // All the views of a page share one stream (a browser holds only six connections to a
    // server): each event names its view; a share token reads only its screen's views.
    let events = feed_events(serve.http, &shop_token, "total,by_province", 2);
    let mut views: Vec<&str> = events
        .iter()
        .map(|(kind, doc)| {
            assert_eq!(kind, "snapshot", "{doc}");
            doc["view"].as_str().unwrap()
        })
        .collect();
    views.sort();
    assert_eq!(views, ["by_province", "total"]);
    let (st, _) = serve.http(
        "GET",
        "/v1/feeds?views=total,nowhere",
        Some(&shop_token),
        None,
    );
    assert_eq!(st, 404);
    let (st, _) = serve.http(
        "GET",
        "/v1/feeds?views=by_province",
        Some(&totals_share),
        None,
    );
    assert_eq!(st, 403);

    let mut browser = Browser::start();
    let url = format!("http://127.0.0.1:{http_port}/screen/sales?token={shop_token}");
    let answer = browser.call(json!({ "open": url }), Duration::from_secs(60));
    assert_eq!(answer["ok"], true, "{answer}");
    // The token leaves the address bar once the page has it.
    assert!(
        !answer["url"].as_str().unwrap().contains("token="),
        "{answer}"
    );
    browser.wait(expected(&totals, 5_000), 60_000);

    // The delay widget measures each sampled order once, when a change adds it (not the
    // snapshot's, nor a Top-N's rows moving rank): settle on what the first file brought, then
    // the second file's 10 samples.
    let probe_rows = |serve: &Serve| {
        let (_, body) = serve.http("GET", "/v1/views/probe/rows", Some(&shop_token), None);
        body["rows"].as_array().map_or(0, |r| r.len())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while probe_rows(&serve) < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe view has not caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let delay_state = |browser: &mut Browser| -> Value {
        let answer = browser.call(
            json!({ "attr": "#w5", "name": "data-state" }),
            Duration::from_secs(30),
        );
        answer["value"]
            .as_str()
            .map_or(json!({ "total": 0 }), |s| serde_json::from_str(s).unwrap())
    };
    let measured_before = delay_state(&mut browser)["total"].as_u64().unwrap();

    // New orders reach the screen's text and map, exactly, within 2 s.
    write_orders(&orders_dir, "b.json", 5_000..6_000, &mut totals);
    let took = browser.wait(expected(&totals, 6_000), 2_000);
    eprintln!("orders to screen: {took} ms");
    browser.wait(json!({ "#w5": { "total": measured_before + 10 } }), 10_000);
    let d = delay_state(&mut browser);
    let (p50, p99) = (d["p50"].as_f64().unwrap(), d["p99"].as_f64().unwrap());
    // Milliseconds from the source's stamp to the page: positive, ordered, and not off by a
    // unit (seconds or microseconds would be far outside a minute).
    assert!(0.0 <= p50 && p50 <= p99 && p99 < 60_000.0, "{d}");
    let shot = screenshots().join("big-screen-test.png");
    let answer = browser.call(json!({ "shot": shot }), Duration::from_secs(30));
    assert_eq!(answer["ok"], true, "{answer}");

    // The server goes away and comes back: the page subscribes again, and the fresh snapshot
    // replaces what it held (nothing counted twice); orders written meanwhile arrive too.
    serve.kill();
    write_orders(&orders_dir, "c.json", 6_000..7_500, &mut totals);
    let serve = Serve::start_on(dir.path(), pg_port, http_port);
    browser.wait(expected(&totals, 7_500), 60_000);
    browser.wait(
        json!({ "#w0": { "value": totals.iter().sum::<f64>() } }),
        1_000,
    );

    let answer = browser.call(json!({ "errors": true }), Duration::from_secs(10));
    let errors: Vec<String> = serde_json::from_value(answer["errors"].clone()).unwrap();
    // While the server was down the page's requests failed; nothing else may have.
    let unexpected: Vec<&String> = errors
        .iter()
        .filter(|e| !e.contains("/v1/feeds") && !e.contains("/v1/screens/"))
        .collect();
    assert!(unexpected.is_empty(), "{errors:?}");

    // The share token shows the same screen; once revoked, it opens nothing.
    let url = format!("http://127.0.0.1:{http_port}/screen/sales?token={share}");
    browser.call(json!({ "open": url }), Duration::from_secs(60));
    browser.wait(expected(&totals, 7_500), 30_000);
    let (st, body) = serve.http("DELETE", "/v1/screens/sales/share", Some(&shop_token), None);
    assert_eq!((st, body["revoked"].clone()), (200, json!(1)), "{body}");
    let (st, _) = serve.http("GET", "/v1/screens/sales", Some(&share), None);
    assert_eq!(st, 401);

    // The rival's token opens nothing of the shop's.
    let url = format!("http://127.0.0.1:{http_port}/screen/sales?token={rival_token}");
    browser.call(json!({ "open": url }), Duration::from_secs(60));
    browser.wait(
        json!({ ".failure": "~screen 'sales' does not exist" }),
        10_000,
    );
    drop(serve);
}

/// The first `n` events of `GET /v1/feeds?views=...`: each one's name and data.
fn feed_events(port: u16, token: &str, views: &str, n: usize) -> Vec<(String, Value)> {
    use std::io::Read;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut resp = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/feeds?views={views}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let mut events = vec![];
    while events.len() < n {
        let got = resp.read(&mut buf).unwrap();
        assert!(got > 0, "the feed ended after {events:?}");
        text.push_str(std::str::from_utf8(&buf[..got]).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = k.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !kind.is_empty() {
                events.push((kind, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}
