// Pure formatting for the NoFlash badge and bottom-panel tab: no DOM, no ComfyUI imports (tested with node --test).
//
// A status is what the server publishes as the "noflash.status" event (noflash_core/comfy_telemetry.py):
// { run_id, label, node_id, state: "running"|"done"|"idle", calls, tiers: {"0": n, "2": m}, active_tier, block_m, block_n,
//   max_q_len, max_kv_len, device, peak_bytes (null on CPU), peak_source, elapsed_s, time }

export const NOFLASH_NODE_TYPES = Object.freeze([
  "NoFlashAttentionPatcher",
  "NoFlashTierSelector",
  "NoFlashFFNChunker",
  "NoFlashVRAMProbe",
]);

export const STATUS_EVENT = "noflash.status";

export function isNoflashNode(type) {
  return NOFLASH_NODE_TYPES.includes(type);
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

// The one-line badge: active tier and peak VRAM ("noflash T2 | peak 1.21 GiB").
export function badgeText(status) {
  if (!status || !status.run_id) return "noflash: waiting for a run";
  const tier = status.active_tier === null || status.active_tier === undefined
    ? (status.calls > 0 ? "comfy" : "-")
    : tierLabel(status.active_tier);
  const head = status.state === "running" ? `noflash ${tier} \u2026` : `noflash ${tier}`;
  return `${head} | ${peakText(status)}`;
}

export function badgeColors(status) {
  if (!status || !status.run_id) return { fg: "#d0d0d0", bg: "#3a3a3a" };
  if (status.state === "running") return { fg: "#1b1300", bg: "#f0b429" };
  if (status.active_tier === null || status.active_tier === undefined) return { fg: "#ffffff", bg: "#5a6270" };
  return { fg: "#ffffff", bg: "#1f7a4d" };
}

// The status a node's badge shows: the last run of the model that node patched (status.node_id), else the latest
// run of any NoFlash-patched model (Tier Selector, FFN Chunker and VRAM Probe nodes, or before the patcher ran).
export function statusForNode(byNode, latest, nodeId) {
  const own = byNode?.[String(nodeId)];
  return own ?? latest ?? null;
}

// byNode after a status arrives (a new object; statuses without node_id change nothing).
export function rememberStatus(byNode, status) {
  if (!status || status.node_id === null || status.node_id === undefined) return { ...byNode };
  return { ...byNode, [String(status.node_id)]: status };
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

// Rows for the bottom-panel table, newest first; every cell is a string.
export function panelRows(runs) {
  return runs
    .slice()
    .reverse()
    .map((r) => [
      `#${r.run_id}`,
      r.label || "model",
      r.state ?? "",
      String(r.calls ?? 0),
      tierMix(r.tiers),
      r.max_q_len ? `${r.max_q_len} tok` : "-",
      r.peak_bytes === null || r.peak_bytes === undefined ? r.peak_source || "n/a" : formatBytes(r.peak_bytes),
      formatSeconds(r.elapsed_s),
    ]);
}
