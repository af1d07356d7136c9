// pyiscsi-target dashboard: polls status.json once a second and renders it.
// Read-only, no dependencies; every value shown is also in a data-* attribute
// so tests (and scripts scraping the page) need not parse formatted text.
"use strict";

function size(n) {
  const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [u, m] of units) if (n >= m) return (n / m).toFixed(n % m ? 1 : 0) + " " + u;
  return Math.round(n) + " B";
}
function rate(bps, iops) { return size(bps) + "/s" + (iops === undefined ? "" : " (" + Math.round(iops) + " IOPS)"); }
function cell(tr, text, cls, data) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (data) for (const k in data) td.dataset[k] = data[k];
  tr.appendChild(td);
  return td;
}
function duration(s) {
  s = Math.floor(s || 0);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

function render(st) {
  document.getElementById("version").textContent = st.version;
  document.getElementById("summary").textContent =
    "pid " + st.pid + ", up " + duration(st.uptime) + " \u2014 portals " + st.portals.join(", ") +
    " \u2014 logins " + (st.logins ? st.logins.ok : 0) + " ok";
  const t = st.throughput;
  const r = document.getElementById("total-read"), w = document.getElementById("total-write");
  r.textContent = rate(t.read_bps, t.read_iops); r.dataset.bps = Math.round(t.read_bps);
  w.textContent = rate(t.write_bps, t.write_iops); w.dataset.bps = Math.round(t.write_bps);

  const lb = document.querySelector("#luns tbody");
  lb.textContent = "";
  for (const tg of st.targets) {
    for (const lun of tg.luns) {
      const tr = document.createElement("tr");
      tr.dataset.target = tg.iqn; tr.dataset.lun = lun.id;
      cell(tr, tg.iqn + (tg.alias ? " (" + tg.alias + ")" : ""));
      cell(tr, String(lun.id), "num");
      cell(tr, size(lun.size), "num", {bytes: lun.size, field: "size"});
      cell(tr, lun.cache);
      cell(tr, lun.cache === "none" ? "\u2013" : size(lun.dirty_bytes), "num", {bytes: lun.dirty_bytes, field: "dirty"});
      cell(tr, rate(lun.io.read_bps, lun.io.read_iops), "num", {bps: Math.round(lun.io.read_bps), field: "read-rate"});
      cell(tr, rate(lun.io.write_bps, lun.io.write_iops), "num", {bps: Math.round(lun.io.write_bps), field: "write-rate"});
      cell(tr, size(lun.io.read_bytes), "num", {bytes: lun.io.read_bytes, field: "read-bytes"});
      cell(tr, size(lun.io.write_bytes), "num", {bytes: lun.io.write_bytes, field: "write-bytes"});
      const pr = lun.pr;
      cell(tr, pr && pr.type ? pr.type + " by " + pr.holder : "none", "", {field: "pr-holder", holder: pr && pr.holder || ""});
      cell(tr, pr ? pr.registrations.map(x => x.key).join(" ") || "none" : "\u2013", "",
           {field: "pr-keys", count: pr ? pr.registrations.length : 0});
      lb.appendChild(tr);
    }
  }

  const sb = document.querySelector("#sessions tbody");
  sb.textContent = "";
  const normal = st.sessions.filter(s => s.target);
  const sc = document.getElementById("session-count");
  sc.textContent = "(" + st.sessions.length + ")"; sc.dataset.count = st.sessions.length;
  for (const s of st.sessions) {
    const c = s.connections[0] || {};
    const tr = document.createElement("tr");
    tr.dataset.tsih = s.tsih;
    cell(tr, s.initiator, "", {field: "initiator"});
    cell(tr, s.connections.map(x => x.peer).join(", "));
    cell(tr, s.target || "discovery");
    cell(tr, s.isid);
    cell(tr, String(s.tsih), "num");
    cell(tr, "header " + (c.header_digest || "-") + ", data " + (c.data_digest || "-"));
    cell(tr, String(s.in_flight), "num");
    sb.appendChild(tr);
  }
  void normal;
  draw(st.series || []);
  document.body.dataset.updates = Number(document.body.dataset.updates) + 1;
}

function draw(series) {
  const cv = document.getElementById("graph"), g = cv.getContext("2d");
  const W = cv.width, H = cv.height, pad = 4;
  g.clearRect(0, 0, W, H);
  const max = Math.max(1, ...series.map(p => Math.max(p.read_bps, p.write_bps)));
  g.fillStyle = "#6a737d"; g.font = "12px sans-serif";
  g.fillText(size(max) + "/s", 6, 14);
  for (const [key, color] of [["read_bps", "#2b7bb9"], ["write_bps", "#d9534f"]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    series.forEach((p, i) => {
      const x = pad + (W - 2 * pad) * (series.length > 1 ? i / (series.length - 1) : 1);
      const y = H - pad - (H - 2 * pad - 16) * (p[key] / max);
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  }
}

async function poll() {
  try {
    const res = await fetch("status.json", {cache: "no-store"});
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "no answer from the server: " + e.message;
  }
}
poll();
setInterval(poll, 1000);
