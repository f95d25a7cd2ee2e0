import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  CHART,
  COLORS,
  barColor,
  chartRows,
  chartScale,
  deviceLine,
  fitText,
  isEstimate,
  layoutChart,
  placeValue,
  subtitleLine,
  verdictLine,
  verdictStyle,
  wrapText,
} from "../noflash_chart.js";
import { formatBytes } from "../noflash_format.js";

// Real estimates: estimate_run(...).to_chart() (noflash_core/vram/report.py), what the VRAM Probe sends. Regenerate
// with `python -m tests.support.chart_fixtures`; tests/test_chart_fixtures.py fails when one is stale.
const fixture = (name) => JSON.parse(readFileSync(new URL(`./fixtures/${name}`, import.meta.url)));
const flux = fixture("flux_1536_gfx1010.json");
const wanArc = fixture("wan22_5b_arc.json");

test("rows: the denoise parts, then two totals per phase", () => {
  const rows = chartRows(flux);
  const names = rows.map((r) => r.name);
  assert.deepEqual(names.slice(0, 5), ["weights", "activations", "attention_comfy", "attention_noflash", "ffn"]);
  assert.deepEqual(names.slice(5), ["denoise_comfy", "denoise_noflash", "text_comfy", "text_noflash", "vae_comfy",
    "vae_noflash"]);
  assert.equal(rows.filter((r) => r.gapBefore).length, 3);
  assert.equal(barColor(rows[2]), COLORS.comfy);
  assert.equal(barColor(rows[3]), COLORS.noflash);
  assert.equal(barColor(rows[0]), COLORS.part);
});

test("scale: the VRAM line is inside the chart, huge bars are clipped", () => {
  const lay = layoutChart(wanArc, 480);
  assert.ok(lay.vramX > lay.barX && lay.vramX < lay.barX + lay.barArea);
  const comfyAttention = lay.rows.find((r) => r.name === "attention_comfy");
  assert.ok(comfyAttention.clipped, "66.8 GiB of math SDPA on a 16 GiB card is clipped");
  assert.equal(comfyAttention.w, lay.barArea);
  const denoiseComfy = lay.rows.find((r) => r.name === "denoise_comfy");
  assert.ok(denoiseComfy.over);
  assert.ok(!lay.rows.find((r) => r.name === "denoise_noflash").over);
  assert.ok(chartScale(wanArc) <= wanArc.vram_bytes * CHART.maxOverVram + 1);
});

const WIDTHS = [300, 480, 640, 900];
const byName = (data, name) => data.components.find((c) => c.name === name);

test("bars are proportional to bytes, past the scale they are clipped", () => {
  for (const data of [flux, wanArc]) {
    for (const width of WIDTHS) {
      const lay = layoutChart(data, width);
      assert.equal(lay.rows.length, data.components.length);
      for (const r of lay.rows) {
        const bytes = byName(data, r.name).bytes;
        const exact = (bytes / lay.scale) * lay.barArea;
        assert.equal(r.x, lay.barX);
        if (bytes > lay.scale) {
          assert.ok(r.clipped && r.w === lay.barArea, `${r.name} at ${width}px`);
        } else {
          const drawn = `${r.name} at ${width}px: ${r.w} px for ${exact.toFixed(2)}`;
          assert.ok(!r.clipped && Math.abs(r.w - Math.max(1, exact)) <= 0.5, drawn);
        }
      }
    }
  }
  // A ratio drawn is the ratio of the bytes (to 1 px): Flux's sub-quadratic attention vs noflash's.
  const lay = layoutChart(flux, 900);
  const [comfy, noflash] = ["attention_comfy", "attention_noflash"].map((n) => lay.rows.find((r) => r.name === n));
  const ratio = byName(flux, "attention_comfy").bytes / byName(flux, "attention_noflash").bytes;
  assert.ok(Math.abs(comfy.w / noflash.w - ratio) <= ratio / noflash.w, `${comfy.w}/${noflash.w} vs ${ratio}`);
});

test("the VRAM line is at the card's memory; the bars past it are the totals that do not fit", () => {
  for (const data of [flux, wanArc]) {
    for (const width of WIDTHS) {
      const lay = layoutChart(data, width);
      assert.ok(Math.abs(lay.vramX - lay.barX - (data.vram_bytes / lay.scale) * lay.barArea) <= 0.5);
      for (const r of lay.rows) {
        const c = byName(data, r.name);
        assert.equal(r.over, c.kind === "total" && c.bytes > data.vram_bytes, r.name);
        if (c.kind === "total") assert.equal(r.over, !c.fits, `${r.name}: the estimator's verdict and the bar agree`);
        if (Math.abs(c.bytes - data.vram_bytes) / lay.scale * lay.barArea > 1) {
          assert.equal(r.x + r.w > lay.vramX, c.bytes > data.vram_bytes, `${r.name} at ${width}px`);
        }
      }
    }
  }
  assert.equal(wanArc.vram_bytes, 16 * 2 ** 30);
  assert.equal(flux.vram_bytes, 8 * 2 ** 30);
  assert.ok(layoutChart(wanArc, 480).rows.find((r) => r.name === "denoise_comfy").over);
});

test("value labels are the bytes formatted, the same text as the estimator's report", () => {
  for (const data of [flux, wanArc]) {
    const lay = layoutChart(data, 480);
    for (const r of lay.rows) {
      const c = byName(data, r.name);
      assert.equal(r.valueText, (r.clipped ? "\u00bb " : "") + formatBytes(c.bytes));
      if (c.label.includes("(streamed)")) continue; // one block of streamed weights; the report gives the file size
      assert.ok(data.text.includes(formatBytes(c.bytes)), `${r.name}: ${formatBytes(c.bytes)} is not in the report`);
    }
    assert.ok(deviceLine(data).includes(formatBytes(data.vram_bytes)));
    assert.ok(data.verdict_text.includes(formatBytes(data.vram_bytes)));
  }
  const denoise = (data, path) => formatBytes(byName(data, `denoise_${path}`).bytes);
  assert.ok(wanArc.advice.includes(`denoise ${denoise(wanArc, "comfy")} -> ${denoise(wanArc, "noflash")}`));
  assert.ok(flux.verdict_text.endsWith(`(largest: VAE decode, ${formatBytes(byName(flux, "vae_comfy").bytes)})`));
  assert.equal(formatBytes(byName(wanArc, "attention_comfy").bytes), "66.8 GiB"); // ComfyUI's math SDPA, 27,280 tokens
});

test("verdict and device lines", () => {
  assert.equal(verdictStyle(wanArc.verdict).icon, "\u25b2");
  assert.match(verdictLine(wanArc), /only with noflash/);
  assert.equal(deviceLine(wanArc), "arc \u00b7 16.0 GiB \u00b7 profile, simulated");
  assert.equal(verdictStyle(null).icon, "?");
  assert.match(verdictLine(null), /queue the workflow/);
});

test("the full report is laid out only on demand", () => {
  const closed = layoutChart(flux, 480, false);
  const open = layoutChart(flux, 480, true);
  assert.equal(closed.report.length, 0);
  assert.ok(open.report.length > 20 && open.height > closed.height + 20 * CHART.reportLineHeight);
  assert.ok(open.report.some((l) => l.startsWith("VERDICT:")));
});

test("no estimate yet", () => {
  assert.equal(isEstimate(null), false);
  assert.equal(isEstimate({ components: [] }), true);
  const lay = layoutChart(null, 300);
  assert.equal(lay.rows.length, 0);
  assert.equal(lay.vramX, null);
});

test("fitText", () => {
  assert.equal(fitText("abcdef", 10), "abcdef");
  assert.equal(fitText("abcdef", 4), "abc\u2026");
});

test("the verdict wraps to at most two lines", () => {
  const lay = layoutChart(flux, 480);
  assert.ok(lay.verdict.length >= 1 && lay.verdict.length <= 2);
  assert.ok(lay.verdict.every((l) => l.length <= Math.floor((480 - 40) / CHART.verdictCharWidth)));
  assert.equal(lay.captions.length, 1);
  assert.deepEqual(wrapText("a b c", 3, 1), ["a \u2026"]);
  assert.deepEqual(wrapText("aa bb cc", 5, 2), ["aa bb", "cc"]);
});

test("the subtitle wraps instead of being cut at 480 px", () => {
  const lay = layoutChart(wanArc, 480);
  const whole = subtitleLine(wanArc);
  assert.ok(whole.includes("121 frames") && whole.length > (480 - 2 * CHART.pad) / CHART.smallCharWidth);
  assert.equal(lay.subtitle.length, 2);
  assert.ok(lay.subtitle.every((l) => !l.endsWith("\u2026")), lay.subtitle);
  assert.equal(lay.subtitle.join(" "), whole);
  assert.ok(lay.rows[0].y > lay.deviceY + 14, "the bars start below the second subtitle line");
});

test("value labels never cross the VRAM line and stay inside the node", () => {
  for (const [data, width] of [[wanArc, 480], [flux, 480], [wanArc, 640], [flux, 900]]) {
    const lay = layoutChart(data, width);
    for (const r of lay.rows) {
      const textW = r.valueText.length * CHART.valueCharWidth;
      const crosses = lay.vramX >= r.valueX - 1 && lay.vramX <= r.valueX + textW + 1;
      assert.ok(!crosses, `${r.name} at ${width}px: label ${r.valueX}..${r.valueX + textW}, VRAM ${lay.vramX}`);
      assert.ok(r.valueX + textW <= lay.width - 2, `${r.name} runs off the node`);
    }
  }
  // The rule itself: a label that would straddle the line moves past it; one that would run off goes inside.
  assert.deepEqual(placeValue({ x: 100, w: 90 }, 200, 480, 50), { valueX: 205, valueInside: false });
  assert.deepEqual(placeValue({ x: 100, w: 20 }, 200, 480, 50), { valueX: 124, valueInside: false });
  assert.equal(placeValue({ x: 100, w: 350 }, 200, 480, 50).valueInside, true);
});

test("empty state: the note and a hint, no stray separator, no legend without bars", () => {
  const note = { version: 1, verdict: null, verdict_text: "Estimate: connect a MODEL or pick a family to get the "
    + "estimate.", components: [], vram_bytes: null, text: "Device: cpu" };
  for (const data of [note, null]) {
    const lay = layoutChart(data, 480);
    assert.equal(lay.empty, true);
    assert.equal(lay.rows.length, 0);
    assert.equal(lay.footerY, null, "no legend");
    assert.equal(lay.vramX, null);
    assert.deepEqual(lay.subtitle, [], "no device line, so no \u00b7 either");
    assert.ok(lay.hint.length >= 1 && lay.hint.join(" ").includes("family"));
    assert.ok(lay.height < 120);
  }
  assert.equal(subtitleLine(note), "");
  assert.equal(layoutChart(note, 480).verdict[0], note.verdict_text);
  assert.equal(layoutChart(flux, 480).empty, false);
});
