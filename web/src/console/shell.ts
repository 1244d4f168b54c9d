// The console: login, then the pages of the caller's tenant, chosen by the address's hash
// (`#/sql`, `#/pipelines`, `#/pipelines/<name>`, `#/catalog`, `#/views/<name>`, `#/screens`,
// `#/screens/<name>`, `#/admin`). Everything is scoped to the token's tenant, as REST is.

import { api, ApiError, savedToken, saveToken, whenUnauthorized } from "../api";
import { h, say } from "./dom";

export interface Me {
  user: string;
  tenant: string;
  role: "owner" | "developer" | "viewer";
  admin: boolean;
}

/** A page draws into `main` and returns how to leave it (stop its timers and feeds). */
export type Page = (main: HTMLElement, me: Me, arg: string) => Promise<(() => void) | void>;

const routes: [RegExp, () => Promise<Page>][] = [
  [/^sql$/, async () => (await import("./sql")).sqlPage],
  [/^pipelines$/, async () => (await import("./pipelines")).pipelinesPage],
  [/^pipelines\/(.+)$/, async () => (await import("./pipeline")).pipelinePage],
  [/^catalog$/, async () => (await import("./catalog")).catalogPage],
  [/^views\/(.+)$/, async () => (await import("./catalog")).viewPage],
  [/^screens$/, async () => (await import("./screens")).screensPage],
  [/^screens\/(.+)$/, async () => (await import("./screens")).screenEditPage],
  [/^admin$/, async () => (await import("./admin")).adminPage],
];

const NAV: [string, string][] = [
  ["sql", "SQL"],
  ["pipelines", "Pipelines"],
  ["catalog", "Tables & views"],
  ["screens", "Screens"],
  ["admin", "Admin"],
];

export function startConsole(root: HTMLElement) {
  document.body.classList.add("console-body");
  whenUnauthorized(() => {
    leavePage();
    saveToken(null);
    login(root);
  });
  if (savedToken()) void open(root);
  else login(root);
}

function login(root: HTMLElement) {
  const message = h("div", { class: "msg-box" });
  const user = h("input", { name: "user", autocomplete: "username", autofocus: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password" });
  const token = h("input", { name: "token", type: "password", autocomplete: "off" });
  const form = h(
    "form",
    { class: "login", id: "login" },
    h("h1", {}, "Sluice console"),
    h("label", {}, "User ", user),
    h("label", {}, "Password ", password),
    h("div", { class: "or" }, "or"),
    h("label", {}, "API token ", token),
    h("button", { type: "submit" }, "Log in"),
    message,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      if (token.value.trim()) {
        saveToken(token.value.trim());
        await api("GET", "/v1/me");
      } else {
        const r = await api<{ token: string }>("POST", "/v1/login", {
          user: user.value.trim(),
          password: password.value,
        });
        saveToken(r.token);
      }
      await open(root);
    } catch (err) {
      saveToken(null);
      say(message, err instanceof Error ? err.message : String(err), true);
    }
  });
  root.replaceChildren(form);
}

let leave: (() => void) | void = undefined;

/** Stops the page shown (its timers and feeds). */
function leavePage() {
  if (leave) leave();
  leave = undefined;
  window.onhashchange = null;
}

async function open(root: HTMLElement) {
  const me = await api<Me>("GET", "/v1/me");
  const main = h("main", { id: "page" });
  const nav = h(
    "nav",
    {},
    h("strong", { class: "brand" }, "Sluice"),
    NAV.map(([path, label]) => h("a", { href: `#/${path}`, "data-nav": path }, label)),
    h("span", { class: "who", id: "who" }, `${me.user} · ${me.tenant} · ${me.role}`),
    h(
      "button",
      {
        id: "logout",
        onclick: async () => {
          leavePage();
          try {
            await api("POST", "/v1/logout");
          } finally {
            saveToken(null);
            location.hash = "";
            login(root);
          }
        },
      },
      "Log out",
    ),
  );
  root.replaceChildren(h("div", { class: "console" }, nav, main));
  const route = async () => {
    if (leave) leave();
    leave = undefined;
    main.dataset.route = location.hash;
    const hash = location.hash.replace(/^#\/?/, "") || "pipelines";
    for (const a of nav.querySelectorAll("a")) {
      a.classList.toggle("active", hash.startsWith(a.dataset.nav ?? "-"));
    }
    for (const [re, load] of routes) {
      const m = hash.match(re);
      if (!m) continue;
      main.replaceChildren(h("div", { class: "loading" }, "…"));
      try {
        const page = await load();
        main.replaceChildren();
        leave = await page(main, me, decodeURIComponent(m[1] ?? ""));
      } catch (e) {
        main.replaceChildren(
          h("pre", { class: "failure" }, e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
        );
      }
      return;
    }
    main.replaceChildren(h("pre", { class: "failure" }, `no page '${hash}'`));
  };
  window.onhashchange = () => void route();
  await route();
}

/** Runs `f` now and every `ms` until the page is left; returns the stopper. */
export function every(ms: number, f: () => Promise<void>): () => void {
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const tick = async () => {
    try {
      await f();
    } catch (e) {
      console.warn(e);
    }
    if (!stopped) timer = setTimeout(() => void tick(), ms);
  };
  void tick();
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
  };
}
