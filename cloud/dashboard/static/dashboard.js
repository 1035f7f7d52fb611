// edgeloop dashboard: polls the cloud API every 2 s and draws what it gets; no libraries.
// Writes (promote, roll back) send the operator token kept in sessionStorage as a bearer token.
"use strict";

(() => {
  const POLL_MS = 2000;
  const HIDDEN_POLL_MS = 10000;
  const REQUEST_TIMEOUT_MS = 8000;
  const TOKEN_KEY = "edgeloop.dashboard.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const CANDIDATE_CLASSES = ["c1", "c2", "c3"];

  const state = {
    overview: null,
    timeline: null,
    model: null,
    metric: null,
    windowS: 900,
    hidden: new Set(),
    legendKey: "",
    registry: {}, // model -> {versionsKey, promotionsKey, versions}
    timer: null,
    busy: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "title" ||
               k === "scope" || k === "colspan" || k === "type" || k === "for" || k === "id")
        node.setAttribute(k, v === true ? "" : String(v));
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- formatting ---------------------------------------------------------------------------

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const PROPORTIONS = new Set(["accuracy", "f1"]);

  function fmtMetric(name, v) {
    if (!isNum(v)) return "–";
    if (PROPORTIONS.has(name)) return (v * 100).toFixed(1) + " %";
    return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3);
  }
  function fmtRate(v) {
    if (!isNum(v)) return "–";
    if (v >= 1000) return (v / 1000).toFixed(1) + " k";
    if (v >= 10) return v.toFixed(0);
    return v.toFixed(1);
  }
  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–";
  }
  function fmtBytes(v) {
    if (!isNum(v)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }
  function fmtAge(s) {
    if (!isNum(s)) return "–";
    if (s < 1) return "just now";
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  function fmtDuration(s) {
    if (!isNum(s)) return "–";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  const nsToDate = (ns) => new Date(Number(ns) / 1e6);
  function fmtTime(ns, withSeconds = true) {
    return nsToDate(ns).toLocaleTimeString("en-GB", {
      hour: "2-digit", minute: "2-digit", second: withSeconds ? "2-digit" : undefined, hour12: false,
    });
  }
  function fmtDateTime(ns) {
    const d = nsToDate(ns);
    return d.toLocaleDateString("en-CA") + " " + fmtTime(ns);
  }

  // -- HTTP ---------------------------------------------------------------------------------

  async function request(path, options = {}) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(path, { ...options, signal: ctrl.signal, cache: "no-store" });
    } catch (err) {
      if (err.name === "AbortError") throw new Error(`${path}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`);
      throw new Error(`${path}: ${err.message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  async function getJSON(path) {
    const r = await request(path, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await detailOf(r)}`);
    return r.json();
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail ?? body);
    } catch {
      return response.statusText || "";
    }
  }

  // -- notices ------------------------------------------------------------------------------

  function showError(title, text, status) {
    const box = $("error");
    box.replaceChildren(el("strong", { text: title }), text);
    box.dataset.status = status ? String(status) : "";
    box.hidden = false;
    $("message").hidden = true;
  }
  function clearError() {
    const box = $("error");
    box.hidden = true;
    box.replaceChildren();
    box.dataset.status = "";
  }
  function showMessage(text) {
    clearError();
    const box = $("message");
    box.textContent = text;
    box.hidden = false;
  }

  // -- token --------------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }
  function renderTokenState() {
    const s = $("token-state");
    const set = token() !== "";
    s.dataset.set = String(set);
    const protectedWrites = state.overview ? state.overview.write_protected : true;
    s.textContent = set
      ? "token set for this tab"
      : protectedWrites ? "no token (read-only)" : "writes are open (development)";
  }
  function setupToken() {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
      renderTokenState();
      if (value) showMessage("Operator token kept for this browser tab only (sessionStorage).");
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
      renderTokenState();
      showMessage("Operator token forgotten.");
    });
    renderTokenState();
  }

  // -- confirm dialog -----------------------------------------------------------------------

  function confirmAction(title, text, okLabel) {
    const dlg = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    return new Promise((resolve) => {
      const done = (value) => {
        $("confirm-ok").onclick = null;
        $("confirm-cancel").onclick = null;
        dlg.onclose = null;
        if (dlg.open) dlg.close();
        resolve(value);
      };
      $("confirm-ok").onclick = (ev) => { ev.preventDefault(); done(true); };
      $("confirm-cancel").onclick = (ev) => { ev.preventDefault(); done(false); };
      dlg.onclose = () => done(false);
      dlg.showModal();
      $("confirm-cancel").focus();
    });
  }

  // -- writes -------------------------------------------------------------------------------

  async function act(kind, model, version, label) {
    const path = `/api/models/${encodeURIComponent(model)}/${kind === "rollback" ? "rollback" : "promote"}`;
    const ok = await confirmAction(
      kind === "rollback" ? "Roll back" : "Promote",
      `${label}? The edge agents receive the new champion through the model delivery path.`,
      kind === "rollback" ? "Roll back" : "Promote",
    );
    if (!ok) return;
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    let response;
    try {
      response = await request(path, {
        method: "POST", headers, body: JSON.stringify(version ? { version } : {}),
      });
    } catch (err) {
      showError("Not sent:", err.message, "network");
      return;
    }
    if (response.ok) {
      const entry = await response.json();
      showMessage(`Model ${model}: version ${entry.version} (${entry.learner}) is champion now` +
        (kind === "rollback" ? " (rolled back)." : "."));
      schedule(0);
      return;
    }
    const detail = await detailOf(response);
    if (response.status === 401) {
      showError("401 Unauthorized:",
        `this action needs the operator token. Enter it under “Operator token” at the top and try again. (Server: ${detail})`, 401);
      $("token").focus();
    } else if (response.status === 403) {
      showError("403 Forbidden:",
        `the server rejected the operator token. Enter the current api.token and try again. (Server: ${detail})`, 403);
      sessionStorage.removeItem(TOKEN_KEY);
      renderTokenState();
      $("token").focus();
    } else if (response.status === 409) {
      showError("Refused (409):", detail, 409);
    } else {
      showError(`HTTP ${response.status}:`, detail, response.status);
    }
  }

  // -- line chart (SVG) ---------------------------------------------------------------------

  function niceTimeStep(spanMs, maxTicks) {
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
      21600, 43200, 86400].map((s) => s * 1000);
    for (const s of steps) if (spanMs / s <= maxTicks) return s;
    return steps[steps.length - 1];
  }

  function niceTicks(lo, hi, count) {
    const span = hi - lo || 1;
    const raw = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  /**
   * Draw lines and vertical markers into an <svg>, sized to its box (so text is not stretched).
   * series: [{name, label, cls, points: [[ts_ns, value], ...]}]; markers: [{ts_ns, kind, label, title}]
   */
  function drawChart(svg, { series, markers = [], xFrom, xTo, yLo, yHi, yFmt, empty }) {
    for (const child of [...svg.childNodes]) {
      if (child.nodeName !== "title" && child.nodeName !== "desc") child.remove();
    }
    const box = svg.getBoundingClientRect();
    const W = Math.max(300, Math.round(box.width || 1000));
    const H = Math.max(120, Math.round(box.height || 300));
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const LABEL_ROWS = 3;
    const m = { l: 58, r: 14, t: markers.length ? 14 + 13 * LABEL_ROWS : 10, b: 24 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const x = (ns) => m.l + ((ns - xFrom) / (xTo - xFrom)) * pw;
    const y = (v) => m.t + (1 - (v - yLo) / (yHi - yLo)) * ph;

    const grid = svgEl("g", { class: "gridlines" });
    for (const v of niceTicks(yLo, yHi, Math.max(2, Math.floor(ph / 45)))) {
      if (v < yLo - 1e-9 || v > yHi + 1e-9) continue;
      grid.append(svgEl("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
      grid.append(svgEl("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }, yFmt(v)));
    }
    const spanMs = (xTo - xFrom) / 1e6;
    const stepMs = niceTimeStep(spanMs, Math.max(2, Math.floor(pw / 110)));
    const firstMs = Math.ceil(xFrom / 1e6 / stepMs) * stepMs;
    for (let t = firstMs; t <= xTo / 1e6; t += stepMs) {
      const px = x(t * 1e6);
      if (px < m.l + 30) continue; // would collide with the y labels
      grid.append(svgEl("line", { class: "grid", x1: px, x2: px, y1: m.t, y2: H - m.b }));
      grid.append(svgEl("text", { x: px, y: H - 6, "text-anchor": "middle" },
        fmtTime(t * 1e6, stepMs < 60000)));
    }
    grid.append(svgEl("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
    grid.append(svgEl("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
    svg.append(grid);

    let drawn = 0;
    const lines = svgEl("g", { class: "lines" });
    for (const s of series) {
      const pts = s.points.filter(([t, v]) => isNum(v) && t >= xFrom && t <= xTo);
      if (!pts.length) continue;
      let d = "";
      let prev;
      for (const [t, v, version] of pts) {
        const cy = Math.min(Math.max(y(v), m.t), H - m.b);
        // a new model version starts a new segment: its metrics start afresh
        const move = !d || (version !== undefined && prev !== undefined && version !== prev);
        d += (move ? "M" : "L") + x(t).toFixed(1) + " " + cy.toFixed(1);
        prev = version;
      }
      if (pts.length === 1) d += "h2"; // a lone point still shows
      const path = svgEl("path", {
        class: `series ${s.cls}`, d, "data-series": s.name, "data-points": pts.length,
      });
      path.append(svgEl("title", {}, `${s.label}: ${yFmt(pts[pts.length - 1][1])} at ${fmtTime(pts[pts.length - 1][0])}`));
      lines.append(path);
      drawn += pts.length;
    }
    svg.append(lines);

    let shown = 0;
    const marks = svgEl("g", { class: "markers" });
    const visible = markers.filter((mk) => mk.ts_ns >= xFrom && mk.ts_ns <= xTo);
    const rowEnd = new Array(LABEL_ROWS).fill(-Infinity); // right end of the last label per row
    visible.forEach((mk, i) => {
      const px = x(mk.ts_ns);
      const width = 6.6 * mk.label.length + 8;
      // the label goes left of its line when the next marker's line would cross it
      const nextPx = i + 1 < visible.length ? x(visible[i + 1].ts_ns) : Infinity;
      const crowded = nextPx - px < width + 7 && px - 7 - width > m.l;
      const anchor = px + 7 + width > W - m.r || crowded ? "end" : "start";
      const left = anchor === "end" ? px - 7 - width : px + 7;
      let row = rowEnd.findIndex((end) => end < left);
      if (row < 0) row = rowEnd.indexOf(Math.min(...rowEnd)); // all taken: overlap the oldest
      rowEnd[row] = anchor === "end" ? px : left + width;
      const g = svgEl("g", { class: `marker ${mk.kind}`, "data-kind": mk.kind, tabindex: 0 });
      g.append(svgEl("title", {}, mk.title));
      g.append(svgEl("line", { x1: px, x2: px, y1: m.t - 6, y2: H - m.b }));
      const ty = m.t - 8;
      const shape = mk.kind === "drift"
        ? `M${px - 5} ${ty + 2}L${px + 5} ${ty + 2}L${px} ${ty + 9}Z`
        : mk.kind === "swap"
          ? `M${px - 4} ${ty + 2}h8v8h-8Z`
          : `M${px - 5} ${ty + 9}L${px + 5} ${ty + 9}L${px} ${ty + 2}Z`;
      g.append(svgEl("path", { d: shape }));
      g.append(svgEl("text", {
        x: px + (anchor === "end" ? -7 : 7), y: ty + 8 - 13 * row, "text-anchor": anchor,
      }, mk.label));
      marks.append(g);
      shown += 1;
    });
    svg.append(marks);

    if (!drawn) {
      svg.append(svgEl("text", {
        class: "empty-note", x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle",
      }, empty || "No data in this window yet."));
    }
    svg.dataset.points = String(drawn);
    svg.dataset.markers = String(shown);
    svg.dataset.series = series.filter((s) => s.points.length).map((s) => s.name).join(" ");
    return { drawn, shown };
  }

  // -- accuracy chart -----------------------------------------------------------------------

  function seriesOrder(names) {
    const rank = (n) => (n === "edge" ? 0 : n === "champion" ? 1 : 2);
    return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  }

  function seriesLabel(name, tl) {
    if (name === "edge") return "edge (champion at the edge)";
    if (name === "champion") return "champion (cloud replica)";
    return name + (tl.challenger === name ? " (challenger)" : " (candidate)");
  }

  function markersOf(tl) {
    const out = [];
    for (const d of tl.drifts || []) {
      out.push({
        ts_ns: d.ts_ns, kind: "drift", label: "drift",
        title: `Drift detected on version ${d.version ?? "–"} (${d.detector}, ${d.source} errors) at ${fmtDateTime(d.ts_ns)}`,
        details: `version ${d.version ?? "–"}, ${d.detector} on ${d.source} errors after ${fmtInt(d.samples)} samples` +
          (d.promotion_id ? "; answered by a promotion" : "; not answered yet"),
      });
    }
    for (const p of tl.promotions || []) {
      const rb = p.rollback;
      out.push({
        ts_ns: p.ts_ns, kind: rb ? "rollback" : "promotion", label: (rb ? "↶ v" : "v") + p.to_version,
        title: `${rb ? "Rollback" : "Promotion"} v${p.from_version ?? "–"} → v${p.to_version} (${p.reason}, by ${p.actor}) at ${fmtDateTime(p.ts_ns)}`,
        details: `v${p.from_version ?? "–"} → v${p.to_version} (${p.learner}), ${p.reason}, by ${p.actor}`,
      });
    }
    for (const s of tl.swaps || []) {
      out.push({
        ts_ns: s.ts_ns, kind: "swap", label: `${s.agent_id} v${s.to_version}`,
        title: `Agent ${s.agent_id} runs v${s.to_version} (was v${s.from_version ?? "–"}), heartbeat at ${fmtDateTime(s.ts_ns)}`,
        details: `agent ${s.agent_id}: v${s.from_version ?? "–"} → v${s.to_version}`,
      });
    }
    return out.sort((a, b) => a.ts_ns - b.ts_ns);
  }

  function renderLegend(names, tl) {
    const key = names.join("|") + "#" + tl.challenger;
    if (key === state.legendKey) return;
    state.legendKey = key;
    const ul = $("chart-legend");
    ul.replaceChildren();
    let c = 0;
    for (const name of names) {
      const cls = name === "edge" || name === "champion" ? name : CANDIDATE_CLASSES[c++ % 3];
      const box = el("input", { type: "checkbox", checked: !state.hidden.has(name), "data-series": name });
      box.addEventListener("change", () => {
        if (box.checked) state.hidden.delete(name); else state.hidden.add(name);
        renderChart();
      });
      ul.append(el("li", {}, el("label", {}, box, el("span", { class: `key ${cls}`, "aria-hidden": "true" }), seriesLabel(name, tl))));
    }
  }

  function renderMetricSelect(tl) {
    const sel = $("chart-metric");
    const keys = new Set();
    for (const pts of Object.values(tl.series)) for (const p of pts) for (const k of Object.keys(p.rolling || {})) keys.add(k);
    const list = [...keys].sort((a, b) => (a === tl.primary ? -1 : b === tl.primary ? 1 : a.localeCompare(b)));
    if (!list.length) list.push(tl.primary);
    const current = [...sel.options].map((o) => o.value).join("|");
    if (current !== list.join("|")) {
      sel.replaceChildren(...list.map((k) => el("option", { value: k, text: k.replace("_", " ") })));
    }
    if (!state.metric || !list.includes(state.metric)) state.metric = list[0];
    sel.value = state.metric;
  }

  function renderChart() {
    const tl = state.timeline;
    const svg = $("accuracy-chart");
    if (!tl) return;
    renderMetricSelect(tl);
    const metric = state.metric;
    const names = seriesOrder(Object.keys(tl.series));
    renderLegend(names, tl);
    let c = 0;
    const series = names.map((name) => ({
      name,
      label: seriesLabel(name, tl),
      cls: name === "edge" || name === "champion" ? name : CANDIDATE_CLASSES[c++ % 3],
      points: state.hidden.has(name) ? [] : tl.series[name].map((p) =>
        [p.ts_ns, p.rolling ? p.rolling[metric] : null, p.version ?? undefined]),
    }));
    const markers = markersOf(tl);
    const all = series.flatMap((s) => s.points).concat(markers.map((mk) => [mk.ts_ns, null]));
    const first = all.length ? Math.min(...all.map((p) => p[0])) : tl.now_ns;
    let xFrom = Math.max(tl.from_ns, first);
    const xTo = tl.now_ns;
    if (xTo - xFrom < 15e9) xFrom = xTo - 15e9;
    const values = series.flatMap((s) => s.points.map((p) => p[1])).filter(isNum);
    let yLo, yHi;
    if (PROPORTIONS.has(metric)) {
      const lo = values.length ? Math.min(...values) : 0.5;
      yLo = Math.max(0, Math.min(0.5, Math.floor(lo * 10) / 10));
      yHi = 1;
    } else {
      yLo = values.length ? Math.min(...values) : 0;
      yHi = values.length ? Math.max(...values) : 1;
      const pad = (yHi - yLo) * 0.1 || Math.abs(yHi) * 0.1 || 1;
      yLo = Math.max(0, yLo - pad);
      yHi += pad;
    }
    const { drawn, shown } = drawChart(svg, {
      series, markers, xFrom, xTo, yLo, yHi,
      yFmt: (v) => (PROPORTIONS.has(metric) ? (v * 100).toFixed(0) + " %" : fmtMetric(metric, v)),
      empty: "No metrics yet: the chart fills as labelled frames are learned.",
    });
    const edge = tl.series.edge && tl.series.edge.length ? tl.series.edge[tl.series.edge.length - 1] : null;
    $("chart-title").textContent = `Rolling ${metric.replace("_", " ")} of model ${tl.model} over time`;
    $("chart-desc").textContent = drawn
      ? `${drawn} points drawn from ${fmtTime(xFrom)} to ${fmtTime(xTo)}. ` +
        (edge ? `Edge ${metric} now ${fmtMetric(metric, edge.rolling[metric])}. ` : "No edge-scored frames in view. ") +
        `${(tl.drifts || []).length} drift detections, ${(tl.promotions || []).length} champion changes, ` +
        `${(tl.swaps || []).length} edge model swaps in view (${shown} markers).`
      : "No data in this window yet.";
    renderEvents(markers);
  }

  function renderEvents(markers) {
    $("events-count").textContent = String(markers.length);
    const names = { drift: "Drift detected", promotion: "Promotion", rollback: "Rollback", swap: "Edge swap" };
    const rows = [...markers].reverse().slice(0, 200).map((mk) =>
      el("tr", { "data-kind": mk.kind },
        el("td", { title: fmtDateTime(mk.ts_ns) }, fmtTime(mk.ts_ns)),
        el("td", {}, el("span", { class: `key ${mk.kind}`, "aria-hidden": "true" }), names[mk.kind]),
        el("td", {}, mk.details)));
    $("events-table").tBodies[0].replaceChildren(...rows);
  }

  // -- overview: KPIs, fleet, throughput ----------------------------------------------------

  function setTile(id, text, tone, note) {
    const dd = $(id);
    dd.replaceChildren(text, ...(note ? [el("small", { class: "note" }, note)] : []));
    if (tone) dd.dataset.tone = tone; else delete dd.dataset.tone;
  }

  function selectedModel(ov) {
    return ov.models.find((m) => m.name === state.model) || ov.models[0] || null;
  }

  function renderKpis(ov) {
    const m = selectedModel(ov);
    const cur = ov.throughput.current || {};
    if (m && m.champion && m.champion.edge.n) {
      setTile("kpi-edge-acc", fmtMetric(m.primary, m.champion.edge.rolling[m.primary]));
    } else if (m && m.champion && m.champion.cloud.n) {
      setTile("kpi-edge-acc", "–", null,
        `no edge-scored frames; cloud replica ${fmtMetric(m.primary, m.champion.cloud.rolling[m.primary])}`);
    } else {
      setTile("kpi-edge-acc", "–", null, m && m.champion ? "no labelled frames yet" : "no champion yet");
    }
    const behind = ov.fleet.filter((a) => m && a.behind[m.name] !== undefined).length;
    setTile("kpi-champion", m && m.champion ? `v${m.champion.version} · ${m.champion.learner}` : "none yet",
      behind ? "warn" : null,
      behind ? `${behind} agent${behind > 1 ? "s" : ""} not on it yet` : null);
    setTile("kpi-readings", fmtRate(cur.telemetry));
    setTile("kpi-frames", fmtRate(cur.frames));
    setTile("kpi-learned", fmtRate(cur.learned));
    setTile("kpi-lag", fmtInt(ov.throughput.lag_total), ov.throughput.lag_total > 10000 ? "warn" : null);
    const healthy = ov.fleet.filter((a) => a.health === "ok").length;
    const down = ov.fleet.filter((a) => a.health === "down").length;
    setTile("kpi-agents", ov.fleet.length ? `${healthy} / ${ov.fleet.length}` : "no agents",
      down ? "bad" : healthy < ov.fleet.length ? "warn" : ov.fleet.length ? "ok" : null);
    const detections = m ? m.drift.detections : 0;
    setTile("kpi-drifts", m ? String(detections) : "–", m && m.drift.pending ? "warn" : null,
      m && m.drift.pending ? "waiting for a challenger" : null);
  }

  function renderFleet(ov) {
    const tbody = $("fleet-table").tBodies[0];
    if (!ov.fleet.length) {
      tbody.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No agent has sent a heartbeat yet.")));
      return;
    }
    const healthText = { ok: "OK", degraded: "Degraded", stale: "Stale", down: "Down" };
    tbody.replaceChildren(...ov.fleet.map((a) => {
      const models = Object.entries(a.models);
      const modelCell = el("td", { "data-field": "models" },
        ...(models.length ? models.map(([name, v]) => el("span", { class: "model-version" },
          `${name} v${v}`,
          a.behind[name] !== undefined ? el("span", { class: "behind" }, `champion is v${a.behind[name]}: not deployed yet`) : null))
          : ["no model"]));
      const reasons = a.reasons.length ? el("ul", { class: "reasons" }, ...a.reasons.map((r) => el("li", {}, r))) : null;
      return el("tr", { "data-agent": a.agent_id, "data-health": a.health },
        el("th", { scope: "row" }, a.agent_id,
          a.incarnation ? el("span", { class: "behind", "data-field": "incarnation",
            title: "outbox incarnation: a new one means the gateway lost its state directory" },
            `incarnation ${a.incarnation.slice(0, 8)}`) : null),
        el("td", {}, el("span", { class: `badge ${a.health}` }, healthText[a.health] || a.health), reasons),
        el("td", { title: fmtDateTime(a.last_heartbeat_ns) }, fmtAge(a.seconds_since_heartbeat)),
        modelCell,
        el("td", { class: "num", "data-field": "outbox", title: fmtBytes(a.outbox_bytes) },
          fmtInt(a.outbox_depth), el("span", { class: "behind" }, fmtBytes(a.outbox_bytes)),
          a.unconfirmed ? el("span", { class: "behind", "data-field": "unconfirmed",
            title: "sent batches the cloud has not confirmed applied yet" },
            `${fmtInt(a.unconfirmed)} batches unconfirmed for ${fmtDuration(a.unconfirmed_age_s)}`) : null),
        el("td", { class: "num" }, fmtDuration(a.uptime_s)));
    }));
  }

  function renderThroughput(ov) {
    const tp = ov.throughput;
    const cur = tp.current || {};
    const names = { telemetry: "readings", frames: "frames", labels: "labels", events: "events", agents: "heartbeats" };
    $("throughput-table").tBodies[0].replaceChildren(...Object.keys(names).map((k) =>
      el("tr", { "data-topic": k },
        el("th", { scope: "row" }, names[k]),
        el("td", { class: "num" }, fmtRate(cur[k])),
        el("td", { class: "num" }, fmtInt(tp.totals[k])),
        el("td", { class: "num" }, fmtInt(tp.lag[k])))));
    const j = tp.join;
    $("join-line").textContent =
      `Join: ${fmtInt(j.joined)} joined, ${fmtInt(j.pending_frames)} frames and ${fmtInt(j.pending_labels)} labels waiting, ` +
      `${fmtInt(j.never_labelled)} never labelled. Dedupe dropped ${fmtInt(tp.dedupe_dropped)} replayed batches; ` +
      `${fmtInt(tp.poison)} undecodable messages skipped; ${fmtInt(tp.checkpoints)} checkpoints.`;
    const pts = tp.series;
    const svg = $("throughput-chart");
    const series = ["telemetry", "frames", "labels"].map((k) => ({
      name: k, label: names[k] + "/s", cls: "s-" + k, points: pts.map((p) => [p.ts_ns, p[k]]),
    }));
    const values = series.flatMap((s) => s.points.map((p) => p[1])).filter(isNum);
    const xTo = ov.now_ns;
    const xFrom = pts.length ? Math.min(pts[0].ts_ns, xTo - 60e9) : xTo - 60e9;
    const yHi = Math.max(1, ...values) * 1.1;
    drawChart(svg, {
      series, xFrom, xTo, yLo: 0, yHi, yFmt: fmtRate,
      empty: "Rates appear after two samples (one per poll).",
    });
    $("tp-desc").textContent = pts.length
      ? `Now ${fmtRate(cur.telemetry)} readings/s, ${fmtRate(cur.frames)} frames/s, ${fmtRate(cur.labels)} labels/s.`
      : "No rates yet.";
  }

  // -- registry -----------------------------------------------------------------------------

  function modelArticle(name) {
    const id = "model-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
    let art = $(id);
    if (art) return art;
    const rollback = el("button", { type: "button", class: "danger", "data-action": "rollback" }, "Roll back");
    const promote = el("button", { type: "button", "data-action": "promote-challenger" }, "Promote challenger");
    rollback.addEventListener("click", () => {
      const parent = rollback.dataset.target;
      act("rollback", name, null, `Roll back ${name} from v${rollback.dataset.from} to v${parent}`);
    });
    promote.addEventListener("click", () => {
      act("promote", name, null, `Promote a snapshot of ${name}'s challenger (${promote.dataset.learner}) to a new version`);
    });
    art = el("article", { class: "model", id, "data-model": name },
      el("div", { class: "model-head" },
        el("h3", {}, name),
        el("span", { class: "champion-line", "data-field": "champion" }),
        el("div", { class: "actions" }, promote, rollback)),
      el("div", { class: "model-grid" },
        el("div", {},
          el("h4", {}, "Learners (prequential, rolling window)"),
          el("table", { class: "data compact candidates" },
            el("thead", {}, el("tr", {},
              el("th", { scope: "col" }, "Subject"), el("th", { scope: "col", class: "num" }, "samples"),
              el("th", { scope: "col", class: "num" }, "rolling"), el("th", { scope: "col", class: "num" }, "overall"))),
            el("tbody"))),
        el("div", {},
          el("h4", {}, "Versions"),
          el("table", { class: "data compact versions" },
            el("thead", {}, el("tr", {},
              el("th", { scope: "col" }, "Version"), el("th", { scope: "col" }, "Learner"), el("th", { scope: "col" }, "Status"),
              el("th", { scope: "col" }, "Reason"), el("th", { scope: "col" }, "Created"),
              el("th", { scope: "col", class: "num" }, "Metric at promotion"), el("th", { scope: "col" }, el("span", { class: "visually-hidden" }, "Action")))),
            el("tbody")),
          el("h4", {}, "Recent champion changes"),
          el("ul", { class: "fine promotions" }))));
    $("registry").append(art);
    return art;
  }

  function renderRegistryModel(m, versions, promotions) {
    const art = modelArticle(m.name);
    const primary = m.primary;
    const champ = versions.find((v) => v.status === "champion");
    art.querySelector('[data-field="champion"]').textContent = champ
      ? `champion v${champ.version} (${champ.learner})` + (m.challenger ? ` · challenger ${m.challenger}` : "")
      : "no champion yet" + (m.challenger ? ` · challenger ${m.challenger}` : "");
    const rb = art.querySelector('[data-action="rollback"]');
    rb.disabled = !champ || !champ.parent;
    rb.dataset.from = champ ? champ.version : "";
    rb.dataset.target = champ && champ.parent ? champ.parent : "";
    rb.setAttribute("aria-label", champ && champ.parent
      ? `Roll back ${m.name} from v${champ.version} to v${champ.parent}` : `Roll back ${m.name} (nothing to roll back to)`);
    rb.textContent = champ && champ.parent ? `Roll back to v${champ.parent}` : "Roll back";
    const pr = art.querySelector('[data-action="promote-challenger"]');
    pr.disabled = !m.challenger;
    pr.dataset.learner = m.challenger || "";

    const rows = [];
    if (m.champion) {
      rows.push(["edge", m.champion.edge], ["champion (cloud)", m.champion.cloud]);
    }
    for (const [name, c] of Object.entries(m.candidates)) rows.push([name + (name === m.challenger ? " ★" : ""), { n: c.n_learned, ...c }]);
    art.querySelector("table.candidates tbody").replaceChildren(...rows.map(([name, r]) =>
      el("tr", {}, el("th", { scope: "row" }, name), el("td", { class: "num" }, fmtInt(r.n)),
        el("td", { class: "num" }, fmtMetric(primary, (r.rolling || {})[primary])),
        el("td", { class: "num" }, fmtMetric(primary, (r.overall || {})[primary])))));

    const reg = state.registry[m.name] || (state.registry[m.name] = {});
    const vkey = JSON.stringify(versions.map((v) => [v.version, v.status, v.status_reason]));
    if (vkey !== reg.versionsKey) {
      reg.versionsKey = vkey;
      const tbody = art.querySelector("table.versions tbody");
      tbody.replaceChildren(...[...versions].reverse().map((v) => {
        let action = null;
        if (champ && v.version !== champ.version && v.status !== "cannot_ship") {
          const older = v.version < champ.version;
          const label = older ? `Roll back to v${v.version}` : `Promote v${v.version}`;
          action = el("button", {
            type: "button", class: "small" + (older ? " danger" : ""),
            "data-action": older ? "rollback-version" : "promote-version", "data-version": v.version,
            "aria-label": `${label} of ${m.name}`,
          }, label);
          action.addEventListener("click", () =>
            act(older ? "rollback" : "promote", m.name, v.version, `${label} of model ${m.name}`));
        }
        const metric = v.metrics && v.metrics.rolling ? v.metrics.rolling[primary] : undefined;
        return el("tr", { "data-version": v.version, "data-status": v.status },
          el("th", { scope: "row" }, "v" + v.version + (v.parent ? ` ← v${v.parent}` : "")),
          el("td", {}, v.learner, v.artifact && v.artifact.sha256
            ? el("span", { class: "fine-inline", title: "sha256 " + v.artifact.sha256 }, " ONNX " + String(v.artifact.sha256).slice(0, 8))
            : null),
          el("td", {}, el("span", { class: `badge ${v.status}` }, v.status.replace("_", " ")),
            v.status_reason ? el("span", { class: "behind" }, v.status_reason) : null),
          el("td", {}, v.reason),
          el("td", { title: fmtDateTime(v.created_ns) }, fmtDateTime(v.created_ns)),
          el("td", { class: "num" }, fmtMetric(primary, metric)),
          el("td", {}, action));
      }));
    }
    const pkey = JSON.stringify(promotions.map((p) => p.id));
    if (pkey !== reg.promotionsKey) {
      reg.promotionsKey = pkey;
      art.querySelector("ul.promotions").replaceChildren(...promotions.slice(0, 6).map((p) =>
        el("li", {}, `${fmtDateTime(p.ts_ns)}: v${p.from_version ?? "–"} → v${p.to_version} ` +
          `(${p.rollback && p.reason !== "rollback" ? "rollback, " : ""}${p.reason}, by ${p.actor})`)));
    }
  }

  async function refreshRegistry(ov) {
    const loaded = await Promise.all(ov.models.map(async (m) => {
      const base = `/api/models/${encodeURIComponent(m.name)}`;
      const [versions, promotions] = await Promise.all([
        getJSON(base + "/versions"), getJSON(base + "/promotions?limit=6"),
      ]);
      return [m, versions, promotions];
    }));
    const placeholder = $("registry").querySelector("p.fine");
    if (placeholder) placeholder.remove();
    if (!ov.models.length) $("registry").replaceChildren(el("p", { class: "fine" }, "No models configured."));
    for (const [m, versions, promotions] of loaded) renderRegistryModel(m, versions, promotions);
  }

  // -- the loop -----------------------------------------------------------------------------

  function renderModelSelect(ov) {
    const sel = $("chart-model");
    const names = ov.models.map((m) => m.name);
    if ([...sel.options].map((o) => o.value).join("|") !== names.join("|")) {
      sel.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    }
    if (!state.model || !names.includes(state.model)) state.model = names[0] || null;
    if (state.model) sel.value = state.model;
  }

  function setConnection(ok, text) {
    const p = $("connection");
    p.dataset.state = ok ? "live" : "lost";
    $("connection-text").textContent = text;
  }

  async function tick() {
    if (state.busy) return;
    state.busy = true;
    try {
      const ov = await getJSON("/api/dashboard/overview");
      state.overview = ov;
      $("instance").textContent = `instance ${ov.instance}`;
      $("environment").textContent = ov.environment + (ov.running ? "" : " (not consuming)");
      renderModelSelect(ov);
      renderKpis(ov);
      renderFleet(ov);
      renderThroughput(ov);
      renderTokenState();
      if (state.model) {
        state.timeline = await getJSON(
          `/api/dashboard/timeline?model=${encodeURIComponent(state.model)}&window_s=${state.windowS}`);
        renderChart();
      }
      await refreshRegistry(ov);
      setConnection(true, `Live · updated ${fmtTime(ov.now_ns)}`);
      document.body.dataset.loaded = "true";
    } catch (err) {
      setConnection(false, `Connection lost: ${err.message}. Retrying…`);
    } finally {
      state.busy = false;
      schedule(document.hidden ? HIDDEN_POLL_MS : POLL_MS);
    }
  }

  function schedule(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(tick, ms);
  }

  function init() {
    setupToken();
    $("chart-model").addEventListener("change", (ev) => {
      state.model = ev.target.value; state.legendKey = ""; state.metric = null; schedule(0);
    });
    $("chart-metric").addEventListener("change", (ev) => { state.metric = ev.target.value; renderChart(); });
    $("chart-window").addEventListener("change", (ev) => { state.windowS = Number(ev.target.value); schedule(0); });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { renderChart(); if (state.overview) renderThroughput(state.overview); }, 150);
    });
    tick();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
