"use strict";
// The ops page: reads /v1/ops/summary with the key kept in sessionStorage, redraws every 5 s.
// Every value is written with textContent or as an SVG attribute, never as HTML.
(function () {
  const KEY = "lorafleet.apiKey";
  const REFRESH_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f5fd0", "#d0782f", "#1f8a4c", "#8e44ad", "#c0392b"];
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fmtSeconds(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    if (v < 0.001) return (v * 1e6).toFixed(0) + " µs";
    if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 2 : 0) + " ms";
    return v.toFixed(2) + " s";
  }

  function fmtAge(seconds) {
    if (seconds < 60) return seconds.toFixed(0) + " s ago";
    if (seconds < 3600) return (seconds / 60).toFixed(0) + " min ago";
    return (seconds / 3600).toFixed(1) + " h ago";
  }

  function fmtTime(unix) {
    return unix ? new Date(unix * 1000).toLocaleString() : "–";
  }

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function badge(state) {
    return el("span", { class: "badge s-" + state }, state);
  }

  function fillBody(table, rows, emptyText, columns) {
    const body = table.tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      body.append(el("tr", {}, el("td", { class: "none", colspan: String(columns) }, emptyText)));
      return;
    }
    for (const r of rows) body.append(r);
  }

  // -- login ---------------------------------------------------------------------------------
  function showLogin(message) {
    if (timer) { clearInterval(timer); timer = null; }
    $("dash").hidden = true;
    $("signout").hidden = true;
    $("who").textContent = "";
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").focus();
  }

  function signOut() {
    sessionStorage.removeItem(KEY);
    showLogin("");
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    start();
  });
  $("signout").addEventListener("click", signOut);

  // -- data ----------------------------------------------------------------------------------
  async function refresh() {
    const key = sessionStorage.getItem(KEY);
    if (!key) { showLogin(""); return; }
    let resp;
    try {
      resp = await fetch("/v1/ops/summary", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    } catch (err) {
      $("banner").textContent = "The server did not answer: " + err;
      $("banner").hidden = false;
      return;
    }
    if (resp.status === 401 || resp.status === 403) {
      let msg = "This key was refused.";
      try { msg = (await resp.json()).error.message; } catch (_) { /* keep the generic text */ }
      sessionStorage.removeItem(KEY);
      showLogin(msg);
      return;
    }
    if (!resp.ok) {
      $("banner").textContent = "The summary failed with HTTP " + resp.status + ".";
      $("banner").hidden = false;
      return;
    }
    $("banner").hidden = true;
    render(await resp.json());
  }

  function start() {
    $("login").hidden = true;
    $("dash").hidden = false;
    $("signout").hidden = false;
    refresh();
    if (!timer) timer = setInterval(refresh, REFRESH_MS);
  }

  // -- rendering -----------------------------------------------------------------------------
  function render(s) {
    $("who").textContent = "tenant " + s.tenant + (s.platform_admin ? " · platform admin" : "");
    renderTiles(s);
    renderCharts(s.history);
    renderJobs(s.jobs);
    renderPolicies(s.policies);
    renderReplicas(s);
    $("updated").textContent = "updated " + new Date(s.generated_at * 1000).toLocaleTimeString() +
      " · refreshes every " + REFRESH_MS / 1000 + " s";
  }

  function renderTiles(s) {
    const c = s.job_counts;
    const up = s.replica_counts.filter((r) => r.state === "up").reduce((a, r) => a + r.count, 0);
    const all = s.replica_counts.reduce((a, r) => a + r.count, 0);
    const warming = s.policies.filter((p) => p.rollout && p.rollout.state === "warming").length;
    const tiles = [
      [c.queued, "jobs queued"], [c.running, "jobs running"], [c.succeeded, "jobs succeeded"],
      [c.failed, "jobs failed"], [s.policies.length, "policies"], [warming, "rollouts warming"],
      [up + " / " + all, "replicas up"],
    ];
    $("tiles").replaceChildren(...tiles.map(([n, l]) =>
      el("div", { class: "tile" }, el("div", { class: "n" }, n), el("div", { class: "l" }, l))));
  }

  function renderJobs(jobs) {
    fillBody($("jobs"), jobs.map((j) => {
      const frac = j.total_steps ? Math.min(1, (j.step || 0) / j.total_steps) : (j.status === "succeeded" ? 1 : 0);
      const fill = el("div");
      fill.style.width = (frac * 100).toFixed(1) + "%";
      const label = j.total_steps ? `step ${j.step || 0} / ${j.total_steps}` : (j.step ? `step ${j.step}` : "not started");
      const progress = el("td", {}, el("span", { class: "small" }, label), el("div", { class: "bar" }, fill));
      if (j.error) progress.append(el("div", { class: "small error" }, j.error));
      return el("tr", { "data-job": j.id }, el("td", { class: "mono" }, j.id), el("td", {}, j.policy),
        el("td", {}, j.method), el("td", {}, badge(j.status)), progress, el("td", { class: "small" }, fmtTime(j.created_at)));
    }), "No jobs yet.", 6);
  }

  function renderPolicies(policies) {
    fillBody($("policies"), policies.map((p) => {
      const ro = p.rollout;
      const rollout = ro
        ? el("td", {}, badge(ro.state), " ", el("span", { class: "mono" }, ro.revision),
          el("div", { class: "small dim" }, "updated " + fmtTime(ro.updated_at)),
          ...(ro.error ? [el("div", { class: "small error" }, ro.error)] : []))
        : el("td", { class: "none" }, "none");
      return el("tr", { "data-policy": p.name }, el("td", {}, p.name), el("td", {}, p.base_model),
        el("td", { class: "mono" }, p.serving_revision || "–"), el("td", { class: "mono" }, p.previous_revision || "–"), rollout);
    }), "No policies yet.", 5);
  }

  function renderReplicas(s) {
    const note = $("replica-note");
    if (s.replicas === null) {
      note.textContent = "Replica details are shown to the platform admin only; counts: " +
        (s.replica_counts.map((r) => `${r.count} ${r.role} ${r.state}`).join(", ") || "none");
      fillBody($("replicas"), [], "Not shown for this key.", 6);
      return;
    }
    note.textContent = "";
    fillBody($("replicas"), s.replicas.map((r) => {
      const tiers = el("td", { class: "small" });
      for (const [tier, entries] of Object.entries(r.resident)) {
        const bytes = entries.reduce((a, e) => a + e.bytes, 0);
        const line = el("div", {}, el("b", { class: "tier" }, `${tier}: ${entries.length}`),
          el("span", { class: "dim" }, entries.length ? fmtBytes(bytes) : ""));
        if (entries.length) line.append(el("div", { class: "mono dim" }, entries.map((e) => e.revision_id + (e.pinned ? " (pinned)" : "")).join(", ")));
        tiers.append(line);
      }
      if (!tiers.childNodes.length) tiers.append(el("span", { class: "none" }, "none"));
      const state = r.stale && r.state === "up" ? "stale" : r.state;
      return el("tr", { "data-replica": r.id }, el("td", { class: "mono" }, r.id), el("td", {}, r.role),
        el("td", {}, r.base_model || "–"), el("td", {}, badge(state)), el("td", { class: "small" }, fmtAge(r.heartbeat_age_seconds)), tiers);
    }), "No replica has registered.", 6);
  }

  function renderCharts(h) {
    const load = h.series.filter((x) => x.key.startsWith("adapter_load"));
    const ttft = h.series.filter((x) => x.key.startsWith("ttft"));
    const end = Date.now() / 1000;
    drawChart($("chart-load"), load, end - (h.window_seconds || 3600), end, h.error);
    drawChart($("chart-ttft"), ttft, end - (h.window_seconds || 3600), end, h.error);
    $("history-note").textContent = h.error ? h.error :
      `source: ${h.source === "prometheus" ? "Prometheus" : "this process's own histograms"}, ` +
      `one point per ${h.step_seconds} s (p95 over the trailing minute).`;
  }

  // A line chart in inline SVG: time on x over the window, seconds on y; gaps where no data.
  function drawChart(host, series, t0, t1, error) {
    const W = 640, H = 220, L = 56, R = 10, T = 10, B = 24;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    const values = series.flatMap((s) => s.points.map((p) => p[1]).filter((v) => v !== null));
    const ymax = values.length ? Math.max(...values) * 1.15 || 0.001 : 1;
    const x = (t) => L + (W - L - R) * Math.max(0, Math.min(1, (t - t0) / (t1 - t0)));
    const y = (v) => T + (H - T - B) * (1 - v / ymax);
    root.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      root.append(svg("line", { class: "axis", x1: L, y1: y(v), x2: W - R, y2: y(v), "stroke-dasharray": "2 3" }));
      const label = svg("text", { class: "tick", x: L - 4, y: y(v) + 3, "text-anchor": "end" });
      label.textContent = values.length ? fmtSeconds(v) : "";
      root.append(label);
    }
    for (let m = 60; m >= 0; m -= 15) {
      const label = svg("text", { class: "tick", x: x(t1 - m * 60), y: H - 6, "text-anchor": "middle" });
      label.textContent = m ? `-${m} min` : "now";
      root.append(label);
    }
    series.forEach((s, i) => {
      let d = "", pen = false;
      for (const [t, v] of s.points) {
        if (v === null || t < t0) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = true;
      }
      if (d) root.append(svg("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2 }));
      // a lone point has no segment to draw: mark every point so sparse data stays visible
      for (const [t, v] of s.points) {
        if (v !== null && t >= t0) root.append(svg("circle", { cx: x(t), cy: y(v), r: 2.2, fill: COLORS[i % COLORS.length] }));
      }
    });
    if (!values.length) {
      const msg = svg("text", { class: "empty", x: (W + L) / 2, y: H / 2, "text-anchor": "middle" });
      msg.textContent = error ? "no data: " + error.slice(0, 80) : "no observations in the last hour";
      root.append(msg);
    }
    const legend = el("div", { class: "legend" }, ...series.map((s, i) => {
      const sw = el("i");
      sw.style.background = COLORS[i % COLORS.length];
      const last = [...s.points].reverse().find((p) => p[1] !== null);
      return el("span", {}, sw, s.title + (last ? " · " + fmtSeconds(last[1]) : ""));
    }));
    host.replaceChildren(root, legend);
  }

  if (sessionStorage.getItem(KEY)) start(); else showLogin("");
})();
