// Small DOM helpers: every text goes in through textContent (never innerHTML), so nothing a model
// or a key name contains can run as script.

export const $ = (selector, root = document) => root.querySelector(selector);

/** Creates `tag` with attributes (class, data-*, aria-*, ...) and children (nodes or strings). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

export function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

export function formatNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** A number input's value, or undefined when empty. */
export function numberValue(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}
