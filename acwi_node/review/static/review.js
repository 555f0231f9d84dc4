// Heatmap overlay controls on the case page: show/hide and opacity (no inline script: CSP).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("figure.viewer").forEach(function (figure) {
    var overlay = figure.querySelector("img.overlay");
    var toggle = figure.querySelector("input.heatmap-toggle");
    var opacity = figure.querySelector("input.heatmap-opacity");
    if (!overlay || !toggle || !opacity) { return; }
    function apply() {
      overlay.classList.toggle("hidden", !toggle.checked);
      overlay.style.opacity = String(Number(opacity.value) / 100);
    }
    toggle.addEventListener("change", apply);
    opacity.addEventListener("input", apply);
    apply();
  });
});
