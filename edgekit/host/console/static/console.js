// The fleet console's pages: fetch /api/..., render with DOM nodes (text only, never HTML
// from the data), fetch again when /api/stream says the page's topic moved.
"use strict";
(() => {
  const app = document.getElementById("app");
  const page = app.dataset.page;
  let session = { operator: false, csrf: "", login: false, actions: false };
  const state = { sort: { key: "device", dir: 1 }, filters: {}, charts: [], markers: [],
                  eventCursor: 0, events: [] };

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%");
  const ms = (v) => (v === null || v === undefined ? "–" : v.toFixed(v < 10 ? 2 : 1) + " ms");
  const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
  const when = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");
  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return n + " B";
    if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
    return (n / (1 << 20)).toFixed(2) + " MiB";
  }
  const badge = (text, kind) => h("span", { class: "badge " + (kind || text) }, text);
  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin" });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }
  async function post(url, fields) {
    const body = new URLSearchParams({ ...fields, csrf_token: session.csrf });
    const r = await fetch(url, { method: "POST", body, credentials: "same-origin",
                                 headers: { "X-CSRF-Token": session.csrf } });
    return r.json().catch(() => ({ ok: false, error: "HTTP " + r.status }));
  }
  function replace(el, ...children) { el.replaceChildren(...children.flat()); }

  function table(columns, rows, opts = {}) {
    const sort = opts.sort;
    if (sort) {
      const col = columns.find((c) => c.key === sort.key);
      const val = (r) => (col && col.sortValue ? col.sortValue(r) : r[sort.key]);
      rows = [...rows].sort((a, b) => {
        const x = val(a), y = val(b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * sort.dir;
      });
    }
    const head = h("tr", {}, columns.map((c) => h("th", {
      class: sort ? "sortable" + (sort.key === c.key ? (sort.dir > 0 ? " asc" : " desc") : "") : "",
      onclick: sort ? () => { sort.dir = sort.key === c.key ? -sort.dir : 1; sort.key = c.key;
                              opts.onSort(); } : null,
    }, c.label)));
    const body = rows.map((r) => h("tr", opts.rowAttrs ? opts.rowAttrs(r) : {},
      columns.map((c) => h("td", { class: c.cls || "" }, c.render ? c.render(r) : r[c.key] ?? "–"))));
    return h("table", { class: opts.cls || "grid", id: opts.id || null },
             h("thead", {}, head), h("tbody", {}, body.length ? body
               : h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "nothing yet"))));
  }
  function select(name, values, current, onchange, all = "all") {
    return h("label", {}, name + " ", h("select", { name, onchange: (e) => onchange(e.target.value) },
      [h("option", { value: "" }, all), ...values.map((v) => h("option", { value: v, selected: v === current }, v))]));
  }
  // The reply to an action stays shown across the re-renders that follow it.
  function flash(text, ok) {
    if (text !== undefined) state.flash = { text, ok };
    let box = document.getElementById("flash");
    if (!box) { box = h("div", { id: "flash" }); app.prepend(box); }
    if (state.flash) replace(box, h("p", { class: state.flash.ok ? "ok" : "error" }, state.flash.text));
  }

  // ------------------------------------------------------------------ header
  function renderWho() {
    const who = document.getElementById("who");
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle(
      "here", a.dataset.nav === page || (page === "device" && a.dataset.nav === "fleet")));
    if (session.operator) {
      replace(who, h("form", { method: "post", action: "/logout" },
        h("input", { type: "hidden", name: "csrf_token", value: session.csrf }),
        h("span", { class: "operator" }, "operator"), " ", h("button", { type: "submit" }, "log out")));
    } else if (session.login) {
      replace(who, h("span", { class: "muted" }, "read-only · "), h("a", { href: "/login" }, "log in"));
    } else {
      replace(who, h("span", { class: "muted", title: "no operator password configured" }, "read-only"));
    }
  }

  // ------------------------------------------------------------------ fleet
  async function fleet() {
    const data = await getJSON("/api/fleet");
    const f = state.filters;
    const uniq = (k) => [...new Set(data.devices.map((d) => d[k]).filter((v) => v))].sort();
    const shown = data.devices.filter((d) => (!f.fleet || d.fleet === f.fleet) &&
      (!f.version || d.version === f.version) &&
      (!f.state || (f.state === "online") === d.online));
    const cols = [
      { key: "device", label: "device", render: (d) => h("a", {
          href: `/device/${encodeURIComponent(d.fleet)}/${encodeURIComponent(d.device)}` }, d.device) },
      { key: "fleet", label: "fleet" },
      { key: "online", label: "state", render: (d) => badge(d.online ? "online" : "offline") },
      { key: "model", label: "model" },
      { key: "version", label: "version", cls: "version" },
      { key: "variant", label: "variant", render: (d) => d.variant || "–" },
      { key: "p50", label: "p50", render: (d) => ms(d.p50), cls: "num" },
      { key: "p95", label: "p95", render: (d) => ms(d.p95), cls: "num" },
      { key: "accuracy", label: "accuracy", render: (d) => pct(d.accuracy), cls: "num" },
      { key: "f1", label: "F1", render: (d) => pct(d.f1), cls: "num" },
      { key: "labels", label: "labels", cls: "num" },
      { key: "estimated", label: "est. accuracy", render: (d) => pct(d.estimated), cls: "num" },
      { key: "confidence", label: "confidence", render: (d) => num(d.confidence), cls: "num" },
      { key: "shift", label: "pred. shift", render: (d) => num(d.shift), cls: "num" },
      { key: "last_seen", label: "last seen", render: (d) => ago(d.last_seen) },
    ];
    const warnings = Object.entries(data.warnings).map(([fl, list]) =>
      h("div", { class: "warning" }, h("b", {}, fl + ": "), list.join("; ")));
    replace(app,
      h("h1", {}, "Fleet ", h("span", { class: "muted" }, `${shown.length} of ${data.devices.length} devices`)),
      warnings,
      h("div", { class: "filters" },
        select("fleet", uniq("fleet"), f.fleet, (v) => { f.fleet = v; fleet(); }),
        select("version", uniq("version"), f.version, (v) => { f.version = v; fleet(); }),
        select("state", ["online", "offline"], f.state, (v) => { f.state = v; fleet(); })),
      table(cols, shown, { id: "devices", sort: state.sort, onSort: fleet,
                           rowAttrs: (d) => ({ "data-device": d.device, "data-version": d.version || "" }) }),
      h("p", { class: "muted small" }, "confidence and prediction shift (total variation against the" +
        " policy's reference) over the last minute: label-free warnings, never a trigger."));
  }

  // ------------------------------------------------------------------ device
  const MARK_COLORS = { "update.succeeded": "#1b8a3a", "update.failed": "#c62828",
                        "update.rolled_back": "#c62828", "rollout.abort": "#c62828",
                        "rollout.aborted": "#c62828" };
  const markColor = (m) => MARK_COLORS[m.kind] || (m.kind.startsWith("rollout.") ? "#2457c5"
    : m.kind.startsWith("policy.") ? "#b26a00" : "#777");

  // Markers closer than a few pixels share one line; labels take the first of three rows
  // where they fit, with a backing box, and are left out (the list below has them all)
  // where none fits.
  const RANK = { "#c62828": 4, "#b26a00": 3, "#1b8a3a": 2, "#2457c5": 1 };
  function markerGroups(u) {
    const groups = [];
    for (const m of [...state.markers].sort((a, b) => a.t - b.t)) {
      const x = Math.round(u.valToPos(m.t, "x", true));
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      const last = groups[groups.length - 1];
      if (last && x - last.x < 8 * devicePixelRatio) {
        last.n += 1;
        if ((RANK[markColor(m)] || 0) > (RANK[last.color] || 0)) last.color = markColor(m);
      } else groups.push({ x, n: 1, label: m.label, color: markColor(m) });
    }
    return groups;
  }
  function markerPlugin(withLabels) {
    return { hooks: { draw: [(u) => {
      const c = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height, px = devicePixelRatio;
      c.save();
      c.font = `${11 * px}px sans-serif`;
      const rowEnds = [-1e9, -1e9, -1e9];
      for (const g of markerGroups(u)) {
        c.strokeStyle = g.color;
        c.lineWidth = g.n > 1 ? 2 * px : px;
        c.setLineDash([4 * px, 3 * px]);
        c.beginPath(); c.moveTo(g.x, top); c.lineTo(g.x, bottom); c.stroke();
        if (!withLabels) continue;
        const text = g.n > 1 ? `${g.label} +${g.n - 1}` : g.label;
        const w = c.measureText(text).width + 6 * px;
        const row = rowEnds.findIndex((end) => g.x + 2 * px > end);
        if (row < 0 || g.x + w > u.bbox.left + u.bbox.width + 40 * px) continue;
        rowEnds[row] = g.x + w;
        const y = top + (2 + row * 14) * px;
        c.fillStyle = "rgba(255,255,255,0.9)";
        c.fillRect(g.x + 2 * px, y, w - 2 * px, 13 * px);
        c.fillStyle = g.color;
        c.fillText(text, g.x + 4 * px, y + 10 * px);
      }
      c.restore();
    }] } };
  }

  function chart(el, title, t, series, withLabels) {
    const width = Math.max(320, el.clientWidth || 800);
    const opts = {
      title, width, height: 170, plugins: [markerPlugin(withLabels)],
      // The time axis reaches the newest marker too: an update shows before its metrics.
      scales: { x: { time: true, range: (u, lo, hi) => {
        const ts = state.markers.map((m) => m.t);
        if (!ts.length || lo === null || hi === null) return [lo, hi];
        return [Math.min(lo, ...ts), Math.max(hi, ...ts)];
      } } },
      legend: { live: false },
      series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.color, width: 1.5,
                                              spanGaps: true, value: (u, v) => (v === null ? "–" : s.fmt(v)) }))],
      axes: [{}, { values: (u, vals) => vals.map((v) => series[0].fmt(v)), size: 76 }],
    };
    return new uPlot(opts, [t, ...series.map((s) => s.data)], el);
  }

  async function device() {
    const { fleet: fl, device: dev } = app.dataset;
    const data = await getJSON(`/api/device/${encodeURIComponent(fl)}/${encodeURIComponent(dev)}`);
    state.markers = data.markers;
    const s = data.series;
    const specs = [
      ["field accuracy", [{ label: "accuracy", data: s.accuracy, color: "#2457c5", fmt: pct },
                          { label: "F1", data: s.f1, color: "#8e44ad", fmt: pct },
                          { label: "estimated (no labels)", data: s.estimated, color: "#16a085", fmt: pct }]],
      ["latency", [{ label: "p50", data: s.p50, color: "#1b8a3a", fmt: ms },
                   { label: "p95", data: s.p95, color: "#d35400", fmt: ms }]],
      ["request rate", [{ label: "requests/s", data: s.rps, color: "#555", fmt: (v) => v.toFixed(1) + "/s" }]],
      ["confidence", [{ label: "mean confidence", data: s.confidence, color: "#b7950b", fmt: (v) => v.toFixed(3) }]],
    ];
    if (state.charts.length && document.getElementById("charts")) {
      state.charts.forEach((u, i) => { u.setData([s.t, ...specs[i][1].map((x) => x.data)]); u.redraw(); });
    } else {
      replace(app,
        h("h1", {}, h("a", { href: "/" }, "Fleet"), " / ", fl, " / ", dev, " ",
          h("span", { id: "state" })),
        h("div", { id: "summary", class: "cards" }),
        h("div", { id: "charts" }),
        h("h2", {}, "Markers"), h("div", { id: "marker-list" }),
        h("h2", {}, "Update history"), h("div", { id: "history" }),
        h("h2", {}, "Events"), h("div", { id: "device-events" }));
      // Every box is in the grid before any is measured, so each chart fits its column.
      const boxes = specs.map(() => h("div", { class: "chart" }));
      document.getElementById("charts").append(...boxes);
      state.charts = specs.map(([title, series], i) => chart(boxes[i], title, s.t, series, i === 0));
    }
    const d = data.device, m = d.metrics;
    replace(document.getElementById("state"), badge(d.online ? "online" : "offline"));
    replace(document.getElementById("summary"),
      [["model", `${d.model_name || "–"} ${d.model_version || ""}`], ["agent", d.agent_version || "–"],
       ...(d.variant ? [["variant", `${d.variant.id} on ${d.variant.provider || d.variant.runtime},`
         + ` ${ms(d.variant.p50_ms)} (${d.variant.candidates.length} measured)`]] : []),
       ["p50 / p95", `${ms(m.latency_p50_ms)} / ${ms(m.latency_p95_ms)}`],
       ["accuracy / F1", `${pct(m.accuracy)} / ${pct(m.f1)} (${m.label_count ?? 0} labels)`],
       ["estimated accuracy", pct(m.estimated_accuracy)],
       ["last seen", ago(d.last_seen)]].map(([k, v]) => h("div", { class: "card" }, h("span", {}, k), h("b", {}, v))));
    const charts = document.getElementById("charts");
    charts.dataset.markers = String(state.markers.length);
    charts.dataset.points = String(s.t.length);
    replace(document.getElementById("marker-list"), table([
      { key: "t", label: "time", render: (x) => new Date(x.t * 1000).toLocaleTimeString() },
      { key: "kind", label: "kind", render: (x) => h("span", { class: "dot", style: `color:${markColor(x)}` }, "● ", x.kind) },
      { key: "label", label: "marker" },
    ], [...state.markers].reverse(), { id: "markers", cls: "grid compact" }));
    replace(document.getElementById("history"), table([
      { key: "rollout", label: "rollout" }, { key: "version", label: "to" }, { key: "from", label: "from" },
      { key: "wave", label: "wave" }, { key: "state", label: "state", render: (x) => badge(x.state) },
      { key: "reason", label: "reason" }, { key: "updated", label: "updated", render: (x) => when(x.updated) },
    ], data.history, { id: "update-history" }));
    replace(document.getElementById("device-events"), eventsTable(data.events));
  }

  // ------------------------------------------------------------------ rollouts
  function startForm(data) {
    if (!session.operator || !session.actions) return null;
    const form = h("form", { id: "start-rollout", class: "action", onsubmit: async (e) => {
      e.preventDefault();
      const fields = Object.fromEntries(new FormData(e.target).entries());
      const reply = await post("/actions/rollout", fields);
      flash(reply.ok ? `rollout ${reply.rollout.id} created: ${reply.rollout.model_name} ` +
            `${reply.rollout.model_version} to ${reply.rollout.targets.length} device(s)`
            : `refused: ${reply.error}${reply.hint ? " (" + reply.hint + ")" : ""}`, reply.ok);
      refresh();
    } },
      h("b", {}, "Start a rollout "),
      h("select", { name: "fleet" }, data.fleets.map((f) => h("option", { value: f }, f))),
      h("select", { name: "model" }, [...data.models].reverse().map((m) =>
        h("option", { value: `${m.name}:${m.version}` }, `${m.name} ${m.version}`))),
      h("input", { name: "canary", placeholder: "canary (default)", size: 14 }),
      h("button", { type: "submit" }, "start"));
    return form;
  }

  function rolloutCard(r) {
    const done = (r.counts.succeeded || 0) + (r.counts.rolled_back || 0) + (r.counts.failed || 0) +
      (r.counts.timed_out || 0) + (r.counts.skipped || 0);
    const abort = r.active && session.operator && session.actions ? h("button", {
      class: "danger", "data-abort": r.id, onclick: async () => {
        if (!confirm(`Abort rollout ${r.id} and roll its devices back?`)) return;
        const reply = await post("/actions/abort", { fleet: r.fleet, rollout: r.id,
                                                     model: `${r.model_name}:${r.model_version}` });
        flash(reply.ok ? `rollout ${r.id}: ${reply.rollout.state}` : `refused: ${reply.error}`, reply.ok);
        refresh();
      } }, "abort and roll back") : null;
    const to = r.rollback_to ? `${r.rollback_to.name} ${r.rollback_to.version}` : null;
    const back = to && session.operator && session.actions ? h("button", {
      class: "danger", "data-rollback": r.id, onclick: async () => {
        if (!confirm(`Roll ${r.fleet} back from rollout ${r.id} to ${to}?`)) return;
        const reply = await post("/actions/rollback", { fleet: r.fleet, rollout: r.id,
                                                        model: `${r.model_name}:${r.model_version}` });
        flash(reply.ok ? `rollout ${reply.rollout.id} created: back to ${reply.rollout.model_name}`
              + ` ${reply.rollout.model_version}` : `refused: ${reply.error}`, reply.ok);
        refresh();
      } }, `roll back to ${to}`) : null;
    const waves = (r.plan.waves || []).map((size, i) => h("span", {
      class: "wave" + (r.state !== "pending" && i === r.current_wave && r.active ? " current" : "") +
        (i < r.current_wave || !r.active ? " past" : "") }, `wave ${i}: ${size}`));
    return h("section", { class: "rollout " + r.state, id: `rollout-${r.id}`, "data-state": r.state },
      h("h2", {}, `#${r.id} ${r.model_name} ${r.model_version} → ${r.fleet} `, badge(r.state), " ", abort, back),
      h("div", { class: "progress", title: `${done} of ${r.total} devices finished` },
        h("div", { class: "bar ok", style: `width:${r.total ? 100 * (r.counts.succeeded || 0) / r.total : 0}%` }),
        h("div", { class: "bar bad", style: `width:${r.total ? 100 * ((r.counts.failed || 0) + (r.counts.rolled_back || 0) + (r.counts.timed_out || 0)) / r.total : 0}%` })),
      h("p", { class: "muted" }, `source ${r.plan.source || "–"} · created ${when(r.created)}` +
        (r.reason ? ` · ${r.reason}` : "")),
      h("div", { class: "waves" }, waves),
      r.verdicts.map((v) => h("p", { class: v.passed ? "ok" : "error" }, "canary quality: ", v.message)),
      table([{ key: "device", label: "device" }, { key: "wave", label: "wave" },
             { key: "state", label: "state", render: (t) => badge(t.state) },
             { key: "from", label: "from" }, { key: "reason", label: "reason" }], r.targets,
            { cls: "grid compact" }));
  }

  async function rollouts() {
    const data = await getJSON("/api/rollouts");
    replace(app, h("div", { id: "flash" }), h("h1", {}, "Rollouts"), startForm(data),
      data.rollouts.length ? data.rollouts.map(rolloutCard) : h("p", { class: "muted" }, "no rollouts yet"));
    flash();
  }

  // ------------------------------------------------------------------ models
  async function models() {
    const data = await getJSON("/api/models");
    replace(app, h("h1", {}, "Models"), table([
      { key: "name", label: "model" }, { key: "version", label: "version", cls: "version" },
      { key: "channels", label: "channels", render: (m) => m.channels.join(", ") || "–" },
      { key: "format", label: "format" }, { key: "size", label: "size", render: (m) => bytes(m.size), cls: "num" },
      { key: "signer", label: "signer", render: (m) => m.signed
          ? h("span", { title: m.verified ? "signature verified at push" : "signed, not verified" },
              (m.verified ? "✔ " : "") + (m.signer || "signed")) : badge("unsigned", "warn") },
      { key: "parity", label: "parity", render: (m) => !m.parity ? "–" : h("span", {
          title: m.parity.failures.join("; ") || `${m.parity.samples} samples` },
          badge(m.parity.passed ? "passed" : "failed"), ` cos ${num(m.parity.cosine, 4)}`) },
      { key: "accuracy", label: "accuracy source → package", render: (m) =>
          `${pct(m.accuracy_source)} → ${pct(m.accuracy_artifact)}` },
      { key: "f1", label: "F1", render: (m) => pct(m.f1_artifact), cls: "num" },
      { key: "latency", label: "latency p50 / p95", render: (m) => `${ms(m.latency_p50)} / ${ms(m.latency_p95)}` },
      { key: "parent", label: "parent", render: (m) => m.parent || "–" },
      { key: "created", label: "registered", render: (m) => when(m.created) },
    ], data.models, { id: "models" }));
  }

  // ------------------------------------------------------------------ events
  function eventsTable(list) {
    return table([
      { key: "ts", label: "time", render: (e) => when(e.ts) },
      { key: "fleet", label: "fleet" }, { key: "device", label: "device", render: (e) => e.device || "controller" },
      { key: "kind", label: "kind", render: (e) => h("span", { class: "kind " + e.level }, e.kind) },
      { key: "rollout", label: "rollout", render: (e) => e.rollout ?? "" },
      { key: "message", label: "message" },
    ], list, { cls: "grid events" });
  }
  function eventQuery() {
    const p = new URLSearchParams();
    for (const k of ["kind", "device", "rollout", "fleet"]) if (state.filters[k]) p.set(k, state.filters[k]);
    return p;
  }
  async function events(tail) {
    const q = eventQuery();
    if (tail && state.eventCursor) q.set("after", state.eventCursor);
    const data = await getJSON("/api/events?" + q);
    state.events = tail ? [...data.events.reverse(), ...state.events].slice(0, 500) : data.events.reverse();
    state.eventCursor = data.cursor;
    if (!document.getElementById("event-list")) {
      const input = (name, ph) => h("input", { name, placeholder: ph, value: state.filters[name] || "", size: 14 });
      replace(app, h("h1", {}, "Events"),
        h("form", { class: "filters", id: "event-filters", onsubmit: (e) => {
          e.preventDefault();
          state.filters = Object.fromEntries(new FormData(e.target).entries());
          state.eventCursor = 0;
          events(false);
        } }, input("kind", "kind (update. = prefix)"), input("device", "device"),
          input("rollout", "rollout id"), input("fleet", "fleet"),
          h("button", { type: "submit" }, "filter"),
          h("label", {}, h("input", { type: "checkbox", id: "tail", checked: true }), " live tail")),
        h("div", { id: "event-list" }));
    }
    replace(document.getElementById("event-list"), eventsTable(state.events));
  }

  // ------------------------------------------------------------------ login
  function login() {
    const failed = new URLSearchParams(location.search).has("failed");
    replace(app, h("h1", {}, "Operator login"),
      !session.login ? h("p", { class: "warning" }, "No operator password is configured: this console is read-only.") :
      h("form", { method: "post", action: "/login", class: "login", id: "login" },
        h("input", { type: "hidden", name: "csrf_token", value: session.csrf }),
        h("label", {}, "password ", h("input", { type: "password", name: "password", autofocus: true,
                                                  autocomplete: "current-password" })),
        h("button", { type: "submit" }, "log in"),
        failed ? h("p", { class: "error" }, "wrong password") : null));
  }

  // ------------------------------------------------------------------ live
  const PAGES = {
    fleet: [fleet, ["fleet", "events"]], device: [device, ["fleet", "events", "rollouts"]],
    rollouts: [rollouts, ["rollouts", "events", "models", "fleet"]], models: [models, ["models"]],
    events: [() => (document.getElementById("tail")?.checked === false ? null
                    : events(state.eventCursor > 0)), ["events"]],
    login: [login, []],
  };
  let pending = null, running = false;
  async function refresh() {
    if (running) { pending = pending || setTimeout(() => { pending = null; refresh(); }, 100); return; }
    running = true;
    try { await PAGES[page][0](); app.dataset.loaded = String(Date.now()); }
    catch (err) { flash(String(err), false); }
    finally { running = false; }
  }
  function live() {
    const badgeEl = document.getElementById("live");
    const source = new EventSource("/api/stream");
    source.addEventListener("open", () => { badgeEl.textContent = "live"; badgeEl.className = "live on"; });
    source.addEventListener("error", () => { badgeEl.textContent = "reconnecting"; badgeEl.className = "live off"; });
    source.addEventListener("change", (e) => {
      const topics = JSON.parse(e.data).topics;
      if (topics.some((t) => PAGES[page][1].includes(t))) refresh();
    });
  }

  (async () => {
    session = await getJSON("/api/session");
    renderWho();
    await refresh();
    if (page !== "login") live();
  })();
})();
