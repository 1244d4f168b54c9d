// The SQL editor: CodeMirror 6 with Flink SQL highlighting and the tenant's tables for
// completion. It validates and explains a script without changing anything, previews a
// SELECT over the live streams (a bounded sample, run in a process of its own), runs
// statements, and creates a pipeline or a materialized view from them.

import { basicSetup, EditorView } from "codemirror";
import { keymap } from "@codemirror/view";
import { sql, StandardSQL } from "@codemirror/lang-sql";
import { setDiagnostics } from "@codemirror/lint";
import { api, ApiError, type Rows } from "../api";
import { h, say, table } from "./dom";
import type { Me, Page } from "./shell";

const STARTER = `-- Validate (Ctrl-Enter), explain, preview a SELECT over the live streams, run
-- statements, or create a pipeline from them.
SELECT category, COUNT(*) AS orders, SUM(amount) AS gmv
FROM orders
GROUP BY category`;

const DRAFT = "sluice-console-draft";

interface Validation {
  statements: { kind: string; text: string }[];
  plan: string;
  warnings: string[];
}

interface Preview extends Rows {
  epoch: number | null;
  seconds: number;
  truncated: boolean;
}

export const sqlPage: Page = async (main: HTMLElement, me: Me) => {
  const tables = await api<{ tables: { name: string; kind: string }[] }>("GET", "/v1/tables");
  const schema: Record<string, string[]> = {};
  for (const t of tables.tables) schema[t.name] = [];
  const status = h("div", { id: "sql-status", class: "msg-box" });
  const output = h("div", { id: "sql-output" });
  const host = h("div", { id: "editor", class: "editor" });
  const view = new EditorView({
    doc: localStorage.getItem(DRAFT) ?? STARTER,
    parent: host,
    extensions: [
      basicSetup,
      sql({ dialect: StandardSQL, schema, upperCaseKeywords: true }),
      keymap.of([{ key: "Mod-Enter", run: () => (void validate(false), true) }]),
      EditorView.updateListener.of((u) => {
        if (u.docChanged) localStorage.setItem(DRAFT, u.state.doc.toString());
      }),
      EditorView.theme({ "&": { height: "100%" }, ".cm-scroller": { overflow: "auto" } }),
    ],
  });
  const text = () => view.state.doc.toString();

  /** Shows an error, and marks its position in the editor when it has one. */
  const failed = (e: unknown) => {
    if (e instanceof ApiError && e.position) {
      const from = Math.min(Math.max(e.position - 1, 0), view.state.doc.length);
      const word = view.state.doc.sliceString(from).match(/^[\w.]+/)?.[0].length ?? 1;
      const to = Math.min(from + Math.max(word, 1), view.state.doc.length);
      const line = view.state.doc.lineAt(from);
      view.dispatch(
        setDiagnostics(view.state, [{ from, to, severity: "error", message: e.message }]),
      );
      view.dispatch({ selection: { anchor: from, head: to }, scrollIntoView: true });
      say(status, `line ${line.number}, column ${from - line.from + 1}: ${e.message}`, true);
    } else {
      say(status, e instanceof Error ? e.message : String(e), true);
    }
    status.dataset.state = JSON.stringify({ ok: false });
  };
  const ok = (message: string) => {
    view.dispatch(setDiagnostics(view.state, []));
    say(status, message);
    status.dataset.state = JSON.stringify({ ok: true });
  };

  async function validate(explain: boolean) {
    say(status, "checking…");
    try {
      const v = await api<Validation>("POST", "/v1/validate", { sql: text() });
      ok(
        `valid: ${v.statements.map((s) => s.kind).join(", ") || "no statements"}` +
          (v.warnings.length ? ` (${v.warnings.length} warning${v.warnings.length > 1 ? "s" : ""})` : ""),
      );
      output.replaceChildren(
        ...v.warnings.map((w) => h("div", { class: "msg warn" }, w)),
        explain || v.plan ? h("pre", { class: "plan", id: "plan" }, v.plan || "(nothing to run)") : "",
      );
      if (!explain) output.querySelector("#plan")?.classList.add("folded");
    } catch (e) {
      failed(e);
    }
  }

  async function preview() {
    say(status, "previewing: running the query over the live streams for a few seconds…");
    output.replaceChildren();
    try {
      const p = await api<Preview>("POST", "/v1/preview", { sql: text(), limit: 100, seconds: 3 });
      ok(
        `preview: ${p.rows.length} row${p.rows.length === 1 ? "" : "s"}` +
          `${p.truncated ? " (the first 100)" : ""} after ${p.seconds} s of the streams`,
      );
      const t = table(p.columns, p.rows, { id: "preview", class: "rows" });
      t.dataset.state = JSON.stringify({ columns: p.columns, rows: p.rows });
      output.replaceChildren(t);
    } catch (e) {
      failed(e);
    }
  }

  async function run() {
    say(status, "running…");
    output.replaceChildren();
    try {
      const r = await api<{ results: (Rows | { command: string })[] }>("POST", "/v1/sql", { sql: text() });
      ok(`ran ${r.results.length} statement${r.results.length === 1 ? "" : "s"}`);
      output.replaceChildren(
        ...r.results.map((x) =>
          "command" in x ? h("div", { class: "msg" }, x.command) : table(x.columns, x.rows, { class: "rows" }),
        ),
      );
    } catch (e) {
      failed(e);
    }
  }

  const name = h("input", { id: "pipeline-name", placeholder: "name", size: 18 });
  const asView = h("input", { id: "as-view", type: "checkbox" });
  async function create() {
    const n = name.value.trim();
    if (!n) return say(status, "give the pipeline a name", true);
    say(status, `creating ${n}…`);
    try {
      await api("POST", "/v1/pipelines", { name: n, sql: text(), materialized_view: asView.checked });
      ok(`created ${asView.checked ? "materialized view" : "pipeline"} ${n}`);
      location.hash = `#/pipelines/${encodeURIComponent(n)}`;
    } catch (e) {
      failed(e);
    }
  }

  const developer = me.role !== "viewer";
  main.append(
    h("h2", {}, "SQL"),
    h(
      "div",
      { class: "toolbar" },
      h("button", { id: "validate", onclick: () => void validate(false), title: "Ctrl-Enter" }, "Validate"),
      h("button", { id: "explain", onclick: () => void validate(true) }, "Explain"),
      h("button", { id: "preview-run", onclick: () => void preview() }, "Preview"),
      developer && h("button", { id: "run", onclick: () => void run() }, "Run statements"),
      developer && h("span", { class: "sep" }),
      developer && name,
      developer && h("label", {}, asView, " materialized view"),
      developer && h("button", { id: "create", class: "primary", onclick: () => void create() }, "Create pipeline"),
    ),
    host,
    status,
    output,
  );
  view.focus();
  return () => view.destroy();
};
