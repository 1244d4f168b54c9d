// Materialized views' change feeds, folded into each view's current rows. All the views a page
// shows share one stream of server-sent events (`GET /v1/feeds?views=a,b`; a browser holds only
// six HTTP/1.1 connections to a server), read with fetch so that the token travels in a header.
//
// Each view's feed starts with a snapshot and then carries each committed epoch's changes. When
// the connection drops, the server restarts, or a view starts over (`reset`), the page
// subscribes again and every view's rows are replaced by its new snapshot: nothing is counted
// twice.

export type Value = string | number | boolean | null;
export type Row = Value[];

interface FeedDoc {
  view: string;
  columns: string[];
  rows: Row[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One view's rows, as its feed events leave them. */
export class ViewFeed {
  columns: string[] = [];
  /** Each distinct row (by its JSON) and how many times the view holds it. */
  private rows = new Map<string, { row: Row; count: number }>();
  epoch = -1;
  /** When the last snapshot or change arrived (Date.now()). */
  updatedAt = 0;
  status: "connecting" | "live" | "retrying" = "connecting";
  error = "";
  /** The last event: a snapshot, or one epoch's changes (`sluice_epoch, sluice_op, <columns>`). */
  last: { kind: "snapshot" | "changes"; rows: Row[] } = { kind: "snapshot", rows: [] };
  private listeners: ((feed: ViewFeed) => void)[] = [];

  constructor(readonly view: string) {}

  onChange(f: (feed: ViewFeed) => void) {
    this.listeners.push(f);
  }

  /** The view's rows as objects by column name. */
  objects(): Record<string, Value>[] {
    const out: Record<string, Value>[] = [];
    for (const { row, count } of this.rows.values()) {
      const o: Record<string, Value> = {};
      this.columns.forEach((c, i) => (o[c] = row[i]));
      for (let n = 0; n < count; n++) out.push(o);
    }
    return out;
  }

  notify() {
    for (const f of this.listeners) f(this);
  }

  /** Takes in a snapshot (its rows replace the view's) or one epoch's changes. */
  receive(kind: "snapshot" | "changes", doc: FeedDoc) {
    if (kind === "snapshot") {
      this.rows.clear();
      this.status = "live";
      this.error = "";
    }
    this.columns = doc.columns.slice(2);
    for (const r of doc.rows) {
      const row = r.slice(2);
      const key = JSON.stringify(row);
      const sign = r[1] === "+I" || r[1] === "+U" ? 1 : -1;
      const held = this.rows.get(key);
      const count = (held?.count ?? 0) + sign;
      if (count === 0) this.rows.delete(key);
      else this.rows.set(key, { row, count });
      this.epoch = Math.max(this.epoch, Number(r[0]));
    }
    this.updatedAt = Date.now();
    this.last = { kind, rows: doc.rows };
    this.notify();
  }

  broken(error: string) {
    this.status = "retrying";
    this.error = error;
    this.notify();
  }
}

/** The feeds of a page's views, over one connection. */
export class Feeds {
  private feeds = new Map<string, ViewFeed>();
  /** Subscriptions made (1 + reconnects). */
  subscriptions = 0;
  private stopped = new AbortController();

  constructor(private readonly token: string) {}

  /** The feed of `view` (one per view, however many widgets show it). */
  feed(view: string): ViewFeed {
    let f = this.feeds.get(view);
    if (!f) {
      f = new ViewFeed(view);
      this.feeds.set(view, f);
    }
    return f;
  }

  start() {
    void this.run();
  }

  /** Ends the subscription (the page was left). */
  stop() {
    this.stopped.abort();
  }

  private async run() {
    const views = [...this.feeds.keys()].map(encodeURIComponent).join(",");
    while (!this.stopped.signal.aborted) {
      try {
        this.subscriptions++;
        const res = await fetch(`/v1/feeds?views=${views}`, {
          headers: { Authorization: `Bearer ${this.token}` },
          signal: this.stopped.signal,
        });
        if (!res.ok || !res.body) {
          throw new Error(`${res.status} ${await res.text()}`);
        }
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) throw new Error("the server closed the feed");
          buf += value.replace(/\r\n/g, "\n");
          let end: number;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            this.event(block);
          }
        }
      } catch (e) {
        if (this.stopped.signal.aborted) return;
        const message = e instanceof Error ? e.message : String(e);
        for (const f of this.feeds.values()) f.broken(message);
      }
      await sleep(1000);
    }
  }

  private event(block: string) {
    let name = "message";
    const data: string[] = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a keep-alive
      const colon = line.indexOf(":");
      const key = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (key === "event") name = value;
      else if (key === "data") data.push(value);
    }
    const text = data.join("\n");
    switch (name) {
      case "snapshot":
      case "changes": {
        const doc = JSON.parse(text) as FeedDoc;
        this.feeds.get(doc.view)?.receive(name, doc);
        break;
      }
      case "reset":
      case "error":
        // Subscribe again: the next snapshots replace everything.
        throw new Error(`${name}: ${text}`);
    }
  }
}
