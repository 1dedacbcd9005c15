// Live status: every model and backend from GET /admin/status, refreshed every few seconds.
import { json } from "./api.js";
import { $, el, formatNumber, showError } from "./dom.js";
import { sparkline } from "./charts.js";

const REFRESH_MS = 2000;

function badge(text, kind) {
  return el("span", { class: `badge ${kind}`, text });
}

/** One word for a backend's state, most severe first. */
function healthBadge(backend) {
  if (!backend.healthy) return badge("down", "bad");
  if (backend.draining) return badge("draining", "warn");
  if (!backend.ready) return badge("not ready", "warn");
  if (backend.breaker === "open") return badge("breaker open", "bad");
  return badge("up", "good");
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${formatNumber(value * 100, 1)}%`;
}

function backendRow(backend) {
  const server = backend.server;
  const cell = (text, cls = "num") => el("td", { class: cls, text });
  return el("tr", { "data-backend": backend.url },
    el("th", { scope: "row", class: "url", text: backend.url }),
    el("td", { class: "health" }, healthBadge(backend)),
    cell(backend.ready ? "yes" : "no", "ready"),
    el("td", { class: "breaker" }, badge(backend.breaker.replace("_", "-"), backend.breaker === "closed" ? "good" : "bad")),
    cell(formatNumber(backend.outstanding)),
    cell(server ? formatNumber(server.waiting) : "–"),
    cell(server ? formatNumber(server.running) : "–"),
    cell(server ? percent(server.kv_cache_usage) : "–"),
    cell(backend.ewma_ttfb_ms === null ? "–" : `${formatNumber(backend.ewma_ttfb_ms)} ms`),
  );
}

function modelCard(model) {
  const history = model.history;
  const ms = (v) => `${formatNumber(v)} ms`;
  const charts = el("div", { class: "charts" },
    sparkline("Requests/s", history.map((p) => p.requests_per_second), (v) => formatNumber(v, 2)),
    sparkline("TTFT p50", history.map((p) => p.ttft_p50_ms), ms),
    sparkline("TTFT p99", history.map((p) => p.ttft_p99_ms), ms),
    sparkline("Error rate", history.map((p) => p.error_rate), percent),
  );
  const head = el("tr", {}, ...["Backend", "Health", "Ready", "Breaker", "In flight", "Queue", "Running", "KV cache", "TTFB (avg)"]
    .map((name) => el("th", { scope: "col", text: name })));
  const table = el("table", {}, el("caption", { class: "visually-hidden", text: `Backends of ${model.name}` }),
    el("thead", {}, head), el("tbody", {}, ...model.backends.map(backendRow)));
  const limit = model.max_in_flight === null ? "" : ` of ${model.max_in_flight}`;
  return el("article", { class: "model panel", "data-model": model.name },
    el("h2", { text: model.name }),
    el("p", { class: "hint", text: `${model.available} of ${model.backends.length} backends available · ${model.in_flight}${limit} in flight · routing: ${model.strategy}` }),
    charts,
    el("div", { class: "scroll" }, table));
}

export class StatusView {
  constructor() {
    this.timer = null;
    this.isLoading = false;
  }

  show() {
    this.refresh();
    if (this.timer === null) this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  hide() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  reset() {
    this.hide();
    $("#status-models").replaceChildren();
    $("#status-updated").textContent = "";
  }

  async refresh() {
    if (this.isLoading) return;
    this.isLoading = true;
    try {
      const status = await json("GET", "/admin/status");
      // Rebuilt whole: a few rows; keep the keyboard focus's place by not touching the page otherwise.
      $("#status-models").replaceChildren(...status.models.map(modelCard));
      const time = new Date(status.time * 1000).toLocaleTimeString();
      $("#status-updated").textContent = `Updated ${time}; refreshed every ${REFRESH_MS / 1000} s.`;
      showError($("#status-error"), "");
    } catch (err) {
      showError($("#status-error"), `Could not read the status: ${err.message}`);
    } finally {
      this.isLoading = false;
    }
  }
}
