// The coordinator's live page: polls /v1/health, /v1/devices (a page at a time) and
// /v1/rounds and redraws. Read-only; no dependencies; every value comes from the same JSON
// a script would read.
//
// URL fragment: #operator=TOKEN (the live-page link the coordinator prints at start-up) is
// kept in sessionStorage, removed from the address bar and sent as a bearer token on
// /v1/devices and /v1/rounds; a 401 `operator_token_required` says which link to open.

const REFRESH_MS = 2000;
const PAGE_SIZE = 100; // devices per page (GET /v1/devices?offset=&limit=)
const OPERATOR_KEY = "heterofl-edge.operator";
const BROWSER_RUNTIME = "onnx-web";

let deviceOffset = 0;
let lastRounds = [];

function text(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return value.toFixed(digits);
  return String(value);
}

/** A table cell whose label (for the card layout on phones) is its column's name. */
function cell(row, label, value, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  if (className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = value;
    td.appendChild(span);
  } else {
    td.textContent = value;
  }
  row.appendChild(td);
  return td;
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

/**
 * A round's training payloads: bytes per device (download + upload, averaged over the
 * devices that moved any) and the encodings used, from /v1/rounds' `transfer`.
 */
export function roundTransfer(round) {
  const transfer = round.transfer ?? {};
  const sum = (direction) => Object.values(transfer[direction]?.train ?? {}).reduce(
    (acc, e) => ({ bytes: acc.bytes + e.bytes, payloads: acc.payloads + e.payloads }), { bytes: 0, payloads: 0 });
  const down = sum("down");
  const up = sum("up");
  const encodings = (direction) => Object.keys(transfer[direction]?.train ?? {}).sort().join("+");
  if (!down.payloads && !up.payloads) return null;
  return {
    perDevice: (down.payloads ? down.bytes / down.payloads : 0) + (up.payloads ? up.bytes / up.payloads : 0),
    down: encodings("down") || "–",
    up: encodings("up") || "–",
  };
}

export function accuracyPoints(rounds) {
  return rounds
    .filter((r) => r.state === "finished" && r.metrics && r.metrics.evaluation
      && typeof r.metrics.evaluation.global_accuracy === "number")
    .map((r) => [r.round, r.metrics.evaluation.global_accuracy]);
}

/** Is this device a browser (the page's onnxruntime-web runtime)? */
export function isBrowser(device) {
  return (device.profile?.runtimes ?? []).includes(BROWSER_RUNTIME);
}

/** The operator token: from the URL fragment (then kept for the tab), else the kept one. */
export function operatorToken(location, storage, history) {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("operator");
  if (token) {
    storage?.setItem(OPERATOR_KEY, token);
    fragment.delete("operator");
    const rest = fragment.toString();
    history?.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
    return token;
  }
  return storage?.getItem(OPERATOR_KEY) ?? null;
}

/**
 * The learning curve, drawn at the chart's own pixel size so that its labels stay legible
 * on a phone (a fixed viewBox scaled to 390 px would shrink 11 px labels to 7 px).
 */
function drawCurve(svg, points) {
  const w = Math.max(240, Math.round(svg.clientWidth || 640));
  const h = w < 480 ? 200 : 240;
  const left = 44, bottom = 28, top = 16, right = 16;
  const ns = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const add = (name, attrs, content) => {
    const el = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (content !== undefined) el.textContent = content;
    svg.appendChild(el);
    return el;
  };
  add("line", { x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, class: "axis" });
  add("text", { x: w - right, y: h - bottom - 6, "text-anchor": "end" }, "round");
  add("line", { x1: left, y1: top, x2: left, y2: h - bottom, class: "axis" });
  for (const y of [0, 0.5, 1]) {
    const py = h - bottom - y * (h - bottom - top);
    add("text", { x: left - 6, y: py + 4, "text-anchor": "end" }, `${(100 * y).toFixed(0)}%`);
  }
  svg.dataset.points = String(points.length);
  if (!points.length) {
    add("text", { x: left + 10, y: h / 2 }, "no evaluated round yet");
    return;
  }
  const first = Math.min(...points.map((p) => p[0]));
  const last = Math.max(...points.map((p) => p[0]));
  const span = Math.max(last - first, 1);
  // One point sits in the middle; more spread from the first round to the last.
  const px = (r) => (points.length === 1 ? (left + w - right) / 2 : left + 12 + ((r - first) / span) * (w - left - right - 24));
  const py = (a) => h - bottom - a * (h - bottom - top);
  if (points.length > 1) {
    add("polyline", { class: "line", points: points.map(([r, a]) => `${px(r)},${py(a)}`).join(" ") });
  }
  const every = Math.ceil(points.length / Math.max(1, Math.floor((w - left - right) / 36)));
  points.forEach(([r, a], i) => {
    add("circle", { class: "point", cx: px(r), cy: py(a), r: 4, "data-round": r });
    if (i % every === 0 || i === points.length - 1) {
      add("text", { x: px(r), y: h - 8, "text-anchor": "middle" }, String(r));
    }
  });
  const [r, a] = points[points.length - 1];
  const label = add(
    "text",
    { x: px(r), y: Math.max(top + 10, py(a) - 10), "text-anchor": points.length === 1 ? "middle" : "end", class: "value" },
    `round ${r}: ${(100 * a).toFixed(1)}%`,
  );
  label.dataset.value = String(a);
}

function deviceRow(d) {
  const row = document.createElement("tr");
  row.dataset.device = d.device_id;
  row.dataset.state = d.state;
  row.dataset.level = d.level ?? "";
  row.dataset.trainedLevel = d.trained_level ?? "";
  const browser = isBrowser(d);
  row.dataset.browser = String(browser);
  const id = cell(row, "device", "");
  const name = document.createElement("span");
  name.textContent = d.device_id;
  if (browser) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "browser";
    badge.title = "a browser device (onnxruntime-web)";
    name.append(" ", badge);
  }
  id.appendChild(name);
  cell(row, "state", d.state, `state state-${d.state}`);
  cell(row, "level", text(d.level));
  cell(row, "trained", text(d.trained_level));
  cell(row, "step (ms)", text(d.profile.step_ms, 1));
  cell(row, "examples", text(d.profile.num_examples));
  cell(row, "memory (MB)", text(d.profile.memory_mb));
  cell(row, "link (Mbit/s)", text(d.profile.bandwidth_mbps));
  cell(row, "last seen", ago(d.last_seen));
  cell(row, "bytes in / out", `${bytes(d.bytes_in)} / ${bytes(d.bytes_out)}`);
  cell(row, "encodings", (d.profile.encodings ?? ["fp32"]).join(" "));
  return row;
}

function roundRow(r) {
  const row = document.createElement("tr");
  row.dataset.round = r.round;
  row.dataset.state = r.state;
  const levelCounts = {};
  for (const a of r.assignments) levelCounts[a.level] = (levelCounts[a.level] || 0) + 1;
  const accuracy = r.metrics && r.metrics.evaluation ? r.metrics.evaluation.global_accuracy : null;
  const end = r.finished_at ?? Date.now() / 1000;
  cell(row, "round", String(r.round));
  cell(row, "state", r.state, `state state-${r.state}`);
  cell(row, "selected", String(r.selected));
  cell(row, "uploaded", String(r.uploads));
  cell(row, "quorum", String(r.quorum));
  cell(row, "levels", Object.entries(levelCounts).sort().map(([l, n]) => `${l}×${n}`).join(" ") || "–");
  cell(row, "accuracy", accuracy === null || accuracy === undefined ? "–" : `${(100 * accuracy).toFixed(2)}%`);
  const transfer = roundTransfer(r);
  const moved = cell(row, "bytes / device", transfer ? `${bytes(transfer.perDevice)} (${transfer.down} ↓ ${transfer.up} ↑)` : "–");
  if (transfer) moved.dataset.bytes = String(Math.round(transfer.perDevice));
  cell(row, "duration", `${(end - r.opened_at).toFixed(1)} s`);
  return row;
}

/** A private run's budget in words: "DP ε 3.2 (δ 1e-05) of 8 · z 1.1 · server". */
export function privacyText(p) {
  const limit = p.max_epsilon ? ` of ${p.max_epsilon}` : "";
  const spent = Number.isFinite(p.epsilon) ? p.epsilon.toPrecision(3) : "∞";
  const noise = p.noise_multiplier === null ? "" : ` · z ${Number(p.noise_multiplier).toPrecision(3)}`;
  return `DP ε ${spent} (δ ${p.delta})${limit}${noise} · ${p.placement}` + (p.stopped ? " · budget reached" : "");
}

function render(health, devices, rounds) {
  document.getElementById("summary").textContent =
    `${health.model} · mode ${health.mode} · policy ${health.policy} · ` +
    `round ${text(health.round)} (${text(health.round_state)}) · ` +
    `${health.completed_rounds}/${health.rounds} rounds done · ` +
    `${health.live_devices}/${health.devices} devices live` +
    (health.status === "starting" ? " · building artifacts" : "") +
    (health.privacy ? ` · ${privacyText(health.privacy)}` : "");
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

  document.getElementById("devices").replaceChildren(...devices.devices.map(deviceRow));
  const total = devices.total ?? devices.devices.length;
  const offset = devices.offset ?? 0;
  const shown = devices.devices.length;
  document.getElementById("device-count").textContent =
    total > shown ? `(${offset + 1}–${offset + shown} of ${total})` : `(${total})`;
  const pager = document.getElementById("device-pager");
  pager.hidden = total <= (devices.limit ?? PAGE_SIZE) && offset === 0;
  document.getElementById("devices-previous").disabled = offset === 0;
  document.getElementById("devices-next").disabled = offset + shown >= total;

  document.getElementById("rounds").replaceChildren(...rounds.slice().reverse().map(roundRow));
  lastRounds = rounds;
  drawCurve(document.getElementById("curve"), accuracyPoints(rounds));
  document.body.dataset.updated = String(Date.now());
}

/** An error reply's {code, message}, or null for a reply that is fine. */
async function problemOf(reply) {
  if (reply.ok) return null;
  let body = {};
  try {
    body = await reply.json();
  } catch {
    body = {};
  }
  return { status: reply.status, code: body.code ?? `http_${reply.status}`, message: body.message ?? `HTTP ${reply.status}` };
}

const token = typeof location === "undefined" ? null : operatorToken(location, globalThis.sessionStorage, history);

async function refresh() {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const alert = document.getElementById("access");
  try {
    const replies = await Promise.all([
      fetch("/v1/health"),
      fetch(`/v1/devices?offset=${deviceOffset}&limit=${PAGE_SIZE}`, { headers }),
      fetch("/v1/rounds", { headers }),
    ]);
    for (const reply of replies) {
      const problem = await problemOf(reply.clone());
      if (problem?.code === "operator_token_required") {
        alert.hidden = false;
        alert.textContent =
          "This coordinator shows its devices and rounds to its operator only: open the live-page " +
          "link printed at the coordinator's start-up (it ends in #operator=…).";
        document.body.dataset.updated = String(Date.now());
        return;
      }
      if (problem) throw new Error(`${reply.url}: ${problem.message}`);
    }
    alert.hidden = true;
    const [health, devices, rounds] = await Promise.all(replies.map((r) => r.json()));
    if (devices.devices.length === 0 && deviceOffset > 0 && devices.total > 0) {
      deviceOffset = Math.max(0, devices.total - PAGE_SIZE); // the list shrank under this page
      return refresh();
    }
    render(health, devices, rounds.rounds);
  } catch (error) {
    document.getElementById("summary").textContent = `coordinator unreachable (${error}); retrying`;
  }
}

if (typeof document !== "undefined") {
  document.getElementById("devices-previous").addEventListener("click", () => {
    deviceOffset = Math.max(0, deviceOffset - PAGE_SIZE);
    refresh();
  });
  document.getElementById("devices-next").addEventListener("click", () => {
    deviceOffset += PAGE_SIZE;
    refresh();
  });
  let width = 0;
  new ResizeObserver(() => {
    const svg = document.getElementById("curve");
    if (svg.clientWidth !== width) {
      width = svg.clientWidth;
      drawCurve(svg, accuracyPoints(lastRounds));
    }
  }).observe(document.getElementById("curve"));
  refresh();
  setInterval(refresh, REFRESH_MS);
}
