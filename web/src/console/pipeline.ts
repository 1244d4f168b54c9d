// One pipeline: its dataflow graph with each operator's rows/s, busy time, state, watermark
// and late rows; its checkpoint history; charts of throughput and lag over the last hour; its
// logs and SQL; and the actions.

import * as echarts from "echarts/core";
import { LineChart } from "echarts/charts";
import { GridComponent, LegendComponent, TooltipComponent } from "echarts/components";
import { CanvasRenderer } from "echarts/renderers";
import { api } from "../api";
import { bytes, duration, h, rate, table } from "./dom";
import { actions, type PipelineDoc } from "./pipelines";
import { every, type Page } from "./shell";

echarts.use([LineChart, GridComponent, LegendComponent, TooltipComponent, CanvasRenderer]);

/** A plan node of the running job, with its operator's live figures. */
export interface GraphNode {
  id: string;
  /** What it computes (`GroupAggregate`, `Scan orders`, ...) and its details. */
  label: string;
  details: string[];
  inputs: string[];
  /** How its input reaches its workers: `forward`, `hash(...)`, ... */
  exchange: string | null;
  rows: number | null;
  rows_per_second: number | null;
  state_bytes: number | null;
  state_keys: number | null;
  watermark_ms: number | null;
  late_rows: number | null;
  /** Share of the last second its operator was scheduled, over all workers (0..workers). */
  busy: number | null;
}

interface Graph {
  nodes: GraphNode[];
  /** Each pipeline's sink (the node it writes from, and what it writes to). */
  sinks: { node: string; label: string }[];
  workers: number;
}

interface Stats extends Omit<PipelineDoc, "views"> {
  /** The materialized views it keeps, with the epoch each shows. */
  views: { name: string; epoch: number; error: string | null }[];
  stats: null | {
    rows_read: Record<string, number>;
    rows_written: Record<string, number>;
    state_bytes: number;
    watermark_ms: number | null;
    checkpoints: number;
    late_rows_dropped: number;
    backpressured: boolean;
    ingest_limit: number | null;
    checkpoint_history: {
      epoch: number;
      bytes: number;
      files: number;
      snapshot_ms: number;
      duration_ms: number;
      committed_at_ms: number;
    }[];
    graph?: Graph;
    plan: string;
  };
}

interface Sample {
  at_ms: number;
  rows_in_per_second: number;
  rows_out_per_second: number;
  lag_ms: number | null;
  state_bytes: number;
}

const NODE_W = 230;
const NODE_H = 74;
const GAP_X = 120;
const GAP_Y = 22;

/** The graph as SVG: sources on the left, sinks on the right, one column per depth. */
export function drawGraph(g: Graph): SVGSVGElement {
  const ns = "http://www.w3.org/2000/svg";
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  // Depth: the longest path from a source (so every edge goes right).
  const depth = new Map<string, number>();
  const depthOf = (id: string, seen = new Set<string>()): number => {
    if (depth.has(id)) return depth.get(id)!;
    if (seen.has(id)) return 0;
    seen.add(id);
    const n = byId.get(id);
    const d = n && n.inputs.length ? Math.max(...n.inputs.map((i) => depthOf(i, seen))) + 1 : 0;
    depth.set(id, d);
    return d;
  };
  g.nodes.forEach((n) => depthOf(n.id));
  const columns: string[][] = [];
  for (const n of g.nodes) (columns[depth.get(n.id)!] ??= []).push(n.id);
  const sinkCol = columns.length;
  const pos = new Map<string, { x: number; y: number }>();
  columns.forEach((ids, c) =>
    ids.forEach((id, r) => pos.set(id, { x: 10 + c * (NODE_W + GAP_X), y: 10 + r * (NODE_H + GAP_Y) })),
  );
  const sinkPos = g.sinks.map((_, r) => ({ x: 10 + sinkCol * (NODE_W + GAP_X), y: 10 + r * (NODE_H + GAP_Y) }));
  const rows = Math.max(g.sinks.length, ...columns.map((c) => c.length));
  const width = 20 + (sinkCol + 1) * (NODE_W + GAP_X) - GAP_X;
  const height = 20 + rows * (NODE_H + GAP_Y) - GAP_Y;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", String(width));
  svg.setAttribute("class", "graph");
  const el = (tag: string, attrs: Record<string, string | number>, text?: string) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const edge = (from: { x: number; y: number }, to: { x: number; y: number }, label: string | null) => {
    const x1 = from.x + NODE_W;
    const y1 = from.y + NODE_H / 2;
    const x2 = to.x;
    const y2 = to.y + NODE_H / 2;
    const mx = (x1 + x2) / 2;
    svg.append(el("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}`, class: "edge" }));
    svg.append(el("path", { d: `M${x2 - 8},${y2 - 4} L${x2},${y2} L${x2 - 8},${y2 + 4}`, class: "edge" }));
    if (label) svg.append(el("text", { x: mx, y: (y1 + y2) / 2 - 4, class: "edge-label" }, label));
  };
  for (const n of g.nodes) {
    for (const i of n.inputs) {
      const a = pos.get(i);
      const b = pos.get(n.id);
      if (a && b) edge(a, b, n.exchange && n.exchange !== "forward" ? n.exchange : null);
    }
  }
  g.sinks.forEach((s, k) => {
    const a = pos.get(s.node);
    if (a) edge(a, sinkPos[k], null);
  });
  const box = (p: { x: number; y: number }, id: string, title: string, lines: string[], hot: boolean) => {
    const grp = el("g", { class: hot ? "node hot" : "node", "data-node": id });
    grp.append(el("rect", { x: p.x, y: p.y, width: NODE_W, height: NODE_H, rx: 6 }));
    const clipped = title.length > 30 ? `${title.slice(0, 29)}…` : title;
    grp.append(el("text", { x: p.x + 8, y: p.y + 17, class: "node-title" }, clipped));
    const t = el("title", {}, title);
    grp.append(t);
    lines.forEach((l, i) => grp.append(el("text", { x: p.x + 8, y: p.y + 35 + i * 15, class: "node-line" }, l)));
    svg.append(grp);
  };
  for (const n of g.nodes) {
    const lines = [`${n.rows === null ? "–" : n.rows.toLocaleString("en-US")} rows · ${rate(n.rows_per_second)}`];
    const extra: string[] = [];
    if (n.busy !== null) extra.push(`busy ${Math.round((n.busy / Math.max(g.workers, 1)) * 100)}%`);
    if (n.state_bytes !== null) extra.push(`state ${bytes(n.state_bytes)}`);
    if (n.late_rows) extra.push(`late ${n.late_rows}`);
    if (extra.length) lines.push(extra.join(" · "));
    if (n.watermark_ms !== null) lines.push(`wm ${new Date(n.watermark_ms).toISOString().slice(11, 19)}`);
    box(pos.get(n.id)!, n.id, n.label, lines.slice(0, 3), (n.busy ?? 0) / Math.max(g.workers, 1) > 0.8);
  }
  g.sinks.forEach((s, k) =>
    box(sinkPos[k], `sink${k}`, s.label, ["sink"], false),
  );
  return svg;
}

export const pipelinePage: Page = async (main, me, name) => {
  const path = `/v1/pipelines/${encodeURIComponent(name)}`;
  const msg = h("div", { class: "msg-box" });
  const head = h("div", { class: "pipeline-head", id: "pipeline-head" });
  const graph = h("div", { class: "graph-box", id: "graph" });
  const operators = h("div", { id: "operators" });
  const checkpoints = h("div", { id: "checkpoints" });
  const chartBox = h("div", { class: "charts" });
  const throughput = h("div", { class: "chart-box", id: "chart-throughput" });
  const lag = h("div", { class: "chart-box", id: "chart-lag" });
  chartBox.append(throughput, lag);
  const logs = h("pre", { class: "logs", id: "logs" });
  const sqlText = h("pre", { class: "plan" });
  main.append(
    h("h2", {}, h("a", { href: "#/pipelines" }, "Pipelines"), " / ", name),
    msg,
    head,
    h("h3", {}, "Dataflow"),
    graph,
    operators,
    h("h3", {}, "Throughput and lag, last hour"),
    chartBox,
    h("h3", {}, "Checkpoints"),
    checkpoints,
    h("h3", {}, "Log"),
    logs,
    h("h3", {}, "SQL"),
    sqlText,
  );
  const tChart = echarts.init(throughput, undefined, { renderer: "canvas" });
  const lChart = echarts.init(lag, undefined, { renderer: "canvas" });
  const axis = { axisLabel: { color: "#7f8fa6" }, splitLine: { lineStyle: { color: "#1d2b45" } } };
  const draw = async () => {
    const s = await api<Stats>("GET", `${path}/stats`);
    const st = s.stats;
    head.dataset.state = JSON.stringify({
      status: s.status,
      rows_in_per_second: s.rows_in_per_second,
      checkpoints: st?.checkpoints ?? 0,
    });
    head.replaceChildren(
      h("span", { class: `state state-${s.status}` }, s.status),
      h("span", {}, `uptime ${s.uptime_seconds === null ? "–" : duration(s.uptime_seconds * 1000)}`),
      h("span", { class: "rows-in" }, `in ${rate(s.rows_in_per_second)}`),
      h("span", {}, `out ${rate(s.rows_out_per_second)}`),
      h("span", {}, `lag ${duration(s.lag_ms)}`),
      h("span", {}, `${s.parallelism} worker${s.parallelism === 1 ? "" : "s"}`),
      h("span", {}, `restarts ${s.restarts}`),
      st?.backpressured ? h("span", { class: "warn" }, "backpressured") : "",
      st && st.ingest_limit ? h("span", {}, `ingest limit ${rate(st.ingest_limit)}`) : "",
      s.views.length
        ? h(
            "span",
            {},
            "views ",
            s.views.map((v) =>
              h("a", { href: `#/views/${encodeURIComponent(v.name)}`, title: `epoch ${v.epoch}` }, v.name, " "),
            ),
          )
        : "",
      actions(msg, { ...s, views: s.views.map((v) => v.name) }, me, () => void draw()),
      s.last_error ? h("pre", { class: "failure" }, s.last_error) : "",
    );
    sqlText.textContent = s.sql;
    if (st?.graph) {
      graph.replaceChildren(drawGraph(st.graph));
      operators.replaceChildren(
        table(
          ["operator", "exchange", "rows", "rows/s", "busy", "state", "keys", "watermark", "late rows"],
          st.graph.nodes.map((n) => [
            n.label,
            n.exchange ?? "",
            n.rows ?? "",
            n.rows_per_second === null ? "" : Math.round(n.rows_per_second),
            n.busy === null ? "" : `${Math.round((n.busy / Math.max(st.graph!.workers, 1)) * 100)}%`,
            n.state_bytes === null ? "" : bytes(n.state_bytes),
            n.state_keys ?? "",
            n.watermark_ms === null ? "" : new Date(n.watermark_ms).toISOString().replace("T", " ").slice(0, 23),
            n.late_rows ?? "",
          ]),
          { class: "rows" },
        ),
      );
    } else {
      graph.replaceChildren(h("p", { class: "note" }, "The graph shows while the pipeline runs."));
      operators.replaceChildren();
    }
    const history = st?.checkpoint_history ?? [];
    checkpoints.replaceChildren(
      history.length
        ? table(
            ["epoch", "size", "files", "snapshot", "duration", "committed"],
            history
              .slice()
              .reverse()
              .map((c) => [
                c.epoch,
                bytes(c.bytes),
                c.files,
                duration(c.snapshot_ms),
                duration(c.duration_ms),
                new Date(c.committed_at_ms).toLocaleTimeString("en-GB"),
              ]),
            { class: "rows", id: "checkpoint-table" },
          )
        : h("p", { class: "note" }, "No checkpoint yet in this run."),
    );
  };
  const drawHistory = async () => {
    const hist = await api<{ samples: Sample[] }>("GET", `${path}/history`);
    const xs = hist.samples;
    // The hour so far: from the first sample (at most an hour ago) to now.
    const span = { min: xs.length ? xs[0].at_ms : Date.now() - 60_000, max: Date.now() };
    // Lines over time: each series' name and its value per sample (null: none then).
    const lines = (unit: string, series: [string, (x: Sample) => number | null][]) => ({
      animation: false,
      tooltip: { trigger: "axis" },
      legend: { top: 4, right: 12, textStyle: { color: "#e6f1ff" } },
      grid: { left: 60, right: 20, top: 30, bottom: 30 },
      xAxis: { type: "time", ...span, ...axis },
      yAxis: { type: "value", name: unit, ...axis },
      series: series.map(([name, value]) => ({
        name,
        type: "line",
        showSymbol: xs.length < 30,
        data: xs.map((x) => [x.at_ms, value(x)]),
      })),
    });
    tChart.setOption(
      lines("rows/s", [
        ["in", (x) => x.rows_in_per_second],
        ["out", (x) => x.rows_out_per_second],
      ]),
    );
    lChart.setOption(lines("s", [["watermark lag", (x) => (x.lag_ms === null ? null : x.lag_ms / 1000)]]));
    throughput.dataset.state = JSON.stringify({ samples: xs.length });
  };
  const drawLogs = async () => {
    const l = await api<{ lines: string[] }>("GET", `${path}/logs?lines=200`);
    const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
    logs.textContent = l.lines.join("\n");
    if (atEnd) logs.scrollTop = logs.scrollHeight;
  };
  const stops = [every(2000, draw), every(5000, drawHistory), every(3000, drawLogs)];
  const resize = () => {
    tChart.resize();
    lChart.resize();
  };
  window.addEventListener("resize", resize);
  return () => {
    stops.forEach((s) => s());
    window.removeEventListener("resize", resize);
    tChart.dispose();
    lChart.dispose();
  };
};
