"""The review web app in a real browser: Playwright driving Debian's Chromium headless.

The node's ``web`` process runs as in production (``acwi-node web``, account created with
``acwi-node users add``); two review cases are real analyses of synthetic studies. The test signs
in, opens a case, checks the images and the heatmap controls, overrides the result and sees the
worklist and the ledger change; on the other case it marks the lesion by dragging a box over an
image, clears and redraws it, sees an escalation with it refused and the page come back with the
box and its choices, marks a second lesion on the same image, confirms the finding with both,
and sees the kept boxes drawn over the image; then it opens the model monitoring page.
A screenshot of the case page is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import Dialog, Page, expect, sync_playwright
from sqlalchemy import select

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Delivery, Result, Verdict
from tests.support.node import NodeProcesses, wait_port, write_config
from tests.support.ports import free_port
from tests.support.review_case import DESTINATION, MODEL, make_review_case, review_settings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CANARY = "<script>document.title='pwned'</script>^Canary"
USER, PASSWORD = "dr.browser", "browser password 42"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is absent: install Debian's chromium package "
        "(scripts/setup.sh --test does)",
    ),
]


def _cli(config: Path, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-m", "acwi_node.cli", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _images_loaded(page: Page, selector: str) -> int:
    return int(
        page.eval_on_selector_all(
            selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
        )
    )


def test_sign_in_open_case_override(tmp_path: Path) -> None:
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    canary_item, canary_uid = make_review_case(
        settings, ledger, tmp_path, patient_name=CANARY, calling_ae="SITEA", seed=11
    )
    other_item, _ = make_review_case(settings, ledger, tmp_path, calling_ae="SITEB", seed=12)
    http_port = free_port()
    config = write_config(
        tmp_path / "acwi.toml",
        {
            "node": {"data_dir": str(settings.data_dir), "http_port": http_port},
            "destinations": [
                {"name": DESTINATION, "ae_title": "PACS", "host": "127.0.0.1", "port": 11199}
            ],
            "models": [{"name": MODEL, "manifest": str(settings.model_manifest(MODEL))}],
        },
    )
    _cli(config, "users", "add", USER, "--role", "radiologist", "--password-stdin", stdin=PASSWORD)
    assert USER in _cli(config, "users", "list")
    base = f"http://127.0.0.1:{http_port}"
    dialogs: list[str] = []
    with NodeProcesses(config, ["web"], tmp_path) as nodes, sync_playwright() as pw:
        wait_port("127.0.0.1", http_port)
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})

            def on_dialog(dialog: Dialog) -> None:  # an alert() would mean script injection
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)

            # Sign in: the worklist sends an anonymous visitor to the sign-in form and back.
            page.goto(f"{base}/review/worklist")
            expect(page).to_have_url(f"{base}/login?next=%2Freview%2Fworklist")
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base}/review/worklist")
            expect(page.locator("#counts")).to_have_text("2 of 2 open cases shown")
            link = page.locator(f"a[href='/review/cases/{canary_item}']")
            expect(link).to_have_text(CANARY)  # the patient name is text, not markup

            # The case page: images, heatmap overlay controls, model figures.
            link.click()
            expect(page).to_have_url(f"{base}/review/cases/{canary_item}")
            expect(page.locator("#patient-name")).to_have_text(CANARY)
            page.wait_for_function(
                "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert _images_loaded(page, "img.source") == 2
            assert _images_loaded(page, "img.overlay") == 2
            overlay = page.locator("img.overlay").first
            page.locator("input.heatmap-opacity").first.fill("40")
            expect(overlay).to_have_css("opacity", "0.4")
            page.locator("input.heatmap-toggle").first.uncheck()
            expect(overlay).to_be_hidden()
            page.locator("input.heatmap-toggle").first.check()
            expect(overlay).to_be_visible()
            # Another window for every image: each picture is asked for again in it, and
            # the heatmap layer stays over it.
            source = page.locator("img.source").first
            before = source.get_attribute("src")
            page.select_option("#window-preset", "auto")
            expect(source).to_have_attribute("src", f"{before}?window=auto")
            page.wait_for_function(
                "() => [...document.querySelectorAll('img.source')]"
                ".every(i => i.complete && i.naturalWidth > 0 && i.src.endsWith('window=auto'))"
            )
            expect(overlay).to_be_visible()
            page.select_option("#window-preset", "")
            expect(source).to_have_attribute("src", before or "")
            expect(page.locator("section.model")).to_contain_text("Epistemic")
            expect(page.locator("section.sr")).to_contain_text("UNVERIFIED")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "review-case.png"), full_page=True)

            # Without a mouse: "Mark lesion" from the keyboard puts a box in the middle of the
            # image, the arrow keys move it (Shift: its size), Escape drops it, Enter keeps it.
            first = page.locator("figure.viewer").first
            first.locator("button.mark-lesion").focus()
            page.keyboard.press("Enter")
            expect(first.locator(".stack")).to_be_focused()
            expect(first.locator(".lesion-box")).to_have_count(1)
            page.keyboard.press("Escape")
            expect(first.locator(".lesion-box")).to_have_count(0)
            expect(first.locator("button.mark-lesion")).to_be_focused()
            page.keyboard.press("Enter")
            for key in ("ArrowLeft", "ArrowLeft", "ArrowUp", "Shift+ArrowRight", "Shift+ArrowDown"):
                page.keyboard.press(key)
            page.keyboard.press("Enter")
            status = page.locator("#lesion-boxes")
            expect(status).to_have_text(
                "1 lesion box marked: sent with a confirmed or corrected finding."
            )
            box = page.locator(f"input[name='box:{first.get_attribute('data-image')}']")
            expect(box).to_have_value("0.3600 0.3800 0.5800 0.6000")
            first.locator("button.clear-lesion").focus()
            page.keyboard.press("Enter")
            expect(status).to_contain_text("No lesion marked")
            # Without dragging (WCAG 2.5.7): a click on one corner, a second on the opposite
            # one; the way to mark is written under the image while marking.
            mark = first.locator("button.mark-lesion")
            mark.click()
            expect(first.locator(".marking-hint")).to_be_visible()
            area = first.locator(".stack").bounding_box()
            assert area is not None
            page.mouse.click(area["x"] + 0.2 * area["width"], area["y"] + 0.2 * area["height"])
            expect(mark).to_have_text("Click the opposite corner")
            page.mouse.click(area["x"] + 0.6 * area["width"], area["y"] + 0.5 * area["height"])
            expect(status).to_contain_text("1 lesion box marked")
            expect(first.locator(".marking-hint")).to_be_hidden()
            remove = first.locator("button.remove-box")
            target = remove.bounding_box()  # WCAG 2.5.8: at least 24 by 24 CSS pixels
            assert target is not None and min(target["width"], target["height"]) >= 24, target
            remove.click()
            expect(status).to_contain_text("No lesion marked")

            # Override: choose another label, give a reason, submit.
            predicted = page.locator("#predicted").inner_text()
            page.check("input[name=action][value=override]")
            new_label = page.locator("select[name=label] option").first.get_attribute("value")
            assert new_label and new_label != predicted
            page.select_option("select[name=label]", new_label)
            page.fill("textarea[name=reason]", "rib overlap <not> a finding")
            # decided, and on to the next case of the worklist at once
            page.click("#submit-next")
            expect(page).to_have_url(f"{base}/review/cases/{other_item}")
            page.goto(f"{base}/review/worklist")
            expect(page.locator("#counts")).to_have_text("1 of 1 open case shown")
            expect(page.locator(f"a[href='/review/cases/{canary_item}']")).to_have_count(0)
            expect(page.locator(f"a[href='/review/cases/{other_item}']")).to_have_count(1)

            page.goto(f"{base}/review/cases/{canary_item}")
            expect(page.locator("#case-state")).to_have_text("closed")
            expect(page.locator("#verdicts")).to_contain_text(
                f"{USER} override as {new_label}: rib overlap <not> a finding"
            )
            expect(page.locator("section.sr")).to_contain_text("VERIFIED by")

            # The other case: mark the lesion on its second image by dragging over it, clear
            # it, mark it again, and confirm the finding with it.
            page.goto(f"{base}/review/cases/{other_item}")
            page.wait_for_function(
                "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
            expect(status).to_contain_text("No lesion marked")
            figure = page.locator("figure.viewer").nth(1)
            marked_image = figure.get_attribute("data-image")
            stack = figure.locator(".stack")

            def drag(x0: float, y0: float, x1: float, y1: float) -> None:
                # a page the node just sent back loads its pictures when scrolled to: drag
                # over the picture as laid out once loaded, not while it still grows
                figure.scroll_into_view_if_needed()
                page.wait_for_function(
                    "f => [...f.querySelectorAll('img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)",
                    arg=figure.element_handle(),
                )
                figure.locator("button.mark-lesion").click()
                expect(stack).to_have_class("stack marking")
                area = stack.bounding_box()
                assert area is not None
                page.mouse.move(area["x"] + x0 * area["width"], area["y"] + y0 * area["height"])
                page.mouse.down()
                page.mouse.move(
                    area["x"] + x1 * area["width"], area["y"] + y1 * area["height"], steps=5
                )
                page.mouse.up()

            drag(0.1, 0.1, 0.3, 0.3)
            expect(status).to_have_text(
                "1 lesion box marked: sent with a confirmed or corrected finding."
            )
            expect(figure.locator(".lesion-box")).to_be_visible()
            figure.locator("button.clear-lesion").click()
            expect(status).to_contain_text("No lesion marked")
            expect(figure.locator(".lesion-box")).to_be_hidden()
            drag(0.75, 0.5, 0.25, 0.25)  # dragged from the bottom right: the same box
            expect(status).to_contain_text("1 lesion box marked")
            # an escalation does not take a box: the page comes back with the box drawn again
            # and the reader's choice and reason, to confirm instead
            page.check("input[name=action][value=escalate]")
            page.fill("textarea[name=reason]", "second look")
            page.click(".verdict-form button[type=submit]")
            expect(page.locator("[role=alert]")).to_contain_text("not an escalation")
            figure = page.locator(f'figure.viewer[data-image="{marked_image}"]')
            expect(figure.locator(".lesion-box")).to_be_visible()
            expect(page.locator("#lesion-boxes")).to_contain_text("1 lesion box marked")
            expect(page.locator("input[name=action][value=escalate]")).to_be_checked()
            expect(page.locator("textarea[name=reason]")).to_have_value("second look")
            # a second lesion on the same image: a second box beside the first
            drag(0.6, 0.7, 0.9, 0.9)
            expect(figure.locator(".lesion-box")).to_have_count(2)
            expect(status).to_contain_text("2 lesion boxes marked")
            expect(figure.locator("button.clear-lesion")).to_have_text("Clear boxes")
            # one box removed by its own button, the other kept; then drawn again
            figure.locator(".lesion-box").nth(1).locator("button.remove-box").click()
            expect(figure.locator(".lesion-box")).to_have_count(1)
            expect(status).to_contain_text("1 lesion box marked")
            drag(0.6, 0.7, 0.9, 0.9)
            expect(figure.locator(".lesion-box")).to_have_count(2)
            page.check("input[name=action][value=confirm]")
            page.click(".verdict-form button[type=submit]")
            expect(page).to_have_url(f"{base}/review/worklist")
            page.goto(f"{base}/review/cases/{other_item}")
            expect(page.locator("#verdicts")).to_contain_text("2 lesion boxes marked")
            figure.scroll_into_view_if_needed()  # its pictures load when scrolled to
            page.wait_for_function(
                "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
            # the kept boxes are drawn over their image where they were marked
            kept = figure.locator(".lesion-box.marked")
            expect(kept).to_have_count(2)
            expect(figure).to_contain_text(f"Lesion marked by {USER} (")
            area = figure.locator(".stack").bounding_box()
            assert area is not None
            for n, want_box in enumerate([(0.25, 0.25, 0.75, 0.5), (0.6, 0.7, 0.9, 0.9)]):
                expect(kept.nth(n)).to_be_visible()
                drawn = kept.nth(n).bounding_box()
                assert drawn is not None
                got_box = (
                    (drawn["x"] - area["x"]) / area["width"],
                    (drawn["y"] - area["y"]) / area["height"],
                    (drawn["x"] + drawn["width"] - area["x"]) / area["width"],
                    (drawn["y"] + drawn["height"] - area["y"]) / area["height"],
                )
                near = [abs(g - w) < 0.02 for g, w in zip(got_box, want_box, strict=True)]
                assert all(near), (drawn, area)
            # the second lesion was not one: amend the verdict, the boxes start as they were
            page.click("#amend-link")
            expect(page.locator("form.amend-form")).to_be_visible()
            drafted = figure.locator(".lesion-box.drawn")
            expect(drafted).to_have_count(2)
            expect(figure.locator(".lesion-box.marked")).to_have_count(0)
            expect(page.locator("#lesion-boxes")).to_contain_text("2 lesion boxes marked")
            drafted.nth(1).locator("button.remove-box").click()
            expect(page.locator("#lesion-boxes")).to_contain_text("1 lesion box marked")
            page.fill("textarea[name=reason]", "the second was a vessel")
            page.click(".amend-form button[type=submit]")
            expect(page).to_have_url(f"{base}/review/cases/{other_item}?amended=1")
            expect(page.locator("[role=status]").first).to_contain_text("The verdict is amended")
            expect(page.locator("#verdicts")).to_contain_text(
                f"{USER} amended the verdict: confirm"
            )
            expect(page.locator("#verdicts li.superseded")).to_have_count(1)
            expect(figure.locator(".lesion-box.marked")).to_have_count(1)

            # Model monitoring, from the navigation: the two studies begin the version's
            # baseline, nothing recent to compare yet.
            page.click("header nav a[href='/review/monitoring']")
            expect(page).to_have_url(f"{base}/review/monitoring")
            section = page.locator("section.monitor")
            expect(section).to_have_count(1)
            expect(section.locator("h2")).to_contain_text("too few studies")
            expect(section).to_contain_text("forming: 2 of 200")
            expect(section.locator("tr.signal-equipment td").nth(1)).to_contain_text("100%")
            expect(page.locator("form.baseline")).to_have_count(0)  # administrators pin
            # studies arriving: this node's ledger holds today's studies alone
            arrivals = page.locator("section.arrivals")
            expect(arrivals.locator("h2")).to_contain_text("too few weeks")
            expect(arrivals.locator("tr.flow-node td").first).to_have_text("All")
            # WCAG 2.2.1: two minutes before the idle timeout (30 min) a warning, read out at
            # once, offers to stay signed in; the request starts the idle time again.
            page.clock.install()
            page.reload()
            page.clock.fast_forward("28:30")
            warning = page.locator("#session-warning[aria-live=assertive]")
            expect(warning).to_contain_text("You will be signed out at")
            with page.expect_response(f"{base}/review/session") as stayed:
                warning.locator("button").click()
            assert stayed.value.json()["idle_left_s"] >= 1790
            expect(warning).to_be_empty()
            # WCAG 1.4.10: 320 CSS pixels wide (400 % zoom), nothing but a table is wider
            page.set_viewport_size({"width": 320, "height": 640})
            for path in (f"/review/cases/{other_item}", "/review/worklist"):
                page.goto(base + path)
                wider = page.evaluate(
                    "() => [...document.querySelectorAll('body *')]"
                    ".filter(e => !e.closest('table') && e.getBoundingClientRect().right > 321)"
                    ".map(e => e.tagName + '.' + e.className)"
                )
                assert wider == [], (path, wider)
            assert page.title() != "pwned"
            assert dialogs == []
        finally:
            browser.close()
        nodes.assert_alive()

    with ledger.session() as s:
        verdict, marked, amended = s.scalars(select(Verdict).order_by(Verdict.id)).all()
        assert (amended.amends_id, amended.action) == (marked.id, "confirm")
        assert marked.superseded_at is not None and amended.boxes is not None
        assert amended.boxes[marked_image] == marked.boxes[marked_image][:1]  # type: ignore[index]
        assert (verdict.user_name, verdict.action, verdict.label) == (USER, "override", new_label)
        assert verdict.boxes is None
        # the boxes in the image's 128 x 128 pixels: about x 32-95, y 32-63 and x 77-115,
        # y 90-115 (the pointer lands on whole CSS pixels of a picture drawn 512 pixels wide)
        assert marked.action == "confirm" and marked.boxes is not None
        ((name, boxes),) = marked.boxes.items()
        assert name == marked_image and len(boxes) == 2, boxes
        for box, want in zip(boxes, [(32, 32, 95, 63), (77, 90, 115, 115)], strict=True):
            assert all(abs(b - w) <= 1 for b, w in zip(box, want, strict=True)), (box, want)
        assert verdict.model_label == predicted
        verified = s.scalars(
            select(Result).where(
                Result.kind == "sr-verified",
                Result.sop_instance_uid == verdict.sr_sop_instance_uid,
            )
        ).one()
        states = [
            d.state.value
            for d in s.scalars(select(Delivery).where(Delivery.result_id == verified.id)).all()
        ]
        assert states == ["pending"]
    study = ledger.get_study(canary_uid)
    assert study is not None and study["state"] == "exporting"
    assert ledger.worklist() == []  # both cases decided
    ledger.dispose()


def _contrast(foreground: str, background: str) -> float:
    """WCAG's contrast ratio of two computed ``rgb(r, g, b)`` colours."""

    def luminance(colour: str) -> float:
        channels = [int(v) / 255 for v in colour[colour.index("(") + 1 : -1].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_first_tab_skips_the_header_to_the_page(tmp_path: Path) -> None:
    """WCAG 2.4.1: a keyboard user went through the header's six links and the sign-out on
    every page before the worklist. The first Tab now shows "Skip to main content" (out of
    sight until then, legible at AA over the header), Enter puts the focus on the page's
    ``<main>``, and the next Tab goes on inside it."""
    http_port = free_port()
    config = write_config(
        tmp_path / "acwi.toml",
        {"node": {"data_dir": str(tmp_path / "data"), "http_port": http_port}},
    )
    _cli(config, "users", "add", USER, "--role", "radiologist", "--password-stdin", stdin=PASSWORD)
    base = f"http://127.0.0.1:{http_port}"
    with NodeProcesses(config, ["web"], tmp_path) as nodes, sync_playwright() as pw:
        wait_port("127.0.0.1", http_port)
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/review/worklist")
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base}/review/worklist")
            for path in ("/review/worklist", "/review/decided"):
                page.goto(base + path)
                skip = page.locator("a.skip-link")
                hidden = skip.bounding_box()
                assert hidden is not None and hidden["width"] <= 1, hidden  # out of sight
                page.keyboard.press("Tab")
                expect(skip).to_be_focused()
                expect(skip).to_have_text("Skip to main content")
                shown = skip.bounding_box()
                assert shown is not None and shown["width"] > 100 and shown["y"] >= 0, shown
                colours = skip.evaluate(
                    "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor,"
                    " getComputedStyle(document.querySelector('header.top')).backgroundColor]"
                )
                assert _contrast(colours[0], colours[1]) >= 4.5, colours  # its text
                assert _contrast(colours[1], colours[2]) >= 3, colours  # it, over the header
                page.keyboard.press("Enter")
                expect(page.locator("main#main")).to_be_focused()
                page.keyboard.press("Tab")
                inside = page.evaluate("() => document.activeElement.closest('main') !== null")
                assert inside, path
        finally:
            browser.close()
        nodes.assert_alive()
