// Small DOM helpers for the console's pages (no framework: the pages are tables and forms).

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | ((e: Event) => void) | undefined>;

/** An element: `h("button", { class: "x", onclick: f }, "text")`. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(k.replace(/^on/, ""), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** A table of rows (values shown as text; null as an empty dimmed cell). */
export function table(
  columns: string[],
  rows: (string | number | boolean | null | Node)[][],
  attrs: Attrs = {},
): HTMLTableElement {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      rows.map((r) =>
        h(
          "tr",
          {},
          r.map((v) =>
            v === null
              ? h("td", { class: "null" }, "null")
              : h("td", { class: typeof v === "number" ? "num" : undefined }, v instanceof Node ? v : String(v)),
          ),
        ),
      ),
    ),
  );
}

/** A number as rows per second, bytes or a duration, for people. */
export function rate(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  return `${Math.round(n).toLocaleString("en-US")}/s`;
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

export function duration(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A message line (an error in red) shown in `box`. */
export function say(box: HTMLElement, text: string, error = false) {
  box.replaceChildren(h("div", { class: error ? "msg error" : "msg" }, text));
}

/** Children for `append`/`replaceChildren`, leaving out the ones a condition removed. */
export function kids(...c: (Node | string | false | null | undefined)[]): (Node | string)[] {
  return c.filter((x): x is Node | string => x !== false && x !== null && x !== undefined);
}
