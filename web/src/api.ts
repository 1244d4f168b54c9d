// The REST API as the pages call it: the tab's token, and calls that fail with the server's
// error (its SQLSTATE, message and, for SQL, the position).

const KEY = "sluice-token";

export function savedToken(): string | null {
  return sessionStorage.getItem(KEY);
}

export function saveToken(token: string | null) {
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
}

/** `?token=` in the address (then kept for the tab and taken out of the address bar). */
export function tokenFromAddress(): string | null {
  const url = new URL(location.href);
  const given = url.searchParams.get("token");
  if (!given) return null;
  saveToken(given);
  url.searchParams.delete("token");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
  return given;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** 1-based character position in the SQL sent, for syntax and planning errors. */
    readonly position?: number,
  ) {
    super(message);
  }
}

/** Called when a call is refused for its token (401): the console shows its login again. */
let onUnauthorized: (() => void) | null = null;
export function whenUnauthorized(f: () => void) {
  onUnauthorized = f;
}

export async function api<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = {};
  const token = savedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let doc: unknown = null;
  try {
    doc = text ? JSON.parse(text) : null;
  } catch {
    doc = null;
  }
  if (!res.ok) {
    const e = (doc ?? {}) as { code?: string; message?: string; position?: number };
    if (res.status === 401 && onUnauthorized && path !== "/v1/login") onUnauthorized();
    throw new ApiError(res.status, e.code ?? String(res.status), e.message ?? text, e.position);
  }
  return doc as T;
}

/** A statement's rows as `/v1/sql` and the listing calls answer them. */
export interface Rows {
  columns: string[];
  rows: (string | number | boolean | null)[][];
}

/** Rows as objects by column name. */
export function objects(r: Rows): Record<string, string | number | boolean | null>[] {
  return r.rows.map((row) => Object.fromEntries(r.columns.map((c, i) => [c, row[i]])));
}
