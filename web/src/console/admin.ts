// Administration within the caller's rights: tenants (administrators), users, tokens, and
// quotas with their use. Each form runs the REST call the docs list; errors are the server's.

import { api, type Rows } from "../api";
import { h, kids, say, table } from "./dom";
import type { Page } from "./shell";

export const adminPage: Page = async (main, me) => {
  const msg = h("div", { class: "msg-box", id: "admin-msg" });
  const sections = h("div", {});
  main.append(h("h2", {}, "Admin"), msg, sections);
  const run = async (f: () => Promise<unknown>, done: string) => {
    try {
      const r = await f();
      const token = (r as { token?: string } | null)?.token;
      say(msg, token ? `${done}: ${token} (shown once)` : done);
      await draw();
    } catch (e) {
      say(msg, e instanceof Error ? e.message : String(e), true);
    }
  };
  const draw = async () => {
    const [tenants, users, tokens, quotas] = await Promise.all([
      api<Rows>("GET", "/v1/tenants"),
      api<Rows>("GET", "/v1/users"),
      api<Rows>("GET", "/v1/tokens"),
      api<Rows>("GET", "/v1/quotas"),
    ]);
    const tenant = h("input", { placeholder: "tenant", size: 12 });
    const user = h("input", { placeholder: "user", size: 12 });
    const password = h("input", { placeholder: "password", type: "password", size: 12 });
    const role = h("select", {}, ["developer", "viewer", "owner"].map((r) => h("option", { value: r }, r)));
    const userTenant = h("input", { placeholder: "tenant (yours)", size: 12 });
    const quotaTenant = h("input", { placeholder: "tenant", size: 12 });
    const quotaKey = h(
      "select",
      {},
      ["max_pipelines", "max_parallelism", "max_state_bytes", "max_ingest_rows_per_second", "max_checkpoint_bytes"].map(
        (q) => h("option", { value: q }, q),
      ),
    );
    const quotaValue = h("input", { placeholder: "value (e.g. 512mb)", size: 14 });
    const tokenUser = h("input", { placeholder: "user (you)", size: 12 });
    const withDrop = (r: Rows, what: string, path: (row: Rows["rows"][number]) => string | null) =>
      table(
        [...r.columns, ""],
        r.rows.map((row) => {
          const p = path(row);
          return [
            ...row,
            p && me.role === "owner"
              ? h("button", { onclick: () => void run(() => api("DELETE", p), `${what} ${row[0]} dropped`) }, "drop")
              : "",
          ];
        }),
        { class: "rows compact" },
      );
    sections.replaceChildren(
      ...kids(
      h("h3", {}, "Tenants"),
      withDrop(tenants, "tenant", (row) => (me.admin ? `/v1/tenants/${row[0]}` : null)),
      me.admin &&
        h(
          "div",
          { class: "toolbar" },
          tenant,
          h("button", { onclick: () => void run(() => api("POST", "/v1/tenants", { name: tenant.value }), `tenant ${tenant.value} created`) }, "Create tenant"),
        ),
      h("h3", {}, "Users"),
      withDrop(users, "user", (row) => `/v1/users/${row[0]}`),
      me.role === "owner" &&
        h(
          "div",
          { class: "toolbar" },
          user,
          password,
          role,
          me.admin && userTenant,
          h(
            "button",
            {
              onclick: () =>
                void run(
                  () =>
                    api("POST", "/v1/users", {
                      name: user.value,
                      password: password.value,
                      role: role.value,
                      tenant: userTenant.value || undefined,
                    }),
                  `user ${user.value} created`,
                ),
            },
            "Create user",
          ),
        ),
      h("h3", {}, "Tokens"),
      table(
        [...tokens.columns, ""],
        tokens.rows.map((row) => [
          ...row,
          String(row[2]) === "true" ? "" : h("button", { onclick: () => void run(() => api("DELETE", `/v1/tokens/${row[0]}`), `token ${row[0]} revoked`) }, "revoke"),
        ]),
        { class: "rows compact" },
      ),
      h(
        "div",
        { class: "toolbar" },
        me.role === "owner" && tokenUser,
        h(
          "button",
          {
            onclick: () =>
              void run(() => api("POST", "/v1/tokens", { user: tokenUser.value || undefined }), "token created"),
          },
          "Create token",
        ),
      ),
      h("h3", {}, "Quotas and use"),
      table(quotas.columns, quotas.rows, { class: "rows compact", id: "quotas" }),
      me.admin &&
        h(
          "div",
          { class: "toolbar" },
          quotaTenant,
          quotaKey,
          quotaValue,
          h(
            "button",
            {
              onclick: () =>
                void run(
                  () =>
                    api("PUT", `/v1/quotas/${quotaTenant.value}`, {
                      [quotaKey.value]: /^\d+$/.test(quotaValue.value) ? Number(quotaValue.value) : quotaValue.value,
                    }),
                  "quota set",
                ),
            },
            "Set quota",
          ),
        ),
      ),
    );
  };
  await draw();
};
