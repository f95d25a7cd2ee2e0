// The VRAM Probe's picture as pure layout: no DOM, no ComfyUI imports (tested with node --test). noflash.js draws it.
//
// The data is what the node sends as ui.noflash_estimate[0] (noflash_core/vram/report.py, chart()):
// { version, title, device: {key, description, kind, simulated, note}, vram_bytes, verdict: "fits"|"noflash"|"no"|null,
//   verdict_text, advice, precision, components: [{name, label, bytes, kind: "part"|"total", phase, path, fits, detail}],
//   text }

import { formatBytes } from "./noflash_format.js";

export const CHART = Object.freeze({
  pad: 10,
  verdictLineHeight: 16,
  verdictCharWidth: 6.7,
  subtitleLineHeight: 14,
  smallCharWidth: 5.8, // 11px sans-serif, generous: device line, labels
  valueCharWidth: 6.2, // 11px sans-serif digits and units
  hintLineHeight: 15,
  captionHeight: 16,
  rowHeight: 17,
  groupGap: 8,
  footerHeight: 18,
  reportLineHeight: 12,
  labelShare: 0.44,
  maxOverVram: 1.6, // the scale never reaches past 1.6x the card's VRAM: longer bars are clipped and marked
});

export const COLORS = Object.freeze({
  comfy: "#d9822b",
  noflash: "#2f80ed",
  part: "#7d8590",
  vram: "#e5e5e5",
  over: "#e5484d",
  text: "#dddddd",
  dim: "#9aa0a6",
});

const VERDICTS = {
  fits: { bg: "#1f7a4d", fg: "#ffffff", icon: "\u2714" },
  noflash: { bg: "#b7791f", fg: "#ffffff", icon: "\u25b2" },
  no: { bg: "#b42318", fg: "#ffffff", icon: "\u2716" },
};

export function verdictStyle(verdict) {
  return VERDICTS[verdict] ?? { bg: "#4a4f57", fg: "#e0e0e0", icon: "?" };
}

export function isEstimate(data) {
  return !!data && typeof data === "object" && Array.isArray(data.components);
}

// The bars in display order: the denoise parts, then each phase's two totals (ComfyUI's attention, noflash).
export function chartRows(data) {
  if (!isEstimate(data)) return [];
  const parts = data.components.filter((c) => c.kind !== "total");
  const totals = data.components.filter((c) => c.kind === "total");
  const rows = parts.map((c) => ({ ...c, group: "part" }));
  let lastPhase = null;
  for (const c of totals) {
    rows.push({ ...c, group: "total", gapBefore: c.phase !== lastPhase });
    lastPhase = c.phase;
  }
  return rows;
}

export function barColor(row) {
  if (row.path === "comfy") return COLORS.comfy;
  if (row.path === "noflash") return COLORS.noflash;
  return COLORS.part;
}

// The byte value at the right end of the bar area.
export function chartScale(data) {
  const rows = chartRows(data);
  const biggest = Math.max(1, ...rows.map((r) => r.bytes || 0));
  const vram = data?.vram_bytes;
  if (!vram) return biggest * 1.05;
  return Math.max(vram * 1.12, Math.min(biggest * 1.05, vram * CHART.maxOverVram));
}

// Words of `text` in at most `maxLines` lines of `maxChars` characters (the last one cut with an ellipsis).
export function wrapText(text, maxChars, maxLines = 2) {
  const words = String(text ?? "").split(/\s+/).filter(Boolean);
  const lines = [];
  let line = "";
  for (const word of words) {
    const next = line ? `${line} ${word}` : word;
    if (next.length <= maxChars || !line) {
      line = next;
    } else {
      lines.push(line);
      line = word;
    }
  }
  if (line) lines.push(line);
  if (lines.length <= maxLines) return lines.map((l) => fitText(l, maxChars));
  const kept = lines.slice(0, maxLines);
  kept[maxLines - 1] = fitText(`${kept[maxLines - 1]} ${lines.slice(maxLines).join(" ")}`, maxChars);
  return kept;
}

// Where a bar's value label goes: after the bar, unless it would cross the VRAM line (then just past the line), or
// run off the chart (then inside the bar's end, drawn light on the bar).
export function placeValue(row, vramX, width, textW) {
  const after = row.x + row.w + 4;
  const right = width - 4;
  let x = after;
  if (vramX !== null && vramX >= after - 3 && vramX <= after + textW + 3) x = vramX + 5;
  if (x + textW > right) return { valueX: Math.max(row.x + 2, row.x + row.w - 4 - textW), valueInside: true };
  return { valueX: x, valueInside: false };
}

const EMPTY_HINT = "Pick a model family (or connect a MODEL), choose the card in \u201cdevice\u201d and queue: " +
  "one bar per part of the run appears here, against the card's VRAM.";

function barRows(data, rows, geometry, y0) {
  const { x0, barArea, scale } = geometry;
  const out = [];
  const captions = [];
  let y = y0;
  for (const r of rows) {
    if (r.gapBefore) y += CHART.groupGap;
    if (r.group === "total" && !captions.length) {
      captions.push({ text: "peak per phase, weights included", y });
      y += CHART.captionHeight;
    }
    const frac = (r.bytes || 0) / scale;
    const clipped = frac > 1;
    out.push({
      label: r.label, name: r.name, y, x: x0,
      w: Math.max(1, Math.round(Math.min(1, frac) * barArea)),
      clipped, color: barColor(r), valueText: `${clipped ? "\u00bb " : ""}${formatBytes(r.bytes)}`,
      over: data.vram_bytes ? r.kind === "total" && r.bytes > data.vram_bytes : false,
      kind: r.kind, fits: r.fits,
    });
    y += CHART.rowHeight;
  }
  return { rows: out, captions, bottom: y };
}

// Geometry for a node `width` pixels wide. Report lines are laid out only when showReport is set. Without bars
// (no estimate yet, or nothing to estimate from) the layout is the empty state: the verdict pill and a hint.
export function layoutChart(data, width, showReport = false) {
  const w = Math.max(200, width || 0);
  const rows = chartRows(data);
  const labelW = Math.round((w - 2 * CHART.pad) * CHART.labelShare);
  const x0 = CHART.pad + labelW + 6;
  const barArea = Math.max(40, w - CHART.pad - x0 - 62);
  const scale = chartScale(data);
  const verdict = wrapText(verdictLine(data), Math.floor((w - 40) / CHART.verdictCharWidth), 2);
  const pillHeight = 8 + verdict.length * CHART.verdictLineHeight;
  const subtitle = wrapText(subtitleLine(data), Math.floor((w - 2 * CHART.pad) / CHART.smallCharWidth), 2);
  const deviceY = pillHeight + 12;
  const top = deviceY + subtitle.length * CHART.subtitleLineHeight + (subtitle.length ? 0 : -8);
  const report = showReport && data?.text ? String(data.text).split("\n") : [];
  const base = { width: w, labelX: CHART.pad, labelW, barX: x0, barArea, scale, verdict, pillHeight, deviceY,
                 subtitle, report };
  if (!rows.length) {
    const hint = wrapText(EMPTY_HINT, Math.floor((w - 2 * CHART.pad) / CHART.smallCharWidth), 3);
    const hintY = top + 6;
    const y = hintY + hint.length * CHART.hintLineHeight + 4;
    const height = y + report.length * CHART.reportLineHeight + (report.length ? CHART.pad : 0);
    return { ...base, empty: true, hint, hintY, rows: [], captions: [], vramX: null, barsBottom: y, footerY: null,
             reportY: y, height };
  }
  const bars = barRows(data, rows, { x0, barArea, scale }, top);
  const vramX = data?.vram_bytes ? x0 + Math.round((data.vram_bytes / scale) * barArea) : null;
  for (const r of bars.rows) Object.assign(r, placeValue(r, vramX, w, r.valueText.length * CHART.valueCharWidth));
  const y = bars.bottom + CHART.footerHeight;
  const height = y + report.length * CHART.reportLineHeight + (report.length ? CHART.pad : 0);
  return { ...base, empty: false, hint: [], rows: bars.rows, captions: bars.captions, vramX, barsBottom: bars.bottom,
           footerY: bars.bottom + 4, reportY: y, height };
}

// The line under the verdict: the card and the run ("gfx1030 · 16.0 GiB · profile, simulated · Wan 2.2 ..."); only
// the parts there are, so no stray separator.
export function subtitleLine(data) {
  return [deviceLine(data), isEstimate(data) ? data.title : ""].filter(Boolean).join(" \u00b7 ");
}

// The one-line verdict shown at the top (the full advice is in the report).
export function verdictLine(data) {
  if (!isEstimate(data)) return "VRAM Probe: queue the workflow to get an estimate";
  return data.verdict_text || "no verdict";
}

export function deviceLine(data) {
  if (!isEstimate(data) || !data.device) return "";
  const d = data.device;
  const mem = data.vram_bytes ? formatBytes(data.vram_bytes) : "memory unknown";
  const how = d.simulated ? "profile, simulated" : "this machine";
  return `${d.key} \u00b7 ${mem} \u00b7 ${how}`;
}

// Middle-truncate text to `max` characters.
export function fitText(text, max) {
  const s = String(text ?? "");
  if (s.length <= max) return s;
  if (max <= 1) return s.slice(0, max);
  return s.slice(0, max - 1) + "\u2026";
}
