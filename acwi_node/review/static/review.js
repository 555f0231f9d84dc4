// Case page controls (no inline script: CSP): each heatmap's show/hide and opacity, the
// window every image is drawn in (the heatmap layer is drawn over it in any window), and the
// lesion boxes a reader may mark with the verdict, with the mouse or the keyboard.
"use strict";
// Every page of a signed-in reader: a warning before the session ends (WCAG 2.2.1). Two
// minutes before the idle timeout (half of it when it is shorter) a "Stay signed in" button
// starts the idle time again; before the session's lifetime ends, a note to send what is
// being written. The warning is an assertive live region (read out at once); the focus is
// not moved.
document.addEventListener("DOMContentLoaded", function () {
  var box = document.getElementById("session-warning");
  if (!box) { return; }
  var timer = null, back = null;
  function seconds(name) { return Number(box.getAttribute(name)) || 0; }
  var idleTimeout = seconds("data-idle-timeout-s");
  // the path a reverse proxy publishes the app under ("" or "/acwi": node.http_root_path)
  var root = box.getAttribute("data-root") || "";
  var warnBefore = Math.min(120, idleTimeout / 2);
  function clock(at) {
    return new Date(at).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }
  function say(text, button) {
    box.textContent = "";
    document.documentElement.classList.toggle("session-warned", text !== "");
    if (!text) { return; }
    var p = document.createElement("p");
    p.textContent = text;
    box.appendChild(p);
    if (button) { box.appendChild(button); }
  }
  function ended() {
    var link = document.createElement("a");
    // the sign-in's next page is a path of the app: without the root path in front
    var path = location.pathname;
    if (root && path.indexOf(root + "/") === 0) { path = path.slice(root.length); }
    link.href = root + "/login?next=" + encodeURIComponent(path + location.search);
    link.textContent = "Sign in again";
    say("Your session has ended: sign in again before you submit anything on this page " +
        "(what you typed here stays in this tab).", link);
  }
  function schedule(idleLeft, lifetimeLeft) {
    clearTimeout(timer);
    var now = Date.now();
    var idleEnd = now + idleLeft * 1000, lifetimeEnd = now + lifetimeLeft * 1000;
    var end = Math.min(idleEnd, lifetimeEnd);
    timer = setTimeout(function () {
      if (lifetimeEnd <= idleEnd) {
        say("Your session ends at " + clock(lifetimeEnd) + " (its longest): submit what you " +
            "are writing before then, then sign in again.", null);
      } else {
        var stay = document.createElement("button");
        stay.type = "button";
        stay.id = "stay-signed-in";
        stay.textContent = "Stay signed in";
        stay.addEventListener("click", extend);
        say("You will be signed out at " + clock(idleEnd) + " for inactivity.", stay);
      }
      timer = setTimeout(ended, Math.max(0, end - Date.now()));
    }, Math.max(0, end - now - warnBefore * 1000));
  }
  function extend() {
    fetch(root + "/review/session", {credentials: "same-origin", redirect: "manual",
                              headers: {"Accept": "application/json"}})
      .then(function (answer) {
        if (!answer.ok) { throw new Error("signed out"); }
        return answer.json();
      })
      .then(function (left) {
        say("", null);
        schedule(left.idle_left_s, left.lifetime_left_s);
        if (back && document.contains(back)) { back.focus(); }
      })
      .catch(ended);
  }
  box.addEventListener("focusin", function (event) {
    if (event.relatedTarget && !box.contains(event.relatedTarget)) { back = event.relatedTarget; }
  });
  schedule(seconds("data-idle-left-s"), seconds("data-lifetime-left-s"));
});

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
    var hint = figure.querySelector(".marking-hint");
    if (!form || !stack || !mark || !clear) { return; }
    var name = "box:" + figure.getAttribute("data-image");
    var boxes = [];  // [{corners: [x0, y0, x1, y1], element: div}]
    stack.querySelectorAll("img").forEach(function (img) {
      img.setAttribute("draggable", "false");
    });
    var start = null, dragged = null;
    // Without dragging (WCAG 2.5.7): a click marks one corner, a second click the opposite
    // one; the box follows the pointer in between.
    var anchor = null;
    function marking(on, words) {
      stack.classList.toggle("marking", on);
      mark.textContent = on ? words : "Mark lesion";
      if (hint) { hint.hidden = !on; }
    }
    function dropAnchor() {
      if (anchor && dragged) { dragged.remove(); }
      anchor = null;
      dragged = null;
    }
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
      marking(false);
      stack.removeAttribute("tabindex");
      stack.removeAttribute("role");
      stack.removeAttribute("aria-label");
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
      dropAnchor();
      marking(on, "Drag over the lesion");
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
      marking(true, anchor ? "Click the opposite corner" : "Drag over the lesion");
      event.preventDefault();
      if (anchor) {
        start = anchor;
      } else {
        start = at(event);
        dragged = outline();
        place(dragged, spanned(start, start));
      }
      stack.setPointerCapture(event.pointerId);
    });
    stack.addEventListener("pointermove", function (event) {
      var from = start || anchor;
      if (from && dragged) { place(dragged, spanned(from, at(event))); }
    });
    stack.addEventListener("pointerup", function (event) {
      if (!start || !dragged) { return; }
      var c = spanned(start, at(event));
      var element = dragged;
      if (c[2] - c[0] < 0.002 || c[3] - c[1] < 0.002) {  // a click, not a drag
        if (!anchor) {  // the first corner: the next click is the opposite one
          anchor = start;
          start = null;
          mark.textContent = "Click the opposite corner";
          return;
        }
        start = null;  // the same spot again: no box
        dropAnchor();
        marking(false);
        element.remove();
        return;
      }
      start = null;
      dragged = null;
      anchor = null;
      marking(false);
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
