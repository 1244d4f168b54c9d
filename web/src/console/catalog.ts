// Tables and views: each object's kind, schema and definition; a materialized view's page
// shows its rows live (folded from its change feed) and the feed itself, epoch by epoch.

import { api, objects, savedToken, type Rows } from "../api";
import { Feeds } from "../feed";
import { h, table } from "./dom";
import type { Page } from "./shell";

interface CatalogObject {
  name: string;
  kind: string;
  sql: string;
}

async function describe(name: string): Promise<Rows> {
  const r = await api<{ results: Rows[] }>("POST", "/v1/sql", { sql: `DESCRIBE ${name}` });
  return r.results[0];
}

export const catalogPage: Page = async (main) => {
  const list = await api<{ tables: CatalogObject[] }>("GET", "/v1/tables");
  main.append(h("h2", {}, "Tables & views"));
  if (list.tables.length === 0) {
    main.append(h("p", { class: "note" }, "Nothing yet: create tables in the SQL editor."));
    return;
  }
  for (const o of list.tables) {
    const schema = h("div", { class: "schema" });
    const isView = /materialized/i.test(o.kind);
    main.append(
      h(
        "section",
        { class: "object", "data-object": o.name },
        h(
          "h3",
          {},
          isView ? h("a", { href: `#/views/${encodeURIComponent(o.name)}` }, o.name) : o.name,
          h("span", { class: "kind" }, o.kind),
        ),
        schema,
        h("details", {}, h("summary", {}, "definition"), h("pre", { class: "plan" }, o.sql)),
      ),
    );
    describe(o.name)
      .then((d) => schema.replaceChildren(table(d.columns, d.rows, { class: "rows compact" })))
      .catch((e) => schema.replaceChildren(h("div", { class: "msg error" }, String(e.message ?? e))));
  }
};

/** How many of the feed's changes the page keeps listed. */
const KEPT_CHANGES = 200;

export const viewPage: Page = async (main, _me, name) => {
  const d = await describe(name);
  const rowsBox = h("div", { id: "view-rows" });
  const status = h("div", { class: "note", id: "view-status" });
  const changes = h("tbody", {});
  main.append(
    h("h2", {}, h("a", { href: "#/catalog" }, "Tables & views"), " / ", name),
    h("h3", {}, "Schema"),
    table(d.columns, d.rows, { class: "rows compact" }),
    h("h3", {}, "Rows, live"),
    status,
    rowsBox,
    h("h3", {}, "Change feed"),
    h(
      "table",
      { class: "rows compact", id: "view-changes" },
      h("thead", {}, h("tr", {}, ["epoch", "op", ...objects(d).map((c) => String(c.column))].map((c) => h("th", {}, c)))),
      changes,
    ),
  );
  const feeds = new Feeds(savedToken() ?? "");
  const feed = feeds.feed(name);
  feed.onChange((f) => {
    const rows = f.objects();
    status.textContent = `${rows.length} row${rows.length === 1 ? "" : "s"} · epoch ${f.epoch} · ${f.status}${f.error ? ` (${f.error})` : ""}`;
    rowsBox.dataset.state = JSON.stringify({ rows: rows.length, epoch: f.epoch });
    const shown = rows.slice(0, 500);
    rowsBox.replaceChildren(
      table(
        f.columns,
        shown.map((r) => f.columns.map((c) => r[c])),
        { class: "rows" },
      ),
      rows.length > shown.length ? h("p", { class: "note" }, `the first ${shown.length}`) : "",
    );
    if (f.last.kind === "changes") {
      for (const r of f.last.rows) {
        changes.prepend(h("tr", { class: `op-${String(r[1]).replace(/[^A-Z]/g, "")}` }, r.map((v) => h("td", {}, v === null ? "null" : String(v)))));
      }
      while (changes.children.length > KEPT_CHANGES) changes.lastElementChild!.remove();
    }
  });
  feeds.start();
  return () => feeds.stop();
};
