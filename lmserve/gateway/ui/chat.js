// The chat playground: a streamed chat completion with stop, and its numbers under each answer.
import { ApiError, errorMessage, json, request, sseData } from "./api.js";
import { $, el, formatNumber, numberValue, showError } from "./dom.js";

const PLACEHOLDER = "$LMSERVE_API_KEY";

/** The request body the settings and conversation describe (what is sent, and what the snippets show). */
function requestBody(settings, messages) {
  const body = { model: settings.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    if (settings[name] !== undefined) body[name] = settings[name];
  }
  return body;
}

function curlSnippet(body) {
  const data = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  return [
    `curl -N ${location.origin}/v1/chat/completions \\`,
    `  -H "Authorization: Bearer ${PLACEHOLDER}" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d '${data}'`,
  ].join("\n");
}

function pythonSnippet(body) {
  // JSON strings are valid Python string literals; the messages hold only strings.
  const messages = JSON.stringify(body.messages, null, 4).replace(/\n/g, "\n    ");
  const options = ["temperature", "top_p", "max_tokens"].filter((n) => body[n] !== undefined)
    .map((n) => `    ${n}=${body[n]},`);
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ["LMSERVE_API_KEY"])`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(body.model)},`,
    `    messages=${messages},`,
    ...options,
    "    stream=True,",
    '    stream_options={"include_usage": True},',
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
  ].join("\n");
}

/** The line under an answer: TTFT, tokens/s, token counts, how it ended. */
function statsText(run) {
  const parts = [];
  if (run.firstAt !== null) parts.push(`TTFT ${formatNumber(run.firstAt - run.sentAt)} ms`);
  const completion = run.usage?.completion_tokens ?? run.chunks;
  const decodeMs = run.endAt - (run.firstAt ?? run.endAt);
  if (completion > 1 && decodeMs > 0) parts.push(`${formatNumber((completion - 1) / (decodeMs / 1000), 1)} tokens/s`);
  if (run.usage) {
    parts.push(`${run.usage.prompt_tokens} prompt + ${run.usage.completion_tokens} completion tokens`);
  } else if (run.chunks) {
    parts.push(`about ${run.chunks} completion token${run.chunks === 1 ? "" : "s"} (no usage: the stream was cut)`);
  }
  if (run.stopped) parts.push("stopped");
  else if (run.finish) parts.push(`finish: ${run.finish}`);
  return parts.join(" · ");
}

export class ChatView {
  constructor() {
    this.history = [];
    this.controller = null;
    this.modelsLoaded = false;
    $("#chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("#chat-settings").addEventListener("submit", (event) => event.preventDefault());
    $("#chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.send();
      }
    });
    $("#chat-stop").addEventListener("click", () => this.stop());
    $("#chat-clear").addEventListener("click", () => this.clear());
    $("#chat-settings").addEventListener("input", () => this.renderSnippets());
  }

  async show() {
    if (this.modelsLoaded) return;
    const select = $("#chat-model");
    try {
      const listing = await json("GET", "/v1/models");
      select.replaceChildren(...listing.data.map((m) => el("option", { value: m.id, text: m.id })));
      this.modelsLoaded = true;
      showError($("#chat-error"), listing.data.length ? "" : "This key may not use any model.");
      $("#chat-send").disabled = !listing.data.length;
    } catch (err) {
      showError($("#chat-error"), `Could not list the models: ${err.message}`);
    }
    this.renderSnippets();
  }

  hide() {}

  reset() {
    this.clear();
    this.modelsLoaded = false;
    $("#chat-model").replaceChildren();
    $("#chat-form").reset();
    showError($("#chat-error"), "");
  }

  settings() {
    return {
      model: $("#chat-model").value,
      temperature: numberValue($("#chat-temperature")),
      top_p: numberValue($("#chat-top-p")),
      max_tokens: numberValue($("#chat-max-tokens")),
    };
  }

  messages(userText) {
    const system = $("#chat-system").value.trim();
    const messages = system ? [{ role: "system", content: system }] : [];
    messages.push(...this.history);
    if (userText) messages.push({ role: "user", content: userText });
    return messages;
  }

  renderSnippets(body) {
    body = body ?? requestBody(this.settings(), this.messages($("#chat-input").value.trim() || "Hello!"));
    $("#snippet-curl").textContent = curlSnippet(body);
    $("#snippet-python").textContent = pythonSnippet(body);
  }

  addMessage(role, text) {
    const textNode = el("div", { class: "text", text });
    const item = el("li", { class: `msg ${role}` }, el("span", { class: "who", text: role === "user" ? "You" : "Model" }), textNode);
    $("#chat-log").append(item);
    item.scrollIntoView({ block: "end" });
    return { item, textNode };
  }

  async send() {
    const input = $("#chat-input");
    const text = input.value.trim();
    if (!text || this.controller) return;
    const body = requestBody(this.settings(), this.messages(text));
    this.renderSnippets(body);
    showError($("#chat-error"), "");
    input.value = "";
    this.addMessage("user", text);
    const answer = this.addMessage("assistant", "");
    answer.item.setAttribute("aria-busy", "true");
    const run = { sentAt: performance.now(), firstAt: null, endAt: null, usage: null, chunks: 0, finish: null,
                  stopped: false, text: "" };
    this.controller = new AbortController();
    this.setBusy(true);
    try {
      await this.stream(body, run, answer.textNode);
      this.history.push({ role: "user", content: text }, { role: "assistant", content: run.text });
    } catch (err) {
      if (err.name === "AbortError") run.stopped = true;
      else showError($("#chat-error"), err instanceof ApiError ? err.message : `The request failed: ${err.message}`);
    } finally {
      run.endAt = performance.now();
      answer.item.removeAttribute("aria-busy");
      answer.item.classList.toggle("stopped", run.stopped);
      answer.item.append(el("p", { class: "stats", text: statsText(run) }));
      this.controller = null;
      this.setBusy(false);
    }
  }

  async stream(body, run, textNode) {
    const response = await request("POST", "/v1/chat/completions", { body, signal: this.controller.signal });
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(502, chunk.error.message);
      if (chunk.usage) run.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.finish_reason) run.finish = choice.finish_reason;
      const delta = choice?.delta?.content;
      if (delta) {
        if (run.firstAt === null) run.firstAt = performance.now();
        run.chunks += 1;
        run.text += delta;
        textNode.textContent = run.text;
      }
    }
  }

  stop() {
    // Aborting the fetch closes the connection: the gateway cancels its upstream request, and the
    // server aborts the generation in its engine.
    this.controller?.abort();
  }

  clear() {
    this.stop();
    this.history = [];
    $("#chat-log").replaceChildren();
    this.renderSnippets();
  }

  setBusy(isBusy) {
    $("#chat-send").disabled = isBusy;
    $("#chat-stop").disabled = !isBusy;
    $("#chat-status").textContent = isBusy ? "Generating…" : "";
    if (!isBusy) $("#chat-input").focus();
  }
}
