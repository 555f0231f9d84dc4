// Case page controls (no inline script: CSP): each heatmap's show/hide and opacity, and the
// window every image is drawn in (the heatmap layer is drawn over it in any window).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var preset = document.getElementById("window-preset");
  if (preset) {
    preset.addEventListener("change", function () {
      document.querySelectorAll("img.source[data-src]").forEach(function (img) {
        var base = img.getAttribute("data-src");
        var sep = base.indexOf("?") < 0 ? "?" : "&";
        img.src = preset.value ? base + sep + "window=" + encodeURIComponent(preset.value) : base;
      });
    });
  }
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
