// Tollway console: the little the pages need beyond HTML. CSRF header on htmx requests,
// copy buttons, rows that open their detail page, and uPlot charts from JSON islands.
(function () {
  "use strict";
  document.addEventListener("htmx:configRequest", function (e) {
    var token = document.body.getAttribute("data-csrf");
    if (token) e.detail.headers["X-CSRF-Token"] = token;
  });
  document.addEventListener("click", function (e) {
    var btn = e.target.closest("[data-copy]");
    if (btn) {
      var src = document.getElementById(btn.getAttribute("data-copy"));
      if (src && navigator.clipboard) {
        navigator.clipboard.writeText(src.textContent.trim()).then(function () {
          var old = btn.textContent; btn.textContent = btn.getAttribute("data-copied") || "✓";
          setTimeout(function () { btn.textContent = old; }, 1500);
        });
      }
      return;
    }
    var row = e.target.closest("tr[data-href]");
    if (row && !e.target.closest("a, button, form")) window.location = row.getAttribute("data-href");
  });
  // The y ticks of a small spend are close together ($0.000025, $0.00005...): a fixed
  // number of decimals would print them all as "$0.0000", or round them to values they
  // are not. Print each tick exactly: the fewest decimals (at least two, at most nine,
  // the nano-dollar) that hold every tick.
  var fixed = {};
  function moneyAt(lang, d) {
    var k = lang + d;
    return fixed[k] || (fixed[k] = new Intl.NumberFormat(lang, { style: "currency", currency: "USD", currencyDisplay: "narrowSymbol",
                                                           minimumFractionDigits: 2, maximumFractionDigits: d }));
  }
  function moneyTicks(lang, vals) {
    var d = 2;
    for (; d < 9; d++) {
      var exact = vals.every(function (v) {
        return v == null || Math.abs(v - Number(v.toFixed(d))) <= 1e-12 + Math.abs(v) * 1e-9;
      });
      if (exact) break;
    }
    return vals.map(function (v) { return v == null ? "" : moneyAt(lang, d).format(v); });
  }
  window.TollwayConsole = { moneyTicks: moneyTicks };
  function chart(el) {
    var data = JSON.parse(document.getElementById(el.getAttribute("data-chart")).textContent);
    var lang = el.getAttribute("data-lang") || "en", tz = el.getAttribute("data-tz") || "UTC";
    var hourly = data.bucket === "hour";
    var fmt = new Intl.DateTimeFormat(lang, hourly ? { month: "numeric", day: "numeric", hour: "2-digit", timeZone: tz }
                                                  : { month: "short", day: "numeric", timeZone: tz });
    var money = new Intl.NumberFormat(lang, { style: "currency", currency: "USD", currencyDisplay: "narrowSymbol", maximumFractionDigits: 9 });
    var ys = data.y.map(Number);
    // A count (requests, errors) rather than money: whole numbers on the axis.
    var count = data.unit === "count", whole = new Intl.NumberFormat(lang, { maximumFractionDigits: 0 });
    function yLabels(u, vals) {
      return count ? vals.map(function (v) { return v == null ? "" : whole.format(v); }) : moneyTicks(lang, vals);
    }
    var width = Math.max(260, el.clientWidth - 8);
    var opts = {
      width: width, height: 240, tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), tz); },
      series: [{ value: function (u, v) { return v == null ? "" : fmt.format(new Date(v * 1000)); } },
               { label: data.label, stroke: "#0b5cad", fill: "rgba(11,92,173,0.12)", width: 2,
                 value: function (u, v) { return v == null ? "" : (count ? whole : money).format(v); } }],
      axes: [{ values: function (u, vals) { return vals.map(function (v) { return fmt.format(new Date(v * 1000)); }); } },
             { values: yLabels, size: function (u, vals) {
                 var n = 6;
                 (vals || []).forEach(function (t) { n = Math.max(n, String(t).length); });
                 return 18 + 7 * n;
               } }],
      legend: { show: false },
      scales: { y: { range: function (u, min, max) {
        // From zero up: spend is never negative, and a flat zero series still gets an axis.
        if (count) return [0, Math.max(5, Math.ceil((max || 0) * 1.1))];  // whole steps, at least 5
        return [0, max > 0 ? uPlot.rangeNum(0, max, 0.1, true)[1] : 1];
      } }, x: { time: true, range: function (u, min, max) {
        var lo = min == null ? data.from : (data.from == null ? min : Math.min(data.from, min));
        var hi = max == null ? data.to : (data.to == null ? max : Math.max(data.to, max));
        if (lo == null || hi == null || lo >= hi) { lo = (lo || hi) - 86400; hi = lo + 2 * 86400; }
        return [lo, hi];
      } } }
    };
    if (count) {
      opts.axes[1].incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5,
                            2e5, 5e5, 1e6, 1e7, 1e8, 1e9];
    }
    if (!data.x.length) { data.x = [Math.floor(Date.now() / 1000)]; ys = [0]; }
    new uPlot(opts, [data.x, ys], el);
  }
  function init() {
    if (typeof uPlot === "undefined") return;
    document.querySelectorAll("[data-chart]").forEach(chart);
  }
  if (document.readyState === "complete") init(); else window.addEventListener("load", init);
})();
