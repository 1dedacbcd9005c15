// Entry point: sign-in, the navigation between views, and which views each role sees.
import { checkKey, clearSession, currentSession, saveSession } from "./api.js";
import { $, showError } from "./dom.js";
import { ChatView } from "./chat.js";
import { StatusView } from "./status.js";
import { KeysView, UsageView } from "./admin.js";
import { BatchesView } from "./batches.js";

const VIEWS = { user: ["chat", "batches"], admin: ["status", "keys", "usage", "batches"] };
const controllers = {};

function showView(name) {
  for (const section of document.querySelectorAll("main > section.view")) {
    section.hidden = section.id !== `view-${name}`;
  }
  for (const button of document.querySelectorAll("#nav button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const [viewName, controller] of Object.entries(controllers)) {
    if (viewName === name) controller.show();
    else controller.hide();
  }
}

function signedIn(session) {
  const allowed = VIEWS[session.role];
  for (const button of document.querySelectorAll("#nav button")) {
    button.hidden = !allowed.includes(button.dataset.view);
  }
  $("#nav").hidden = false;
  $("#sign-out").hidden = false;
  $("#whoami").textContent = session.role === "admin" ? "Administrator" : "API key user";
  if (!Object.keys(controllers).length) {
    controllers.chat = new ChatView();
    controllers.status = new StatusView();
    controllers.keys = new KeysView();
    controllers.usage = new UsageView();
    controllers.batches = new BatchesView();
  }
  showView(allowed[0]);
}

function signedOut() {
  // Nothing one key saw stays on the page for the next one.
  for (const controller of Object.values(controllers)) controller.reset();
  $("#nav").hidden = true;
  $("#sign-out").hidden = true;
  $("#whoami").textContent = "";
  showView("signin");
  $("#signin-key").focus();
}

async function onSignIn(event) {
  event.preventDefault();
  const input = $("#signin-key");
  const key = input.value.trim();
  const role = $("#signin-role-admin").checked ? "admin" : "user";
  const error = $("#signin-error");
  if (!key) {
    showError(error, "Enter a key.");
    input.focus();
    return;
  }
  const submit = $("#signin-submit");
  submit.disabled = true;
  showError(error, "");
  try {
    await checkKey(key, role);
  } catch (err) {
    showError(error, err.message || String(err));
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  } finally {
    submit.disabled = false;
  }
  input.value = "";
  input.removeAttribute("aria-invalid");
  saveSession(key, role);
  signedIn(currentSession());
}

function start() {
  $("#signin-form").addEventListener("submit", onSignIn);
  $("#sign-out").addEventListener("click", () => {
    clearSession();
    signedOut();
  });
  for (const button of document.querySelectorAll("#nav button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  const session = currentSession();
  if (session) signedIn(session);
  else signedOut();
}

start();
