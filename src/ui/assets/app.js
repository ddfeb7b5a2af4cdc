// pgcrew operations console: live updates. The server pushes small Server-Sent Events when
// something changed (a NOTIFY reached the instance); the page then re-reads itself and swaps
// its <main>. `resync` (sent on every (re)connection) re-reads too. No framework, no build.
(function () {
  "use strict";
  var body = document.body;
  var base = body.getAttribute("data-base") || "";
  var live = body.getAttribute("data-live") || "all";
  var banner = document.getElementById("live-status");
  function status(text, cls) {
    if (banner) { banner.textContent = text; banner.className = cls; }
  }
  document.addEventListener("submit", function (ev) {
    var msg = ev.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) { ev.preventDefault(); }
  });
  if (live === "none") { return; }
  var inflight = false, again = false, timer = null;
  function keepSelection() {
    return document.querySelector("main input[type=checkbox]:checked") !== null;
  }
  function refresh() {
    if (inflight) { again = true; return; }
    if (keepSelection()) { return; }
    inflight = true;
    fetch(window.location.href, { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) {
        return r.text().then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.querySelector("main");
          var old = document.querySelector("main");
          if (fresh && old && !keepSelection()) { old.replaceWith(fresh); }
          if (r.status === 503) {
            status("database unavailable - retrying", "bad");
            setTimeout(schedule, 2000);
          } else {
            status("live", "ok");
          }
        });
      })
      .catch(function () {
        status("console unreachable - retrying", "bad");
        setTimeout(schedule, 2000);
      })
      .then(function () {
        inflight = false;
        if (again) { again = false; schedule(); }
      });
  }
  function schedule() {
    if (timer !== null) { return; }
    timer = setTimeout(function () { timer = null; refresh(); }, 30);
  }
  var source = new EventSource(base + "/events");
  source.addEventListener("change", function (ev) {
    var d = {};
    try { d = JSON.parse(ev.data); } catch (e) { d = {}; }
    if (live.indexOf("run:") === 0 && d.run_id && d.run_id !== live.slice(4)) { return; }
    schedule();
  });
  source.addEventListener("resync", schedule);
  source.onopen = function () { status("live", "ok"); };
  source.onerror = function () { status("live updates reconnecting", "warn"); };
  // What has no notification (heartbeat ages, task completions) is re-read every few seconds.
  setInterval(schedule, 5000);
  if (document.querySelector("[data-poll]")) { setInterval(schedule, 400); }
  if (document.querySelector("[data-status='503']")) { setTimeout(schedule, 2000); }
})();
