// rock-serve console: one page, no build step, no CDN. Data is only ever put in the DOM as
// text (never innerHTML). Talks to /ui/api/* and REST v1 with the session cookie; every
// state-changing call repeats the CSRF cookie in X-CSRF-Token.
"use strict";
(function () {
  const ROOT = location.pathname.replace(/\/ui\/.*$/, "");
  const API = ROOT + "/v1";
  const UI = ROOT + "/ui/api";
  const state = { me: null, rows: new Map(), seq: 0, events: null, stats: new Map(),
    timers: [], term: null, ws: null, dropped: 0, received: 0 };
  window.rockConsole = state; // for tests and the bench (read-only use)

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function cookie(name) {
    const m = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return m ? decodeURIComponent(m[1]) : "";
  }
  async function api(url, opts) {
    opts = Object.assign({ credentials: "same-origin" }, opts || {});
    opts.headers = Object.assign({}, opts.headers || {});
    const method = (opts.method || "GET").toUpperCase();
    if (method !== "GET" && method !== "HEAD") opts.headers["X-CSRF-Token"] = cookie("rock_csrf");
    const resp = await fetch(url, opts);
    if (!resp.ok) {
      let message = resp.status + " " + resp.statusText, code = "";
      try { const b = await resp.json(); message = b.error.message; code = b.error.code; } catch (e) { /* not JSON */ }
      const err = new Error(message);
      err.status = resp.status; err.code = code;
      err.requestId = resp.headers.get("x-request-id"); err.traceId = resp.headers.get("x-trace-id");
      throw err;
    }
    return resp;
  }
  async function json(url, opts) { return (await api(url, opts)).json(); }
  function toast(err) {
    const box = document.getElementById("toast");
    box.replaceChildren(
      h("strong", { text: (err.code || "error") + ": " }), err.message || String(err),
      err.traceId ? h("div", { class: "trace" }, "request id ", h("code", { text: err.requestId }),
        " · trace id ", h("code", { text: err.traceId })) : null,
      h("button", { type: "button", onclick: () => { box.hidden = true; } }, "Dismiss"));
    box.hidden = false;
  }
  function age(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  }
  const now = () => Date.now() / 1000;
  const mib = (b) => (b === null || b === undefined) ? "–" : (b / 1048576).toFixed(1) + " MiB";
  function clearPage() {
    for (const t of state.timers) clearInterval(t);
    state.timers = [];
    if (state.events) { state.events.close(); state.events = null; }
    if (state.ws) { state.ws.close(); state.ws = null; }
    if (state.term) { state.term.dispose(); state.term = null; }
    if (state.follow) { state.follow.abort(); state.follow = null; }
  }
  function page(title, ...children) {
    const el = document.getElementById("page");
    el.replaceChildren(h("h1", { id: "page-title", text: title }), ...children);
    el.hidden = false;
    document.title = title + " · rock-serve";
    return el;
  }

  // ------------------------------------------------------------------ session
  async function start() {
    try {
      state.me = await json(UI + "/me");
    } catch (err) {
      if (err.status === 401) return showLogin();
      return toast(err);
    }
    document.getElementById("login").hidden = true;
    document.getElementById("nav").hidden = false;
    document.getElementById("logout").hidden = !state.me.auth_required;
    document.getElementById("who").textContent =
      state.me.name + " · " + state.me.role + (state.me.all_namespaces ? "" : " · " + state.me.namespace);
    document.body.dataset.role = state.me.role;
    route();
  }
  function showLogin() {
    clearPage();
    document.getElementById("page").hidden = true;
    document.getElementById("nav").hidden = true;
    document.getElementById("logout").hidden = true;
    document.getElementById("who").textContent = "";
    document.getElementById("login").hidden = false;
    document.getElementById("token").focus();
  }
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = document.getElementById("token").value.trim();
    const msg = document.getElementById("login-error");
    msg.textContent = "";
    try {
      await json(UI + "/login", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token }) });
      document.getElementById("token").value = "";
      if (!location.hash) location.hash = "#/sandboxes";
      start();
    } catch (err) { msg.textContent = err.message; }
  });
  document.getElementById("logout").addEventListener("click", async () => {
    await api(UI + "/logout", { method: "POST" }).catch(toast);
    state.me = null;
    showLogin();
  });

  // ------------------------------------------------------------------ router
  function route() {
    if (!state.me) return;
    clearPage();
    const hash = location.hash || "#/sandboxes";
    for (const a of document.querySelectorAll("nav a"))
      a.toggleAttribute("aria-current", hash.startsWith(a.getAttribute("href")) ||
        (a.getAttribute("href") === "#/envs" && hash.startsWith("#/env/")));
    for (const a of document.querySelectorAll("nav a[aria-current]")) a.setAttribute("aria-current", "page");
    const m = hash.match(/^#\/sandbox\/([^/]+)$/);
    if (m) return sandboxPage(decodeURIComponent(m[1]));
    const e = hash.match(/^#\/env\/([^/]+)(?:\/episode\/(\d+))?$/);
    if (e) return envPage(decodeURIComponent(e[1]), e[2] === undefined ? null : Number(e[2]));
    if (hash === "#/workers") return workersPage();
    if (hash === "#/envs") return envsPage();
    if (hash === "#/metrics") return metricsPage();
    return sandboxesPage();
  }
  window.addEventListener("hashchange", route);

  // ------------------------------------------------------------------ sandboxes table
  const PAGE_ROWS = 200;
  const COLUMNS = ["ID", "State", "Namespace", "Owner", "Image", "Node", "Age", "Lease left",
    "CPU", "Memory"];
  function sandboxesPage() {
    const search = h("input", { id: "search", type: "search", placeholder: "id, owner, label…" });
    const stateSel = h("select", { id: "state-filter" }, h("option", { value: "", text: "any" }),
      ["pending", "starting", "running", "paused", "stopping", "stopped", "failed"].map(
        (s) => h("option", { value: s, text: s })));
    const nsInput = h("input", { id: "ns-filter", type: "text", placeholder: "any" });
    const count = h("p", { id: "count", "aria-live": "polite" });
    // At most `limit` rows are in the DOM (the newest first); "Show more" adds a page.
    let limit = PAGE_ROWS;
    const more = h("button", { type: "button", id: "show-more", hidden: true,
      onclick: () => { limit += PAGE_ROWS; render(); } }, "Show more");
    const tbody = h("tbody", { id: "rows" });
    const table = h("table", { id: "sandboxes", "aria-describedby": "count" },
      h("caption", { class: "skip", text: "Sandboxes" }),
      h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", { scope: "col", text: c })))), tbody);
    page("Sandboxes",
      h("div", { class: "filters", role: "search" },
        h("label", { for: "search" }, "Search", search),
        h("label", { for: "state-filter" }, "State", stateSel),
        h("label", { for: "ns-filter" }, "Namespace", nsInput)),
      count, table, more);
    const trs = new Map();
    function visible() {
      const q = search.value.trim().toLowerCase(), st = stateSel.value, ns = nsInput.value.trim();
      const out = [];
      for (const r of state.rows.values()) {
        if (st && r.state !== st) continue;
        if (ns && r.namespace !== ns) continue;
        if (q) {
          const hay = [r.id, r.owner, r.image || "", r.namespace, r.worker,
            ...Object.entries(r.labels).map(([k, v]) => k + "=" + v)].join(" ").toLowerCase();
          if (!hay.includes(q)) continue;
        }
        out.push(r);
      }
      return out.sort((a, b) => b.created_at - a.created_at);
    }
    function cells(r) {
      const st = state.stats.get(r.id);
      const cpu = (st && st.cpu_percent !== undefined ? st.cpu_percent.toFixed(0) + "% " : "") +
        (r.cpus ? "/ " + r.cpus : "");
      const mem = (st ? mib(st.memory_usage_bytes) + " " : "") + (r.memory_mb ? "/ " + r.memory_mb + " MiB" : "");
      return [r.state + (r.reason ? " (" + r.reason + ")" : ""), r.namespace, r.owner, r.image || "default",
        r.worker, age(now() - r.created_at),
        r.lease_expires_at ? age(r.lease_expires_at - now()) : "–", cpu || "–", mem || "–"];
    }
    function render() {
      const matching = visible();
      const rows = matching.slice(0, limit);
      count.textContent = (rows.length < matching.length ? "showing " + rows.length + " of " : "") +
        matching.length + " of " + state.rows.size + " sandboxes";
      more.hidden = rows.length >= matching.length;
      const wanted = new Set(rows.map((r) => r.id));
      for (const [id, tr] of trs) if (!wanted.has(id)) { tr.remove(); trs.delete(id); }
      let i = 0, inOrder = true;
      for (const r of rows) {
        let tr = trs.get(r.id);
        if (!tr) {
          tr = h("tr", { "data-id": r.id },
            h("td", {}, h("a", { href: "#/sandbox/" + encodeURIComponent(r.id), text: r.id })),
            ...COLUMNS.slice(1).map(() => h("td")));
          trs.set(r.id, tr);
        }
        const values = cells(r);
        for (let c = 0; c < values.length; c++) {
          const td = tr.children[c + 1];
          if (td.textContent !== values[c]) td.textContent = values[c];
        }
        const cls = "state-" + r.state;
        if (tr.children[1].className !== cls) tr.children[1].className = cls;
        if (tbody.children[i] !== tr) inOrder = false;
        i++;
      }
      if (!inOrder || tbody.children.length !== rows.length)
        tbody.replaceChildren(...rows.map((r) => trs.get(r.id)));
      tbody.dataset.seq = String(state.seq);
    }
    for (const el of [search, stateSel, nsInput])
      el.addEventListener("input", () => { limit = PAGE_ROWS; render(); });
    state.rows = new Map();
    state.seq = 0;
    const es = new EventSource(UI + "/events");
    state.events = es;
    es.addEventListener("table", (ev) => {
      const e = JSON.parse(ev.data);
      if (e.snapshot) state.rows = new Map();
      else if (e.seq !== state.seq + 1) state.dropped += e.seq - state.seq - 1;
      state.seq = e.seq;
      state.received += e.upsert.length + e.remove.length;
      for (const r of e.upsert) state.rows.set(r.id, r);
      for (const id of e.remove) state.rows.delete(id);
      render();
      if (e.snapshot) document.body.dataset.tableReady = "1";
    });
    es.addEventListener("error", () => { if (es.readyState === EventSource.CLOSED) toast(new Error("live updates stopped")); });
    // Usage of the first rows shown (one stats call each, every 5 s).
    async function refreshStats() {
      const rows = visible().filter((r) => r.state === "running").slice(0, 20);
      await Promise.all(rows.map(async (r) => {
        try {
          const s = await json(API + "/sandboxes/" + encodeURIComponent(r.id) + "/stats");
          const prev = state.stats.get(r.id);
          if (prev && s.cpu_usage_seconds !== null && prev.cpu_usage_seconds !== null)
            s.cpu_percent = 100 * (s.cpu_usage_seconds - prev.cpu_usage_seconds) / ((Date.now() - prev.at) / 1000);
          s.at = Date.now();
          state.stats.set(r.id, s);
        } catch (e) { /* gone meanwhile */ }
      }));
    }
    state.timers.push(setInterval(render, 1000), setInterval(refreshStats, 5000));
    refreshStats();
  }

  // ------------------------------------------------------------------ one sandbox
  async function sandboxPage(id) {
    const path = API + "/sandboxes/" + encodeURIComponent(id);
    let rec;
    try { rec = await json(path); } catch (err) { page("Sandbox " + id, h("p", { class: "error", text: err.message })); return toast(err); }
    const dl = (pairs) => h("dl", {}, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
    const statsBox = h("div", { id: "stats" });
    const actions = h("div", { class: "actions", role: "group", "aria-label": "Actions" });
    if (state.me.may_act) {
      actions.append(
        h("button", { type: "button", id: "renew", onclick: async () => {
          try { rec = await json(path + "/renew", { method: "POST" }); toast({ code: "ok", message: "lease renewed" }); } catch (e) { toast(e); }
        } }, "Renew lease"),
        h("button", { type: "button", id: "delete", onclick: async () => {
          if (!confirm("Delete " + id + " and everything in it?")) return;
          try { await api(path, { method: "DELETE" }); location.hash = "#/sandboxes"; } catch (e) { toast(e); }
        } }, "Delete"),
        h("button", { type: "button", id: "open-terminal", onclick: () => openTerminal(id, termBox) }, "Open terminal"));
    }
    // Fork, pause and resume: shown to everyone, disabled for a read-only role.
    const lifecycle = (bid, label, verb, body) => h("button", { type: "button", id: bid,
      disabled: !state.me.may_act, title: state.me.may_act ? null : "read-only role",
      onclick: async () => {
        try {
          const res = await json(path + "/" + verb, { method: "POST",
            headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
          if (verb === "fork") {
            const child = res.items[0].id;
            toast({ code: "ok", message: "forked into " + res.items.map((r) => r.id).join(", ") });
            location.hash = "#/sandbox/" + encodeURIComponent(child);
          } else { toast({ code: "ok", message: id + " is " + res.state }); route(); }
        } catch (e) { toast(e); }
      } }, label);
    actions.append(lifecycle("fork", "Fork", "fork", { count: 1 }),
      rec.state === "paused" ? lifecycle("resume", "Resume", "resume") : lifecycle("pause", "Pause", "pause"));
    const termBox = h("div", { id: "terminal", class: "terminal", hidden: true, "aria-label": "Terminal" });
    page("Sandbox " + id,
      actions,
      h("div", { class: "grid2" },
        h("section", { "aria-labelledby": "h-summary" }, h("h2", { id: "h-summary", text: "Summary" }),
          dl([["State", rec.state + (rec.reason ? " (" + rec.reason + ")" : "")], ["Namespace", rec.namespace],
            ["Owner", rec.owner || "–"], ["Image", rec.image || "default"], ["Node", rec.worker],
            ["Network", rec.network], ["Created", new Date(rec.created_at * 1000).toISOString()],
            ["TTL left", rec.expires_at ? age(rec.expires_at - now()) : "–"],
            ["Lease left", rec.lease_expires_at ? age(rec.lease_expires_at - now()) : "–"]])),
        h("section", { "aria-labelledby": "h-res" }, h("h2", { id: "h-res", text: "Resources" }),
          dl([["CPUs", rec.resources.cpus ?? "–"], ["Memory", rec.resources.memory_mb ? rec.resources.memory_mb + " MiB" : "–"],
            ["PIDs", rec.resources.pids ?? "–"], ["Disk", rec.resources.disk_mb ? rec.resources.disk_mb + " MiB" : "–"]]),
          statsBox)),
      h("section", { "aria-labelledby": "h-labels" }, h("h2", { id: "h-labels", text: "Labels" }),
        Object.keys(rec.labels).length ? dl(Object.entries(rec.labels)) : h("p", { text: "none" })),
      h("section", { "aria-labelledby": "h-history" }, h("h2", { id: "h-history", text: "History" }),
        h("table", { id: "history" }, h("thead", {}, h("tr", {}, ["When", "State", "Reason"].map((c) => h("th", { scope: "col", text: c })))),
          h("tbody", {}, rec.history.map((c) => h("tr", {}, h("td", { text: new Date(c.at * 1000).toISOString() }),
            h("td", { text: c.state }), h("td", { text: c.reason || "" })))))),
      h("section", { "aria-labelledby": "h-term" }, h("h2", { id: "h-term", text: "Terminal" }), termBox,
        state.me.may_act ? null : h("p", { text: "Read-only role: no terminal." })),
      processesSection(id, path),
      portSection(id, path),
      filesSection(id, path));
    async function stats() {
      try {
        const s = await json(path + "/stats");
        statsBox.replaceChildren(dl([["CPU used", s.cpu_usage_seconds !== null ? s.cpu_usage_seconds.toFixed(2) + " s" : "–"],
          ["Memory used", mib(s.memory_usage_bytes)], ["Processes", s.pids_current]]));
      } catch (e) { /* stopped */ }
    }
    stats();
    state.timers.push(setInterval(stats, 5000));
  }

  function openTerminal(id, box) {
    if (state.term) { state.term.focus(); return; }
    box.hidden = false;
    const term = new window.Terminal({ convertEol: false, fontSize: 13, cursorBlink: true });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    fit.fit();
    state.term = term;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(proto + "//" + location.host + API + "/sandboxes/" +
      encodeURIComponent(id) + "/pty?cols=" + term.cols + "&rows=" + term.rows);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    const enc = new TextEncoder();
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const m = JSON.parse(ev.data);
        if (m.type === "exit") term.write("\r\n[exited with " + m.exit_code + "]\r\n");
        else if (m.error) { term.write("\r\n[" + m.error.code + ": " + m.error.message + "]\r\n"); toast(m.error); }
      } else term.write(new Uint8Array(ev.data));
    };
    ws.onopen = () => { box.dataset.connected = "1"; term.focus(); };
    ws.onclose = () => { box.dataset.connected = "0"; };
    term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });
    term.onResize(({ cols, rows }) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows })); });
  }

  // ------------------------------------------------------------------ processes, ports
  function processesSection(id, path) {
    const list = h("tbody", { id: "processes" });
    const out = h("pre", { id: "process-output", class: "output", "aria-live": "polite", hidden: true });
    const outTitle = h("h3", { id: "h-output", hidden: true });
    async function show() {
      try {
        const res = await json(path + "/processes");
        list.replaceChildren(...res.processes.map((p) => h("tr", { "data-pid": String(p.pid) },
          h("td", { text: String(p.pid) }), h("td", {}, h("code", { text: p.command.join(" ") })),
          h("td", { class: p.running ? "state-running" : "state-stopped",
            text: p.running ? "running" : (p.signal ? "killed (signal " + p.signal + ")" : "exited") }),
          h("td", { text: p.exit_code === null ? "–" : String(p.exit_code) }),
          h("td", { text: age((p.ended_at || now()) - p.started_at) }),
          h("td", {},
            h("button", { type: "button", class: "follow", "aria-label": "Output of " + p.pid,
              onclick: () => follow(p.pid) }, "Output"),
            h("button", { type: "button", class: "kill", "aria-label": "Kill " + p.pid,
              disabled: !state.me.may_act || !p.running, onclick: async () => {
                try { await json(path + "/processes/" + p.pid, { method: "DELETE" }); await show(); } catch (e) { toast(e); }
              } }, "Kill")))));
        list.dataset.loaded = "1";
      } catch (err) { /* not running (paused, stopped): keep the last list */ }
    }
    // Follows stdout of one process over the NDJSON stream (the `next` offset resumes).
    async function follow(pid) {
      if (state.follow) state.follow.abort();
      const ctl = new AbortController();
      state.follow = ctl;
      out.hidden = false; outTitle.hidden = false;
      outTitle.textContent = "Output of " + pid;
      out.textContent = "";
      out.dataset.pid = String(pid); out.dataset.ended = "0";
      try {
        const resp = await api(path + "/processes/" + pid + "/output?follow=true&stream=stdout", { signal: ctl.signal });
        const reader = resp.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
            if (!line.trim()) continue;
            const m = JSON.parse(line);
            if (m.error) { toast(m.error); continue; }
            if (m.type === "data") out.append(m.encoding === "base64" ? atob(m.data) : m.data);
            else if (m.type === "truncated") out.append("[… output before byte " + m.truncated_before + " dropped]\n");
            else if (m.type === "end") { out.dataset.ended = "1"; show(); }
          }
        }
      } catch (err) { if (err.name !== "AbortError") toast(err); }
    }
    show();
    state.timers.push(setInterval(show, 2000));
    return h("section", { "aria-labelledby": "h-proc" }, h("h2", { id: "h-proc", text: "Processes" }),
      h("table", { id: "process-table" }, h("thead", {}, h("tr", {}, ["PID", "Command", "Status", "Exit code", "Ran", "Actions"]
        .map((c) => h("th", { scope: "col", text: c })))), list),
      outTitle, out);
  }
  function portSection(id, path) {
    const port = h("input", { id: "port", type: "number", min: "1", max: "65535", value: "8000" });
    const link = h("a", { id: "open-port", target: "_blank", rel: "noopener" });
    const update = () => {
      const n = parseInt(port.value, 10);
      const ok = n >= 1 && n <= 65535;
      link.setAttribute("href", ok ? path + "/ports/" + n + "/" : "#");
      link.textContent = ok ? "Open port " + n : "Open port";
      link.toggleAttribute("aria-disabled", !ok);
    };
    port.addEventListener("input", update);
    update();
    return h("section", { "aria-labelledby": "h-port" }, h("h2", { id: "h-port", text: "Ports" }),
      state.me.may_act ? h("p", { class: "filters" }, h("label", { for: "port" }, "Port in the sandbox", port), link)
        : h("p", { text: "Read-only role: no port access." }));
  }

  function filesSection(id, path) {
    const dir = h("input", { id: "dir", type: "text", value: "." });
    const list = h("tbody", { id: "files" });
    const upload = h("input", { id: "upload", type: "file" });
    const status = h("p", { id: "files-status", "aria-live": "polite" });
    async function show() {
      status.textContent = "";
      try {
        const res = await json(path + "/files/list?path=" + encodeURIComponent(dir.value));
        dir.value = res.path;
        list.replaceChildren(...res.entries.map((e) => {
          const name = e.type === "dir"
            ? h("button", { type: "button", class: "linkish", onclick: () => { dir.value = e.path; show(); } }, e.name + "/")
            : h("a", { href: path + "/files?path=" + encodeURIComponent(e.path), download: e.name, text: e.name });
          return h("tr", {}, h("td", {}, name), h("td", { text: e.type }), h("td", { text: String(e.size) }),
            h("td", { text: new Date(e.mtime * 1000).toISOString() }));
        }));
      } catch (err) { status.textContent = err.message; }
    }
    const form = h("form", { id: "upload-form", onsubmit: async (ev) => {
      ev.preventDefault();
      const file = upload.files[0];
      if (!file) return;
      const target = dir.value.replace(/\/$/, "") + "/" + file.name;
      try {
        await api(path + "/files?path=" + encodeURIComponent(target), { method: "PUT", body: file });
        await show();
        status.textContent = "uploaded " + target;
      } catch (err) { toast(err); status.textContent = err.message; }
    } }, h("label", { for: "upload" }, "File to upload "), upload, h("button", { type: "submit" }, "Upload"));
    return h("section", { "aria-labelledby": "h-files" }, h("h2", { id: "h-files", text: "Files" }),
      h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); show(); } },
        h("label", { for: "dir" }, "Directory", dir), h("button", { type: "submit", id: "list-files" }, "List")),
      state.me.may_act ? form : null, status,
      h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Type", "Size", "Modified"].map((c) => h("th", { scope: "col", text: c })))), list));
  }

  // ------------------------------------------------------------------ workers, envs
  async function workersPage() {
    const body = h("div", { id: "workers" });
    page("Workers", body);
    async function load() {
      try {
        const w = await json(UI + "/workers");
        body.replaceChildren(
          h("dl", {}, h("dt", { text: "Status" }), h("dd", { text: w.status }),
            h("dt", { text: "Creates queued" }), h("dd", { text: String(w.queued) }),
            h("dt", { text: "Creates in flight" }), h("dd", { text: String(w.in_flight) }),
            h("dt", { text: "429 per second" }), h("dd", { text: String(w.rate_limited_per_second) })),
          w.workers.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Worker", "Node", "Alive", "Runtime", "Sandboxes", "Capacity", "Warm pool"].map((c) => h("th", { scope: "col", text: c })))),
            h("tbody", {}, w.workers.map((x) => h("tr", {}, [x.name, x.node_id.slice(0, 12), x.alive ? "yes" : "NO", x.runtime,
              String(x.sandboxes), String(x.capacity), String(x.warm)].map((v) => h("td", { text: v }))))))
            : h("p", { text: "Node details are shown to viewer, operator and admin roles." }));
      } catch (err) { toast(err); }
    }
    load();
    state.timers.push(setInterval(load, 5000));
  }
  async function envsPage() {
    const body = h("div", { id: "envs" });
    page("Envs", body);
    const cols = ["Instance", "Env", "Namespace", "Idle", "Busy", "Episodes", "Sandbox", "Open"];
    async function load() {
      try {
        const res = await json(UI + "/envs");
        body.replaceChildren(res.items.length ? h("table", {},
          h("caption", { class: "skip", text: "Env instances" }),
          h("thead", {}, h("tr", {}, cols.map((c) => h("th", { scope: "col", text: c })))),
          h("tbody", {}, res.items.map((e) => h("tr", { "data-id": e.id },
            h("td", {}, h("a", { href: "#/env/" + encodeURIComponent(e.id), text: e.id })),
            [e.env_id, e.namespace, age(e.idle_seconds), e.busy ? "yes" : "no", String(e.episodes),
              e.sandbox_id || "–", e.closed ? "closed" : "open"].map((v) => h("td", { text: v }))))))
          : h("p", { text: "No GEM env instances are open (or recently closed)." }));
      } catch (err) { toast(err); }
    }
    load();
    state.timers.push(setInterval(load, 5000));
  }
  // One env instance: its episodes, one episode's steps, and its sandbox's LLM calls beside.
  const STEPS_PAGE = 100, CALLS_PAGE = 50, EPISODES_PAGE = 20;
  const cut = (text, n) => (text && text.length > n ? text.slice(0, n - 1) + "…" : text || "");
  function llmText(message) {
    if (!message) return "";
    if (typeof message.content === "string") return message.content;
    if (Array.isArray(message.content)) return message.content.map((p) => p.text || "").join("");
    if (message.tool_calls) return JSON.stringify(message.tool_calls);
    return JSON.stringify(message);
  }
  function llmCall(step, i) {
    const msgs = (step.request && step.request.messages) || [];
    const last = msgs[msgs.length - 1];
    const choice = step.response && step.response.choices && step.response.choices[0];
    const answer = step.error ? "error: " + JSON.stringify(step.error)
      : choice ? llmText(choice.message || choice.delta) : "(waiting for an answer)";
    return h("li", { class: "llm-call", "data-index": String(i) },
      h("h3", { text: "Call " + (i + 1) + (step.request && step.request.model ? " · " + step.request.model : "") }),
      h("div", { class: "grid2" },
        h("div", {}, h("strong", { text: "Request" + (last ? " (" + last.role + ", " + msgs.length + " messages)" : "") }),
          h("pre", { class: "output llm-request", text: cut(llmText(last), 4000) })),
        h("div", {}, h("strong", { text: "Response" }),
          h("pre", { class: "output llm-response", text: cut(answer, 4000) }))));
  }
  async function envPage(id, wanted) {
    const episodesBox = h("div", { id: "episodes" });
    const stepsBox = h("section", { id: "steps", "aria-labelledby": "steps-title" },
      h("h2", { id: "steps-title", text: "Steps" }));
    const callsBox = h("section", { id: "llm", "aria-labelledby": "llm-title" },
      h("h2", { id: "llm-title", text: "LLM calls" }));
    const summary = h("dl", { id: "env-summary" });
    page("Env " + id, h("p", {}, h("a", { href: "#/envs", text: "← all env instances" })), summary,
      h("section", { "aria-labelledby": "episodes-title" }, h("h2", { id: "episodes-title", text: "Episodes" }), episodesBox),
      h("div", { class: "grid2 side-by-side" }, stepsBox, callsBox));
    const base = UI + "/envs/" + encodeURIComponent(id) + "/episodes";
    let list;
    try {
      const all = await json(UI + "/envs");
      const inst = all.items.find((x) => x.id === id);
      if (inst) summary.replaceChildren(
        ...[["Env", inst.env_id], ["Namespace", inst.namespace], ["Sandbox", inst.sandbox_id || "–"],
          ["State", inst.closed ? "closed" : inst.busy ? "busy" : "open"]]
          .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
      list = await json(base + "?limit=" + EPISODES_PAGE);
    } catch (err) { episodesBox.replaceChildren(h("p", { class: "error", text: err.message })); return toast(err); }
    if (!list.items.length) {
      episodesBox.replaceChildren(h("p", { text: "No episode yet (reset the env to start one)." }));
      episodesBox.dataset.loaded = "1";
      return;
    }
    const current = wanted === null ? list.items[0].index : wanted;
    episodesBox.replaceChildren(h("table", { id: "episode-list" },
      h("caption", { class: "skip", text: "Episodes, newest first" }),
      h("thead", {}, h("tr", {}, ["Episode", "Steps", "Total reward", "Done", "Started"].map((c) => h("th", { scope: "col", text: c })))),
      h("tbody", {}, list.items.map((ep) => h("tr", { "data-index": String(ep.index) },
        h("td", {}, h("a", { href: "#/env/" + encodeURIComponent(id) + "/episode/" + ep.index,
          "aria-current": ep.index === current ? "true" : null, text: "Episode " + ep.index })),
        h("td", { text: String(ep.steps) + (ep.dropped_steps ? " (" + ep.dropped_steps + " not kept)" : "") }),
        h("td", { text: fmt(ep.total_reward) }), h("td", { text: ep.done ? "yes" : "no" }),
        h("td", { text: new Date(ep.started * 1000).toLocaleTimeString() }))))),
      ...(list.total > list.items.length ? [h("p", { text: list.total + " episodes kept; the newest " + list.items.length + " are listed." })] : []));
    episodesBox.dataset.loaded = "1";
    // Steps of the chosen episode, a page at a time.
    const tbody = h("tbody", { id: "step-rows" });
    const moreSteps = h("button", { type: "button", id: "more-steps", hidden: true }, "More steps");
    stepsBox.append(h("table", { id: "step-table" },
      h("caption", { class: "skip", text: "Steps of episode " + current }),
      h("thead", {}, h("tr", {}, ["Step", "Action", "Reward", "End", "Observation"].map((c) => h("th", { scope: "col", text: c })))),
      tbody), moreSteps);
    let sandboxId = null, stepsAt = 0;
    async function steps() {
      try {
        const res = await json(base + "/" + current + "?offset=" + stepsAt + "&limit=" + STEPS_PAGE);
        sandboxId = res.episode.sandbox_id;
        for (const st of res.items) tbody.append(h("tr", { "data-step": String(st.index) },
          h("td", { text: st.index === 0 ? "reset" : String(st.index) }),
          h("td", {}, h("code", { text: st.action === null ? "–" : cut(st.action, 200) })),
          h("td", { text: st.reward === null ? "–" : fmt(st.reward) }),
          h("td", { text: st.terminated ? "terminated" : st.truncated ? "truncated" : "" }),
          h("td", { class: "obs", title: st.observation, text: cut(st.observation, 200) })));
        stepsAt += res.items.length;
        moreSteps.hidden = stepsAt >= res.total;
        stepsBox.dataset.loaded = "1";
      } catch (err) { toast(err); }
    }
    moreSteps.addEventListener("click", steps);
    await steps();
    // The sandbox's recorded LLM calls (its model service), when it has one.
    const calls = h("ol", { id: "llm-calls" });
    const moreCalls = h("button", { type: "button", id: "more-calls", hidden: true }, "More calls");
    let callsAt = 0;
    async function llm() {
      if (!sandboxId) { callsBox.append(h("p", { text: "This episode has no sandbox." })); callsBox.dataset.loaded = "1"; return; }
      try {
        const res = await json(UI + "/sandboxes/" + encodeURIComponent(sandboxId) + "/trajectory?offset=" + callsAt + "&limit=" + CALLS_PAGE);
        res.items.forEach((st, i) => calls.append(llmCall(st, callsAt + i)));
        callsAt += res.items.length;
        moreCalls.hidden = callsAt >= res.total;
        if (!res.total) callsBox.append(h("p", { text: "No LLM call recorded yet." }));
      } catch (err) {
        if (err.status !== 404) toast(err);
        callsBox.append(h("p", { text: err.status === 404 ? "No LLM calls recorded for sandbox " + sandboxId + "." : err.message }));
      }
      callsBox.dataset.loaded = "1";
    }
    moreCalls.addEventListener("click", llm);
    callsBox.append(calls, moreCalls);
    await llm();
  }

  // ------------------------------------------------------------------ charts (SVG)
  const COLORS = ["#0a58ca", "#137333", "#b42318", "#8250df", "#bf8700", "#1b7c83", "#57606a"];
  function chart(title, series) {
    // series: [{name, points: [[t, v], ...]}]
    const W = 420, H = 160, P = 28;
    const all = series.flatMap((s) => s.points);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("class", "chart");
    svg.setAttribute("role", "img");
    const last = series.map((s) => s.name + " " + (s.points.length ? fmt(s.points[s.points.length - 1][1]) : "–")).join(", ");
    svg.setAttribute("aria-label", title + ": latest " + last);
    const t0 = Math.min(...all.map((p) => p[0]), now() - 60), t1 = Math.max(...all.map((p) => p[0]), now());
    const vmax = Math.max(1e-9, ...all.map((p) => p[1]));
    const x = (t) => P + (W - P - 4) * (t - t0) / Math.max(1, t1 - t0);
    const y = (v) => H - P + 10 - (H - P - 4) * v / vmax;
    const axis = document.createElementNS(svg.namespaceURI, "path");
    axis.setAttribute("d", `M${P},4 V${H - P + 10} H${W - 4}`);
    axis.setAttribute("stroke", "#d0d7de"); axis.setAttribute("fill", "none");
    svg.append(axis);
    const label = document.createElementNS(svg.namespaceURI, "text");
    label.setAttribute("x", 2); label.setAttribute("y", 12); label.setAttribute("font-size", "10");
    label.textContent = fmt(vmax);
    svg.append(label);
    series.forEach((s, i) => {
      if (!s.points.length) return;
      const line = document.createElementNS(svg.namespaceURI, "polyline");
      line.setAttribute("points", s.points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" "));
      line.setAttribute("fill", "none"); line.setAttribute("stroke", COLORS[i % COLORS.length]);
      line.setAttribute("stroke-width", "2"); line.setAttribute("data-series", s.name);
      svg.append(line);
      // The latest point as a dot: a series of one sample (a rare create, one error) shows too.
      const [lt, lv] = s.points[s.points.length - 1];
      const dot = document.createElementNS(svg.namespaceURI, "circle");
      dot.setAttribute("cx", x(lt).toFixed(1)); dot.setAttribute("cy", y(lv).toFixed(1));
      dot.setAttribute("r", "2.5"); dot.setAttribute("fill", COLORS[i % COLORS.length]);
      svg.append(dot);
    });
    return h("figure", {}, h("figcaption", { text: title }), svg,
      h("div", { class: "legend" }, series.map((s, i) => h("span", { style: "color:" + COLORS[i % COLORS.length], text: "■ " + s.name }))));
  }
  function fmt(v) { return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toPrecision(2); }
  async function metricsPage() {
    const box = h("div", { class: "charts", id: "charts" });
    page("Metrics (last hour)", box);
    async function load() {
      try {
        const m = await json(UI + "/metrics");
        const S = m.samples;
        const states = [...new Set(S.flatMap((s) => Object.keys(s.sandboxes)))];
        const pts = (f) => S.filter((s) => f(s) !== null && f(s) !== undefined).map((s) => [s.t, f(s)]);
        const codes = [...new Set(S.flatMap((s) => Object.keys(s.errors)))];
        const reasons = [...new Set(S.flatMap((s) => Object.keys(s.reaped || {})))];
        box.replaceChildren(
          chart("Sandboxes by state", states.map((st) => ({ name: st, points: pts((s) => s.sandboxes[st] || 0) }))),
          chart("Requests per second", [{ name: "requests", points: pts((s) => s.requests / Math.max(s.interval, 1e-9)) },
            { name: "429", points: pts((s) => s.rate_limited / Math.max(s.interval, 1e-9)) }]),
          chart("Create latency (s)", [{ name: "p50", points: pts((s) => s.create_p50) }, { name: "p99", points: pts((s) => s.create_p99) }]),
          chart("Op latency (s)", [{ name: "p50", points: pts((s) => s.op_p50) }, { name: "p99", points: pts((s) => s.op_p99) }]),
          chart("Errors by status", codes.map((c) => ({ name: c, points: pts((s) => s.errors[c] || 0) }))),
          chart("Reaps by reason", reasons.map((r) => ({ name: r, points: pts((s) => (s.reaped || {})[r] || 0) }))),
          chart("Paused sandboxes", [{ name: "paused", points: pts((s) => s.sandboxes.paused || 0) }]),
          chart("Processes running", [{ name: "processes", points: pts((s) => s.processes_running) }]));
        box.dataset.samples = String(S.length);
      } catch (err) { toast(err); }
    }
    load();
    state.timers.push(setInterval(load, 5000));
  }

  start();
})();
