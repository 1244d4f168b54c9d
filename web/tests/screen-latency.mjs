// The big screen's end-to-end delay under load: from an order's ingestion stamp (PROCTIME(),
// taken by the source) to the browser's redraw showing it, at a given order rate.
//
//   node web/tests/screen-latency.mjs --sluice $CARGO_TARGET_DIR/release/sluice \
//        --rate 50000 --seconds 60 --warmup 15 --interval "200 ms" [--json out.json]
//
// Starts `sluice serve` on free ports, makes a tenant with two materialized views over one
// generated order stream (`ecommerce` at --rate orders/s; each view is a pipeline of its own):
// the GMV ticker's view (SUM, COUNT over every order) and a probe of every 1000th order with its
// ingestion stamp, appended (never retracted, so every sampled order is measured once). A screen
// shows both, in Debian's Chromium; the screen's `delay` widget measures each probe row as
// `Date.now()` in the animation frame after the change arrived, minus its stamp. After the
// warm-up it reads the widget's measurements for --seconds and prints p50/p99/max, the orders
// the GMV view counted per second meanwhile (the rate actually sustained), and the machine.
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir, cpus } from "node:os";
import { join } from "node:path";
import readline from "node:readline";

const args = Object.fromEntries(
  process.argv
    .slice(2)
    .join(" ")
    .split(/\s*--/)
    .filter(Boolean)
    .map((a) => {
      const i = a.indexOf(" ");
      return i < 0 ? [a, "true"] : [a.slice(0, i), a.slice(i + 1).replace(/^"|"$/g, "")];
    }),
);
const sluice = args.sluice ?? `${process.env.CARGO_TARGET_DIR ?? "target"}/release/sluice`;
const rate = Number(args.rate ?? 50000);
const seconds = Number(args.seconds ?? 60);
const warmup = Number(args.warmup ?? 15);
const interval = args.interval ?? "200 ms";
const TOKEN = "sluice_bench_token_00000000000000000000000000000000";

const freePort = () =>
  new Promise((ok) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => ok(p));
    });
  });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const data = mkdtempSync(join(tmpdir(), "sluice-screen-latency-"));
const [http, pg] = [await freePort(), await freePort()];
const server = spawn(sluice, ["serve", "--data-dir", data, "--http-port", http, "--pg-port", pg], {
  env: { ...process.env, SLUICE_ADMIN_TOKEN: TOKEN, SLUICE_ADMIN_PASSWORD: "bench-admin" },
  stdio: ["ignore", "pipe", "inherit"],
});
let browser;
const cleanup = () => {
  server.kill("SIGKILL");
  rmSync(data, { recursive: true, force: true });
};
process.on("exit", cleanup);
await new Promise((ok, fail) => {
  const rl = readline.createInterface({ input: server.stdout });
  rl.on("line", (l) => l.includes("Postgres wire") && ok());
  server.on("exit", (c) => fail(new Error(`sluice serve exited with ${c}`)));
});
const base = `http://127.0.0.1:${http}`;
async function call(token, method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const doc = await res.json();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(doc)}`);
  return doc;
}
await call(TOKEN, "POST", "/v1/sql", {
  sql: "CREATE TENANT bench; CREATE USER bench WITH PASSWORD 'bench' IN TENANT bench ROLE owner",
});
const { token } = await fetch(`${base}/v1/login`, {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ user: "bench", password: "bench" }),
}).then((r) => r.json());
await call(token, "POST", "/v1/sql", {
  sql: `SET 'execution.checkpointing.interval' = '${interval}';
    CREATE TABLE orders (order_id BIGINT, province STRING, amount DOUBLE, ingest AS PROCTIME())
      WITH ('connector' = 'ecommerce', 'rows-per-second' = '${rate}');
    CREATE MATERIALIZED VIEW gmv_total AS SELECT SUM(amount) AS gmv, COUNT(*) AS orders FROM orders;
    CREATE MATERIALIZED VIEW delay_probe AS
      SELECT order_id, CAST(ingest AS BIGINT) AS ingest_ms FROM orders WHERE MOD(order_id, 1000) = 0`,
});
await call(token, "PUT", "/v1/screens/bench", {
  title: "Screen latency",
  widgets: [
    { type: "ticker", title: "GMV", view: "gmv_total", column: "gmv", prefix: "¥" },
    { type: "number", title: "Orders", view: "gmv_total", column: "orders" },
    { type: "delay", title: "End-to-end delay", view: "delay_probe", time: "ingest_ms" },
  ],
});

browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const page = await (await browser.newContext({ viewport: { width: 1600, height: 900 } })).newPage();
await page.goto(`${base}/screen/bench?token=${token}`);
const state = async (id) => JSON.parse((await page.locator(`#${id}`).getAttribute("data-state")) ?? "null");
await sleep(warmup * 1000);
const before = { orders: (await state("w1"))?.value ?? 0, at: Date.now() };
// The widget keeps every measurement since the page opened: those made during the run count.
const measured = () => page.evaluate(() => document.getElementById("w2")?.measured?.length ?? 0);
const from = await measured();
await sleep(seconds * 1000);
const to = await measured();
const pooled = await page.evaluate(
  ([a, b]) => document.getElementById("w2").measured.slice(a, b),
  [from, to],
);
const after = { orders: (await state("w1"))?.value ?? 0, at: Date.now() };
pooled.sort((a, b) => a - b);
const q = (p) => pooled[Math.min(pooled.length - 1, Math.max(0, Math.ceil(p * pooled.length) - 1))];
const cpu = readFileSync("/proc/cpuinfo", "utf8").match(/model name\s*:\s*(.*)/)?.[1];
const result = {
  bench: "screen-latency",
  date: new Date().toISOString(),
  machine: `${cpus().length} vCPU, ${cpu}`,
  rate,
  interval,
  seconds,
  warmup,
  orders_per_second_counted: Math.round(((after.orders - before.orders) * 1000) / (after.at - before.at)),
  measured: pooled.length,
  p50_ms: q(0.5),
  p99_ms: q(0.99),
  max_ms: pooled[pooled.length - 1],
};
console.log(JSON.stringify(result));
if (args.json) writeFileSync(args.json, JSON.stringify(result) + "\n", { flag: "a" });
await browser.close();
process.exit(0);
