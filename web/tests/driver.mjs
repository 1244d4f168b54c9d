// Drives a real Chromium (Debian's, through playwright-core) for the Rust browser tests: reads
// one JSON command per line on stdin, answers one JSON line on stdout.
//   {"open": url}                                  load a page in a fresh context
//   {"wait": {selector: expected, ...}, "ms": n}  wait until every selector's element matches:
//        a string is its exact text; an object is matched against its data-state (JSON): each
//        key's value equal (numbers to 1e-9 relative), nested objects likewise; a string
//        starting with "~" is text the element's text contains; in a data-state, a string
//        ">n" matches a number greater than n
//   {"attr": selector, "name": a}                  an attribute's value now
//   {"click": selector}                            click the element (waits for it, up to 10 s)
//   {"fill": selector, "text": t}                  replace an input's (or the SQL editor's) text
//   {"select": selector, "value": v}               choose an option of a <select>
//   {"goto": "#/hash"}                             go to another page of the console (same tab)
//   {"visit": url}                                 load a page in the same tab (keeps its token)
//   {"dialogs": answer}                            what later prompt() dialogs answer (confirm()
//                                                  is accepted)
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
// What prompt() answers (confirm() is accepted).
let dialogAnswer = "";

function matches(got, want) {
  if (typeof want === "string" && /^>-?[0-9.]+$/.test(want)) {
    return typeof got === "number" && got > Number(want.slice(1));
  }
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
        if (!r.url().includes("/changes") && !r.url().includes("/v1/feeds")) {
          errors.push(`request failed: ${r.url()}`);
        }
      });
      page.on("response", (r) => {
        if (r.status() >= 400) errors.push(`HTTP ${r.status()}: ${r.url()}`);
      });
      page.on("dialog", (d) => void d.accept(d.type() === "prompt" ? dialogAnswer : undefined));
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
    } else if (cmd.click) {
      await page.locator(cmd.click).first().click({ timeout: 10000 });
      answer = { ok: true };
    } else if (cmd.fill) {
      const el = page.locator(cmd.fill).first();
      // CodeMirror: its content is an editable element; select all, then type over it.
      if ((await el.getAttribute("contenteditable")) === "true") {
        await el.click();
        await page.keyboard.press("Control+A");
        await page.keyboard.press("Delete");
        await page.keyboard.insertText(cmd.text);
      } else {
        await el.fill(cmd.text, { timeout: 10000 });
      }
      answer = { ok: true };
    } else if (cmd.select) {
      await page.locator(cmd.select).first().selectOption(cmd.value, { timeout: 10000 });
      answer = { ok: true };
    } else if (cmd.visit) {
      await page.goto(cmd.visit);
      answer = { ok: true, url: page.url() };
    } else if (cmd.goto) {
      await page.evaluate((h) => (location.hash = h), cmd.goto);
      answer = { ok: true };
    } else if (cmd.dialogs !== undefined) {
      dialogAnswer = String(cmd.dialogs);
      answer = { ok: true };
    } else if (cmd.shot) {
      await page.screenshot({ path: cmd.shot, fullPage: !!cmd.full });
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
