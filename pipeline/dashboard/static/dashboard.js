// moeforge dashboard: polls /api/runs/<id> and draws it. No framework, no network beyond this server.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);
const fmt = (x, digits = 3) => (x === null || x === undefined) ? "–" : Number(x).toFixed(digits);
const sig = (x) => (x === null || x === undefined) ? "–" : Number(x).toPrecision(4);
const secs = (s) => s === null || s === undefined ? "–" : s < 120 ? `${s.toFixed(1)}s` : `${(s / 60).toFixed(1)}m`;

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function params() { return new URLSearchParams(location.search); }

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

// ------------------------------------------------------------------------------------------------ sections

function drawRunHeader(view) {
  const run = view.run;
  const state = $("#run-state");
  state.textContent = run.state;
  state.className = `state ${run.state}`;
  $("#run-meta").textContent = `${run.name} · config ${run.config} (${run.config_hash}) · ${secs(run.seconds)}` +
    (run.ray_job ? ` · Ray job ${run.ray_job}` : "");
  const links = $("#links");
  links.replaceChildren();
  if (view.links.mlflow) links.append(el("a", {href: view.links.mlflow, id: "mlflow-link"}, "MLflow run"));
  else links.append(el("span", {id: "mlflow-link", title: view.links.tracking_uri},
                       `MLflow: ${view.links.tracking_uri} (moeforge ui)`));
  if (view.links.ray) links.append(el("a", {href: view.links.ray, id: "ray-link"}, "Ray dashboard"));
  const error = $("#error");
  error.hidden = !run.error;
  error.textContent = run.error ? `error: ${run.error}` : "";
}

function drawDag(view) {
  const svg = $("#dag");
  svg.replaceChildren();
  const w = 150, gap = 40, h = 54;
  const pos = {};
  view.stages.forEach((s, i) => { pos[s.name] = i * (w + gap) + 10; });
  const top = 30;  // room for the arcs of edges that skip a stage
  svg.setAttribute("viewBox", `0 ${-top} ${view.stages.length * (w + gap)} ${h + 20 + top}`);
  const defs = el("svg:defs");
  const marker = el("svg:marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6,
                                   markerHeight: 6, orient: "auto"});
  marker.append(el("svg:path", {d: "M0,0 L10,5 L0,10 z", fill: "#888"}));
  defs.append(marker);
  svg.append(defs);
  for (const [from, to] of view.edges) {
    const x1 = pos[from] + w, x2 = pos[to];
    const d = x2 - x1 > gap  // an edge that skips a stage arcs over it, top edge to top edge
      ? `M${x1 - w / 2},10 Q${(x1 + x2) / 2 - w / 4},${-2 * top} ${x2 + w / 2},10`
      : `M${x1},${10 + h / 2} L${x2},${10 + h / 2}`;
    svg.append(el("svg:path", {d, fill: "none", stroke: "#888", "marker-end": "url(#arrow)",
                               "data-edge": `${from}->${to}`}));
  }
  for (const s of view.stages) {
    const g = el("svg:g", {"data-stage": s.name, "data-state": s.state, class: "dag-node"});
    g.append(el("svg:rect", {x: pos[s.name], y: 10, width: w, height: h, rx: 6, class: s.state.replace(" ", "-"),
                             stroke: "#667"}));
    g.append(el("svg:text", {x: pos[s.name] + 10, y: 30, "font-weight": 600}, s.name));
    const detail = s.cache_hit ? "cached" : s.state === "running" && s.progress
      ? `${Math.round(100 * s.progress.done / s.progress.total)}%` : s.state;
    g.append(el("svg:text", {x: pos[s.name] + 10, y: 50, "font-size": 12},
                `${detail}${s.seconds !== undefined ? " · " + secs(s.seconds) : ""}`));
    svg.append(g);
  }
}

function drawStageTable(view) {
  const body = $("#stage-table tbody");
  body.replaceChildren();
  for (const s of view.stages) {
    const tr = el("tr", {"data-stage": s.name});
    tr.append(el("td", {}, s.name));
    const state = el("td", {class: "stage-state"});
    state.append(el("span", {class: `state ${s.state.replace(" ", "-")}`}, s.state));
    tr.append(state);
    tr.append(el("td", {class: "stage-duration"}, secs(s.seconds)));
    tr.append(el("td", {class: "stage-cache"}, s.cache_hit ? `hit (from ${s.cached_from.slice(0, 8)})`
                                                          : s.run_id ? "miss" : "–"));
    const km = Object.entries(s.key_metrics || {}).map(([k, v]) => `${k}=${sig(v)}`).join(", ");
    tr.append(el("td", {class: "stage-metrics"}, km || (s.error ? `error: ${s.error}` : "–")));
    body.append(tr);
  }
  const progress = $("#progress");
  progress.replaceChildren();
  for (const s of view.stages.filter((x) => x.state === "running" && x.progress)) {
    const p = s.progress;
    const bar = el("progress", {max: p.total, value: p.done, "data-stage": s.name});
    progress.append(el("span", {}, `${s.name}: ${p.done} / ${p.total} ${p.unit} `), bar);
  }
}

function drawAcceptance(view) {
  const body = $("#acceptance-table tbody");
  body.replaceChildren();
  const acc = view.acceptance;
  if (!acc) { body.append(el("tr", {}, "no generate stage yet")); return; }
  for (const [task, rate] of Object.entries(acc.by_task)) {
    const tr = el("tr", {"data-task": task});
    tr.append(el("td", {}, task));
    const td = el("td", {class: "rate"});
    td.append(el("span", {class: "bar", style: `width:${Math.round(rate * 200)}px`}), fmt(rate));
    tr.append(td);
    body.append(tr);
  }
  const tr = el("tr", {"data-task": "overall"});
  tr.append(el("th", {}, `overall (${acc.accepted} of ${acc.samples} samples)`), el("th", {class: "rate"}, fmt(acc.overall)));
  body.append(tr);
}

// the evaluation as `moeforge run` prints it: pass@1 per task and overall of each model and of the constant-answer
// floor (with its answer), format failures and completion lengths, the student's costs and the decode speeds
const EVAL_STATS = [["format_failure_rate", "format failures", 3], ["mean_completion_tokens", "mean completion tokens", 1]];
const pct = (x) => (x === null || x === undefined) ? "–" : `${Math.round(100 * x)}%`;
const millions = (x) => (x === null || x === undefined) ? "–" : `${(x / 1e6).toFixed(1)}M`;

function drawEvaluation(view) {
  const table = $("#eval-table");
  const [head, body, foot] = ["thead", "tbody", "tfoot"].map((part) => table.querySelector(part));
  for (const part of [head, body, foot]) part.replaceChildren();
  const reg = view.registration;
  $("#registration").textContent = reg ? `registered version ${reg.version} as ${reg.alias}` : "";
  const ev = view.evaluation;
  $("#eval-costs").textContent = ev && ev.costs ? costLine(ev.costs) : "";
  $("#eval-decode").textContent = ev && ev.decode.length ? decodeLine(ev.decode) : "";
  if (!ev) { body.append(el("tr", {}, "no evaluation yet")); return; }
  const cells = (values, digits) => ev.models.map((m) => el("td", {class: m.name}, fmt(values[m.name], digits)));
  const top = el("tr");
  top.append(el("th", {}, "held-out pass@1"), ...ev.models.map((m) => el("th", {class: m.name}, m.label)),
             el("th", {class: "floor"}, "constant-answer floor"));
  head.append(top);
  for (const row of ev.rows) {
    const tr = el("tr", {"data-task": row.task});
    const floor = el("td", {class: "floor"}, fmt(row.floor));
    if (row.floor_answer !== null) floor.append(" (always ", el("span", {class: "floor-answer"}, row.floor_answer), ")");
    tr.append(el("td", {}, row.task), ...cells(row), floor);
    body.append(tr);
  }
  for (const [key, label, digits] of EVAL_STATS) {
    const tr = el("tr", {"data-stat": key});
    tr.append(el("td", {}, label), ...cells(ev[key], digits), el("td"));
    foot.append(tr);
  }
}

function costLine(c) {
  return `student cost vs teacher: active non-embedding parameters per token ` +
    `${millions(c.student_params_active_nonembedding)} vs ${millions(c.teacher_params_nonembedding)} ` +
    `(${pct(c.active_param_ratio)}); KV cache per token ${c.student_cache_floats_per_token} vs ` +
    `${c.teacher_cache_floats_per_token} floats (${pct(c.cache_ratio)}); KL to the teacher before training ` +
    `${fmt(c.kl_to_teacher)} nats/token`;
}

function decodeLine(speeds) {
  return "decode tokens/s (this machine, greedy): " +
    speeds.map((d) => `batch ${d.batch}: student ${fmt(d.student, 1)}, teacher ${fmt(d.teacher, 1)}`).join("; ");
}

function drawLoss(view) {
  drawCurves("loss", view.loss || {}, "loss", "step", "no training steps yet",
             {loss: "#174ea6", kd: "#e08a00", ce: "#2e9e4f", val_loss: "#c5221f"});
}

function drawRefine(view) {
  drawCurves("refine", view.refine || {}, "reward", "iteration", "refine has logged no iteration",
             {reward: "#2e9e4f", reverse_kl: "#c5221f"});
}

// line curves of {name: [[x, y], ...]} in svg #<id>-curve; `main` is the curve whose last point is labelled
function drawCurves(id, curves, main, unit, empty, colours) {
  const svg = $(`#${id}-curve`);
  svg.replaceChildren();
  const head = curves[main] || [];
  if (!head.length) { svg.append(el("svg:text", {x: 10, y: 20}, empty)); return; }
  const W = 600, H = 260, L = 60, R = 20, T = 20, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const all = Object.values(curves).flat();
  const steps = all.map((p) => p[0]), values = all.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const y0 = Math.min(...values), y1 = Math.max(...values, y0 + 1e-9);
  const sx = (x) => L + (W - L - R) * (x - x0) / (x1 - x0);
  const sy = (y) => T + (H - T - B) * (1 - (y - y0) / (y1 - y0));
  svg.append(el("svg:line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#444"}),
             el("svg:line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#444"}),
             el("svg:text", {x: L - 6, y: T + 4, "text-anchor": "end", "font-size": 11, "data-role": "y-max"}, sig(y1)),
             el("svg:text", {x: L - 6, y: H - B, "text-anchor": "end", "font-size": 11, "data-role": "y-min"}, sig(y0)),
             el("svg:text", {x: L, y: H - B + 16, "font-size": 11, "data-role": "x-min"}, `${unit} ${x0}`),
             el("svg:text", {x: W - R, y: H - B + 16, "text-anchor": "end", "font-size": 11, "data-role": "x-max"},
                `${unit} ${x1}`));
  let legend = L + 10;
  for (const [name, points] of Object.entries(curves)) {
    svg.append(el("svg:polyline", {id: `${id}-line-${name}`, "data-points": points.length, fill: "none",
                                   stroke: colours[name] || "#777", "stroke-width": name === main ? 2 : 1,
                                   points: points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ")}));
    svg.append(el("svg:text", {x: legend, y: T + 4, fill: colours[name], "font-size": 12}, name));
    legend += 12 + 8 * name.length;
  }
  const [lastStep, lastValue] = head[head.length - 1];
  svg.append(el("svg:text", {x: W - R, y: T + 4, "text-anchor": "end", "font-size": 12, id: `${id}-last`,
                             "data-step": lastStep, "data-value": lastValue},
                `${main} ${sig(lastValue)} at ${unit} ${lastStep}`));
}

function drawHeatmap(view) {
  const svg = $("#expert-heatmap");
  svg.replaceChildren();
  const load = view.expert_load;
  if (!load) { svg.append(el("svg:text", {x: 10, y: 20}, "no expert load logged yet")); return; }
  const cell = 36, L = 50, T = 20;
  svg.setAttribute("viewBox", `0 0 ${L + cell * load.experts.length + 10} ${T + cell * load.layers.length + 10}`);
  const max = Math.max(...load.share.flat().filter((v) => v !== null), 1e-9);
  load.experts.forEach((e, j) => svg.append(el("svg:text", {x: L + j * cell + cell / 2, y: T - 6,
                                                            "text-anchor": "middle", "font-size": 11}, `e${e}`)));
  load.layers.forEach((layer, i) => {
    svg.append(el("svg:text", {x: L - 6, y: T + i * cell + cell / 2 + 4, "text-anchor": "end", "font-size": 11},
                  `layer ${layer}`));
    load.experts.forEach((e, j) => {
      const v = load.share[i][j];
      const rect = el("svg:rect", {x: L + j * cell, y: T + i * cell, width: cell - 2, height: cell - 2,
                                   fill: v === null ? "#eee" : `rgba(23, 78, 166, ${0.1 + 0.9 * v / max})`,
                                   "data-layer": layer, "data-expert": e, "data-share": v});
      rect.append(el("svg:title", {}, `layer ${layer}, expert ${e}: ${fmt(v)}`));
      svg.append(rect);
    });
  });
}

function drawServing(view) {
  const section = $("#serving-section");
  section.hidden = !view.serving;
  if (!view.serving) return;
  const body = $("#serving-table tbody");
  body.replaceChildren();
  const s = view.serving;
  const routes = Object.keys(s.latency);
  if (!routes.length) body.append(el("tr", {}, s.scraped ? "no requests yet" : "no Ray metrics endpoint reachable"));
  for (const route of routes) {
    const lat = s.latency[route], ttft = s.ttft[route] || {};
    const tr = el("tr", {"data-route": route});
    // quantiles as histogram bucket bounds: Ray exports histogram sums from bucket midpoints, so a mean would
    // only look precise
    const bound = (q) => q === undefined ? "–" : q === null ? "> max" : `≤ ${q}s`;
    tr.append(el("td", {}, route), el("td", {}, lat.count), el("td", {}, bound(lat.p50_s)), el("td", {}, bound(lat.p95_s)),
              el("td", {}, bound(ttft.p50_s)), el("td", {}, bound(ttft.p95_s)));
    body.append(tr);
  }
}

// ------------------------------------------------------------------------------------------------ loop

async function fillRunList(current) {
  const {runs} = await getJSON("/api/runs");
  const select = $("#run-select");
  select.replaceChildren(...runs.map((r) => el("option", {value: r.run_id}, `${r.name} (${r.state})`)));
  if (current) select.value = current;
  select.onchange = () => { location.search = `?run=${select.value}`; };
}

async function refresh() {
  const id = params().get("run");
  try {
    const view = await getJSON(id ? `/api/runs/${encodeURIComponent(id)}` : "/api/runs/latest");
    drawRunHeader(view); drawDag(view); drawStageTable(view); drawAcceptance(view); drawEvaluation(view);
    drawLoss(view); drawRefine(view); drawHeatmap(view); drawServing(view);
    document.body.dataset.loaded = view.run.run_id;
    await fillRunList(view.run.run_id);
    if (view.run.state === "running") setTimeout(refresh, 2000);
  } catch (e) {
    const error = $("#error");
    error.hidden = false;
    error.textContent = String(e.message || e);
    document.body.dataset.loaded = "error";
  }
}

refresh();
