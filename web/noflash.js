// NoFlash ComfyUI extension: a live badge on the NoFlash nodes that produced a run in the graph shown (attention
// tier and peak VRAM; the FFN Chunker's chunks; the CLIP/VAE Patchers' last encode/decode), a "NoFlash" bottom-panel
// tab with the last runs, and the VRAM Probe's picture: one bar per component against the card's VRAM, a one-line
// verdict, and the full report on demand (and to copy). Formatting and status keying live in noflash_format.js, the
// chart layout in noflash_chart.js.
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
  emptyStore,
  isProducerNode,
  panelRows,
  pushRun,
  rememberPrompt,
  rememberStatus,
  statusForNode,
} from "./noflash_format.js";

const state = { store: emptyStore(), runs: [], panel: null };

// Drawn where a node has no status: LiteGraph's drawBadges() needs an object, so an invisible one.
const NO_BADGE = Object.freeze({ text: "", height: 0, getWidth: () => 0, draw() {} });

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

// The id of the (root) graph a node is in: LGraph.id, which the frontend also sends with each queued prompt.
function graphIdOf(node) {
  const graph = node?.graph ?? app.graph;
  return graph?.rootGraph?.id ?? graph?.id ?? app.graph?.id ?? null;
}

function badgeFor(node) {
  const status = statusForNode(state.store, graphIdOf(node), node.id);
  const text = badgeText(status);
  return text ? new NoflashBadge(text, badgeColors(status)) : NO_BADGE;
}

// Remember which graph each prompt this page queues came from (the server also reads it from the prompt's
// workflow; this covers a prompt whose workflow carries no id).
function trackQueuedPrompts() {
  const original = api.queuePrompt;
  if (typeof original !== "function" || original.noflashTracked) return;
  const tracked = async function (number, data, ...rest) {
    const graphId = data?.workflow?.id ?? app.graph?.id ?? null;
    const res = await original.call(this, number, data, ...rest);
    if (res?.prompt_id && graphId) state.store = rememberPrompt(state.store, res.prompt_id, graphId);
    return res;
  };
  tracked.noflashTracked = true;
  api.queuePrompt = tracked;
}

function renderPanel() {
  const el = state.panel;
  if (!el) return;
  el.replaceChildren();
  el.style.cssText = "padding:6px 10px;overflow:auto;height:100%;font:12px sans-serif;";
  if (state.runs.length === 0) {
    el.textContent = "No NoFlash runs yet. Queue a workflow with a NoFlash Attention Patcher, FFN Chunker, " +
      "CLIP Patcher or VAE Patcher.";
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
  state.store = rememberStatus(state.store, status);
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
      state.store = rememberStatus(state.store, run);
    }
    renderPanel();
  } catch (err) {
    console.debug("noflash: no run history", err);
  }
}

const ESTIMATE_KEY = "noflash_estimate";
const SHOW_REPORT_KEY = "noflash_show_report";
const SIZE_BEFORE_REPORT_KEY = "noflash_size_before_report";
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

function drawLegend(ctx, data, lay) {
  if (lay.vramX !== null) {
    ctx.strokeStyle = COLORS.vram;
    ctx.lineWidth = 1;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(lay.vramX + 0.5, lay.rows[0].y - 4);
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
}

function drawBars(ctx, lay) {
  ctx.font = "italic 10px sans-serif";
  ctx.fillStyle = COLORS.dim;
  for (const c of lay.captions) ctx.fillText(c.text, lay.labelX, c.y + 7);
  ctx.font = "11px sans-serif";
  const labelChars = Math.floor(lay.labelW / 5.8);
  for (const r of lay.rows) {
    const cy = r.y + 8;
    ctx.fillStyle = r.kind === "total" ? COLORS.text : COLORS.dim;
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
    ctx.fillStyle = r.valueInside ? "#ffffff" : r.over ? COLORS.over : COLORS.text;
    ctx.fillText(r.valueText, r.valueX, cy);
  }
}

// Draw the probe's picture with its top at y (a LiteGraph custom widget's draw()).
function drawChart(ctx, node, width, y) {
  const data = estimateOf(node);
  const lay = layoutChart(data, width, !!node.properties?.[SHOW_REPORT_KEY]);
  ctx.save();
  ctx.translate(0, y);
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  // Verdict pill, the device and run lines.
  const style = verdictStyle(data?.verdict);
  roundRect(ctx, 8, 2, lay.width - 16, lay.pillHeight, 5);
  ctx.fillStyle = style.bg;
  ctx.fill();
  ctx.fillStyle = style.fg;
  ctx.font = "bold 12px sans-serif";
  lay.verdict.forEach((line, i) => ctx.fillText(`${i === 0 ? style.icon : " "} ${line}`, 14, 13 + i * 16));
  ctx.font = "11px sans-serif";
  ctx.fillStyle = COLORS.dim;
  lay.subtitle.forEach((line, i) => ctx.fillText(line, 10, lay.deviceY + i * 14));
  if (lay.empty) {
    ctx.fillStyle = COLORS.text;
    lay.hint.forEach((line, i) => ctx.fillText(line, 10, lay.hintY + 7 + i * 15));
  } else {
    drawBars(ctx, lay);
    drawLegend(ctx, data, lay);
  }
  if (lay.report.length) {
    ctx.font = "10px monospace";
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "left";
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

// The node's height for its widgets at its width; the width only grows (to MIN_WIDTH, and to the report's longest
// line while the report shows). Hiding the report puts back the size the node had before it was shown.
function fitNode(node) {
  let width = Math.max(node.size[0], MIN_WIDTH);
  const text = estimateOf(node)?.text;
  if (node.properties?.[SHOW_REPORT_KEY] && text) {
    const longest = Math.max(...String(text).split("\n").map((l) => l.length));
    width = Math.max(width, Math.min(1400, 20 + longest * 6.1));
  }
  node.setSize?.([width, node.size[1]]); // the chart lays itself out at the node's width
  const needed = node.computeSize?.() ?? node.size;
  node.setSize?.([width, needed[1]]);
  app.graph?.setDirtyCanvas?.(true, true);
}

function toggleReport(node, button) {
  const show = !node.properties[SHOW_REPORT_KEY];
  if (show) node.properties[SIZE_BEFORE_REPORT_KEY] = [...node.size];
  node.properties[SHOW_REPORT_KEY] = show;
  button.name = show ? "hide full report" : "show full report";
  button.label = button.name;
  const before = node.properties[SIZE_BEFORE_REPORT_KEY];
  const restore = !show && Array.isArray(before) && before.length === 2;
  if (restore) {
    delete node.properties[SIZE_BEFORE_REPORT_KEY];
    node.setSize?.([before[0], before[1]]);
  }
  fitNode(node);
  if (restore && before[1] > node.size[1]) node.setSize?.([node.size[0], before[1]]);
  recordChange();
}

// Copy text to the clipboard: the async Clipboard API where the page may use it, else a selected textarea and
// execCommand("copy") (plain http on another host, older browsers). Resolves to the way that worked, or null.
async function copyText(text) {
  try {
    if (navigator.clipboard?.writeText) {
      await navigator.clipboard.writeText(text);
      return "clipboard";
    }
  } catch (err) {
    console.debug("noflash: clipboard API refused, trying the fallback", err);
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.cssText = "position:fixed;left:-9999px;top:0;opacity:0;";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch (err) {
    console.debug("noflash: execCommand copy failed", err);
  }
  area.remove();
  return ok ? "execCommand" : null;
}

function toast(severity, summary, detail) {
  try {
    app.extensionManager?.toast?.add?.({ severity, summary, detail, life: 2500 });
  } catch (err) {
    console.debug("noflash:", summary, detail, err);
  }
}

async function copyReport(node) {
  const text = estimateOf(node)?.text;
  if (!text) {
    toast("warn", "NoFlash VRAM Probe", "No report yet: queue the probe first.");
    return null;
  }
  const how = await copyText(text);
  node.noflashLastCopy = how ? text : null; // for tests and other extensions
  if (how) toast("success", "NoFlash VRAM Probe", "Report copied to the clipboard.");
  else toast("error", "NoFlash VRAM Probe", "The browser refused the copy; use the node's report output.");
  return how;
}

function addButton(node, name, callback) {
  const button = node.addWidget("button", name, null, callback);
  button.serialize = false;
  button.options = { ...(button.options ?? {}), serialize: false };
  return button;
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
    computeSize() {
      // LiteGraph asks with its minimum width; the chart is drawn (and wraps) at the node's width.
      const width = Math.max(node.size?.[0] ?? MIN_WIDTH, MIN_WIDTH);
      return [width, chartHeight(node, width)];
    },
  };
  node.addCustomWidget(chart);
  const button = addButton(node, "show full report", () => toggleReport(node, button));
  addButton(node, "copy report", () => copyReport(node));

  const getExtraMenuOptions = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const result = getExtraMenuOptions?.apply(this, arguments);
    options?.push?.({ content: "Copy NoFlash report", callback: () => copyReport(node) });
    return result;
  };

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
    trackQueuedPrompts();
    await loadHistory();
  },

  nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (isProducerNode(type)) {
      node.badges = node.badges ?? [];
      node.badges.push(() => badgeFor(node));
    }
    if (type === "NoFlashVRAMProbe") setupProbe(node);
  },
});
