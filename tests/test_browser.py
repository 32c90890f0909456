"""End to end in a real browser: Playwright drives Debian's Chromium against the launched studio.

Each tab: upload an example image, run it, wait for the result, pick a label / answer token and
see the heatmap change, and save a screenshot under test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("MMIE_CHROMIUM", "/usr/bin/chromium")

# CI installs chromium (.ci/run), so there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)

TIMEOUT = 90_000  # ms: first model loads included


@pytest.fixture(scope="module")
def page(studio_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        page.set_default_timeout(TIMEOUT)
        page.goto(studio_url)
        page.get_by_text("MMIE Studio: look inside").wait_for()
        try:
            yield page
        finally:
            browser.close()


def example(i: int) -> str:
    from studio.common import example_images

    return example_images()[i]


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def upload(page, elem_id: str, path: str) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(path)
    page.locator(f"#{elem_id} img").first.wait_for()


def click(page, text: str) -> None:
    page.locator("button:visible", has_text=text).first.click()


def image_src(page, elem_id: str) -> str:
    img = page.locator(f"#{elem_id} img").first
    img.wait_for()
    return img.get_attribute("src") or ""


def wait_new_image(page, elem_id: str, old: str = "") -> str:
    page.wait_for_function(
        "([id, old]) => { const i = document.querySelector(`#${id} img`); return i && i.src && i.src !== old; }",
        arg=[elem_id, old],
    )
    return image_src(page, elem_id)


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_patches_tab(page):
    open_tab(page, "Patches")
    upload(page, "patches-image", example(0))
    click(page, "Show patches")
    wait_new_image(page, "patches-original")
    click(page, "Inspect the vision tower")
    wait_new_image(page, "patches-rollout")
    assert shot(page, "patches").stat().st_size > 20_000


def test_zero_shot_tab(page):
    open_tab(page, "Zero-shot")
    upload(page, "zs-image", example(0))
    click(page, "Classify")
    wait_new_image(page, "zs-chart")
    click(page, "Explain this label")
    first = wait_new_image(page, "zs-overlay")
    # pick another label: the heatmap must change
    page.locator("#zs-label input").click()
    page.get_by_role("option").nth(1).click()
    click(page, "Explain this label")
    wait_new_image(page, "zs-overlay", first)
    assert shot(page, "zero_shot").stat().st_size > 20_000


def test_chat_tab(page):
    open_tab(page, "Chat")
    upload(page, "chat-image", example(0))
    page.locator("#chat-message textarea").fill("how many shapes are there?")
    click(page, "Send")
    page.locator("#chat-tokens label").first.wait_for()
    first = wait_new_image(page, "chat-overlay")
    page.locator("#chat-message textarea").fill("describe the image.")
    click(page, "Send")
    page.wait_for_function("() => document.querySelectorAll('#chat-tokens label').length > 3")
    second = wait_new_image(page, "chat-overlay", first)
    page.locator("#chat-tokens label").nth(3).click()
    wait_new_image(page, "chat-overlay", second)
    assert "three" in page.locator(".message-wrap, [role=log]").first.inner_text().lower()
    assert shot(page, "chat").stat().st_size > 20_000


def test_alt_text_tab(page):
    open_tab(page, "Alt text")
    upload(page, "alt-image", example(1))
    click(page, "Write alt text")
    page.wait_for_function("() => document.querySelector('#alt-text textarea').value.length > 5")
    first = wait_new_image(page, "alt-overlay")
    page.locator("#alt-words label").nth(2).click()
    wait_new_image(page, "alt-overlay", first)
    text = page.locator("#alt-text textarea").input_value()
    assert text.endswith(".") and len(text) <= 125
    assert shot(page, "alt_text").stat().st_size > 20_000


def click_image_at(page, elem_id: str, fx: float, fy: float) -> None:
    """Click an output image at a fraction (fx, fy) of its displayed size."""
    img = page.locator(f"#{elem_id} img").first
    page.wait_for_function("(id) => { const i = document.querySelector(`#${id} img`); "
                           "return i && i.complete && i.naturalWidth > 0; }", arg=elem_id)
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    img.click(position={"x": fx * box["width"], "y": fy * box["height"]})


def number_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def pick_patch_by_click(page, button: str, pick_id: str, result_id: str, prefix: str, row: int, col: int,
                        grid: int = 8) -> None:
    """Run a view, click patch (row, col) on its grid picture, and check the pick and a new result."""
    click(page, button)
    first = wait_new_image(page, result_id)
    click_image_at(page, pick_id, (col + 0.5) / grid, (row + 0.5) / grid)
    wait_new_image(page, result_id, first)
    assert (number_value(page, f"{prefix}-row"), number_value(page, f"{prefix}-col")) == (str(row), str(col))


def test_inside_tab(page):
    open_tab(page, "Inside")
    upload(page, "inside-image", example(0))
    # the sequence: pick an image-token chip, its patch is outlined
    open_tab(page, "Sequence")
    click(page, "Show the sequence")
    first = wait_new_image(page, "inside-seq-patch")
    page.locator("#inside-sequence .token").nth(20).click()
    wait_new_image(page, "inside-seq-patch", first)
    assert shot(page, "inside_sequence").stat().st_size > 20_000
    # a click on a grid picks the patch under the pointer (8 x 8 grid), and the view follows
    open_tab(page, "Patch similarity")
    pick_patch_by_click(page, "Show patch similarity", "inside-sim-pick", "inside-sim-map", "inside-sim", 1, 6)
    assert shot(page, "inside_similarity").stat().st_size > 20_000
    open_tab(page, "Patch to words")
    page.locator("#inside-question textarea").fill("describe the image.")
    pick_patch_by_click(page, "Show patch to words", "inside-ptw-pick", "inside-ptw-chart", "inside-ptw", 6, 3)
    assert shot(page, "inside_patch_to_words").stat().st_size > 20_000
    open_tab(page, "Logit lens")
    pick_patch_by_click(page, "Read the patches", "inside-lens", "inside-lens", "inside-lens", 0, 0)
    assert shot(page, "inside_lens").stat().st_size > 20_000
    open_tab(page, "Robustness")
    click(page, "Run the robustness panel")
    wait_new_image(page, "inside-robustness")
    assert shot(page, "inside_robustness").stat().st_size > 20_000


def test_interventions_tab(page):
    open_tab(page, "Interventions")
    click(page, "Make the scene and its counterfactual")
    page.locator("#iv-corrupted img").first.wait_for()
    wait_new_image(page, "iv-picker")
    # knockout of the picked patches: click two cells of the circle (middle left) on the picker
    old = image_src(page, "iv-picker")
    click_image_at(page, "iv-picker", 1.5 / 8, 3.5 / 8)
    old = wait_new_image(page, "iv-picker", old)
    click_image_at(page, "iv-picker", 0.5 / 8, 3.5 / 8)
    wait_new_image(page, "iv-picker", old)
    page.wait_for_function("() => document.querySelector('#iv-picked textarea').value.includes('3, 0')")
    assert "[3, 1]" in page.locator("#iv-picked textarea").input_value()
    page.get_by_label("the picked patches").check()
    click(page, "Knock out")
    wait_new_image(page, "iv-knockout-map")
    assert "Cutting" in page.locator("body").inner_text()
    assert shot(page, "interventions_knockout").stat().st_size > 20_000
    open_tab(page, "Information flow")
    click(page, "Trace the flow")
    wait_new_image(page, "iv-flow-chart")
    assert shot(page, "interventions_flow").stat().st_size > 20_000
    open_tab(page, "Patching")
    click(page, "Run patching")
    wait_new_image(page, "iv-patching-maps")
    assert shot(page, "interventions_patching").stat().st_size > 20_000
    open_tab(page, "Segment ablation")
    click(page, "Ablate segments")
    wait_new_image(page, "iv-segment-map")
    assert "green circle" in page.locator("body").inner_text()
    assert shot(page, "interventions_segments").stat().st_size > 20_000


def test_search_tab(page):
    open_tab(page, "Search")
    click(page, "Build the index")
    page.wait_for_function("() => document.querySelector('#search-index-id textarea, #search-index-id input')"
                           " && document.querySelector('#search-index-id textarea, #search-index-id input').value.length == 16")
    page.locator("#search-text textarea").fill("a blue square")
    page.locator("#search-go").click()
    page.locator("#search-gallery img").first.wait_for()
    page.locator("#search-gallery img").nth(1).click()
    wait_new_image(page, "search-match")
    assert "Hit 2" in page.locator("body").inner_text()
    assert shot(page, "search").stat().st_size > 20_000
