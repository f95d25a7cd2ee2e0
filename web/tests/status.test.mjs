import test from "node:test";
import assert from "node:assert/strict";

import {
  badgeColors,
  badgeText,
  emptyStore,
  panelRows,
  rememberPrompt,
  rememberStatus,
  statusForNode,
  statusGraph,
} from "../noflash_format.js";
import { GiB, MiB } from "./units.mjs";

// A finished attention run of the Attention Patcher (node 2) and Tier Selector (node 3) of graph "wf-a".
function run(extra = {}) {
  return {
    run_id: 5, kind: "attention", label: "SD3", node_id: "2", node_ids: ["2", "3"], prompt_id: "p-1",
    workflow_id: "wf-a", exec_node_id: "8", state: "done", calls: 10, tiers: { 2: 10 }, active_tier: 2,
    block_m: 64, block_n: 64, max_q_len: 4096, max_kv_len: 4096, device: "cpu", peak_bytes: null,
    peak_source: "not tracked on CPU", elapsed_s: 1.5, ...extra,
  };
}

test("a status shows on the nodes that produced it, in the graph it ran in, and nowhere else", () => {
  const store = rememberStatus(emptyStore(), run());
  assert.equal(statusForNode(store, "wf-a", 2).run_id, 5);
  assert.equal(statusForNode(store, "wf-a", "3").run_id, 5);
  assert.equal(statusForNode(store, "wf-a", 10), null, "a node of the same graph that did not run");
  assert.equal(statusForNode(store, "wf-b", 2), null, "the same node id in another workflow (a template)");
  assert.equal(statusForNode(store, null, 2), null, "a graph without an id");
  assert.equal(statusForNode(emptyStore(), "wf-a", 2), null, "a fresh page");
});

test("the newest run of a node wins; other kinds keep their own nodes", () => {
  let store = emptyStore();
  store = rememberStatus(store, run({ run_id: 7, active_tier: 1, tiers: { 1: 3 } }));
  store = rememberStatus(store, run({ run_id: 6 }));  // arrives late: older run
  store = rememberStatus(store, run({ run_id: 8, kind: "ffn", node_id: "5", node_ids: ["5"], chunks: 4,
                                      chunked_calls: 2, modules: 2, saved_bytes: 3 * MiB }));
  assert.equal(statusForNode(store, "wf-a", 2).run_id, 7);
  assert.equal(statusForNode(store, "wf-a", 5).kind, "ffn");
  // An update of a run replaces it (running -> done).
  store = rememberStatus(store, run({ run_id: 7, state: "running" }));
  store = rememberStatus(store, run({ run_id: 7, state: "done", calls: 99 }));
  assert.equal(statusForNode(store, "wf-a", 2).calls, 99);
});

test("a prompt this page queued maps its statuses to the graph it was queued from", () => {
  let store = rememberStatus(emptyStore(), run({ workflow_id: null, prompt_id: "p-9" }));
  assert.equal(statusGraph(store, run({ workflow_id: null, prompt_id: "p-9" })), null);
  assert.equal(statusForNode(store, "wf-c", 2), null, "unknown graph: no badge");
  store = rememberPrompt(store, "p-9", "wf-c");
  assert.equal(statusForNode(store, "wf-c", 2).run_id, 5);
  assert.equal(statusForNode(store, "wf-a", 2), null);
  // The page's own record wins over the workflow id the server read.
  store = rememberPrompt(rememberStatus(emptyStore(), run()), "p-1", "wf-d");
  assert.equal(statusForNode(store, "wf-d", 2).run_id, 5);
});

test("statuses without node_ids fall back to node_id; without run_id they are ignored", () => {
  let store = rememberStatus(emptyStore(), run({ node_ids: undefined }));
  assert.equal(statusForNode(store, "wf-a", 2).run_id, 5);
  assert.equal(statusForNode(store, "wf-a", 3), null);
  store = rememberStatus(store, { node_id: "9", workflow_id: "wf-a" });
  assert.equal(statusForNode(store, "wf-a", 9), null);
  assert.equal(Object.keys(rememberStatus(emptyStore(), null).runs).length, 0);
});

test("the store keeps the newest statuses and never mutates its input", () => {
  let store = emptyStore();
  for (let i = 1; i <= 12; i += 1) store = rememberStatus(store, run({ run_id: i }), 10);
  assert.deepEqual(Object.keys(store.runs).map(Number).sort((a, b) => a - b), [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  const before = JSON.stringify(store);
  rememberStatus(store, run({ run_id: 50 }));
  rememberPrompt(store, "p", "g");
  assert.equal(JSON.stringify(store), before);
});

test("badges per kind: attention tier (tuned), FFN chunks, CLIP/VAE last encode/decode, replaced override", () => {
  assert.equal(badgeText(run()), "noflash T2 | peak n/a (CPU)");
  assert.equal(badgeText(run({ plan_source: { 2: "tuned" } })), "noflash T2 tuned | peak n/a (CPU)");
  assert.equal(badgeText(run({ plan_source: { 2: "model" } })), "noflash T2 | peak n/a (CPU)");
  const ffn = run({ kind: "ffn", modules: 30, chunks: 8, chunked_calls: 60, calls: 60, saved_bytes: 1.5 * GiB,
                    peak_bytes: 2 * GiB });
  assert.equal(badgeText(ffn), "noflash FFN 8 chunks \u00b7 30 modules \u00b7 saved 1.50 GiB");
  assert.equal(badgeText({ ...ffn, chunked_calls: 0, chunks: 0 }), "noflash FFN unchunked \u00b7 30 modules");
  assert.equal(badgeText({ ...ffn, state: "running" }),
               "noflash FFN 8 chunks \u2026 \u00b7 30 modules \u00b7 saved 1.50 GiB");
  const vae = run({ kind: "vae", op: "decode", tiers: { 1: 4 }, max_q_len: 4096, peak_bytes: 3 * GiB });
  assert.equal(badgeText(vae), "noflash VAE decode T1\u00d74 \u00b7 4096 tok | peak 3.00 GiB");
  const clip = run({ kind: "clip", op: "encode", tiers: { comfy: 12 }, max_q_len: 77 });
  assert.equal(badgeText(clip), "noflash CLIP encode comfy\u00d712 \u00b7 77 tok | peak n/a (CPU)");
  assert.equal(badgeColors(clip).bg, "#5a6270");
  assert.equal(badgeColors(vae).bg, "#1f7a4d");
  const replaced = run({ replaced_by: "SageAttention" });
  assert.equal(badgeText(replaced), "noflash \u26a0 override replaced by SageAttention");
  assert.equal(badgeColors(replaced).bg, "#b42318");
});

test("panel rows name the kind of each run", () => {
  const rows = panelRows([
    run({ run_id: 1 }),
    run({ run_id: 2, kind: "vae", op: "decode", label: "WanVAE", tiers: { 1: 2 } }),
    run({ run_id: 3, kind: "ffn", label: "WAN22", chunks: 4, chunked_calls: 2, saved_bytes: 3 * MiB,
          max_q_len: undefined, max_tokens: 128 }),
  ]);
  assert.deepEqual(rows.map((r) => r[1]), ["FFN (WAN22)", "VAE decode (WanVAE)", "SD3"]);
  assert.equal(rows[0][4], "4 chunks, saved 3.00 MiB");
  assert.equal(rows[0][5], "128 tok");
  assert.equal(rows[1][4], "T1\u00d72");
});
