// durable dashboard: keeps a run's page live. The server tells the page (server-sent events,
// fed by LISTEN/NOTIFY) that its run changed; the page then fetches the run again. No polling.
// Cancel, resume and the send-event form (class in-place) are posted in the background, so
// the page stays where it is and shows their effect when the run changes; without script they
// are plain forms. Retry and fork open the new run.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || !window.EventSource || !window.fetch) return;
  let fetching = false;
  let again = false;
  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const response = await fetch(live.dataset.fragment, { credentials: "same-origin" });
      if (response.ok) {
        live.innerHTML = await response.text();
        live.dataset.updated = String(Date.now());
      }
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }
  const source = new EventSource(live.dataset.live);
  source.addEventListener("change", refresh);
  source.addEventListener("open", () => { live.dataset.connected = "yes"; refresh(); });

  const notice = document.getElementById("notice");
  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.matches(".in-place")) return;
    if (!document.body.contains(live)) return;
    event.preventDefault();
    // getAttribute: the forms have a field named "action", which shadows form.action.
    const response = await fetch(form.getAttribute("action"), {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
    });
    if (notice) {
      const done = new URL(response.url).searchParams.get("done");
      notice.textContent = response.ok ? (done || "done") : "refused (" + response.status + ")";
      notice.hidden = false;
    }
    refresh();
  });
})();
