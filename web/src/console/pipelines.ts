// The tenant's pipelines: state, uptime, rows/s, lag, restarts and last error, with the
// actions (stop, resume from the last checkpoint, start fresh, rescale, checkpoint, drop).

import { api } from "../api";
import { duration, h, rate, say } from "./dom";
import { every, type Me, type Page } from "./shell";

export interface PipelineDoc {
  name: string;
  status: string;
  desired: string;
  parallelism: number;
  restarts: number;
  last_error: string | null;
  uptime_seconds: number | null;
  views: string[];
  sql: string;
  rows_in_per_second: number | null;
  rows_out_per_second: number | null;
  lag_ms: number | null;
}

/** Runs an action on a pipeline; shows what happened in `box`. */
export async function act(box: HTMLElement, p: PipelineDoc, action: string): Promise<void> {
  const name = p.name;
  const path = `/v1/pipelines/${encodeURIComponent(name)}`;
  try {
    if (action === "drop") {
      const what = p.views.length
        ? `Drop materialized view ${name} and its pipeline? Its rows, state and checkpoints are deleted.`
        : `Drop pipeline ${name}? Its state and checkpoints are deleted.`;
      if (!confirm(what)) return;
      await api("DELETE", path);
    } else if (action === "rescale") {
      const n = prompt(`Worker threads for ${name}:`);
      if (!n) return;
      await api("POST", "/v1/sql", { sql: `ALTER PIPELINE ${name} SET PARALLELISM = ${Number(n)}` });
    } else {
      await api("POST", `${path}/${action}`);
    }
    say(box, `${name}: ${action} done`);
  } catch (e) {
    say(box, `${name}: ${action}: ${e instanceof Error ? e.message : String(e)}`, true);
  }
}

export function actions(box: HTMLElement, p: PipelineDoc, me: Me, after: () => void): HTMLElement {
  const running = p.status === "running" || p.status === "starting" || p.status === "restarting";
  const b = (action: string, label: string, show: boolean) =>
    show &&
    h(
      "button",
      {
        "data-action": action,
        onclick: async () => {
          await act(box, p, action);
          after();
        },
      },
      label,
    );
  if (me.role === "viewer") return h("span");
  return h(
    "span",
    { class: "actions" },
    b("stop", "Stop", running),
    b("start", "Resume", !running),
    b("start-fresh", "Start fresh", !running),
    b("rescale", "Rescale", true),
    b("checkpoint", "Checkpoint", running),
    b("drop", "Drop", true),
  );
}

export const pipelinesPage: Page = async (main, me) => {
  const box = h("div", { class: "msg-box", id: "pipelines-msg" });
  const body = h("div", { id: "pipelines" });
  main.append(
    h("h2", {}, "Pipelines ", h("a", { class: "small", href: "#/sql" }, "+ new in the SQL editor")),
    box,
    body,
  );
  const refresh = async () => {
    const list = await api<{ pipelines: PipelineDoc[] }>("GET", "/v1/pipelines");
    body.dataset.state = JSON.stringify({ names: list.pipelines.map((p) => p.name) });
    if (list.pipelines.length === 0) {
      body.replaceChildren(h("p", { class: "note" }, "No pipelines yet: write one in the SQL editor."));
      return;
    }
    body.replaceChildren(
      h(
        "table",
        { class: "rows" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["pipeline", "state", "uptime", "rows/s in", "rows/s out", "lag", "workers", "restarts", "last error", ""].map(
              (c) => h("th", {}, c),
            ),
          ),
        ),
        h(
          "tbody",
          {},
          list.pipelines.map((p) =>
            h(
              "tr",
              {
                "data-pipeline": p.name,
                "data-state": JSON.stringify({
                  status: p.status,
                  rows_in_per_second: p.rows_in_per_second,
                  restarts: p.restarts,
                  parallelism: p.parallelism,
                }),
              },
              h("td", {}, h("a", { href: `#/pipelines/${encodeURIComponent(p.name)}` }, p.name)),
              h("td", {}, h("span", { class: `state state-${p.status}` }, p.status)),
              h("td", {}, p.uptime_seconds === null ? "–" : duration(p.uptime_seconds * 1000)),
              h("td", { class: "num rows-in" }, rate(p.rows_in_per_second)),
              h("td", { class: "num" }, rate(p.rows_out_per_second)),
              h("td", { class: "num" }, duration(p.lag_ms)),
              h("td", { class: "num" }, p.parallelism),
              h("td", { class: "num" }, p.restarts),
              h("td", { class: "error-cell", title: p.last_error ?? "" }, p.last_error ?? ""),
              h("td", {}, actions(box, p, me, () => void refresh())),
            ),
          ),
        ),
      ),
    );
  };
  return every(2000, refresh);
};
