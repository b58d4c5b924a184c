// Two pictures drawn as inline SVG by this script (no library): the sink profile's layer x head heatmaps, and
// the routed-expert counts of the last steered answer as bars per MoE layer.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Value in [0, 1] -> a colour from pale yellow to dark blue.
function colour(t) {
  const x = Math.min(1, Math.max(0, t));
  const r = Math.round(255 - 230 * x), g = Math.round(247 - 180 * x), b = Math.round(200 - 40 * x);
  return `rgb(${r},${g},${b})`;
}

// profile: the JSON `steerserve profile sinks` writes. One heatmap per statistic, layers down, heads across;
// heads flagged as sinks (row/column entropy) or dormant (key-0 mass) get an x.
export function sinkHeatmaps(profile) {
  const wrap = document.createElement("div");
  wrap.className = "heatmaps";
  const flagged = (list) => new Set(list || []);
  const panels = [
    ["key-0 mass", profile.key0_mass, flagged(profile.dormant_heads)],
    ["row entropy", profile.row_entropy, flagged(profile.sink_heads)],
    ["column entropy", profile.col_entropy, flagged(profile.sink_heads)],
  ];
  for (const [title, grid, marks] of panels) {
    if (!Array.isArray(grid)) continue;
    const cell = 14, left = 28, top = 30, layers = grid.length, heads = (grid[0] || []).length;
    const values = grid.flat();
    const lo = Math.min(...values), hi = Math.max(...values);
    const pic = svg("svg", { width: Math.max(left + heads * cell + 4, 220), height: top + layers * cell + 4, role: "img",
                             "aria-label": `${title} per layer and head`, class: "heatmap" });
    pic.append(svg("text", { x: left, y: 12, class: "title" }, `${title} (${lo.toFixed(2)}–${hi.toFixed(2)})`));
    for (let h = 0; h < heads; h++) pic.append(svg("text", { x: left + h * cell + 3, y: top - 4, class: "tick" }, h));
    grid.forEach((row, l) => {
      pic.append(svg("text", { x: 2, y: top + l * cell + 11, class: "tick" }, l));
      row.forEach((v, h) => {
        const rect = svg("rect", { x: left + h * cell, y: top + l * cell, width: cell - 1, height: cell - 1,
                                   fill: colour(hi > lo ? (v - lo) / (hi - lo) : 0), "data-head": `${l}.${h}` });
        rect.append(svg("title", {}, `layer ${l}, head ${h}: ${v.toFixed(3)}`));
        pic.append(rect);
        if (marks.has(`${l}.${h}`)) {
          pic.append(svg("text", { x: left + h * cell + 3, y: top + l * cell + 11, class: "mark" }, "x"));
        }
      });
    });
    wrap.append(pic);
  }
  return wrap;
}

// counts: {"<layer>": [count per expert]} from steering_stats.routed_experts; off: the experts switched off
// ("<layer>.<expert>"), drawn hollow.
export function expertBars(counts, off = []) {
  const wrap = document.createElement("div");
  wrap.className = "expert-bars";
  const offSet = new Set(off);
  for (const [layer, row] of Object.entries(counts)) {
    const width = 6, height = 60, max = Math.max(1, ...row);
    const pic = svg("svg", { width: row.length * width + 40, height: height + 18, role: "img",
                             "aria-label": `routed experts in layer ${layer}`, class: "bars" });
    pic.append(svg("text", { x: 0, y: 12, class: "tick" }, `L${layer}`));
    row.forEach((n, e) => {
      const h = Math.round((height * n) / max);
      const bar = svg("rect", { x: 36 + e * width, y: height + 14 - h, width: width - 1, height: Math.max(h, 1),
                                class: offSet.has(`${layer}.${e}`) ? "off" : "on", "data-expert": `${layer}.${e}`,
                                "data-count": n });
      bar.append(svg("title", {}, `layer ${layer}, expert ${e}: ${n}`));
      pic.append(bar);
    });
    wrap.append(pic);
  }
  return wrap;
}
