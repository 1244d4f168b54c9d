// The Sluice web pages: `/screen/<name>` shows a big screen of the caller's tenant (or the one
// screen a share token opens).

import "./style.css";
import { showScreen, type ScreenDoc } from "./screen";

const root = document.getElementById("app")!;

/** The token: `?token=` (then kept for the tab and taken out of the address), or the tab's. */
function token(): string | null {
  const url = new URL(location.href);
  const given = url.searchParams.get("token");
  if (given) {
    sessionStorage.setItem("sluice-token", given);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
    return given;
  }
  return sessionStorage.getItem("sluice-token");
}

function fail(message: string) {
  root.innerHTML = "";
  const p = document.createElement("pre");
  p.className = "failure";
  p.textContent = message;
  root.append(p);
}

function askForToken(then: () => void) {
  root.innerHTML = `<form class="login"><h1>Sluice</h1>
    <label>Token <input name="token" type="password" autocomplete="off" autofocus></label>
    <button>Open</button></form>`;
  root.querySelector("form")!.addEventListener("submit", (e) => {
    e.preventDefault();
    const t = (root.querySelector("input[name=token]") as HTMLInputElement).value.trim();
    if (t) {
      sessionStorage.setItem("sluice-token", t);
      then();
    }
  });
}

async function screen(name: string) {
  const t = token();
  if (!t) return askForToken(() => void screen(name));
  const res = await fetch(`/v1/screens/${encodeURIComponent(name)}`, {
    headers: { Authorization: `Bearer ${t}` },
  });
  if (res.status === 401) {
    sessionStorage.removeItem("sluice-token");
    return askForToken(() => void screen(name));
  }
  if (!res.ok) return fail(`screen '${name}': ${res.status} ${await res.text()}`);
  const body = (await res.json()) as { name: string; screen: ScreenDoc };
  showScreen(root, body.screen, t);
}

const match = location.pathname.match(/^\/screen\/([^/]+)\/?$/);
if (match) {
  void screen(decodeURIComponent(match[1]));
} else {
  fail(`nothing at ${location.pathname}: open /screen/<name>`);
}
