// The gateway's JSON routes, called with the signed-in key. The key lives in sessionStorage only:
// never in a URL, a cookie or localStorage, and it is sent only in the Authorization header.

const KEY_ITEM = "lmserve.console.key";
const ROLE_ITEM = "lmserve.console.role";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

export function currentSession() {
  const key = sessionStorage.getItem(KEY_ITEM);
  const role = sessionStorage.getItem(ROLE_ITEM);
  return key && (role === "user" || role === "admin") ? { key, role } : null;
}

export function saveSession(key, role) {
  sessionStorage.setItem(KEY_ITEM, key);
  sessionStorage.setItem(ROLE_ITEM, role);
}

export function clearSession() {
  sessionStorage.removeItem(KEY_ITEM);
  sessionStorage.removeItem(ROLE_ITEM);
}

/** The raw fetch Response of `method path` with the session's key (or `key`). */
export async function request(method, path, { key, body, signal } = {}) {
  const session = currentSession();
  const headers = { authorization: "Bearer " + (key ?? session?.key ?? "") };
  if (body !== undefined) headers["content-type"] = "application/json";
  return fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
}

/** The error message of a failed response: the OpenAI error body's, else the status. */
export async function errorMessage(response) {
  const data = await response.json().catch(() => null);
  return data?.error?.message || `HTTP ${response.status} ${response.statusText}`.trim();
}

/** The parsed JSON of `method path`; throws ApiError when the gateway refuses. */
export async function json(method, path, options = {}) {
  const response = await request(method, path, options);
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

/** Checks `key` for `role` against a route it may call; throws ApiError with a message a person can act on. */
export async function checkKey(key, role) {
  const path = role === "admin" ? "/admin/health" : "/v1/models";
  const response = await request("GET", path, { key });
  if (response.ok) return;
  const detail = await errorMessage(response);
  if (response.status === 401) {
    const what = role === "admin" ? "the admin key" : "a valid API key";
    throw new ApiError(401, `The gateway did not accept this key: it is not ${what} (${detail})`);
  }
  if (role === "admin" && response.status === 404) {
    throw new ApiError(404, "This gateway has no admin API (no admin key is configured).");
  }
  throw new ApiError(response.status, detail);
}

/** Yields the `data:` payloads of a server-sent event stream. */
export async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}
