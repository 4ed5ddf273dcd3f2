// The coordinator's live page: polls /v1/health, /v1/devices and /v1/rounds and redraws.
// Read-only; no dependencies; every value comes from the same JSON a script would read.

const REFRESH_MS = 2000;

function text(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return value.toFixed(digits);
  return String(value);
}

function cell(row, value, className) {
  const td = document.createElement("td");
  if (className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = value;
    td.appendChild(span);
  } else {
    td.textContent = value;
  }
  row.appendChild(td);
}

function ago(seconds) {
  const now = Date.now() / 1000;
  const delta = Math.max(0, now - seconds);
  return delta < 90 ? `${delta.toFixed(0)} s ago` : `${(delta / 60).toFixed(0)} min ago`;
}

function bytes(n) {
  if (n > 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MB`;
  if (n > 1024) return `${(n / 1024).toFixed(0)} kB`;
  return `${n} B`;
}

export function accuracyPoints(rounds) {
  return rounds
    .filter((r) => r.state === "finished" && r.metrics && r.metrics.evaluation
      && typeof r.metrics.evaluation.global_accuracy === "number")
    .map((r) => [r.round, r.metrics.evaluation.global_accuracy]);
}

function drawCurve(svg, points) {
  const w = 640, h = 240, left = 40, bottom = 24, top = 12, right = 12;
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const add = (name, attrs, content) => {
    const el = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (content !== undefined) el.textContent = content;
    svg.appendChild(el);
    return el;
  };
  add("line", { x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, class: "axis" });
  add("text", { x: w - right - 40, y: h - bottom - 6 }, "round");
  add("line", { x1: left, y1: top, x2: left, y2: h - bottom, class: "axis" });
  for (const y of [0, 0.5, 1]) {
    const py = h - bottom - y * (h - bottom - top);
    add("text", { x: 4, y: py + 4 }, `${(100 * y).toFixed(0)}%`);
  }
  svg.dataset.points = String(points.length);
  if (!points.length) {
    add("text", { x: left + 10, y: h / 2 }, "no evaluated round yet");
    return;
  }
  const maxRound = Math.max(...points.map((p) => p[0]), 1);
  const px = (r) => left + (r / maxRound) * (w - left - right);
  const py = (a) => h - bottom - a * (h - bottom - top);
  add("polyline", { class: "line", points: points.map(([r, a]) => `${px(r)},${py(a)}`).join(" ") });
  for (const [r, a] of points) {
    add("circle", { class: "point", cx: px(r), cy: py(a), r: 3, "data-round": r });
    add("text", { x: px(r) - 4, y: h - 8 }, String(r));
  }
}

function render(health, devices, rounds) {
  document.getElementById("summary").textContent =
    `${health.model} · mode ${health.mode} · policy ${health.policy} · ` +
    `round ${text(health.round)} (${text(health.round_state)}) · ` +
    `${health.completed_rounds}/${health.rounds} rounds done · ` +
    `${health.live_devices}/${health.devices} devices live` +
    (health.status === "starting" ? " · building artifacts" : "");
  const problem = document.getElementById("problem");
  problem.hidden = !health.problem;
  problem.textContent = health.problem ? `server fault: ${health.problem}` : "";

  document.getElementById("policy").textContent = `(${devices.policy})`;
  const levels = document.getElementById("levels");
  levels.replaceChildren(...Object.entries(devices.levels).map(([level, share]) => {
    const div = document.createElement("div");
    div.className = "level";
    div.dataset.level = level;
    div.textContent = `${level}: ${(100 * share).toFixed(0)}%`;
    return div;
  }));

  const deviceRows = devices.devices.map((d) => {
    const row = document.createElement("tr");
    row.dataset.device = d.device_id;
    row.dataset.state = d.state;
    row.dataset.level = d.level ?? "";
    cell(row, d.device_id);
    cell(row, d.state, `state state-${d.state}`);
    cell(row, text(d.level));
    cell(row, text(d.profile.step_ms, 1));
    cell(row, text(d.profile.memory_mb));
    cell(row, text(d.profile.bandwidth_mbps));
    cell(row, ago(d.last_seen));
    cell(row, `${bytes(d.bytes_in)} / ${bytes(d.bytes_out)}`);
    return row;
  });
  document.getElementById("devices").replaceChildren(...deviceRows);
  document.getElementById("device-count").textContent = `(${devices.devices.length})`;

  const roundRows = rounds.slice().reverse().map((r) => {
    const row = document.createElement("tr");
    row.dataset.round = r.round;
    row.dataset.state = r.state;
    const levelCounts = {};
    for (const a of r.assignments) levelCounts[a.level] = (levelCounts[a.level] || 0) + 1;
    const accuracy = r.metrics && r.metrics.evaluation ? r.metrics.evaluation.global_accuracy : null;
    const end = r.finished_at ?? Date.now() / 1000;
    cell(row, String(r.round));
    cell(row, r.state, `state state-${r.state}`);
    cell(row, String(r.selected));
    cell(row, String(r.uploads));
    cell(row, String(r.quorum));
    cell(row, Object.entries(levelCounts).sort().map(([l, n]) => `${l}×${n}`).join(" "));
    cell(row, accuracy === null || accuracy === undefined ? "–" : `${(100 * accuracy).toFixed(2)}%`);
    cell(row, `${(end - r.opened_at).toFixed(1)} s`);
    return row;
  });
  document.getElementById("rounds").replaceChildren(...roundRows);
  drawCurve(document.getElementById("curve"), accuracyPoints(rounds));
  document.body.dataset.updated = String(Date.now());
}

async function refresh() {
  try {
    const [health, devices, rounds] = await Promise.all(
      ["/v1/health", "/v1/devices", "/v1/rounds"].map((u) => fetch(u).then((r) => r.json())),
    );
    render(health, devices, rounds.rounds);
  } catch (error) {
    document.getElementById("summary").textContent = `coordinator unreachable (${error}); retrying`;
  }
}

if (typeof document !== "undefined") {
  refresh();
  setInterval(refresh, REFRESH_MS);
}
