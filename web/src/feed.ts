// A materialized view's change feed (`GET /v1/views/{name}/changes`, server-sent events), read
// with fetch so that the token travels in a header, folded into the view's current rows.
//
// The feed starts with a snapshot and then carries each committed epoch's changes. When the
// connection drops, the server restarts, or the view starts over (`reset`), the feed
// subscribes again and replaces its rows with the new snapshot: nothing is counted twice.

export type Value = string | number | boolean | null;
export type Row = Value[];

interface FeedDoc {
  columns: string[];
  rows: Row[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

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
  /** Subscriptions made (1 + reconnects). */
  subscriptions = 0;
  private listeners: ((feed: ViewFeed) => void)[] = [];
  private stopped = new AbortController();

  constructor(
    readonly view: string,
    private readonly token: string,
  ) {}

  onChange(f: (feed: ViewFeed) => void) {
    this.listeners.push(f);
  }

  start() {
    void this.run();
  }

  /** Ends the subscription (a page that showed the view was left). */
  stop() {
    this.stopped.abort();
    this.listeners = [];
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

  private notify() {
    for (const f of this.listeners) f(this);
  }

  private async run() {
    while (!this.stopped.signal.aborted) {
      try {
        this.subscriptions++;
        const res = await fetch(`/v1/views/${encodeURIComponent(this.view)}/changes`, {
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
        this.error = e instanceof Error ? e.message : String(e);
        this.status = "retrying";
        this.notify();
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
      case "snapshot": {
        this.rows.clear();
        const doc = JSON.parse(text) as FeedDoc;
        this.apply(doc);
        this.last = { kind: "snapshot", rows: doc.rows };
        this.status = "live";
        this.error = "";
        this.notify();
        break;
      }
      case "changes": {
        const doc = JSON.parse(text) as FeedDoc;
        this.apply(doc);
        this.last = { kind: "changes", rows: doc.rows };
        this.notify();
        break;
      }
      case "reset":
      case "error":
        // Subscribe again: the next snapshot replaces everything.
        throw new Error(`${name}: ${text}`);
    }
  }

  /** Folds feed rows (`sluice_epoch, sluice_op, <columns>`) into the view. */
  private apply(doc: FeedDoc) {
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
  }
}
