// A big screen: widgets bound to materialized views, redrawn from their change feeds.

import * as echarts from "echarts/core";
import { BarChart, LineChart, MapChart, PieChart } from "echarts/charts";
import {
  GeoComponent,
  GridComponent,
  TooltipComponent,
  VisualMapComponent,
} from "echarts/components";
import { CanvasRenderer } from "echarts/renderers";
import china from "echarts-china-map/map/json/china.json";
import { Feeds, ViewFeed, type Value } from "./feed";
import { mapName } from "./provinces";

echarts.use([
  BarChart,
  LineChart,
  MapChart,
  PieChart,
  GeoComponent,
  GridComponent,
  TooltipComponent,
  VisualMapComponent,
  CanvasRenderer,
]);
// eslint-disable-next-line @typescript-eslint/no-explicit-any
echarts.registerMap("china", china as any);

/** A widget of a screen document, bound to a view's columns. */
export interface Widget {
  type: "ticker" | "number" | "rate" | "pie" | "line" | "map" | "bars" | "freshness" | "delay";
  title: string;
  view: string;
  /** ticker, number, rate: the value's column (of a one-row view). */
  column?: string;
  /** pie, map, bars: the label column and the value column. */
  name?: string;
  value?: string;
  /** line: the x column (sorted as text) and the y column. */
  x?: string;
  y?: string;
  /** line: the last points shown; bars: the top rows shown. */
  limit?: number;
  /** Text before a number (a currency sign). */
  prefix?: string;
  /** freshness: the column holding the latest event time (the watermark's side); delay: the
   * column holding each row's ingestion stamp in Unix milliseconds (`CAST(PROCTIME() AS BIGINT)`). */
  time?: string;
}

export interface ScreenDoc {
  title: string;
  widgets: Widget[];
}

const THEME = {
  text: "#e6f1ff",
  dim: "#7f8fa6",
  accent: ["#ff4d4f", "#ffa940", "#fadb14", "#73d13d", "#36cfc9", "#40a9ff", "#9254de", "#f759ab"],
};

function num(v: Value | undefined): number {
  return typeof v === "number" ? v : Number(v ?? 0);
}

function format(n: number, digits = 2): string {
  return n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** One drawn widget: its card, and how it redraws from its feed. */
interface Drawn {
  card: HTMLElement;
  draw(feed: ViewFeed): void;
}

function card(w: Widget, index: number): HTMLElement {
  const el = document.createElement("section");
  el.className = `card card-${w.type}`;
  el.id = `w${index}`;
  el.dataset.widget = w.type;
  el.dataset.view = w.view;
  const h = document.createElement("h2");
  h.textContent = w.title;
  el.append(h);
  return el;
}

/** The exact data a widget shows, kept on its card for tests and for copy-paste. */
function expose(el: HTMLElement, state: unknown) {
  el.dataset.state = JSON.stringify(state);
}

function ticker(w: Widget, el: HTMLElement): Drawn {
  const value = document.createElement("div");
  value.className = "value";
  value.textContent = "…";
  el.append(value);
  let shown = 0;
  let from = 0;
  let target = 0;
  let since = 0;
  let frame = 0;
  // Counts up smoothly to the latest value (an ease-out over 300 ms), landing on it exactly.
  const step = (now: number) => {
    const t = Math.min(1, (now - since) / 300);
    shown = t >= 1 ? target : from + (target - from) * (1 - (1 - t) ** 3);
    value.textContent = (w.prefix ?? "") + format(shown);
    frame = t >= 1 ? 0 : requestAnimationFrame(step);
  };
  return {
    card: el,
    draw(feed) {
      const row = feed.objects()[0];
      const next = num(row?.[w.column ?? ""]);
      if (next !== target) {
        from = shown;
        target = next;
        since = performance.now();
      }
      value.dataset.target = String(target);
      expose(el, { value: target, epoch: feed.epoch });
      if (!frame) frame = requestAnimationFrame(step);
    },
  };
}

function number(w: Widget, el: HTMLElement): Drawn {
  const value = document.createElement("div");
  value.className = "value";
  value.textContent = "…";
  el.append(value);
  return {
    card: el,
    draw(feed) {
      const n = num(feed.objects()[0]?.[w.column ?? ""]);
      value.textContent = (w.prefix ?? "") + format(n, 0);
      expose(el, { value: n, epoch: feed.epoch });
    },
  };
}

/** Per second, from how a counter column grew over the last few seconds of updates. */
function rate(w: Widget, el: HTMLElement): Drawn {
  const value = document.createElement("div");
  value.className = "value";
  value.textContent = "…";
  el.append(value);
  const samples: { t: number; v: number }[] = [];
  return {
    card: el,
    draw(feed) {
      const now = Date.now();
      const v = num(feed.objects()[0]?.[w.column ?? ""]);
      // A smaller counter means the view started over: the window starts again.
      if (samples.length && v < samples[samples.length - 1].v) samples.length = 0;
      samples.push({ t: now, v });
      while (samples.length > 2 && now - samples[0].t > 5000) samples.shift();
      const first = samples[0];
      const per = now > first.t ? ((v - first.v) * 1000) / (now - first.t) : 0;
      value.textContent = format(per, 0);
      expose(el, { value: per });
    },
  };
}

function chart(el: HTMLElement): echarts.ECharts {
  const box = document.createElement("div");
  box.className = "chart";
  el.append(box);
  const c = echarts.init(box, undefined, { renderer: "canvas" });
  new ResizeObserver(() => c.resize()).observe(box);
  return c;
}

function labelled(w: Widget, feed: ViewFeed): { name: string; value: number }[] {
  // Rows of one label are summed (a view may hold a label in several rows).
  const sums = new Map<string, number>();
  for (const r of feed.objects()) {
    const name = String(r[w.name ?? ""] ?? "NULL");
    sums.set(name, (sums.get(name) ?? 0) + num(r[w.value ?? ""]));
  }
  return [...sums].map(([name, value]) => ({ name, value }));
}

function pie(w: Widget, el: HTMLElement): Drawn {
  const c = chart(el);
  return {
    card: el,
    draw(feed) {
      const data = labelled(w, feed).sort((a, b) => b.value - a.value);
      c.setOption({
        color: THEME.accent,
        tooltip: { trigger: "item" },
        series: [
          {
            type: "pie",
            roseType: "radius",
            // Inside a one-column card: a smaller rose, with labels on two short lines that
            // wrap rather than run out of the card.
            radius: ["12%", "52%"],
            avoidLabelOverlap: true,
            label: {
              color: THEME.text,
              formatter: "{b}\n{d}%",
              fontSize: 11,
              width: 72,
              overflow: "break",
            },
            labelLine: { length: 6, length2: 6 },
            data,
          },
        ],
      });
      expose(el, Object.fromEntries(data.map((d) => [d.name, d.value])));
    },
  };
}

function line(w: Widget, el: HTMLElement): Drawn {
  const c = chart(el);
  return {
    card: el,
    draw(feed) {
      const points = new Map<string, number>();
      for (const r of feed.objects()) {
        const x = String(r[w.x ?? ""]);
        points.set(x, (points.get(x) ?? 0) + num(r[w.y ?? ""]));
      }
      const sorted = [...points].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      const last = sorted.slice(-(w.limit ?? 60));
      c.setOption({
        color: THEME.accent[5],
        tooltip: { trigger: "axis" },
        grid: { left: 70, right: 20, top: 20, bottom: 30 },
        xAxis: {
          type: "category",
          data: last.map(([x]) => x.slice(11, 16) || x),
          axisLabel: { color: THEME.dim },
        },
        yAxis: { type: "value", axisLabel: { color: THEME.dim }, splitLine: { lineStyle: { color: "#1d2b45" } } },
        series: [{ type: "line", smooth: true, areaStyle: { opacity: 0.2 }, data: last.map(([, y]) => y) }],
      });
      expose(el, Object.fromEntries(last));
    },
  };
}

function map(w: Widget, el: HTMLElement): Drawn {
  const c = chart(el);
  const note = document.createElement("div");
  note.className = "note";
  el.append(note);
  return {
    card: el,
    draw(feed) {
      const values = new Map<string, number>();
      const unknown = new Map<string, number>();
      for (const { name, value } of labelled(w, feed)) {
        const feature = mapName(name);
        if (feature) values.set(feature, (values.get(feature) ?? 0) + value);
        else unknown.set(name, (unknown.get(name) ?? 0) + 1);
      }
      const data = [...values].map(([name, value]) => ({ name, value }));
      const max = Math.max(1, ...data.map((d) => d.value));
      c.setOption({
        tooltip: { trigger: "item" },
        visualMap: {
          min: 0,
          max,
          left: 10,
          bottom: 10,
          calculable: false,
          textStyle: { color: THEME.text },
          inRange: { color: ["#0b3d91", "#36cfc9", "#fadb14", "#ff4d4f"] },
        },
        series: [
          {
            type: "map",
            map: "china",
            roam: false,
            label: { show: false },
            itemStyle: { areaColor: "#10223f", borderColor: "#3b5b8c" },
            data,
          },
        ],
      });
      // Names the map does not know are counted and shown, not dropped silently.
      note.textContent = unknown.size ? `unmapped: ${[...unknown.keys()].join(", ")}` : "";
      expose(el, { values: Object.fromEntries(values), unmapped: [...unknown.keys()] });
    },
  };
}

function bars(w: Widget, el: HTMLElement): Drawn {
  const c = chart(el);
  return {
    card: el,
    draw(feed) {
      const top = labelled(w, feed)
        .sort((a, b) => b.value - a.value || (a.name < b.name ? -1 : 1))
        .slice(0, w.limit ?? 10);
      c.setOption({
        color: THEME.accent[1],
        grid: { left: 90, right: 30, top: 10, bottom: 20 },
        xAxis: { type: "value", axisLabel: { color: THEME.dim }, splitLine: { show: false } },
        yAxis: {
          type: "category",
          inverse: true,
          data: top.map((d) => d.name),
          axisLabel: { color: THEME.text },
        },
        series: [
          {
            type: "bar",
            data: top.map((d) => d.value),
            label: {
              show: true,
              position: "right",
              color: THEME.text,
              formatter: (p: { value: unknown }) => format(Number(p.value)),
            },
          },
        ],
      });
      expose(el, top.map((d) => [d.name, d.value]));
    },
  };
}

/** The latest event time the view has seen, and how long ago the view last changed. */
function freshness(w: Widget, el: HTMLElement): Drawn {
  const value = document.createElement("div");
  value.className = "value small";
  el.append(value);
  let current: ViewFeed | undefined;
  const tick = () => {
    if (!current) return;
    const age = current.updatedAt ? (Date.now() - current.updatedAt) / 1000 : NaN;
    const time = current.objects()[0]?.[w.time ?? ""];
    value.innerHTML = "";
    const lines = [
      `event time ${time ?? "…"}`,
      `updated ${Number.isNaN(age) ? "…" : age.toFixed(1) + " s"} ago · epoch ${current.epoch}`,
      current.status === "live" ? "live" : `${current.status}: ${current.error}`,
    ];
    for (const l of lines) {
      const d = document.createElement("div");
      d.textContent = l;
      value.append(d);
    }
    el.classList.toggle("stale", current.status !== "live" || age > 5);
  };
  setInterval(tick, 250);
  return {
    card: el,
    draw(feed) {
      current = feed;
      expose(el, { time: feed.objects()[0]?.[w.time ?? ""] ?? null, epoch: feed.epoch });
      tick();
    },
  };
}

/** How long the delay widget keeps measurements. */
const DELAY_WINDOW_MS = 60_000;

/** The q-quantile of sorted values (nearest rank). */
function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

/**
 * End-to-end delay: for each row a change adds to the view, the time from its ingestion stamp (taken by
 * the source) to this card's redraw showing it; p50 and p99 over the last minute. Bound to a
 * probe view of sampled orders, it measures the path every view takes: source, checkpoint
 * commit, the view, the change feed, the page. The browser's clock is compared with the
 * server's, so both must agree (the same machine, or NTP).
 */
function delay(w: Widget, el: HTMLElement): Drawn {
  const value = document.createElement("div");
  value.className = "value";
  const note = document.createElement("div");
  note.className = "note";
  el.append(value, note);
  const seen: { at: number; ms: number }[] = [];
  let all = 0;
  // Every measurement since the page opened, for benchmarks (web/tests/screen-latency.mjs).
  const measured: number[] = [];
  (el as HTMLElement & { measured?: number[] }).measured = measured;
  return {
    card: el,
    draw(feed) {
      if (feed.last.kind !== "changes") return;
      const col = feed.columns.indexOf(w.time ?? "") + 2;
      // Rows this change adds to the view: a row retracted and inserted again in one change
      // (a Top-N's rows moving rank, say) is not new, and is not measured again.
      const net = new Map<string, { stamp: unknown; n: number }>();
      for (const r of feed.last.rows) {
        const key = JSON.stringify(r.slice(2));
        const e = net.get(key) ?? { stamp: r[col], n: 0 };
        e.n += r[1] === "+I" || r[1] === "+U" ? 1 : -1;
        net.set(key, e);
      }
      const stamps = [...net.values()]
        .filter((e) => e.n > 0 && typeof e.stamp === "number")
        .map((e) => e.stamp as number);
      if (stamps.length === 0) return;
      value.textContent = "…";
      // Measured once the browser has laid out this update, as a viewer would see it.
      requestAnimationFrame(() => {
        const now = Date.now();
        for (const s of stamps) {
          seen.push({ at: now, ms: now - s });
          measured.push(now - s);
        }
        all += stamps.length;
        while (seen.length && now - seen[0].at > DELAY_WINDOW_MS) seen.shift();
        const sorted = seen.map((x) => x.ms).sort((a, b) => a - b);
        const p50 = quantile(sorted, 0.5);
        const p99 = quantile(sorted, 0.99);
        value.textContent = `${Math.round(p50)} ms`;
        note.textContent = `p50 · p99 ${Math.round(p99)} ms · ${sorted.length} orders in the last minute`;
        expose(el, { count: sorted.length, total: all, p50, p99, max: sorted[sorted.length - 1] });
      });
    },
  };
}

const KINDS: Record<Widget["type"], (w: Widget, el: HTMLElement) => Drawn> = {
  ticker,
  number,
  rate,
  pie,
  line,
  map,
  bars,
  freshness,
  delay,
};

/** Draws a screen into `root`, one feed per view, and keeps it live. */
export function showScreen(root: HTMLElement, doc: ScreenDoc, token: string) {
  document.title = doc.title;
  root.innerHTML = "";
  const header = document.createElement("header");
  const h1 = document.createElement("h1");
  h1.textContent = doc.title;
  const clock = document.createElement("div");
  clock.className = "clock";
  header.append(h1, clock);
  setInterval(() => (clock.textContent = new Date().toLocaleTimeString()), 1000);
  const grid = document.createElement("main");
  grid.className = "grid";
  root.append(header, grid);
  const feeds = new Feeds(token);
  doc.widgets.forEach((w, i) => {
    const make = KINDS[w.type];
    if (!make) throw new Error(`widget ${i + 1}: unknown type '${w.type}'`);
    const drawn = make(w, card(w, i));
    grid.append(drawn.card);
    feeds.feed(w.view).onChange((f) => {
      drawn.card.classList.toggle("offline", f.status !== "live");
      if (f.status === "live") drawn.draw(f);
    });
  });
  feeds.start();
}
