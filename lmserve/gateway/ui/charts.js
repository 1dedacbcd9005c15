// Small SVG charts drawn with DOM calls (no library, no inline style: the page's CSP allows neither).
const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attributes = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

/**
 * A sparkline of `values` (null: no data at that point) in a <figure> whose caption says the label and
 * the latest value, and whose SVG has a text alternative for screen readers.
 */
export function sparkline(label, values, format) {
  const width = 160, height = 40, pad = 2;
  const known = values.filter((v) => v !== null && v !== undefined);
  const latest = known.length ? known[known.length - 1] : null;
  const max = Math.max(...known, 0) || 1;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img",
    "aria-label": `${label}: ${latest === null ? "no data" : format(latest)} now, peak ${known.length ? format(max) : "–"}` });
  svg.append(svgEl("line", { x1: 0, y1: height - pad, x2: width, y2: height - pad, class: "axis" }));
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const has = (i) => i >= 0 && i < values.length && values[i] !== null && values[i] !== undefined;
  let path = "";
  values.forEach((value, i) => {
    if (!has(i)) return;
    const x = (i * step).toFixed(1);
    const y = (height - pad - (value / max) * (height - 2 * pad)).toFixed(1);
    path += `${has(i - 1) ? "L" : "M"}${x},${y}`;
    // A point with no neighbour draws no line: a dot shows it.
    if (!has(i - 1) && !has(i + 1)) svg.append(svgEl("circle", { cx: x, cy: y, r: 1.8, class: "dot" }));
  });
  if (path) svg.append(svgEl("path", { d: path, class: "line" }));
  const caption = document.createElement("figcaption");
  caption.textContent = `${label}: ${latest === null ? "–" : format(latest)}`;
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.append(caption, svg);
  return figure;
}

/** Horizontal stacked bars: `rows` of {label, parts: [{name, value}]}, one colour class per part. */
export function stackedBars(title, rows, partNames) {
  const barHeight = 22, gap = 8, labelWidth = 0, width = 600;
  const total = (row) => row.parts.reduce((sum, p) => sum + p.value, 0);
  const max = Math.max(...rows.map(total), 1);
  const height = rows.length * (barHeight * 2 + gap) + 4;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, class: "bars", role: "img",
    "aria-label": `${title}: ` + rows.map((r) => `${r.label} ${total(r)}`).join("; ") });
  rows.forEach((row, i) => {
    const y = i * (barHeight * 2 + gap);
    const label = svgEl("text", { x: 0, y: y + barHeight - 6, class: "bar-label" });
    label.textContent = `${row.label} (${total(row).toLocaleString("en-US")})`;
    svg.append(label);
    let x = labelWidth;
    row.parts.forEach((part, j) => {
      const w = (part.value / max) * (width - labelWidth);
      if (w > 0) {
        const rect = svgEl("rect", { x: x.toFixed(1), y: y + barHeight, width: w.toFixed(1), height: barHeight - 4, class: `part-${j}` });
        const tip = svgEl("title");
        tip.textContent = `${part.name}: ${part.value.toLocaleString("en-US")}`;
        rect.append(tip);
        svg.append(rect);
      }
      x += w;
    });
  });
  const legend = document.createElement("p");
  legend.className = "legend";
  partNames.forEach((name, j) => {
    const swatch = document.createElement("span");
    swatch.className = `swatch part-${j}`;
    swatch.setAttribute("aria-hidden", "true");
    legend.append(swatch, ` ${name} `);
  });
  const figure = document.createElement("figure");
  figure.className = "chart wide";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, svg, legend);
  return figure;
}
