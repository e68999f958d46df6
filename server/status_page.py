"""The fleet status page served at `/`: who is enrolled, what each device runs, and the catalog it is chosen from.

One self-contained, constant HTML document (no external assets: fleets often run offline), rendered in one place
only, the browser: its script fetches `/api/devices` and `/api/catalog`, builds the tables, and does so again every
few seconds, so an open page stays live. Without JavaScript the page points at the JSON API and `restnet status`.
Device ids and reasons come from devices and are hostile: the script only ever sets `textContent`, and the
Content-Security-Policy below allows no script but this one (defence in depth should that ever slip).
"""
from __future__ import annotations

import base64
import hashlib

REFRESH_S = 3

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d2433;color:#fff;padding:14px 24px;display:flex;align-items:baseline;gap:18px;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header a{color:#9cc3ff;margin-right:12px}
main{padding:8px 24px 24px}
h2{font-size:15px;margin:22px 0 8px}
#summary{font-size:15px;margin:14px 0 0}
#live{color:#667;font-size:12px;margin:4px 0 0}
#live.down{color:#b3261e;font-weight:600}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:60%}
th,td{padding:6px 12px;text-align:left;border-bottom:1px solid #e4e7ec;white-space:nowrap}
th{background:#eef0f4;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#445}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace}
.reason{display:block;color:#b3261e;font-size:12px;white-space:normal;max-width:420px;overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#e4e7ec}
.online,.installed{background:#d5f2dc;color:#14632b}
.stale,.downloading,.verified,.assigned{background:#fff1c2;color:#7a5300}
.offline{background:#e4e7ec;color:#555}
.failed,.refused{background:#fbd9d6;color:#8c1d13}
.muted{color:#889}
"""

# Constant text (its sha256 goes into the CSP); it builds nodes with textContent only.
_SCRIPT = """
"use strict";
(function () {
  var REFRESH_MS = @REFRESH_MS@;
  function fmt(x, digits) { return x == null ? "\\u2014" : Number(x).toFixed(digits); }
  function sig(x) { return x == null ? "\\u2014" : String(Number(Number(x).toPrecision(3))); }
  function mib(bytes) { return bytes == null ? "\\u2014" : fmt(bytes / 1048576, 1) + " MiB"; }
  function count(n) { return n >= 1e6 ? fmt(n / 1e6, 2) + "M" : n >= 1e3 ? fmt(n / 1e3, 1) + "K" : String(n); }
  function pct(x) { return x == null ? "\\u2014" : fmt(100 * x, 2) + "%"; }
  function ago(ts, now) {
    if (ts == null) return "never";
    var s = Math.max(0, Math.round(now - ts));
    return s < 120 ? s + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function badge(td, text) {
    var span = document.createElement("span");
    span.className = "badge " + text;
    span.textContent = text;
    td.appendChild(span);
  }
  function fill(id, rows, empty, columns) {
    var body = document.getElementById(id);
    body.textContent = "";
    rows.forEach(function (r) { body.appendChild(r); });
    if (!rows.length) {
      var tr = document.createElement("tr");
      cell(tr, empty, "muted").colSpan = columns;
      body.appendChild(tr);
    }
  }
  function render(devices, catalog, now) {
    var used = {}, presence = {online: 0, stale: 0, offline: 0}, installed = 0;
    fill("devices", devices.map(function (d) {
      var tr = document.createElement("tr"), p = d.profile || {};
      used[d.variant_id] = (used[d.variant_id] || 0) + 1;
      presence[d.presence] = (presence[d.presence] || 0) + 1;
      if (d.state === "installed") installed++;
      cell(tr, d.id, "id");
      badge(cell(tr, ""), d.presence);
      var st = cell(tr, "");
      badge(st, d.state);
      if (d.reason) {
        var why = document.createElement("span");
        why.className = "reason";
        why.textContent = d.reason;
        st.appendChild(why);
      }
      cell(tr, d.variant_id == null ? "\\u2014" : d.variant_id, "id");
      cell(tr, d.variant_version == null ? "\\u2014" : "v" + d.variant_version, "num");
      cell(tr, fmt(p.memory_mb, 1) + " MiB", "num");
      cell(tr, sig(p.compute), "num");
      cell(tr, p.latency_ms == null ? "\\u2014" : sig(p.latency_ms) + " ms", "num");
      cell(tr, ago(d.last_seen, now), "num");
      var rungs = d.rungs || [], at = rungs.indexOf(d.running);
      cell(tr, (d.running == null ? "\\u2014" : d.running) +
               (rungs.length ? " (rung " + (at + 1) + " of " + rungs.length + ")" : ""), "id");
      return tr;
    }), "no device has enrolled yet", 10);
    var variants = (catalog.variants || []).slice().sort(function (a, b) { return a.params - b.params; });
    fill("variants", variants.map(function (v) {
      var tr = document.createElement("tr");
      cell(tr, v.id, "id");
      cell(tr, count(v.params), "num");
      cell(tr, mib(v.memory_bytes), "num");
      cell(tr, mib(v.finetune_memory_bytes), "num");
      cell(tr, v.accuracy != null ? pct(v.accuracy)
               : v.accuracy_init != null ? pct(v.accuracy_init) + " (init)" : "\\u2014", "num");
      cell(tr, "v" + v.version, "num");
      cell(tr, String(used[v.id] || 0), "num");
      return tr;
    }), "the catalog has no variants", 7);
    document.getElementById("pair").textContent = "catalog: " + ((catalog.front || {}).name || "?") + " \\u2192 " +
      ((catalog.behind || {}).name || "?");
    var inUse = variants.filter(function (v) { return used[v.id]; }).length;
    document.getElementById("summary").textContent = devices.length + " devices \\u00b7 " + presence.online +
      " online \\u00b7 " + presence.stale + " stale \\u00b7 " + presence.offline + " offline \\u00b7 " + installed +
      " installed \\u00b7 " + inUse + " of " + variants.length + " variants in use";
  }
  function status(text, down) {
    var el = document.getElementById("live");
    el.textContent = text;
    el.className = down ? "down" : "";
  }
  function refresh() {
    Promise.all([fetch("api/devices", {cache: "no-store"}), fetch("api/catalog", {cache: "no-store"})])
      .then(function (rs) {
        rs.forEach(function (r) { if (!r.ok) throw new Error("HTTP " + r.status + " from " + r.url); });
        var now = Date.parse(rs[0].headers.get("Date")) / 1000 || Date.now() / 1000;  // the server's clock
        return Promise.all([rs[0].json(), rs[1].json()]).then(function (j) { render(j[0], j[1], now); });
      })
      .then(function () {
        var when = new Date().toLocaleTimeString();
        status("live \\u00b7 updated " + when + " \\u00b7 every " + REFRESH_MS / 1000 + " s");
      }, function (e) {
        status("cannot reach the coordinator (" + e.message + "): showing the last known state", true);
      })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  document.body.setAttribute("data-live", "1");
  refresh();
})();
""".replace("@REFRESH_MS@", str(REFRESH_S * 1000))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only our inline script and style run; the script may only talk to this origin.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>ReStNet Fleet status</title>
<style>{_STYLE}</style></head>
<body>
<header><h1>ReStNet Fleet</h1><span id="pair"></span>
<nav><a href="metrics">/metrics</a><a href="api/devices">/api/devices</a><a href="api/catalog">/api/catalog</a></nav>
</header>
<main>
<noscript><p>This page draws the fleet with JavaScript. Without it: the JSON at <a href="api/devices">/api/devices</a>
and <a href="api/catalog">/api/catalog</a>, or <code>restnet status</code> in a terminal.</p></noscript>
<p id="summary"></p>
<p id="live">loading&hellip;</p>
<h2>Devices</h2>
<table><thead><tr><th>device</th><th>presence</th><th>state</th><th>variant</th><th>version</th><th>memory</th>
<th>compute</th><th>latency target</th><th>last seen</th><th>runs now</th></tr></thead>
<tbody id="devices"></tbody></table>
<h2>Catalog variants</h2>
<table><thead><tr><th>variant</th><th>params</th><th>inference memory</th><th>fine-tune memory</th><th>accuracy</th>
<th>version</th><th>devices</th></tr></thead>
<tbody id="variants"></tbody></table>
</main>
<script>{_SCRIPT}</script>
</body></html>
""".encode()
