// Drives a real Chromium (Debian's, through playwright-core) for the Rust browser tests: reads
// one JSON command per line on stdin, answers one JSON line on stdout.
//   {"open": url}                                  load a page in a fresh context
//   {"wait": {selector: expected, ...}, "ms": n}  wait until every selector's element matches:
//        a string is its exact text; an object is matched against its data-state (JSON): each
//        key's value equal (numbers to 1e-9 relative), nested objects likewise; a string
//        starting with "~" is text the element's text contains
//   {"attr": selector, "name": a}                  an attribute's value now
//   {"shot": path}                                 a screenshot of the page
//   {"errors": true}                               page errors and failed requests so far
// Answers {"ok": true, "ms": elapsed, ...} or {"ok": false, "error": "..."}.
import { chromium } from "playwright-core";
import readline from "node:readline";

const browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
let context;
let page;
const errors = [];

function matches(got, want) {
  if (typeof want === "number") {
    return typeof got === "number" && Math.abs(got - want) <= 1e-9 * Math.max(1, Math.abs(want));
  }
  if (want && typeof want === "object" && !Array.isArray(want)) {
    return got && typeof got === "object" && Object.entries(want).every(([k, v]) => matches(got[k], v));
  }
  return JSON.stringify(got) === JSON.stringify(want);
}

async function check(expect) {
  const seen = {};
  let all = true;
  for (const [selector, want] of Object.entries(expect)) {
    const el = page.locator(selector).first();
    if ((await el.count()) === 0) {
      seen[selector] = null;
      all = false;
      continue;
    }
    if (typeof want === "string") {
      const text = (await el.textContent())?.trim();
      seen[selector] = text;
      all &&= want.startsWith("~") ? (text ?? "").includes(want.slice(1)) : text === want;
    } else {
      const raw = await el.getAttribute("data-state");
      const state = raw ? JSON.parse(raw) : null;
      seen[selector] = state;
      all &&= matches(state, want);
    }
  }
  return { all, seen };
}

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  const started = Date.now();
  let answer;
  try {
    if (cmd.open) {
      if (context) await context.close();
      context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
      page = await context.newPage();
      page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
      page.on("requestfailed", (r) => {
        // A feed cut by a server restart or a closed page is expected; anything else is not.
        if (!r.url().includes("/changes")) errors.push(`request failed: ${r.url()}`);
      });
      page.on("response", (r) => {
        if (r.status() >= 400) errors.push(`HTTP ${r.status()}: ${r.url()}`);
      });
      await page.goto(cmd.open);
      answer = { ok: true, url: page.url() };
    } else if (cmd.wait) {
      let last;
      for (;;) {
        last = await check(cmd.wait);
        if (last.all) break;
        if (Date.now() - started > (cmd.ms ?? 10000)) break;
        await page.waitForTimeout(20);
      }
      answer = last.all
        ? { ok: true, ms: Date.now() - started }
        : { ok: false, error: `not within ${cmd.ms} ms`, seen: last.seen };
    } else if (cmd.attr) {
      answer = { ok: true, value: await page.locator(cmd.attr).first().getAttribute(cmd.name) };
    } else if (cmd.shot) {
      await page.screenshot({ path: cmd.shot });
      answer = { ok: true };
    } else if (cmd.errors) {
      answer = { ok: true, errors };
    } else {
      answer = { ok: false, error: `unknown command ${line}` };
    }
  } catch (e) {
    answer = { ok: false, error: String(e?.stack ?? e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();
