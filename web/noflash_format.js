// Pure formatting and status keying for the NoFlash badges and bottom-panel tab: no DOM, no ComfyUI imports (tested
// with node --test).
//
// A status is what the server publishes as the "noflash.status" event (noflash_core/comfy/telemetry.py and
// op_telemetry.py):
// { run_id, kind: "attention"|"ffn"|"clip"|"vae", label, node_id, node_ids: [ids of the NoFlash nodes that made it],
//   prompt_id, workflow_id (the id of the graph the prompt was queued from), exec_node_id,
//   state: "running"|"done"|"idle", device, peak_bytes (null on CPU), peak_source, elapsed_s, time,
//   attention/clip/vae: calls, tiers: {"0": n, "2": m, "comfy": k}, active_tier, block_m, block_n, max_q_len,
//     max_kv_len, plan_source: {"2": "tuned"|"model"} (optional), op: "encode"|"decode" (clip/vae),
//   ffn: modules, num_chunks, calls, chunked_calls, chunks, max_tokens, intermediate_bytes, saved_bytes,
//   replaced_by (optional): what replaced the noflash override }

export const NOFLASH_NODE_TYPES = Object.freeze([
  "NoFlashAttentionPatcher",
  "NoFlashTierSelector",
  "NoFlashFFNChunker",
  "NoFlashVRAMProbe",
  "NoFlashCLIPPatcher",
  "NoFlashVAEPatcher",
]);

// The nodes whose patches produce runs (a badge each); the VRAM Probe shows its own picture instead.
export const PRODUCER_NODE_TYPES = Object.freeze(NOFLASH_NODE_TYPES.filter((t) => t !== "NoFlashVRAMProbe"));

export const STATUS_EVENT = "noflash.status";

export function isNoflashNode(type) {
  return NOFLASH_NODE_TYPES.includes(type);
}

export function isProducerNode(type) {
  return PRODUCER_NODE_TYPES.includes(type);
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function formatBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "n/a";
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${Math.round(value)} B` : `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} ${UNITS[unit]}`;
}

// Tier keys: "1".."3" tiled tiers; "0" noflash's fast path (torch's own SDPA, the problem fits anyway);
// "comfy" calls sent on to ComfyUI's attention (below min_tokens, or the patcher disabled).
export function tierLabel(tier) {
  if (tier === null || tier === undefined) return "-";
  if (tier === "comfy") return "comfy";
  return `T${Number(tier)}`;
}

function tierOrder(key) {
  return key === "comfy" ? -1 : Number(key);
}

export function tierMix(tiers) {
  const entries = Object.entries(tiers ?? {}).filter(([, n]) => n > 0);
  if (entries.length === 0) return "no calls";
  entries.sort(([a], [b]) => tierOrder(b) - tierOrder(a));
  return entries.map(([t, n]) => `${tierLabel(t)}\u00d7${n}`).join(" ");
}

export function peakText(status) {
  if (!status) return "n/a";
  if (status.peak_bytes === null || status.peak_bytes === undefined) {
    const dev = String(status.device ?? "").split(":")[0].toUpperCase();
    return dev ? `peak n/a (${dev})` : "peak n/a";
  }
  return `peak ${formatBytes(status.peak_bytes)}`;
}

const KIND_NAMES = { attention: "attention", ffn: "FFN", clip: "CLIP", vae: "VAE" };

function running(status) {
  return status.state === "running" ? " \u2026" : "";
}

function attentionBadge(status) {
  const tier = status.active_tier === null || status.active_tier === undefined
    ? (status.calls > 0 ? "comfy" : "-")
    : tierLabel(status.active_tier);
  const source = status.plan_source?.[String(status.active_tier)] ?? null;
  const tuned = source === "tuned" ? " tuned" : "";
  return `noflash ${tier}${tuned}${running(status)} | ${peakText(status)}`;
}

function ffnBadge(status) {
  const modules = `${status.modules ?? 0} modules`;
  if (!status.chunked_calls) {
    const what = status.calls ? "unchunked" : "no calls";
    return `noflash FFN ${what}${running(status)} \u00b7 ${modules}`;
  }
  return `noflash FFN ${status.chunks} chunks${running(status)} \u00b7 ${modules} \u00b7 saved ` +
    formatBytes(status.saved_bytes);
}

function encodeBadge(status) {
  const what = `${KIND_NAMES[status.kind]} ${status.op || (status.kind === "clip" ? "encode" : "decode")}`;
  const longest = status.max_q_len ? ` \u00b7 ${status.max_q_len} tok` : "";
  return `noflash ${what} ${tierMix(status.tiers)}${longest}${running(status)} | ${peakText(status)}`;
}

// The one-line badge of a status, or "" for none: "noflash T2 | peak 1.21 GiB", "noflash FFN 8 chunks · 30 modules
// · saved 1.20 GiB", "noflash VAE decode T1×4 · 4096 tok | peak 3.00 GiB".
export function badgeText(status) {
  if (!status || !status.run_id) return "";
  if (status.replaced_by) return `noflash \u26a0 override replaced by ${status.replaced_by}`;
  if (status.kind === "ffn") return ffnBadge(status);
  if (status.kind === "clip" || status.kind === "vae") return encodeBadge(status);
  return attentionBadge(status);
}

export function badgeColors(status) {
  if (!status || !status.run_id) return { fg: "#d0d0d0", bg: "#3a3a3a" };
  if (status.replaced_by) return { fg: "#ffffff", bg: "#b42318" };
  if (status.state === "running") return { fg: "#1b1300", bg: "#f0b429" };
  if (status.kind === "ffn") return status.chunked_calls ? { fg: "#ffffff", bg: "#1f7a4d" } : { fg: "#ffffff", bg: "#5a6270" };
  if (status.kind === "clip" || status.kind === "vae") {
    return status.tiers && Object.keys(status.tiers).some((t) => t !== "comfy")
      ? { fg: "#ffffff", bg: "#1f7a4d" } : { fg: "#ffffff", bg: "#5a6270" };
  }
  if (status.active_tier === null || status.active_tier === undefined) return { fg: "#ffffff", bg: "#5a6270" };
  return { fg: "#ffffff", bg: "#1f7a4d" };
}

// ---- which status belongs on which node ------------------------------------------------------------------------
// A store is { runs: {run_id: status}, prompts: {prompt_id: graph id} }: the statuses seen (newest kept) and the
// prompts this page queued, with the id of the graph each was queued from. A status belongs to the graph the server
// read from the queued prompt (workflow_id) or, for a prompt this page queued, to that prompt's graph; on that graph
// it belongs to the nodes in node_ids. Nothing else gets a badge: not other workflows, not nodes that did not run.

export function emptyStore() {
  return { runs: {}, prompts: {} };
}

// The store after a status arrives (a new object; statuses without run_id change nothing).
export function rememberStatus(store, status, max = 200) {
  const runs = { ...(store?.runs ?? {}) };
  const prompts = { ...(store?.prompts ?? {}) };
  if (!status || !status.run_id) return { runs, prompts };
  runs[String(status.run_id)] = { ...status };
  const ids = Object.keys(runs).map(Number).sort((a, b) => a - b);
  for (const id of ids.slice(0, Math.max(0, ids.length - max))) delete runs[String(id)];
  return { runs, prompts };
}

// The store after this page queued prompt `promptId` from the graph `graphId`.
export function rememberPrompt(store, promptId, graphId) {
  const runs = { ...(store?.runs ?? {}) };
  const prompts = { ...(store?.prompts ?? {}) };
  if (promptId && graphId) prompts[String(promptId)] = String(graphId);
  return { runs, prompts };
}

// The id of the graph a status was produced in, or null when unknown.
export function statusGraph(store, status) {
  const queued = status?.prompt_id ? store?.prompts?.[String(status.prompt_id)] : undefined;
  return queued ?? status?.workflow_id ?? null;
}

function producers(status) {
  const ids = Array.isArray(status.node_ids) && status.node_ids.length ? status.node_ids : [status.node_id];
  return ids.filter((id) => id !== null && id !== undefined).map(String);
}

// The newest status produced by node `nodeId` of graph `graphId`, or null.
export function statusForNode(store, graphId, nodeId) {
  if (graphId === null || graphId === undefined || nodeId === null || nodeId === undefined) return null;
  let best = null;
  for (const status of Object.values(store?.runs ?? {})) {
    if (statusGraph(store, status) !== String(graphId)) continue;
    if (!producers(status).includes(String(nodeId))) continue;
    if (!best || status.run_id > best.run_id) best = status;
  }
  return best;
}

// Keep the last `max` runs, newest last; a status for a known run_id replaces that run's entry.
export function pushRun(runs, status, max = 10) {
  if (!status || !status.run_id) return runs.slice();
  const out = runs.filter((r) => r.run_id !== status.run_id);
  out.push({ ...status });
  out.sort((a, b) => a.run_id - b.run_id);
  return out.slice(Math.max(0, out.length - max));
}

export const PANEL_COLUMNS = Object.freeze(["Run", "Model", "State", "Calls", "Tiers", "Longest seq", "Peak", "Time"]);

export function formatSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "-";
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function runName(r) {
  const label = r.label || "model";
  if (r.kind === "ffn") return `FFN (${label})`;
  if (r.kind === "clip" || r.kind === "vae") return `${KIND_NAMES[r.kind]} ${r.op || ""} (${label})`.replace("  ", " ");
  return label;
}

function ffnMix(r) {
  return r.chunked_calls ? `${r.chunks} chunks, saved ${formatBytes(r.saved_bytes)}` : "unchunked";
}

// Rows for the bottom-panel table, newest first; every cell is a string.
export function panelRows(runs) {
  return runs
    .slice()
    .reverse()
    .map((r) => [
      `#${r.run_id}`,
      runName(r),
      r.state ?? "",
      String(r.calls ?? 0),
      r.kind === "ffn" ? ffnMix(r) : tierMix(r.tiers),
      (r.max_q_len ?? r.max_tokens) ? `${r.max_q_len ?? r.max_tokens} tok` : "-",
      r.peak_bytes === null || r.peak_bytes === undefined ? r.peak_source || "n/a" : formatBytes(r.peak_bytes),
      formatSeconds(r.elapsed_s),
    ]);
}
