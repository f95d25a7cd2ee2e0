// NoFlash ComfyUI extension: a live badge on every NoFlash node (active tier, peak VRAM), a "NoFlash" bottom-panel
// tab with the last runs, and the VRAM Probe's picture: one bar per component against the card's VRAM, a one-line
// verdict, and the full report on demand. Formatting lives in noflash_format.js, the chart layout in
// noflash_chart.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  COLORS,
  deviceLine,
  fitText,
  isEstimate,
  layoutChart,
  verdictStyle,
} from "./noflash_chart.js";
import {
  PANEL_COLUMNS,
  STATUS_EVENT,
  badgeColors,
  badgeText,
  isNoflashNode,
  panelRows,
  pushRun,
  rememberStatus,
  statusForNode,
} from "./noflash_format.js";

const state = { latest: null, byNode: {}, runs: [], panel: null };

// A pill drawn by LiteGraph's drawBadges(): it only needs height, getWidth(ctx) and draw(ctx, x, y).
class NoflashBadge {
  constructor(text, colors) {
    this.text = text;
    this.fg = colors.fg;
    this.bg = colors.bg;
    this.height = 20;
    this.fontSize = 12;
    this.padding = 6;
  }

  getWidth(ctx) {
    const font = ctx.font;
    ctx.font = `${this.fontSize}px sans-serif`;
    const width = ctx.measureText(this.text).width + 2 * this.padding;
    ctx.font = font;
    return width;
  }

  draw(ctx, x, y) {
    const width = this.getWidth(ctx);
    ctx.save();
    ctx.fillStyle = this.bg;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, width, this.height, 5);
    else ctx.rect(x, y, width, this.height);
    ctx.fill();
    ctx.font = `${this.fontSize}px sans-serif`;
    ctx.fillStyle = this.fg;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2 + 1);
    ctx.restore();
  }
}

function badgeFor(node) {
  const status = statusForNode(state.byNode, state.latest, node.id);
  return new NoflashBadge(badgeText(status), badgeColors(status));
}

function renderPanel() {
  const el = state.panel;
  if (!el) return;
  el.replaceChildren();
  el.style.cssText = "padding:6px 10px;overflow:auto;height:100%;font:12px sans-serif;";
  if (state.runs.length === 0) {
    el.textContent = "No NoFlash runs yet. Queue a workflow with a NoFlash Attention Patcher.";
    return;
  }
  const table = document.createElement("table");
  table.style.cssText = "border-collapse:collapse;width:100%;";
  const head = table.createTHead().insertRow();
  for (const name of PANEL_COLUMNS) {
    const th = document.createElement("th");
    th.textContent = name;
    th.style.cssText = "text-align:left;padding:2px 8px;border-bottom:1px solid #555;";
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const row of panelRows(state.runs)) {
    const tr = body.insertRow();
    for (const cell of row) {
      const td = tr.insertCell();
      td.textContent = cell;
      td.style.cssText = "padding:2px 8px;white-space:nowrap;";
    }
  }
  el.appendChild(table);
}

function onStatus(status) {
  if (!status || typeof status !== "object") return;
  state.latest = status;
  state.byNode = rememberStatus(state.byNode, status);
  state.runs = pushRun(state.runs, status, 10);
  renderPanel();
  app.graph?.setDirtyCanvas?.(true, true);
}

async function loadHistory() {
  try {
    const res = await api.fetchApi("/noflash/runs");
    if (!res.ok) return;
    const data = await res.json();
    for (const run of data.runs ?? []) {
      state.runs = pushRun(state.runs, run, 10);
      state.byNode = rememberStatus(state.byNode, run);
    }
    if (!state.latest && state.runs.length) state.latest = state.runs.at(-1);
    renderPanel();
  } catch (err) {
    console.debug("noflash: no run history", err);
  }
}

const ESTIMATE_KEY = "noflash_estimate";
const SHOW_REPORT_KEY = "noflash_show_report";
const MIN_WIDTH = 480;

function estimateOf(node) {
  const data = node.properties?.[ESTIMATE_KEY];
  return isEstimate(data) ? data : null;
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
  else ctx.rect(x, y, w, h);
}

// Draw the probe's picture with its top at y (a LiteGraph custom widget's draw()).
function drawChart(ctx, node, width, y) {
  const data = estimateOf(node);
  const show = !!node.properties?.[SHOW_REPORT_KEY];
  const lay = layoutChart(data, width, show);
  ctx.save();
  ctx.translate(0, y);
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  // Verdict pill and the device line.
  const style = verdictStyle(data?.verdict);
  roundRect(ctx, 8, 2, lay.width - 16, lay.pillHeight, 5);
  ctx.fillStyle = style.bg;
  ctx.fill();
  ctx.fillStyle = style.fg;
  ctx.font = "bold 12px sans-serif";
  lay.verdict.forEach((line, i) => ctx.fillText(`${i === 0 ? style.icon : " "} ${line}`, 14, 13 + i * 16));
  ctx.font = "11px sans-serif";
  ctx.fillStyle = COLORS.dim;
  const maxChars = Math.floor((lay.width - 20) / 5.8);
  ctx.fillText(fitText(data ? `${deviceLine(data)} \u00b7 ${data.title ?? ""}` : "", maxChars), 10, lay.deviceY);
  if (!data) {
    ctx.restore();
    return;
  }
  // Bars.
  ctx.font = "italic 10px sans-serif";
  ctx.fillStyle = COLORS.dim;
  for (const c of lay.captions) ctx.fillText(c.text, lay.labelX, c.y + 7);
  ctx.font = "11px sans-serif";
  const labelChars = Math.floor(lay.labelW / 5.8);
  for (const r of lay.rows) {
    const cy = r.y + 8;
    ctx.fillStyle = r.kind === "total" ? COLORS.text : COLORS.dim;
    ctx.textAlign = "left";
    ctx.fillText(fitText(r.label, labelChars), lay.labelX, cy);
    ctx.fillStyle = r.color;
    ctx.globalAlpha = r.kind === "total" ? 1 : 0.8;
    ctx.fillRect(r.x, r.y + 2, r.w, 12);
    ctx.globalAlpha = 1;
    if (r.over) {
      ctx.strokeStyle = COLORS.over;
      ctx.lineWidth = 2;
      ctx.strokeRect(r.x, r.y + 2, r.w, 12);
    }
    ctx.fillStyle = r.over ? COLORS.over : COLORS.text;
    ctx.fillText(`${r.clipped ? "\u00bb " : ""}${r.valueText}`, r.x + r.w + 4, cy);
  }
  // The card's VRAM.
  if (lay.vramX !== null) {
    ctx.strokeStyle = COLORS.vram;
    ctx.lineWidth = 1;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(lay.vramX + 0.5, lay.rows.length ? lay.rows[0].y - 4 : 40);
    ctx.lineTo(lay.vramX + 0.5, lay.barsBottom);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = COLORS.vram;
    ctx.textAlign = "center";
    ctx.fillText(`VRAM ${deviceLine(data).split(" \u00b7 ")[1] ?? ""}`, lay.vramX, lay.footerY + 6);
  }
  ctx.textAlign = "left";
  ctx.fillStyle = COLORS.comfy;
  ctx.fillRect(lay.labelX, lay.footerY + 2, 9, 9);
  ctx.fillStyle = COLORS.dim;
  ctx.fillText("ComfyUI's attention", lay.labelX + 13, lay.footerY + 7);
  ctx.fillStyle = COLORS.noflash;
  ctx.fillRect(lay.labelX + 128, lay.footerY + 2, 9, 9);
  ctx.fillStyle = COLORS.dim;
  ctx.fillText("noflash", lay.labelX + 141, lay.footerY + 7);
  // The full report, on demand.
  if (lay.report.length) {
    ctx.font = "10px monospace";
    ctx.fillStyle = COLORS.text;
    lay.report.forEach((line, i) => ctx.fillText(line, lay.labelX, lay.reportY + 6 + i * 12));
  }
  ctx.restore();
}

function chartHeight(node, width) {
  return layoutChart(estimateOf(node), width ?? node.size?.[0] ?? MIN_WIDTH, !!node.properties?.[SHOW_REPORT_KEY])
    .height;
}

// Record the node's new properties as a workflow change: the frontend then saves the workflow to the browser's
// storage (it does so on graph changes only), so the last estimate is there after a page reload.
function recordChange() {
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (err) {
    console.debug("noflash: could not record the probe's estimate as a workflow change", err);
  }
}

function fitNode(node) {
  const needed = node.computeSize?.() ?? node.size;
  let width = Math.max(node.size[0], MIN_WIDTH);
  if (node.properties?.[SHOW_REPORT_KEY] && estimateOf(node)?.text) {
    const longest = Math.max(...String(estimateOf(node).text).split("\n").map((l) => l.length));
    width = Math.max(width, Math.min(1400, 20 + longest * 6.1));
  }
  node.setSize?.([width, needed[1]]);
  app.graph?.setDirtyCanvas?.(true, true);
}

function setupProbe(node) {
  node.properties = node.properties ?? {};
  const chart = {
    name: "noflash_chart",
    type: "noflash_chart",
    value: null,
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      drawChart(ctx, n, width, y);
    },
    computeSize(width) {
      return [width ?? node.size[0], chartHeight(node, width)];
    },
  };
  node.addCustomWidget(chart);
  const button = node.addWidget("button", "show full report", null, () => {
    node.properties[SHOW_REPORT_KEY] = !node.properties[SHOW_REPORT_KEY];
    button.name = node.properties[SHOW_REPORT_KEY] ? "hide full report" : "show full report";
    button.label = button.name;
    fitNode(node);
    recordChange();
  });
  button.serialize = false;
  button.options = { ...(button.options ?? {}), serialize: false };

  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const data = output?.[ESTIMATE_KEY]?.[0];
    if (data) {
      this.properties[ESTIMATE_KEY] = data; // saved with the workflow: the picture survives a reload
      fitNode(this);
      recordChange();
    }
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    onConfigure?.apply(this, arguments);
    const show = !!this.properties?.[SHOW_REPORT_KEY];
    button.name = show ? "hide full report" : "show full report";
    button.label = button.name;
    requestAnimationFrame(() => fitNode(this));
  };
  requestAnimationFrame(() => fitNode(node));
}

app.registerExtension({
  name: "noflash.status",

  bottomPanelTabs: [
    {
      id: "noflash-runs",
      title: "NoFlash",
      type: "custom",
      render: (el) => {
        state.panel = el;
        renderPanel();
      },
      destroy: () => {
        state.panel = null;
      },
    },
  ],

  async setup() {
    api.addEventListener(STATUS_EVENT, (event) => onStatus(event.detail));
    await loadHistory();
  },

  nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (!isNoflashNode(type)) return;
    node.badges = node.badges ?? [];
    node.badges.push(() => badgeFor(node));
    if (type === "NoFlashVRAMProbe") setupProbe(node);
  },
});
