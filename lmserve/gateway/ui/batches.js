// Batch jobs. A user sees the key's own (/v1/batches): progress, the output and error files, cancel.
// The administrator sees every key's jobs with their owner (/admin/batches), read only: the files
// belong to their owners.
import { ApiError, currentSession, errorMessage, json, request } from "./api.js";
import { $, el, formatNumber, showError } from "./dom.js";

const FINISHED = new Set(["completed", "failed", "expired", "cancelled"]);
const REFRESH_MS = 3000;

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

export class BatchesView {
  constructor() {
    this.timer = null;
    $("#batches-refresh").addEventListener("click", () => this.load());
  }

  show() {
    this.load();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  reset() {
    this.hide();
    $("#batches-table tbody").replaceChildren();
    showError($("#batches-error"), "");
  }

  async load() {
    clearTimeout(this.timer);
    try {
      const isAdmin = currentSession()?.role === "admin";
      $("#batches-scope").textContent = isAdmin
        ? "Every key's jobs (/admin/batches), newest first, with the tenant or key that owns each; read only."
        : "This key's jobs (/v1/batches), newest first.";
      const page = await json("GET", isAdmin ? "/admin/batches?limit=50" : "/v1/batches?limit=50");
      const rows = page.data.map((batch) => this.row(batch, isAdmin));
      $("#batches-table tbody").replaceChildren(...rows);
      $("#batches-empty").hidden = rows.length > 0;
      showError($("#batches-error"), "");
      // Poll while a job is still moving; stop when every one has finished.
      if (page.data.some((batch) => !FINISHED.has(batch.status))) {
        this.timer = setTimeout(() => this.load(), REFRESH_MS);
      }
    } catch (err) {
      showError($("#batches-error"), `Could not list the batches: ${err.message}`);
    }
  }

  row(batch, isAdmin) {
    const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    const actions = el("td");
    const idCell = el("td", {}, el("code", { text: batch.id }));
    if (isAdmin) {
      idCell.append(el("div", { class: "hint", text: `owner ${batch.owner}` }));
      return el("tr", { "data-batch": batch.id }, idCell, ...this.cells(batch, counts), actions);
    }
    for (const [fileId, label, name] of [[batch.output_file_id, "Output", "output"], [batch.error_file_id, "Errors", "errors"]]) {
      if (!fileId) continue;
      const button = el("button", { type: "button", class: "secondary small", text: label,
        "aria-label": `Download the ${name} of batch ${batch.id}` });
      button.addEventListener("click", () => this.download(fileId, `${batch.id}-${name}.jsonl`));
      actions.append(button);
    }
    if (!FINISHED.has(batch.status) && batch.status !== "cancelling") {
      const cancel = el("button", { type: "button", class: "danger small", text: "Cancel",
        "aria-label": `Cancel batch ${batch.id}` });
      cancel.addEventListener("click", () => this.cancel(batch));
      actions.append(cancel);
    }
    return el("tr", { "data-batch": batch.id }, idCell, ...this.cells(batch, counts), actions);
  }

  cells(batch, counts) {
    return [
      el("td", { class: "status", text: batch.status }),
      el("td", { text: batch.endpoint }),
      el("td", { text: when(batch.created_at) }),
      el("td", { class: "num", text: `${formatNumber(counts.completed)} done, ${formatNumber(counts.failed)} failed of ${formatNumber(counts.total)}` }),
    ];
  }

  async cancel(batch) {
    try {
      await json("POST", `/v1/batches/${encodeURIComponent(batch.id)}/cancel`);
    } catch (err) {
      showError($("#batches-error"), `Could not cancel ${batch.id}: ${err.message}`);
    }
    this.load();
  }

  async download(fileId, filename) {
    try {
      const response = await request("GET", `/v1/files/${encodeURIComponent(fileId)}/content`);
      if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
      const url = URL.createObjectURL(await response.blob());
      const link = el("a", { href: url, download: filename });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (err) {
      showError($("#batches-error"), `Could not download ${fileId}: ${err.message}`);
    }
  }
}
