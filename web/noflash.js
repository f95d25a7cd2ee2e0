// NoFlash ComfyUI extension: a live badge on every NoFlash node (active tier, peak VRAM), a "NoFlash" bottom-panel
// tab with the last runs, and the VRAM Probe's report shown on its node. Formatting lives in noflash_format.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
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

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === "noflash_report");
  if (!widget) {
    widget = ComfyWidgets.STRING(node, "noflash_report", ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the saved workflow's widgets_values
    widget.options = { ...(widget.options ?? {}), serialize: false }; // not in the prompt
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = text;
  // Grow the node to fit the new widget, never shrink what the user (or the workflow) sized.
  const needed = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size[0], needed[0]), Math.max(node.size[1], needed[1])]);
  app.graph?.setDirtyCanvas?.(true, true);
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
    if (type === "NoFlashVRAMProbe") {
      const onExecuted = node.onExecuted;
      node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const text = output?.text;
        if (text) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
      };
    }
  },
});
