"""One self-contained HTML file that draws a compiled model's graph.

Each segment gets its own colour, ops left in TensorFlow are marked, and
nodes are collapsed by name scope (a click expands a scope), so a model of
10^4 nodes opens as ~150 boxes. The layered layout runs in the page, since
it changes with every click; no file or network access is needed to view it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from fuseflow import errors
from fuseflow.graph_util import NON_COMPUTE_OPS
from fuseflow.inspect_model import LogicalNode, logical_graph, read_report
from fuseflow.load import read_saved_model_proto, select_meta_graph
from fuseflow.report import summary_line

TF_GROUP, INPUT_GROUP = -1, -2
_HIDDEN_OPS = NON_COMPUTE_OPS - {"Placeholder", "PlaceholderWithDefault"}  # weights, no-ops
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
            "#ff9da7", "#2f6f5e", "#8c6bb1", "#d4a373", "#5fa2ce")


def segment_color(k: int) -> str:
    """A palette colour, then golden-angle hues: neighbours stay distinguishable."""
    if k < len(_PALETTE):
        return _PALETTE[k]
    return f"hsl({(k * 137.508) % 360:.0f},55%,58%)"


def graph_data(nodes: list[LogicalNode], report: dict | None) -> dict:
    """What the page draws: nodes [name, op, group], edges [src, dst], segments, reasons."""
    shown = [n for n in nodes if n.op not in _HIDDEN_OPS]
    index = {n.name: i for i, n in enumerate(shown)}
    order = [s["name"] for s in (report or {}).get("segments", []) if s["compiled"]]
    order += [s for s in dict.fromkeys(n.segment for n in shown if n.segment) if s not in order]
    group = {name: k for k, name in enumerate(order)}

    def group_of(n: LogicalNode) -> int:
        if n.segment is not None:
            return group[n.segment]
        return INPUT_GROUP if n.op.startswith("Placeholder") else TF_GROUP

    edges = sorted({(index[src], i) for i, n in enumerate(shown) for src in n.inputs
                    if src in index and index[src] != i})
    sizes = {name: 0 for name in order}
    for n in shown:
        if n.segment in sizes:
            sizes[n.segment] += 1
    backends = {s["name"]: s["backend"] for s in (report or {}).get("segments", [])}
    reasons: dict[str, list[str]] = {}
    for row in (report or {}).get("not_compiled", []):
        reasons.setdefault(row["op_type"], []).append(f"{row['reason']} ({row['count']})")
    return {
        "nodes": [[n.name, n.op, group_of(n)] for n in shown],
        "edges": [list(e) for e in edges],
        "segments": [{"name": name, "color": segment_color(k), "ops": sizes[name],
                      "backend": backends.get(name, "")} for k, name in enumerate(order)],
        "reasons": {op: "; ".join(r) for op, r in reasons.items()},
    }


def render_html(data: dict, title: str, subtitle: str = "") -> str:
    """The page: data as inline JSON (with '</' escaped so it cannot end the script)."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (_TEMPLATE.replace("@TITLE@", html.escape(title))
            .replace("@SUBTITLE@", html.escape(subtitle))
            .replace("@DATA@", payload))


def write_graph_html(model_dir, html_path) -> Path:
    """Draw the compiled model at model_dir (and its report, if any) into html_path."""
    model_dir = os.fspath(model_dir)
    proto = read_saved_model_proto(model_dir)
    _tags, meta_graph = select_meta_graph(proto, None)
    report = read_report(model_dir)
    data = graph_data(logical_graph(meta_graph.graph_def, model_dir), report)
    subtitle = summary_line(report) if report else "no fuseflow_report.json: reasons unknown"
    path = Path(os.fspath(html_path))
    try:
        path.write_text(render_html(data, model_dir, subtitle), encoding="utf-8")
    except OSError as e:
        raise errors.OutputDirError(f"cannot write the graph picture to {str(path)!r}: "
                                    f"{e.strerror}; choose a writable path") from None
    return path


_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>fuseflow: @TITLE@</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;display:flex;height:100vh;color:#222}
#side{width:290px;padding:10px;overflow:auto;border-right:1px solid #ccc;background:#fafafa}
#side h1{font-size:14px;margin:0 0 4px;word-break:break-all}
#side p{margin:4px 0;color:#555}
#side ul{list-style:none;padding:0;margin:6px 0}
#side li{margin:2px 0;display:flex;align-items:center;gap:6px}
.sw{width:14px;height:14px;border:1px solid #555;flex:none}
.tf{background:#fff;border:2px dashed #d62728}
#info{white-space:pre-wrap;word-break:break-all;margin-top:8px}
button{margin:2px 2px 2px 0}
#view{flex:1;overflow:hidden;cursor:grab}
svg text{pointer-events:none;font-size:11px}
.unit{cursor:pointer}
.unit.sel rect.box{stroke:#000;stroke-width:3}
</style></head><body>
<div id="side"><h1>@TITLE@</h1><p>@SUBTITLE@</p>
<div><button id="collapse">collapse</button><button id="expand">expand all</button>
<button id="fit">fit</button></div>
<p>Click a box with &#9656; to open its name scope; click an op for details.</p>
<ul id="legend"></ul><div id="info"></div></div>
<div id="view"><svg id="svg" width="100%" height="100%"><g id="vp"></g></svg></div>
<script id="data" type="application/json">@DATA@</script>
<script>
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const LIMIT = 150, W = 170, H = 36, GX = 22, GY = 48, TF = -1, INPUT = -2;
const N = D.nodes.length;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;"})[c]);
const clip = (s, n) => s.length > n ? s.slice(0, n - 1) + "\\u2026" : s;
const tail = (s, n) => s.length > n ? "\\u2026" + s.slice(1 - n) : s;  // names end in what differs
const color = g => g >= 0 ? D.segments[g].color : g === INPUT ? "#ddd" : "#fff";

// Name-scope tree: scope 0 is the root; chain[i] lists node i's scopes, outermost first.
const scopes = [{name: "", path: "", parent: -1, kids: new Map(), leaves: 0, size: 0, hist: {}}];
const chain = new Array(N);
D.nodes.forEach((nd, i) => {
  const parts = nd[0].split("/");
  let s = 0;
  const c = [];
  for (let k = 0; k < parts.length - 1; k++) {
    let id = scopes[s].kids.get(parts[k]);
    if (id === undefined) {
      id = scopes.length;
      scopes.push({name: parts[k], path: parts.slice(0, k + 1).join("/"), parent: s,
                   kids: new Map(), leaves: 0, size: 0, hist: {}});
      scopes[s].kids.set(parts[k], id);
    }
    s = id;
    c.push(id);
  }
  scopes[s].leaves++;
  chain[i] = c;
  for (const id of [0].concat(c)) {
    scopes[id].size++;
    scopes[id].hist[nd[2]] = (scopes[id].hist[nd[2]] || 0) + 1;
  }
});

let expanded = new Set([0]);
function collapseAll() {
  // Open whole levels of scopes while the picture stays under LIMIT boxes (a level that
  // does not fit stays closed, so siblings look alike); single-child scopes always open.
  expanded = new Set([0]);
  const add = id => scopes[id].kids.size + scopes[id].leaves - 1;
  let visible = scopes[0].kids.size + scopes[0].leaves, level = [...scopes[0].kids.values()];
  while (level.length) {
    const cost = level.reduce((s, id) => s + add(id), 0);
    const open = visible + cost <= LIMIT ? level : level.filter(id => add(id) <= 0);
    open.forEach(id => { expanded.add(id); visible += add(id); });
    level = open.flatMap(id => [...scopes[id].kids.values()]);
  }
}

function visibleGraph() {
  const rep = new Array(N), units = [], byKey = new Map();
  for (let i = 0; i < N; i++) {
    const s = chain[i].find(id => !expanded.has(id));
    const key = s === undefined ? "n" + i : "s" + s;
    if (!byKey.has(key)) {
      byKey.set(key, units.length);
      units.push(s === undefined ? {leaf: i} : {scope: s});
    }
    rep[i] = byKey.get(key);
  }
  const seen = new Set(), edges = [];
  for (const [a, b] of D.edges) {
    const ra = rep[a], rb = rep[b], k = ra * units.length + rb;
    if (ra !== rb && !seen.has(k)) { seen.add(k); edges.push([ra, rb]); }
  }
  return {units, edges};
}

function layout(n, edges) {
  // Layered: drop back edges (collapsed scopes can form cycles), longest-path layers,
  // then barycenter sweeps to untangle each layer.
  const out = Array.from({length: n}, () => []);
  edges.forEach(([a, b]) => out[a].push(b));
  const state = new Uint8Array(n), succ = Array.from({length: n}, () => []),
        pred = Array.from({length: n}, () => []), indeg = new Int32Array(n);
  for (let r = 0; r < n; r++) {
    if (state[r]) continue;
    state[r] = 1;
    const stack = [[r, 0]];
    while (stack.length) {
      const top = stack[stack.length - 1], v = top[0];
      if (top[1] < out[v].length) {
        const w = out[v][top[1]++];
        if (state[w] === 1) continue;
        succ[v].push(w); pred[w].push(v); indeg[w]++;
        if (!state[w]) { state[w] = 1; stack.push([w, 0]); }
      } else { state[v] = 2; stack.pop(); }
    }
  }
  const layer = new Int32Array(n), order = [];
  for (let v = 0; v < n; v++) if (!indeg[v]) order.push(v);
  for (let k = 0; k < order.length; k++) {
    for (const w of succ[order[k]]) {
      layer[w] = Math.max(layer[w], layer[order[k]] + 1);
      if (--indeg[w] === 0) order.push(w);
    }
  }
  const rows = [];
  order.forEach(v => (rows[layer[v]] = rows[layer[v]] || []).push(v));
  const pos = new Float64Array(n);
  const place = r => r.forEach((v, i) => { pos[v] = i - r.length / 2; });
  rows.forEach(place);
  const sweep = (r, nb) => {
    r.forEach(v => {
      if (nb[v].length) pos[v] = nb[v].reduce((s, u) => s + pos[u], 0) / nb[v].length;
    });
    r.sort((a, b) => pos[a] - pos[b]);
    place(r);
  };
  for (let it = 0; it < 4; it++) {
    for (let l = 1; l < rows.length; l++) sweep(rows[l], pred);
    for (let l = rows.length - 2; l >= 0; l--) sweep(rows[l], succ);
  }
  const wide = Math.max(1, ...rows.map(r => r.length));
  const xy = new Array(n);
  rows.forEach((r, l) => r.forEach((v, i) => {
    xy[v] = [(i + (wide - r.length) / 2) * (W + GX), l * (H + GY)];
  }));
  return {xy, width: wide * (W + GX), height: rows.length * (H + GY)};
}

function unitSvg(u, x, y, k) {
  if (u.leaf !== undefined) {
    const [name, op, g] = D.nodes[u.leaf];
    const style = g === TF ? 'stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"'
                           : 'stroke="#555"';
    const mark = g === TF ? '<text x="' + (W - 20) + '" y="29" fill="#d62728" ' +
                            'font-weight="bold">TF</text>' : "";
    return '<g class="unit leaf" data-unit="' + k + '" data-group="' + g +
      '" transform="translate(' + x + "," + y + ')"><rect class="box" width="' + W +
      '" height="' + H + '" rx="5" fill="' + color(g) + '" ' + style + "/>" + mark +
      "<title>" + esc(name) + "</title>" +
      '<text x="6" y="14">' + esc(tail(name.split("/").slice(-2).join("/"), 25)) + "</text>" +
      '<text x="6" y="29" fill="#444">' + esc(clip(op, g === TF ? 21 : 26)) + "</text></g>";
  }
  const s = scopes[u.scope], groups = Object.keys(s.hist).map(Number)
    .sort((a, b) => (a < 0) - (b < 0) || a - b);
  let bar = "", bx = 6;
  for (const g of groups) {  // a TF op is never thinner than 3px: it must not get lost
    const w = Math.max(g === TF ? 3 : 0, (W - 12) * s.hist[g] / s.size);
    bar += '<rect x="' + bx + '" y="' + (H - 9) + '" width="' + w + '" height="5" fill="' +
      (g === TF ? "#d62728" : color(g)) + '"/>';
    bx += w;
  }
  const fill = groups.length === 1 && groups[0] >= 0 ? color(groups[0]) : "#f4f4f4";
  return '<g class="unit scope" data-unit="' + k + '" data-scope="' + u.scope +
    '" transform="translate(' + x + "," + y + ')"><rect x="4" y="4" width="' + W +
    '" height="' + H + '" rx="5" fill="#bbb"/><rect class="box" width="' + W + '" height="' +
    H + '" rx="5" fill="' + fill + '" stroke="#333"/><title>' + esc(s.path) +
    '/</title><text x="6" y="14">\\u25b8 ' +
    esc(clip(s.name, 22)) + '/</text><text x="6" y="25" fill="#444">' + s.size + " ops" +
    (s.hist[TF] ? ", " + s.hist[TF] + " in TF" : "") + "</text>" + bar + "</g>";
}

let current = null, view = {x: 20, y: 20, k: 1}, drag = null, moved = false;
const vp = document.getElementById("vp"), svg = document.getElementById("svg");
const applyView = () => vp.setAttribute("transform",
  "translate(" + view.x + "," + view.y + ") scale(" + view.k + ")");

function render(fit) {
  const g = visibleGraph(), L = layout(g.units.length, g.edges);
  let out = "";
  for (const [a, b] of g.edges) {
    const [x1, y1] = L.xy[a], [x2, y2] = L.xy[b], cx1 = x1 + W / 2, cx2 = x2 + W / 2;
    const back = y2 <= y1, skip = (y2 - y1) / (H + GY) - 1;  // layers jumped over
    const bow = skip > 0 ? Math.min(W, 40 + 15 * skip) : 0;  // skips curve around boxes
    out += '<path d="M' + cx1 + "," + (y1 + H) + " C" + (cx1 + bow) + "," + (y1 + H + GY) +
      " " + (cx2 + bow) + "," + (y2 - GY) + " " + cx2 + "," + y2 + '" fill="none" stroke="' +
      (back ? "#e9a" : "#999") + '" stroke-width="1.2"/>';
  }
  g.units.forEach((u, k) => { out += unitSvg(u, L.xy[k][0], L.xy[k][1], k); });
  vp.innerHTML = out;
  current = g;
  if (fit) {
    const r = svg.getBoundingClientRect();
    view.k = Math.max(0.4, Math.min(1, (r.width - 40) / L.width));  // tall graphs scroll
    view.x = Math.max(20, (r.width - L.width * view.k) / 2);
    view.y = 20;
  }
  applyView();
  document.body.dataset.units = g.units.length;
  document.body.dataset.ready = "1";
}

function showInfo(k) {
  const u = current.units[k], info = document.getElementById("info");
  vp.querySelectorAll(".sel").forEach(e => e.classList.remove("sel"));
  const el = vp.querySelector('[data-unit="' + k + '"]');
  if (el) el.classList.add("sel");
  const [name, op, g] = D.nodes[u.leaf];
  const where = g >= 0 ? "runs in " + D.segments[g].name + " (" + D.segments[g].backend + ")"
    : g === INPUT ? "model input" : "stays in TensorFlow: " + (D.reasons[op] || "reason unknown");
  let html = "<b>" + esc(op) + "</b> " + esc(name) + "\\n" + esc(where) + "\\n";
  for (const s of chain[u.leaf].slice().reverse()) {
    html += '<button data-collapse="' + s + '">collapse ' + esc(clip(scopes[s].path, 40)) +
      "/</button>";
  }
  info.innerHTML = html;
}

vp.addEventListener("click", e => {
  const el = e.target.closest(".unit");
  if (!el || moved) return;
  const k = Number(el.dataset.unit), u = current.units[k];
  if (u.scope !== undefined) { expanded.add(u.scope); render(false); } else showInfo(k);
});
document.getElementById("info").addEventListener("click", e => {
  const s = e.target.dataset.collapse;
  if (s !== undefined) { expanded.delete(Number(s)); render(false); }
});
document.getElementById("collapse").onclick = () => { collapseAll(); render(true); };
document.getElementById("expand").onclick = () => {
  expanded = new Set(scopes.map((_, i) => i)); render(true);
};
document.getElementById("fit").onclick = () => render(true);

svg.addEventListener("mousedown", e => {
  drag = [e.clientX - view.x, e.clientY - view.y];
  moved = false;
});
window.addEventListener("mousemove", e => {
  if (!drag) return;
  moved = true;
  view.x = e.clientX - drag[0]; view.y = e.clientY - drag[1]; applyView();
});
window.addEventListener("mouseup", () => { drag = null; setTimeout(() => { moved = false; }, 0); });
svg.addEventListener("wheel", e => {
  e.preventDefault();
  const r = svg.getBoundingClientRect(), f = e.deltaY < 0 ? 1.15 : 1 / 1.15;
  const px = e.clientX - r.left, py = e.clientY - r.top;
  view.x = px - (px - view.x) * f; view.y = py - (py - view.y) * f; view.k *= f;
  applyView();
}, {passive: false});

const legend = document.getElementById("legend");
legend.innerHTML = D.segments.map((s, k) => '<li class="seg" data-seg="' + k +
  '"><span class="sw" style="background:' + s.color + '"></span>' + esc(s.name) + " \\u2013 " +
  s.ops + " ops " + esc(s.backend) + "</li>").join("") +
  '<li><span class="sw tf"></span>op left in TensorFlow</li>' +
  '<li><span class="sw" style="background:#ddd"></span>model input</li>' +
  '<li><span class="sw" style="background:#f4f4f4"></span>closed name scope (bar: its mix)</li>';
collapseAll();
render(true);
})();
</script></body></html>
"""
