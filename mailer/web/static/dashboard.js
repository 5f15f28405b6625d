// Auto-refresh without full reloads: every element with data-refresh re-reads its URL every
// data-every seconds and swaps its content; paused while the tab is hidden. No dependency.
(function () {
  "use strict";
  function refresh(panel) {
    if (document.hidden) return;
    fetch(panel.dataset.refresh, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) {
        if (answer.status === 401) { window.location.reload(); return null; }
        return answer.ok ? answer.text() : null;
      })
      .then(function (html) {
        if (html === null) { panel.classList.add("stale"); return; }
        panel.innerHTML = html;
        panel.classList.remove("stale");
        panel.dataset.refreshed = String(Date.now());
      })
      .catch(function () { panel.classList.add("stale"); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(function (panel) {
      var every = Math.max(1, parseInt(panel.dataset.every || "5", 10)) * 1000;
      setInterval(function () { refresh(panel); }, every);
      document.addEventListener("visibilitychange", function () { refresh(panel); });
    });
  });
})();
