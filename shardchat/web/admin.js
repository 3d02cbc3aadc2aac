// The ops page: polls /admin/cluster.json (same origin, the browser resends the Basic
// credentials it was given for /admin) and redraws the table. No framework, no inline code.
"use strict";

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);

function cell(row, text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  row.appendChild(td);
  return td;
}

function pill(text, kind, title) {
  const span = document.createElement("span");
  span.className = `pill ${kind}`;
  span.textContent = text;
  if (title) span.title = title;
  return span;
}

function number(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString("en");
}

function health(inst) {
  if (!inst.reachable) return pill("unreachable", "bad", inst.error || "");
  if (inst.draining) return pill("draining", "warn", "out of placement");
  const age = inst.stats_age === null ? "" : `stats ${inst.stats_age.toFixed(1)} s old`;
  return pill(inst.this ? "up (this node)" : "up", "ok", age);
}

function loadBar(load, highest) {
  const wrap = document.createElement("div");
  wrap.className = "load";
  const bar = document.createElement("div");
  bar.className = "bar";
  const share = highest > 0 && load ? Math.max(2, (100 * load) / highest) : 0;
  bar.style.width = `${share}%`;
  const label = document.createElement("span");
  label.textContent = load === null || load === undefined ? "–" : load.toFixed(2);
  wrap.append(bar, label);
  return wrap;
}

function offsite(copy) {
  if (!copy) return pill("off", "muted");
  if (!copy.running) return pill("stopped", "bad", copy.target || "");
  const age = copy.last_upload_age === null ? "no upload yet" :
    `last upload ${copy.last_upload_age.toFixed(1)} s ago`;
  return pill("streaming", "ok", `${copy.target} – ${age}`);
}

function follower(inst) {
  if (inst.follower === null) return "–";
  const lag = inst.follower_lag;
  if (!lag) return `i${inst.follower}`;
  if (!lag.connected) return pill(`i${inst.follower} · not reading`, "bad", "the follower is not connected");
  const kind = lag.records > 0 && lag.seconds > 1 ? "warn" : "ok";
  return pill(`i${inst.follower} · ${lag.records} behind`, kind,
    `oldest unacknowledged batch ${lag.seconds.toFixed(2)} s old`);
}

function rule(r) {
  const kind = { "ok": "ok", "draining": "warn" }[r.status] || "bad";
  return pill(r.status, kind, r.detail);
}

function draw(data) {
  const rows = data.instances;
  $("cluster").textContent =
    `cluster ${data.cluster} · asked instance ${data.asked} · public URL ${data.public_url}`;
  $("t-instances").textContent = rows.length;
  $("t-reachable").textContent = `${rows.filter((r) => r.reachable).length} / ${rows.length}`;
  $("t-connections").textContent = number(rows.reduce((n, r) => n + (r.connections || 0), 0));
  $("t-rooms").textContent = number(rows.reduce((n, r) => n + (r.rooms || 0), 0));
  $("t-rules").textContent =
    `${rows.filter((r) => r.rule.status === "ok").length} / ${rows.length}`;
  const highest = Math.max(0, ...rows.map((r) => r.load || 0));
  const body = document.querySelector("#instances tbody");
  const fresh = document.createDocumentFragment();
  for (const inst of rows) {
    const tr = document.createElement("tr");
    tr.dataset.instance = inst.instance;
    const name = document.createElement("div");
    const strong = document.createElement("strong");
    strong.textContent = `i${inst.instance}`;
    const addr = document.createElement("span");
    addr.className = "muted small";
    addr.textContent = ` ${inst.address}`;
    name.append(strong, addr);
    cell(tr, name, "instance");
    cell(tr, health(inst), "health");
    cell(tr, number(inst.connections), "num connections");
    cell(tr, number(inst.rooms), "num rooms");
    cell(tr, loadBar(inst.load, highest), "load-cell");
    cell(tr, number(inst.messages), "num messages");
    cell(tr, follower(inst), "follower");
    cell(tr, offsite(inst.offsite), "offsite");
    cell(tr, rule(inst.rule), "rule");
    fresh.appendChild(tr);
  }
  body.replaceChildren(fresh);
  $("updated").textContent = `updated ${new Date(data.at * 1000).toLocaleTimeString("en-GB")}`;
}

async function refresh() {
  try {
    const resp = await fetch("/admin/cluster.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`the node answered HTTP ${resp.status}`);
    draw(await resp.json());
    $("error").hidden = true;
  } catch (err) {
    $("error").textContent = `Could not refresh: ${err.message}. Retrying.`;
    $("error").hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
