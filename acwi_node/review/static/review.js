// Case page controls (no inline script: CSP): each heatmap's show/hide and opacity, the
// window every image is drawn in (the heatmap layer is drawn over it in any window), and the
// lesion boxes a reader may mark with the verdict.
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

  // Boxes kept with a verdict ("x0 y0 x1 y1", fractions of the picture) drawn over their image.
  function place(element, corners) {
    element.style.left = (corners[0] * 100) + "%";
    element.style.top = (corners[1] * 100) + "%";
    element.style.width = ((corners[2] - corners[0]) * 100) + "%";
    element.style.height = ((corners[3] - corners[1]) * 100) + "%";
  }
  function corners(text) {
    var values = (text || "").trim().split(/\s+/).map(Number);
    if (values.length !== 4 || values.some(function (v) { return !isFinite(v); })) {
      return null;
    }
    return values;
  }
  document.querySelectorAll(".lesion-box[data-box]").forEach(function (element) {
    var c = corners(element.getAttribute("data-box"));
    if (c) { place(element, c); } else { element.classList.add("hidden"); }
  });

  // Lesion boxes: "Mark lesion" under an image, then drag over the lesion. The box goes into
  // the verdict form as "box:<image>" = "x0 y0 x1 y1", fractions of the picture (the server
  // turns them into the image's pixels), and is shown over the image until cleared.
  var form = document.querySelector("form.verdict-form");
  var status = document.getElementById("lesion-boxes");
  function describe() {
    if (!form || !status) { return; }
    var n = form.querySelectorAll("input[name^='box:']").length;
    status.textContent = n === 0
      ? "No lesion marked (optional: \"Mark lesion\" under an image)."
      : n + (n === 1 ? " lesion box" : " lesion boxes") +
        " marked: sent with a confirmed or corrected finding.";
  }
  document.querySelectorAll("figure.viewer[data-image]").forEach(function (figure) {
    var stack = figure.querySelector(".stack");
    var mark = figure.querySelector("button.mark-lesion");
    var clear = figure.querySelector("button.clear-lesion");
    if (!form || !stack || !mark || !clear) { return; }
    var name = "box:" + figure.getAttribute("data-image");
    var box = document.createElement("div");
    box.className = "lesion-box hidden";
    stack.appendChild(box);
    stack.querySelectorAll("img").forEach(function (img) {
      img.setAttribute("draggable", "false");
    });
    var start = null;
    function field() {
      var input = form.querySelector("input[name='" + CSS.escape(name) + "']");
      if (!input) {
        input = document.createElement("input");
        input.type = "hidden";
        input.name = name;
        form.appendChild(input);
      }
      return input;
    }
    function at(event) {
      var rect = stack.getBoundingClientRect();
      return {
        x: Math.min(Math.max((event.clientX - rect.left) / rect.width, 0), 1),
        y: Math.min(Math.max((event.clientY - rect.top) / rect.height, 0), 1)
      };
    }
    function draw(a, b) {
      var x0 = Math.min(a.x, b.x), y0 = Math.min(a.y, b.y);
      var x1 = Math.max(a.x, b.x), y1 = Math.max(a.y, b.y);
      place(box, [x0, y0, x1, y1]);
      box.classList.remove("hidden");
      return [x0, y0, x1, y1];
    }
    function keep(c) {
      field().value = c.map(function (v) { return v.toFixed(4); }).join(" ");
      clear.hidden = false;
      describe();
    }
    // a verdict the node refused comes back with the boxes that were drawn
    var drafted = corners(figure.getAttribute("data-drafted-box"));
    if (drafted) {
      keep(draw({x: drafted[0], y: drafted[1]}, {x: drafted[2], y: drafted[3]}));
    }
    mark.addEventListener("click", function () {
      var on = !stack.classList.contains("marking");
      stack.classList.toggle("marking", on);
      mark.textContent = on ? "Drag over the lesion" : "Mark lesion";
    });
    stack.addEventListener("pointerdown", function (event) {
      if (!stack.classList.contains("marking")) { return; }
      event.preventDefault();
      start = at(event);
      stack.setPointerCapture(event.pointerId);
    });
    stack.addEventListener("pointermove", function (event) {
      if (start) { draw(start, at(event)); }
    });
    stack.addEventListener("pointerup", function (event) {
      if (!start) { return; }
      var drawn = draw(start, at(event));
      start = null;
      stack.classList.remove("marking");
      mark.textContent = "Mark lesion";
      if (drawn[2] - drawn[0] < 0.002 || drawn[3] - drawn[1] < 0.002) {
        box.classList.add("hidden");  // a click, not a box
        return;
      }
      keep(drawn);
    });
    clear.addEventListener("click", function () {
      var input = form.querySelector("input[name='" + CSS.escape(name) + "']");
      if (input) { input.remove(); }
      box.classList.add("hidden");
      clear.hidden = true;
      describe();
    });
  });
});
