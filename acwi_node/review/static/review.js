// Case page controls (no inline script: CSP): each heatmap's show/hide and opacity, the
// window every image is drawn in (the heatmap layer is drawn over it in any window), and the
// lesion boxes a reader may mark with the verdict, with the mouse or the keyboard.
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

  // Lesion boxes: "Mark lesion" under an image, then drag over the lesion; again for each
  // other lesion on it. An image's boxes go into the verdict form as "box:<image>" =
  // "x0 y0 x1 y1;x0 y0 x1 y1", fractions of the picture (the server turns them into the
  // image's pixels), and are shown over the image until cleared.
  var form = document.querySelector("form.verdict-form");
  var status = document.getElementById("lesion-boxes");
  function describe() {
    if (!form || !status) { return; }
    var n = 0;
    form.querySelectorAll("input[name^='box:']").forEach(function (input) {
      n += input.value.split(";").length;
    });
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
    var boxes = [];  // [{corners: [x0, y0, x1, y1], element: div}]
    stack.querySelectorAll("img").forEach(function (img) {
      img.setAttribute("draggable", "false");
    });
    var start = null, dragged = null;
    function store() {
      var input = form.querySelector("input[name='" + CSS.escape(name) + "']");
      if (boxes.length === 0) {
        if (input) { input.remove(); }
      } else {
        if (!input) {
          input = document.createElement("input");
          input.type = "hidden";
          input.name = name;
          form.appendChild(input);
        }
        input.value = boxes.map(function (b) {
          return b.corners.map(function (v) { return v.toFixed(4); }).join(" ");
        }).join(";");
      }
      clear.hidden = boxes.length === 0;
      clear.textContent = boxes.length > 1 ? "Clear boxes" : "Clear box";
      describe();
    }
    function outline() {
      var element = document.createElement("div");
      element.className = "lesion-box drawn";
      var remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove-box";
      remove.textContent = "\u00d7";
      remove.title = "Remove this box";
      remove.setAttribute("aria-label", "Remove this lesion box");
      remove.addEventListener("pointerdown", function (event) { event.stopPropagation(); });
      remove.addEventListener("click", function () {
        boxes = boxes.filter(function (b) { return b.element !== element; });
        element.remove();
        store();
      });
      element.appendChild(remove);
      stack.appendChild(element);
      return element;
    }
    function at(event) {
      var rect = stack.getBoundingClientRect();
      return {
        x: Math.min(Math.max((event.clientX - rect.left) / rect.width, 0), 1),
        y: Math.min(Math.max((event.clientY - rect.top) / rect.height, 0), 1)
      };
    }
    function spanned(a, b) {
      return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
    }
    // a verdict the node refused comes back with the boxes that were drawn
    (figure.getAttribute("data-drafted-box") || "").split(";").forEach(function (text) {
      var c = corners(text);
      if (c) {
        var element = outline();
        place(element, c);
        boxes.push({corners: c, element: element});
      }
    });
    if (boxes.length) { store(); }
    // Without a mouse: "Mark lesion" pressed from the keyboard puts a box in the middle of the
    // image and the focus on the image; the arrow keys move the box, with Shift they make it
    // wider or narrower, taller or shorter; Enter keeps it, Escape (or leaving) drops it.
    var keyed = null;  // {corners, element} while a box is placed with the keys
    function endKeyed(keep, refocus) {
      var k = keyed;
      if (!k) { return; }
      keyed = null;
      stack.classList.remove("marking");
      stack.removeAttribute("tabindex");
      stack.removeAttribute("role");
      stack.removeAttribute("aria-label");
      mark.textContent = "Mark lesion";
      if (keep) {
        boxes.push(k);
        store();
      } else {
        k.element.remove();
      }
      if (refocus) { mark.focus(); }
    }
    mark.addEventListener("click", function (event) {
      if (keyed) { endKeyed(false, true); return; }
      var on = !stack.classList.contains("marking");
      stack.classList.toggle("marking", on);
      mark.textContent = on ? "Drag over the lesion" : "Mark lesion";
      if (on && event.detail === 0) {  // Enter or Space, not a mouse click
        keyed = {corners: [0.4, 0.4, 0.6, 0.6], element: outline()};
        place(keyed.element, keyed.corners);
        stack.tabIndex = 0;
        stack.setAttribute("role", "application");
        stack.setAttribute("aria-label", "Lesion box on " + figure.id.replace("-", " ") +
          ": the arrow keys move it, Shift and the arrow keys change its size; " +
          "Enter keeps it, Escape drops it.");
        mark.textContent = "Drop the box";
        stack.focus();
      }
    });
    stack.addEventListener("keydown", function (event) {
      if (!keyed) { return; }
      var c = keyed.corners, step = 0.02, dx = 0, dy = 0;
      if (event.key === "Enter" || event.key === "Escape") {
        event.preventDefault();
        endKeyed(event.key === "Enter", true);
        return;
      }
      if (event.key === "ArrowLeft") { dx = -step; }
      else if (event.key === "ArrowRight") { dx = step; }
      else if (event.key === "ArrowUp") { dy = -step; }
      else if (event.key === "ArrowDown") { dy = step; }
      else { return; }
      event.preventDefault();
      if (event.shiftKey) {
        c[2] = Math.min(Math.max(c[2] + dx, c[0] + step), 1);
        c[3] = Math.min(Math.max(c[3] + dy, c[1] + step), 1);
      } else {
        dx = Math.min(Math.max(dx, -c[0]), 1 - c[2]);
        dy = Math.min(Math.max(dy, -c[1]), 1 - c[3]);
        c[0] += dx; c[2] += dx; c[1] += dy; c[3] += dy;
      }
      place(keyed.element, c);
    });
    stack.addEventListener("focusout", function () { endKeyed(false, false); });
    stack.addEventListener("pointerdown", function (event) {
      if (!stack.classList.contains("marking")) { return; }
      endKeyed(false, false);
      stack.classList.add("marking");
      event.preventDefault();
      start = at(event);
      dragged = outline();
      place(dragged, spanned(start, start));
      stack.setPointerCapture(event.pointerId);
    });
    stack.addEventListener("pointermove", function (event) {
      if (start && dragged) { place(dragged, spanned(start, at(event))); }
    });
    stack.addEventListener("pointerup", function (event) {
      if (!start || !dragged) { return; }
      var c = spanned(start, at(event));
      var element = dragged;
      start = null;
      dragged = null;
      stack.classList.remove("marking");
      mark.textContent = "Mark lesion";
      if (c[2] - c[0] < 0.002 || c[3] - c[1] < 0.002) {
        element.remove();  // a click, not a box
        return;
      }
      place(element, c);
      boxes.push({corners: c, element: element});
      store();
    });
    clear.addEventListener("click", function () {
      boxes.forEach(function (b) { b.element.remove(); });
      boxes = [];
      store();
    });
  });
});
