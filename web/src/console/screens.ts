// The tenant's big screens: list them, and create or edit one: a JSON document of widgets,
// each bound to a materialized view and its columns, built with a form or written by hand;
// saved through the REST API (which checks every view and column), opened, shared read-only.

import { api, type Rows } from "../api";
import { h, kids, say } from "./dom";
import type { Page } from "./shell";

export const screensPage: Page = async (main, me) => {
  const list = await api<{ screens: string[] }>("GET", "/v1/screens");
  const name = h("input", { id: "new-screen", placeholder: "new screen's name", size: 20 });
  main.append(
    ...kids(
    h("h2", {}, "Screens"),
    list.screens.length
      ? h(
          "ul",
          { class: "screens", id: "screens" },
          list.screens.map((s) =>
            h(
              "li",
              {},
              h("a", { href: `#/screens/${encodeURIComponent(s)}` }, s),
              " · ",
              h("a", { href: `/screen/${encodeURIComponent(s)}`, target: "_blank" }, "open"),
            ),
          ),
        )
      : h("p", { class: "note" }, "No screens yet."),
    me.role !== "viewer" &&
      h(
        "form",
        {
          class: "toolbar",
          onsubmit: (e: Event) => {
            e.preventDefault();
            if (name.value.trim()) location.hash = `#/screens/${encodeURIComponent(name.value.trim())}`;
          },
        },
        name,
        h("button", { id: "create-screen" }, "Create"),
      ),
    ),
  );
};

const FIELDS: Record<string, string[]> = {
  ticker: ["column", "prefix"],
  number: ["column", "prefix"],
  rate: ["column"],
  pie: ["name", "value"],
  map: ["name", "value"],
  bars: ["name", "value", "limit"],
  line: ["x", "y", "limit"],
  freshness: ["time"],
  delay: ["time"],
};

export const screenEditPage: Page = async (main, _me, name) => {
  const msg = h("div", { class: "msg-box", id: "screen-msg" });
  let doc: { title: string; widgets: Record<string, unknown>[] } = { title: name, widgets: [] };
  try {
    doc = (await api<{ screen: typeof doc }>("GET", `/v1/screens/${encodeURIComponent(name)}`)).screen;
  } catch {
    say(msg, `screen '${name}' is new: add widgets, then save`);
  }
  const text = h("textarea", { id: "screen-json", class: "json", rows: 18, spellcheck: "false" });
  text.value = JSON.stringify(doc, null, 2);

  // The widget form: a type, a view, the view's columns for the type's fields.
  const views = (await api<{ tables: { name: string; kind: string }[] }>("GET", "/v1/tables")).tables
    .filter((t) => /materialized/i.test(t.kind))
    .map((t) => t.name);
  const type = h("select", { id: "widget-type" }, Object.keys(FIELDS).map((t) => h("option", { value: t }, t)));
  const view = h("select", { id: "widget-view" }, views.map((v) => h("option", { value: v }, v)));
  const title = h("input", { id: "widget-title", placeholder: "title", size: 16 });
  const fields = h("span", { class: "fields" });
  let columns: string[] = [];
  const drawFields = () => {
    fields.replaceChildren(
      ...FIELDS[type.value].map((f) =>
        f === "limit"
          ? h("label", {}, `${f} `, h("input", { "data-field": f, type: "number", value: 10, size: 4 }))
          : f === "prefix"
            ? h("label", {}, `${f} `, h("input", { "data-field": f, size: 3, placeholder: "¥" }))
            : h(
              "label",
              {},
              `${f} `,
              h("select", { "data-field": f }, columns.map((c) => h("option", { value: c }, c))),
            ),
      ),
    );
  };
  const loadColumns = async () => {
    if (!view.value) return;
    const d = await api<{ results: Rows[] }>("POST", "/v1/sql", { sql: `DESCRIBE ${view.value}` });
    columns = d.results[0].rows.map((r) => String(r[0]));
    drawFields();
  };
  type.addEventListener("change", drawFields);
  view.addEventListener("change", () => void loadColumns());
  await loadColumns();
  const add = () => {
    try {
      const current = JSON.parse(text.value);
      const w: Record<string, unknown> = { type: type.value, title: title.value || type.value, view: view.value };
      for (const input of fields.querySelectorAll<HTMLInputElement | HTMLSelectElement>("[data-field]")) {
        const f = input.dataset.field!;
        if (f === "prefix" && !input.value) continue;
        w[f] = f === "limit" ? Number(input.value) : input.value;
      }
      current.widgets = [...(current.widgets ?? []), w];
      text.value = JSON.stringify(current, null, 2);
    } catch (e) {
      say(msg, `the document is not JSON: ${e}`, true);
    }
  };
  const save = async () => {
    try {
      const body = JSON.parse(text.value);
      await api("PUT", `/v1/screens/${encodeURIComponent(name)}`, body);
      say(msg, `saved ${name}`);
      msg.dataset.state = JSON.stringify({ saved: true });
    } catch (e) {
      say(msg, e instanceof Error ? e.message : String(e), true);
      msg.dataset.state = JSON.stringify({ saved: false });
    }
  };
  const share = async () => {
    try {
      const r = await api<{ url: string }>("POST", `/v1/screens/${encodeURIComponent(name)}/share`);
      const url = new URL(r.url, location.href).href;
      msg.replaceChildren(
        h("div", { class: "msg" }, "Read-only link for a wall display (shown once): "),
        h("input", { class: "share-url", value: url, readonly: true, size: 90 }),
      );
    } catch (e) {
      say(msg, e instanceof Error ? e.message : String(e), true);
    }
  };
  const remove = async () => {
    if (!confirm(`Delete screen ${name} and its share links?`)) return;
    try {
      await api("DELETE", `/v1/screens/${encodeURIComponent(name)}`);
      location.hash = "#/screens";
    } catch (e) {
      say(msg, e instanceof Error ? e.message : String(e), true);
    }
  };
  main.append(
    h("h2", {}, h("a", { href: "#/screens" }, "Screens"), " / ", name),
    h(
      "div",
      { class: "toolbar" },
      "Add a widget: ",
      type,
      view,
      title,
      fields,
      h("button", { id: "add-widget", onclick: add }, "Add"),
    ),
    text,
    h(
      "div",
      { class: "toolbar" },
      h("button", { id: "save-screen", class: "primary", onclick: () => void save() }, "Save"),
      h("a", { id: "open-screen", href: `/screen/${encodeURIComponent(name)}`, target: "_blank" }, "Open"),
      h("button", { id: "share-screen", onclick: () => void share() }, "Share read-only"),
      h("button", { id: "delete-screen", onclick: () => void remove() }, "Delete"),
    ),
    msg,
  );
};
