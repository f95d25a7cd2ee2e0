import test from "node:test";
import assert from "node:assert/strict";

import {
  NOFLASH_NODE_TYPES,
  badgeColors,
  badgeText,
  formatBytes,
  formatSeconds,
  isNoflashNode,
  isProducerNode,
  panelRows,
  PANEL_COLUMNS,
  peakText,
  pushRun,
  tierLabel,
  tierMix,
} from "../noflash_format.js";
import { GiB, MiB } from "./units.mjs";

function status(extra = {}) {
  return {
    run_id: 3, label: "WAN21", state: "done", calls: 48, tiers: { 2: 40, comfy: 8 }, active_tier: 2,
    block_m: 256, block_n: 512, max_q_len: 27280, max_kv_len: 27280, device: "cuda:0",
    peak_bytes: 1.5 * GiB, peak_source: "torch.cuda.max_memory_allocated", elapsed_s: 12.25, ...extra,
  };
}

test("node types are the pack's six ids; all but the probe produce runs", () => {
  assert.deepEqual([...NOFLASH_NODE_TYPES].sort(), [
    "NoFlashAttentionPatcher", "NoFlashCLIPPatcher", "NoFlashFFNChunker", "NoFlashTierSelector",
    "NoFlashVAEPatcher", "NoFlashVRAMProbe",
  ]);
  assert.ok(isNoflashNode("NoFlashVRAMProbe"));
  assert.ok(!isNoflashNode("KSampler"));
  assert.ok(isProducerNode("NoFlashVAEPatcher") && isProducerNode("NoFlashFFNChunker"));
  assert.ok(!isProducerNode("NoFlashVRAMProbe") && !isProducerNode("KSampler"));
});

test("formatBytes picks a unit and keeps three significant figures", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(1536), "1.50 KiB");
  assert.equal(formatBytes(1.5 * GiB), "1.50 GiB");
  assert.equal(formatBytes(12.25 * MiB), "12.3 MiB");
  assert.equal(formatBytes(300 * MiB), "300 MiB");
  assert.equal(formatBytes(2048 * GiB), "2.00 TiB");
  assert.equal(formatBytes(null), "n/a");
  assert.equal(formatBytes(undefined), "n/a");
  assert.equal(formatBytes(NaN), "n/a");
});

test("tier labels: comfy is ComfyUI's own attention, T0 torch's fast path", () => {
  assert.equal(tierLabel("comfy"), "comfy");
  assert.equal(tierLabel(0), "T0");
  assert.equal(tierLabel("0"), "T0");
  assert.equal(tierLabel(2), "T2");
  assert.equal(tierLabel("3"), "T3");
  assert.equal(tierLabel(null), "-");
  assert.equal(tierMix({ comfy: 8, 2: 40 }), "T2\u00d740 comfy\u00d78");
  assert.equal(tierMix({ comfy: 1, 0: 3, 1: 2 }), "T1\u00d72 T0\u00d73 comfy\u00d71");
  assert.equal(tierMix({}), "no calls");
  assert.equal(tierMix(undefined), "no calls");
  assert.equal(tierMix({ 1: 0 }), "no calls");
});

test("badge shows active tier and peak VRAM", () => {
  assert.equal(badgeText(status()), "noflash T2 | peak 1.50 GiB");
  assert.equal(badgeText(status({ state: "running" })), "noflash T2 \u2026 | peak 1.50 GiB");
});

test("badge says when peak memory is not tracked (CPU)", () => {
  const s = status({ device: "cpu", peak_bytes: null, peak_source: "not tracked on CPU" });
  assert.equal(badgeText(s), "noflash T2 | peak n/a (CPU)");
  assert.equal(peakText(s), "peak n/a (CPU)");
});

test("no badge without a run; a badge for runs that never tiled", () => {
  assert.equal(badgeText(null), "");
  assert.equal(badgeText({}), "");
  const comfyOnly = status({ active_tier: null, tiers: { comfy: 12 }, calls: 12 });
  assert.equal(badgeText(comfyOnly), "noflash comfy | peak 1.50 GiB");
  assert.equal(badgeColors(comfyOnly).bg, "#5a6270");
});

test("badge colours follow the run state", () => {
  assert.notEqual(badgeColors(status()).bg, badgeColors(status({ state: "running" })).bg);
  assert.notEqual(badgeColors(null).bg, badgeColors(status()).bg);
  for (const s of [null, status(), status({ state: "running" })]) {
    assert.match(badgeColors(s).fg, /^#[0-9a-f]{6}$/);
  }
});

test("pushRun keeps the newest runs and replaces updates of the same run", () => {
  let runs = [];
  for (let i = 1; i <= 12; i += 1) runs = pushRun(runs, status({ run_id: i, state: "running" }), 10);
  assert.equal(runs.length, 10);
  assert.equal(runs[0].run_id, 3);
  runs = pushRun(runs, status({ run_id: 12, state: "done", calls: 99 }), 10);
  assert.equal(runs.length, 10);
  assert.equal(runs.at(-1).state, "done");
  assert.equal(runs.at(-1).calls, 99);
  assert.deepEqual(pushRun(runs, null), runs);
  assert.deepEqual(pushRun(runs, { run_id: 0 }), runs);
});

test("pushRun does not mutate its input", () => {
  const runs = [status({ run_id: 1 })];
  const out = pushRun(runs, status({ run_id: 2 }));
  assert.equal(runs.length, 1);
  assert.equal(out.length, 2);
});

test("panel rows: newest first, one string per column", () => {
  const runs = [status({ run_id: 1, elapsed_s: 75 }), status({ run_id: 2, peak_bytes: null, peak_source: "not tracked on CPU" })];
  const rows = panelRows(runs);
  assert.equal(rows.length, 2);
  for (const row of rows) {
    assert.equal(row.length, PANEL_COLUMNS.length);
    for (const cell of row) assert.equal(typeof cell, "string");
  }
  assert.equal(rows[0][0], "#2");
  assert.equal(rows[0][6], "not tracked on CPU");
  assert.equal(rows[1][6], "1.50 GiB");
  assert.equal(rows[1][7], "1 min 15 s");
  assert.equal(rows[1][4], "T2\u00d740 comfy\u00d78");
});

test("formatSeconds", () => {
  assert.equal(formatSeconds(0.04), "0.0 s");
  assert.equal(formatSeconds(59.9), "59.9 s");
  assert.equal(formatSeconds(125), "2 min 5 s");
  assert.equal(formatSeconds(undefined), "-");
});
