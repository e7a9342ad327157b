// The console's own script: keyboard navigation, the constitution editor's line marks, the job
// form's mode fields, and the training charts (uPlot). Everything else is htmx attributes in the
// pages. No inline scripts anywhere: the Content-Security-Policy allows scripts from /ui/static only.
(function () {
  "use strict";

  // --- keyboard ---------------------------------------------------------------------------------
  // `data-key="x"` on a link, button or <summary> makes the key x activate it; tables marked
  // `data-nav="rows"` get j/k to move through their rows and Enter (or o) to open one.

  function typing(target) {
    return target.closest && target.closest("input, textarea, select, [contenteditable]");
  }

  function activate(element) {
    if (element.tagName === "SUMMARY") {
      const details = element.parentElement;
      details.open = true;
      const field = details.querySelector("textarea, input:not([type=hidden])");
      if (field) field.focus();
    } else if (element.tagName === "A") {
      window.location.href = element.href;
    } else {
      element.click();
    }
  }

  function rows() {
    const table = document.querySelector("table[data-nav=rows]");
    return table ? Array.from(table.querySelectorAll("tbody tr[data-href]")) : [];
  }

  function moveSelection(step) {
    const all = rows();
    if (!all.length) return false;
    const current = all.findIndex((row) => row.classList.contains("selected"));
    const next = Math.max(0, Math.min(all.length - 1, current < 0 ? 0 : current + step));
    all.forEach((row) => row.classList.remove("selected"));
    all[next].classList.add("selected");
    all[next].scrollIntoView({ block: "nearest" });
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    let key = event.key;
    if (key === "ArrowRight") key = "j";
    if (key === "ArrowLeft") key = "k";
    const bound = document.querySelector('[data-key="' + CSS.escape(key) + '"]');
    if (bound) {
      event.preventDefault();
      activate(bound);
      return;
    }
    if ((key === "j" || key === "k") && moveSelection(key === "j" ? 1 : -1)) {
      event.preventDefault();
    } else if (key === "Enter" || key === "o") {
      const selected = document.querySelector("tr.selected[data-href]");
      if (selected) {
        event.preventDefault();
        window.location.href = selected.dataset.href;
      }
    }
  });

  document.addEventListener("click", function (event) {
    const row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a, button, input, label, select, textarea")) {
      window.location.href = row.dataset.href;
    }
  });

  // --- the job form: the fields of the chosen mode ----------------------------------------------

  function setupModes() {
    const mode = document.getElementById("mode");
    if (!mode) return;
    const verify = document.getElementById("verify");
    const update = function () {
      const verifying = mode.value === "revise" && verify && verify.checked;
      document.querySelectorAll("[data-modes]").forEach(function (element) {
        const modes = element.dataset.modes.split(" ");
        element.hidden = !(modes.includes(mode.value) || (verifying && modes.includes("revise-verify")));
      });
    };
    mode.addEventListener("change", update);
    if (verify) verify.addEventListener("change", update);
    update();
  }

  // --- the constitution editor: line numbers, the line at fault -------------------------------

  const LINE_HEIGHT = 18;
  const PADDING = 6;

  function setupEditor() {
    const body = document.getElementById("body");
    const gutter = document.getElementById("gutter");
    if (!body || !gutter) return;
    const band = document.getElementById("error-band");

    const render = function () {
      const check = document.getElementById("check");
      const bad = check && check.dataset.line ? parseInt(check.dataset.line, 10) : 0;
      const count = body.value.split("\n").length;
      const numbers = [];
      for (let line = 1; line <= Math.max(count, bad); line++) {
        const span = document.createElement("span");
        span.textContent = String(line);
        if (line === bad) {
          span.className = "error";
          span.title = check.dataset.message || "";
        }
        numbers.push(span);
      }
      gutter.replaceChildren(...numbers);
      gutter.scrollTop = body.scrollTop;
      if (band) {
        band.hidden = !bad;
        band.style.top = PADDING + (bad - 1) * LINE_HEIGHT - body.scrollTop + "px";
      }
    };

    body.addEventListener("input", render);
    body.addEventListener("scroll", render);
    document.body.addEventListener("htmx:afterSettle", render);
    render();

    // A click on the error selects its line in the editor.
    document.addEventListener("click", function (event) {
      const check = event.target.closest("#check");
      if (!check || !check.dataset.line) return;
      const line = parseInt(check.dataset.line, 10);
      const lines = body.value.split("\n");
      let start = 0;
      for (let i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
      body.focus();
      body.setSelectionRange(start, start + (lines[line - 1] || "").length);
      body.scrollTop = Math.max(0, (line - 5) * LINE_HEIGHT);
    });
  }

  // --- training charts ------------------------------------------------------------------------

  const COLORS = ["#2f5bd3", "#c23a35", "#1f8a4c", "#b7791f"];

  // Axis labels that stay readable for a learning rate (5e-6) as for a log-prob (-180).
  function tick(value) {
    if (value === null || value === undefined) return "";
    const size = Math.abs(value);
    if (size !== 0 && (size < 1e-3 || size >= 1e6)) return value.toExponential(1);
    return String(Number(value.toPrecision(4)));
  }

  function setupCharts() {
    const root = document.getElementById("charts");
    if (!root || !window.uPlot) return;
    const charts = {};
    window.caiCharts = charts;

    const draw = function (metrics) {
      root.querySelectorAll("figure.chart").forEach(function (figure) {
        const names = JSON.parse(figure.dataset.series);
        const steps = metrics.map((row) => row.step);
        const series = names.map((name) => metrics.map((row) => (typeof row[name] === "number" ? row[name] : null)));
        if (!steps.length || series.every((values) => values.every((v) => v === null))) return;
        const data = [steps, ...series];
        figure.dataset.points = String(steps.length);
        const key = figure.dataset.chart;
        if (charts[key]) {
          charts[key].setData(data);
          return;
        }
        const plot = figure.querySelector(".plot");
        charts[key] = new window.uPlot(
          {
            width: Math.max(plot.clientWidth, 320),
            height: 220,
            scales: { x: { time: false } },
            legend: { show: names.length > 1 },
            series: [{ label: "step" }].concat(
              names.map((name, i) => ({
                label: name,
                stroke: COLORS[i % COLORS.length],
                width: 1.5,
                points: { show: steps.length <= 80, size: 5 },
              }))
            ),
            axes: [{ label: "step" }, { size: 70, values: (u, splits) => splits.map(tick) }],
          },
          data,
          plot
        );
      });
    };

    const refresh = function () {
      fetch(root.dataset.metrics, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then((response) => (response.ok ? response.json() : []))
        .catch(() => [])
        .then(function (metrics) {
          draw(metrics);
          const status = document.getElementById("run-status");
          if (status && status.dataset.live === "1") window.setTimeout(refresh, 3000);
          else root.dataset.loaded = "1";
        });
    };
    refresh();

    window.addEventListener("resize", function () {
      Object.values(charts).forEach(function (chart) {
        const width = chart.root.parentElement.clientWidth;
        if (width > 0) chart.setSize({ width: width, height: 220 });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupModes();
    setupEditor();
    setupCharts();
  });
})();
