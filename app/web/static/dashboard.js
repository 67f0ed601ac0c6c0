// The dashboard: polls /api/dashboard every second (with the chosen task's last 15 minutes) and
// /tasks/{id}/stats every 10 s; draws its charts by hand on canvases (no CDN, no library).
"use strict";

const $ = (id) => document.getElementById(id);
let chartTask = null;

function text(tag, content, cls) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (cls) node.className = cls;
  return node;
}

function ms(value) { return value == null ? "–" : `${value.toFixed(value < 10 ? 2 : 0)} ms`; }
function pct(value) { return value == null ? "–" : `${(value * 100).toFixed(1)}%`; }

// A suspended task (its calls kept timing out): its name cell carries a badge until when, the reason as its title.
function nameCell(task) {
  const cell = text("td", task.task_id);
  if (task.suspension_reason != null) {
    const until = task.suspended_until == null ? "" : ` until ${task.suspended_until.slice(11, 19)} UTC`;
    const badge = text("span", `suspended${until}`, "badge suspended");
    badge.title = task.suspension_reason;
    cell.append(" ", badge);
  }
  return cell;
}

// Accuracy per version; a task without validations says why when it has no oracle.
function accuracyCell(task) {
  const parts = Object.entries(task.accuracy).filter(([, a]) => a.validated > 0)
    .map(([version, a]) => `v${version} ${pct(a.accuracy)} (${a.validated})`);
  if (parts.length) return text("td", parts.join(", "));
  if (task.oracle != null) return text("td", "–");
  const cell = text("td", "no oracle", "muted");
  cell.title = "Only requests carrying expected_output are validated; to validate the others, give the task an "
    + "oracle: loopai task update NAME --oracle label|shadow|external";
  return cell;
}

function renderTasks(tasks) {
  const body = $("tasks").querySelector("tbody");
  body.replaceChildren();
  if (!tasks.length) {
    const row = document.createElement("tr");
    const cell = text("td", "no tasks yet", "empty");
    cell.colSpan = 13;
    row.append(cell);
    body.append(row);
  }
  for (const task of tasks) {
    const live = task.live || {};
    const row = document.createElement("tr");
    row.dataset.task = task.task_id;
    if (task.suspension_reason != null) row.className = "suspended";
    row.append(
      nameCell(task),
      text("td", task.active_version == null ? "–" : `v${task.active_version}`),
      text("td", task.canary_version ? `v${task.canary_version} @ ${task.canary_percent}%` : "–",
           task.canary_version ? "canary" : ""),
      text("td", task.versions.map((v) => `v${v}`).join(" ")),
      text("td", live.per_second == null ? "–" : live.per_second.toFixed(1), "rate"),
      text("td", pct(live.error_rate), live.error_rate > 0.05 ? "bad" : ""),
      text("td", ms(live.p50_ms)), text("td", ms(live.p95_ms)), text("td", ms(live.p99_ms)),
      text("td", ms(live.request_result_p50_ms), "wait"), text("td", ms(live.request_result_p95_ms), "wait"),
      text("td", ms(live.request_result_p99_ms), "wait"),
      accuracyCell(task),
    );
    body.append(row);
  }
  const select = $("chart-task");
  const names = tasks.map((t) => t.task_id);
  if (select.options.length !== names.length || names.some((n, i) => select.options[i].value !== n)) {
    select.replaceChildren(...names.map((n) => { const o = text("option", n); o.value = n; return o; }));
    if (chartTask && names.includes(chartTask)) select.value = chartTask;
  }
  if (!chartTask && names.length) { chartTask = names[0]; loadChart(); }
}

function renderEvents(id, items, describe) {
  const list = $(id);
  list.replaceChildren();
  if (!items.length) list.append(text("li", "none seen", "empty"));
  for (const item of items) {
    const [when, what] = describe(item);
    const line = document.createElement("li");
    line.append(text("span", when.replace("T", " ").slice(0, 19), "when"), document.createTextNode(what));
    list.append(line);
  }
}

async function poll() {
  try {
    const query = chartTask ? `?chart=${encodeURIComponent(chartTask)}` : "";
    const response = await fetch(`/api/dashboard${query}`, { cache: "no-store" });
    const data = await response.json();
    $("worker").textContent = `worker ${data.worker_id} · partitions ${data.partitions.join(",") || "none"}`
      + ` · ${data.executed} executed`;
    const health = $("health");
    health.textContent = data.ready ? "ready" : "not ready";
    health.title = data.reasons.join("\n");
    health.className = `badge ${data.ready ? "ready" : "not-ready"}`;
    renderTasks(data.tasks);
    if (data.chart) drawLive(data.chart, data.tasks.find((t) => t.task_id === data.chart.task_id));
    renderEvents("signals", data.signals, (s) => [s.detected_at,
      `${s.task_id} v${s.version ?? "all"}: ${s.metric} ${s.value.toFixed(3)} (`
      + (s.method === "target" ? `target ${s.baseline.toFixed(3)}, ` : `baseline ${s.baseline.toFixed(3)}, `)
      + `${s.method} score ${s.score.toFixed(1)}) ${s.hint}`]);
    renderEvents("letters", data.dead_letters, (d) => [d.dead_lettered_at,
      `${d.error_type}: ${d.reason} (${d.source_topic}:${d.source_partition}@${d.source_offset}, ${d.worker_id})`]);
    renderEvents("improvements", data.improvements, (r) => [r.updated_at,
      `${r.task_id} v${r.active_version ?? "-"}${r.candidate_version ? ` → v${r.candidate_version}` : ""}: `
      + `${r.status} (${r.trigger}) ${r.reason}`]);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("health").textContent = "unreachable";
    $("health").className = "badge not-ready";
  }
}

async function loadChart() {
  if (!chartTask) return;
  try {
    const response = await fetch(`/tasks/${encodeURIComponent(chartTask)}/stats?days=14`, { cache: "no-store" });
    if (response.ok) drawChart(await response.json());
  } catch (error) { /* the next poll tries again */ }
}

// The last 15 minutes of one task, three panels sharing a time axis: executions/s, error rate, p99 latency
// (request -> result solid, execution time dashed). A gap in a line: no results then.
const LIVE_SPAN_S = 900;
const PANELS = [
  { title: "executions/s", color: "#4c6ef5", values: [1], format: (v) => v.toFixed(v < 10 ? 1 : 0) },
  { title: "error rate", color: "#e03131", values: [2], format: (v) => `${(v * 100).toFixed(v < 0.1 ? 1 : 0)}%`,
    least: 0.05 },
  { title: "p99 ms", color: "#e8590c", values: [3, 4], format: (v) => v.toFixed(v < 10 ? 2 : 0) },
];

function drawLive(chart, task) {
  const canvas = $("live-chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 58, right = 10, axis = 22;
  const points = chart.points;
  canvas.dataset.points = String(points.length);
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  const now = points.length ? points[points.length - 1][0] : Date.now() / 1000;
  const x = (t) => left + (w - left - right) * (1 - (now - t) / LIVE_SPAN_S);
  const panelHeight = (h - axis) / PANELS.length;
  PANELS.forEach((panel, i) => {
    const top = i * panelHeight + 16, bottom = (i + 1) * panelHeight - 4;
    const seen = points.flatMap((p) => panel.values.map((k) => p[k])).filter((v) => v != null);
    const most = Math.max(...seen, panel.least ?? 0, 1e-9);
    const y = (v) => bottom - (bottom - top) * v / most;
    g.strokeStyle = "#eef0f3";
    g.beginPath(); g.moveTo(left, bottom); g.lineTo(w - right, bottom); g.moveTo(left, top); g.lineTo(w - right, top);
    g.stroke();
    g.fillStyle = "#667";
    g.fillText(panel.title, left, top - 4);
    g.fillText(panel.format(most), 4, top + 8);
    g.fillText("0", 4, bottom);
    panel.values.forEach((k, j) => {
      g.strokeStyle = panel.color;
      g.lineWidth = j ? 1 : 2;
      g.setLineDash(j ? [4, 3] : []);
      g.beginPath();
      let drawing = false;
      for (const p of points) {
        if (p[k] == null || now - p[0] > LIVE_SPAN_S) { drawing = false; continue; }
        if (drawing) g.lineTo(x(p[0]), y(p[k])); else g.moveTo(x(p[0]), y(p[k]));
        drawing = true;
      }
      g.stroke();
      const last = points.length ? points[points.length - 1][k] : null;  // a dot on the newest value
      if (last != null) {
        g.fillStyle = panel.color;
        g.beginPath(); g.arc(x(now), y(last), 2.5, 0, 2 * Math.PI); g.fill();
      }
    });
    g.setLineDash([]);
    g.lineWidth = 1;
  });
  g.fillStyle = "#667";
  for (const back of [900, 600, 300, 0]) {
    g.fillText(back ? `-${back / 60} min` : "now", Math.min(x(now - back), w - right - 24), h - 6);
  }
  const latest = points.length ? points[points.length - 1] : null;
  const suspended = $("live-suspended");
  suspended.hidden = !(task && task.suspension_reason != null);
  if (!suspended.hidden) {
    suspended.textContent = task.suspended_until ? `suspended until ${task.suspended_until.slice(11, 19)} UTC`
      : "suspended";
    suspended.title = task.suspension_reason;
  }
  $("live-note").textContent = `${chart.task_id}: this worker's results, a point every ${chart.step_s} s (the last:`
    + ` the last 10 s, now)` + (latest ? `: ${latest[1].toFixed(1)}/s, error rate ${pct(latest[2])},`
    + ` p99 request → result ${ms(latest[3])} (solid), execution ${ms(latest[4])} (dashed).` : ": no results yet.");
}

function drawChart(stats) {
  $("chart-name").textContent = stats.task_id;
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 50, bottom = 30, top = 10;
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  const days = stats.days;
  canvas.dataset.days = String(days.length);
  if (!days.length) {
    g.fillStyle = "#889";
    g.fillText(`${stats.task_id}: no executions in the last 14 days`, left, h / 2);
    return;
  }
  const most = Math.max(...days.map((d) => d.executions), 1);
  const slot = Math.min(60, (w - left - 10) / days.length);  // a few days must not make giant bars
  g.strokeStyle = "#dde1e7";
  g.beginPath(); g.moveTo(left, h - bottom); g.lineTo(w - 10, h - bottom); g.stroke();
  g.fillStyle = "#667";
  g.fillText(String(most), 4, top + 10);
  g.fillText("0", 4, h - bottom);
  days.forEach((d, i) => {
    const barHeight = (h - bottom - top) * d.executions / most;
    g.fillStyle = d.closed_at ? "#4c6ef5" : "#91a7ff";  // today's running window is lighter
    g.fillRect(left + i * slot + 4, h - bottom - barHeight, Math.max(2, slot - 8), barHeight);
    g.fillStyle = "#667";
    g.fillText(d.date.slice(5), left + i * slot + 4, h - bottom + 16);
  });
  g.strokeStyle = "#2f9e44";
  g.lineWidth = 2;
  g.beginPath();
  days.forEach((d, i) => {
    const x = left + i * slot + slot / 2;
    const y = top + (h - bottom - top) * (1 - (d.success_rate ?? 0));
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
  g.lineWidth = 1;
  g.fillStyle = "#2f9e44";  // a dot per day: one day alone has no line to show
  days.forEach((d, i) => {
    const y = top + (h - bottom - top) * (1 - (d.success_rate ?? 0));
    g.beginPath(); g.arc(left + i * slot + slot / 2, y, 3, 0, 2 * Math.PI); g.fill();
  });
  $("chart-note").textContent = `${stats.task_id}: executions per day (${stats.time_zone}; lighter: today, running)`
    + `, line: success rate. Today: ${days[days.length - 1].executions} executions.`;
}

$("chart-task").addEventListener("change", (event) => { chartTask = event.target.value; loadChart(); poll(); });
poll();
setInterval(poll, 1000);
setInterval(loadChart, 10000);
