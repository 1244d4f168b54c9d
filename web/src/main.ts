// The Sluice web pages: `/screen/<name>` shows a big screen of the caller's tenant (or the one
// screen a share token opens); `/console` is the console. Each loads its own code.

import "./style.css";
import { savedToken, saveToken, tokenFromAddress } from "./api";

const root = document.getElementById("app")!;

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
      saveToken(t);
      then();
    }
  });
}

async function screen(name: string) {
  const t = tokenFromAddress() ?? savedToken();
  if (!t) return askForToken(() => void screen(name));
  const res = await fetch(`/v1/screens/${encodeURIComponent(name)}`, {
    headers: { Authorization: `Bearer ${t}` },
  });
  if (res.status === 401) {
    saveToken(null);
    return askForToken(() => void screen(name));
  }
  if (!res.ok) return fail(`screen '${name}': ${res.status} ${await res.text()}`);
  const body = (await res.json()) as { name: string; screen: import("./screen").ScreenDoc };
  const { showScreen } = await import("./screen");
  showScreen(root, body.screen, t);
}

const match = location.pathname.match(/^\/screen\/([^/]+)\/?$/);
if (match) {
  void screen(decodeURIComponent(match[1]));
} else if (/^\/console\/?$/.test(location.pathname)) {
  tokenFromAddress();
  void import("./console/shell").then((c) => c.startConsole(root));
} else {
  fail(`nothing at ${location.pathname}: open /console or /screen/<name>`);
}
