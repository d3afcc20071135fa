// mcp-metrics pages: tabs, period switching without reload, live chart updates over
// Server-Sent Events, the usage beacon and client-side search. Pages work without it.
document.documentElement.classList.add("js");

const server = document.querySelector("[data-server]");

function beacon(serverId, event) {
  const body = JSON.stringify({ server_id: serverId, event });
  if (!navigator.sendBeacon || !navigator.sendBeacon("/api/v1/usage", new Blob([body], { type: "text/plain" }))) {
    fetch("/api/v1/usage", { method: "POST", body, keepalive: true, headers: { "content-type": "text/plain" } });
  }
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('.tabs [role="tab"]')];
  if (!tabs.length) return;
  const show = (id) => {
    for (const t of tabs) {
      const selected = t.getAttribute("aria-controls") === id;
      t.setAttribute("aria-selected", String(selected));
      document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
    }
  };
  for (const t of tabs) {
    t.addEventListener("click", (e) => {
      e.preventDefault();
      history.replaceState(null, "", "#" + t.getAttribute("aria-controls"));
      show(t.getAttribute("aria-controls"));
    });
  }
  const initial = location.hash.slice(1);
  show(tabs.some((t) => t.getAttribute("aria-controls") === initial) ? initial : "overview");
}

async function refreshCharts(period) {
  const id = server.dataset.server;
  const boxes = [...document.querySelectorAll("#metrics [data-metric]")];
  await Promise.all(boxes.map(async (box) => {
    const r = await fetch(`/charts/${encodeURIComponent(id)}/${encodeURIComponent(box.dataset.metric)}.svg?period=${period}&w=640&h=240`, { cache: "no-cache" });
    if (r.ok) box.innerHTML = await r.text();
  }));
  const m = await fetch(`/api/v1/servers/${encodeURIComponent(id)}/metrics?period=${period}`, { cache: "no-cache" });
  if (m.ok) {
    const s = (await m.json()).summary;
    const fmt = (v, d = 0) => (v == null ? "–" : Number(v).toFixed(d));
    const req = document.querySelector('[data-figure="requests"]');
    const err = document.querySelector('[data-figure="error_rate"]');
    if (req) req.textContent = fmt(s.requests);
    if (err) err.textContent = s.error_rate == null ? "–" : (s.error_rate * 100).toFixed(2) + " %";
  }
  document.dispatchEvent(new CustomEvent("charts-updated"));
}

function setupPeriods() {
  for (const a of document.querySelectorAll(".periods a")) {
    a.addEventListener("click", (e) => {
      e.preventDefault();
      server.dataset.period = a.dataset.period;
      for (const o of document.querySelectorAll(".periods a")) o.removeAttribute("aria-current");
      a.setAttribute("aria-current", "true");
      history.replaceState(null, "", `?period=${a.dataset.period}#metrics`);
      refreshCharts(a.dataset.period);
    });
  }
}

function setupLive() {
  if (!window.EventSource) return;
  const source = new EventSource(`/api/v1/servers/${encodeURIComponent(server.dataset.server)}/live`);
  const badge = document.querySelector(".live");
  let pending = null;
  source.addEventListener("ready", () => { if (badge) badge.hidden = false; });
  source.addEventListener("metric", (e) => {
    // Only redraw when a metric this page shows changed.
    let names = null;
    try { names = JSON.parse(e.data).names; } catch {}
    const shown = [...document.querySelectorAll("#metrics [data-metric]")].map((b) => b.dataset.metric);
    if (Array.isArray(names) && !names.some((n) => shown.includes(n))) return;
    clearTimeout(pending);
    pending = setTimeout(() => refreshCharts(server.dataset.period), 150);
  });
  source.onerror = () => { if (badge) badge.hidden = true; };
}

function setupButtons() {
  for (const el of document.querySelectorAll("[data-usage]")) {
    el.addEventListener("click", () => {
      beacon(server.dataset.server, el.dataset.usage);
      if (el.dataset.copy && navigator.clipboard) navigator.clipboard.writeText(el.dataset.copy).catch(() => {});
    });
  }
}

function setupSearch() {
  const input = document.querySelector("[data-filter]");
  if (!input) return;
  const list = document.querySelector(input.dataset.filter);
  input.addEventListener("input", () => {
    const q = input.value.trim().toLowerCase();
    for (const li of list.children) li.hidden = q !== "" && !li.dataset.text.includes(q);
  });
}

setupSearch();
if (server) {
  setupTabs();
  setupPeriods();
  setupLive();
  setupButtons();
  beacon(server.dataset.server, "view");
}
