// Admin views: API keys (create, shown once; list; revoke) and usage per key and model.
import { json } from "./api.js";
import { $, el, formatNumber, numberValue, showError } from "./dom.js";
import { stackedBars } from "./charts.js";

function limitsText(key) {
  const parts = [];
  if (key.rpm !== null) parts.push(`${key.rpm} req/min`);
  if (key.tpm !== null) parts.push(`${key.tpm} tokens/min`);
  if (key.budget_tokens !== null) parts.push(`budget ${key.budget_tokens} tokens`);
  parts.push(`priority ${key.priority}`);
  if (key.tenant) parts.push(`tenant ${key.tenant}`);
  return parts.join(", ");
}

function keyState(key) {
  if (key.revoked_at) return "revoked";
  if (key.expires_at && new Date(key.expires_at) <= new Date()) return "expired";
  return "active";
}

/** The create-key body from the form; only fields a person filled in. */
function keyRequest() {
  const body = { name: $("#key-name").value.trim(), priority: $("#key-priority").value };
  const models = $("#key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  const tenant = $("#key-tenant").value.trim();
  if (tenant) body.tenant = tenant;
  for (const [field, id] of [["rpm", "#key-rpm"], ["tpm", "#key-tpm"], ["budget_tokens", "#key-budget"]]) {
    const value = numberValue($(id));
    if (value !== undefined) body[field] = value;
  }
  const expires = $("#key-expires").value;
  // An explicit UTC offset (not "Z", which Python before 3.11 cannot parse).
  if (expires) body.expires_at = new Date(expires).toISOString().replace("Z", "+00:00");
  return body;
}

export class KeysView {
  constructor() {
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.create();
    });
    $("#key-copy").addEventListener("click", () => this.copy());
    $("#key-dismiss").addEventListener("click", () => this.dismiss());
  }

  show() {
    this.load();
  }

  hide() {
    this.dismiss();
  }

  reset() {
    this.dismiss();
    $("#key-form").reset();
    $("#keys-table tbody").replaceChildren();
    showError($("#keys-error"), "");
  }

  async load() {
    try {
      const keys = await json("GET", "/admin/keys");
      $("#keys-table tbody").replaceChildren(...keys.data.map((key) => this.row(key)));
    } catch (err) {
      showError($("#keys-error"), `Could not list the keys: ${err.message}`);
    }
  }

  row(key) {
    const state = keyState(key);
    const actions = el("td");
    if (state === "active") {
      const button = el("button", { type: "button", class: "danger small", "aria-label": `Revoke key ${key.name}`, text: "Revoke" });
      button.addEventListener("click", () => this.revoke(key));
      actions.append(button);
    }
    return el("tr", { "data-key-id": key.id },
      el("th", { scope: "row", text: key.name }),
      el("td", { class: "mono", text: key.id }),
      el("td", { class: "mono", text: key.key_prefix + "…" }),
      el("td", { text: key.models ? key.models.join(", ") : "all" }),
      el("td", { text: limitsText(key) }),
      el("td", { text: key.expires_at ? new Date(key.expires_at).toLocaleString() : "never" }),
      el("td", { class: "state" }, el("span", { class: `badge ${state === "active" ? "good" : "bad"}`, text: state })),
      actions);
  }

  async create() {
    const body = keyRequest();
    if (!body.name) {
      showError($("#keys-error"), "A key needs a name.");
      $("#key-name").focus();
      return;
    }
    showError($("#keys-error"), "");
    try {
      const created = await json("POST", "/admin/keys", { body });
      $("#key-secret").textContent = created.key;
      $("#key-created").hidden = false;
      $("#key-form").reset();
      $("#key-copy").focus();
      await this.load();
    } catch (err) {
      showError($("#keys-error"), `The key was not created: ${err.message}`);
    }
  }

  async copy() {
    try {
      await navigator.clipboard.writeText($("#key-secret").textContent);
      $("#key-copy").textContent = "Copied";
    } catch {
      // No clipboard (a plain-HTTP origin other than localhost): select the text for a manual copy.
      getSelection().selectAllChildren($("#key-secret"));
    }
  }

  dismiss() {
    $("#key-secret").textContent = "";
    $("#key-created").hidden = true;
    $("#key-copy").textContent = "Copy";
  }

  async revoke(key) {
    try {
      await json("DELETE", `/admin/keys/${encodeURIComponent(key.id)}`);
      await this.load();
    } catch (err) {
      showError($("#keys-error"), `The key was not revoked: ${err.message}`);
    }
  }
}

const CSV_COLUMNS = ["key_id", "key_name", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens"];

function csvField(value) {
  const text = String(value ?? "");
  // Quoted when needed; a leading =, +, - or @ is prefixed so a spreadsheet never runs it as a formula.
  const safe = /^[=+\-@]/.test(text) ? `'${text}` : text;
  return /[",\n\r]/.test(safe) ? `"${safe.replaceAll('"', '""')}"` : safe;
}

export class UsageView {
  constructor() {
    this.rows = [];
    $("#usage-refresh").addEventListener("click", () => this.load());
    $("#usage-csv").addEventListener("click", () => this.download());
    $("#usage-key").addEventListener("change", () => this.renderSeries());
    this.series = [];
    this.names = new Map();
  }

  show() {
    this.load();
  }

  hide() {}

  reset() {
    this.rows = [];
    this.series = [];
    $("#usage-series").replaceChildren();
    $("#usage-table tbody").replaceChildren();
    $("#usage-chart").replaceChildren();
  }

  async load() {
    try {
      const [usage, series, keys] = await Promise.all([json("GET", "/admin/usage"),
        json("GET", "/admin/usage/series?bucket=hour&buckets=24"), json("GET", "/admin/keys")]);
      this.names = new Map(keys.data.map((k) => [k.id, k.name]));
      this.rows = usage.data.map((row) => ({ ...row, key_name: this.names.get(row.key_id) ?? row.key_id }));
      this.series = series.data;
      this.render();
      this.renderKeyChoice();
      this.renderSeries();
      showError($("#usage-error"), "");
    } catch (err) {
      showError($("#usage-error"), `Could not read the usage: ${err.message}`);
    }
  }

  render() {
    $("#usage-table tbody").replaceChildren(...this.rows.map((row) => el("tr", {},
      el("th", { scope: "row", text: row.key_name }),
      el("td", { text: row.model }),
      ...["requests", "prompt_tokens", "completion_tokens", "cached_tokens"]
        .map((field) => el("td", { class: "num", text: formatNumber(row[field]) })))));
    const bars = this.rows.map((row) => ({ label: `${row.key_name} · ${row.model}`, parts: [
      { name: "prompt tokens", value: row.prompt_tokens - row.cached_tokens },
      { name: "cached prompt tokens", value: row.cached_tokens },
      { name: "completion tokens", value: row.completion_tokens },
    ] }));
    const chart = this.rows.length
      ? stackedBars("Tokens per key and model", bars, ["prompt tokens", "cached prompt tokens", "completion tokens"])
      : el("p", { class: "hint", text: "No usage recorded yet." });
    $("#usage-chart").replaceChildren(chart);
  }

  renderKeyChoice() {
    const select = $("#usage-key");
    const chosen = select.value;
    const ids = [...new Set(this.rows.map((row) => row.key_id))];
    select.replaceChildren(el("option", { value: "", text: "All keys" }),
      ...ids.map((id) => el("option", { value: id, text: this.names.get(id) ?? id })));
    select.value = ids.includes(chosen) ? chosen : "";
  }

  /** Tokens per hour over the last 24 hours (UTC), for all keys or the chosen one. */
  renderSeries() {
    const keyId = $("#usage-key").value;
    const byHour = new Map();
    for (const row of this.series) {
      if (keyId && row.key_id !== keyId) continue;
      const sum = byHour.get(row.bucket) ?? { requests: 0, prompt: 0, cached: 0, completion: 0 };
      sum.requests += row.requests;
      sum.prompt += row.prompt_tokens - row.cached_tokens;
      sum.cached += row.cached_tokens;
      sum.completion += row.completion_tokens;
      byHour.set(row.bucket, sum);
    }
    const bars = [...byHour.entries()].map(([bucket, sum]) => ({
      label: `${bucket.slice(0, 10)} ${bucket.slice(11, 16)} UTC · ${sum.requests} requests`,
      parts: [{ name: "prompt tokens", value: sum.prompt }, { name: "cached prompt tokens", value: sum.cached },
              { name: "completion tokens", value: sum.completion }] }));
    const who = keyId ? (this.names.get(keyId) ?? keyId) : "all keys";
    $("#usage-series").replaceChildren(bars.length
      ? stackedBars(`Tokens per hour, last 24 hours (${who})`, bars, ["prompt tokens", "cached prompt tokens", "completion tokens"])
      : el("p", { class: "hint", text: "No usage in the last 24 hours." }));
  }

  download() {
    const lines = [CSV_COLUMNS.join(","), ...this.rows.map((row) => CSV_COLUMNS.map((c) => csvField(row[c])).join(","))];
    const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: "lmserve-usage.csv" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }
}
