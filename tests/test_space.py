"""The Space (dualcache_diffusers.space): the plain functions, its API through gradio_client, and the page in a
real headless Chromium driven by selenium.

The browser test needs Debian's ``chromium`` + ``chromium-driver`` (``.ci/run`` installs them as root) and
``selenium`` (the ``test`` extra); it skips, saying which is missing, only when one of them is not installed.
Its screenshot is kept in ``$DUALCACHE_ARTIFACTS`` (or the test's tmp_path) and its path printed.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualcache_diffusers import space
from dualcache_diffusers.cli import build_parser, main

STEPS = 20


# --------------------------------------------------------------------------------------- plain functions


def test_generate_calibrated_to_budget_reuses_the_uncached_images(monkeypatch):
    # every uncached call counts as short, so the re-timing path runs whatever the machine's load
    monkeypatch.setattr(space, "RETIME_UNCACHED_S", float("inf"))
    first = space.generate("dit", "calibrated:duca", budget=3.0, seed=5, condition="3", steps=STEPS)
    n = first.numbers
    assert abs(math.log(n["flops_ratio"] / 3.0)) < math.log(1.1), n  # the knob search hit the budget (measured)
    assert 15.0 < n["psnr"] < 60.0 and 0.5 < n["ssim"] < 1.0, n
    assert n["cache_bytes"] > 0 and len(n["pattern"]) == STEPS and set(n["pattern"]) > {"F"}
    assert first.uncached.size == first.cached.size == first.difference.size
    assert np.asarray(first.uncached).std() > 0 and first.plan is not None
    assert "| FLOPs ratio |" in first.table and f"{n['flops_ratio']:.2f}x" in first.table

    references = len(space._REFERENCES)
    second = space.generate("dit", "calibrated:fora", budget=2.0, seed=5, condition="three", steps=STEPS)
    assert second.numbers["uncached_images_from_memory"] and not n["uncached_images_from_memory"]
    assert len(space._REFERENCES) == references
    assert not second.numbers["uncached_time_from_memory"]  # a short uncached call is timed again, interleaved
    assert np.array_equal(np.asarray(second.uncached), np.asarray(first.uncached))
    # FORA's interval, then its leading full steps where the interval alone misses the budget by more than 3%
    assert set(second.numbers["setting"]) <= {"interval", "first_full_steps"}, second.numbers["setting"]
    assert abs(math.log(second.numbers["flops_ratio"] / 2.0)) < math.log(1.1), second.numbers


def test_generate_pixart_prompt_and_a_learned_plan():
    pixart = space.generate("pixart", "fora", seed=1, condition="a thin two", steps=8, num_images=2)
    assert pixart.numbers["flops_ratio"] > 1.5 and math.isfinite(pixart.numbers["psnr"])
    assert pixart.numbers["seeds"] == [1, 2] and "'a thin two'" in pixart.status

    learned = space.generate("dit", "plan:l2c_dit_2x", seed=0, condition="7", steps=20, num_images=1)
    assert learned.numbers["pattern"].count("L") > 0  # the plan's learned steps ran
    assert 1.7 < learned.numbers["flops_ratio"] < 2.2


def test_method_choices_offer_learned_plans_only_where_they_fit():
    def plans(model, steps):
        return {value for _, value in space.method_choices(model, steps) if value.startswith("plan:")}

    assert plans("dit", 20) == {f"plan:{p.stem}" for p in space.find_plans().values()} != set()
    assert plans("dit", 10) == set() and plans("pixart", 20) == set()
    values = [value for _, value in space.method_choices("pixart", 20)]
    assert {"duca", "fora", "toca", "calibrated:duca", "calibrated:fora", "calibrated:toca"} <= set(values)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(model="pixart", condition="  "), "The prompt is empty"),
    (dict(condition=""), "The class is empty"),
    (dict(condition="eleven"), "'eleven' is not a class of this model"),
    (dict(condition="10"), "class 10 is out of range"),
    (dict(budget=4.5), "budget=4.5 is out of range; allowed: 1.5 to 4.0"),
    (dict(budget=float("nan")), "out of range"),
    (dict(steps=3), "steps=3 is out of range"),
    (dict(model="video-xl"), "model 'video-xl' is not offered here"),
    (dict(model="hub", hub_id=""), "Type a Hub pipeline id"),
    (dict(model="hub", hub_id="not an id"), "is not a Hub id"),
    (dict(method="plan:l2c_dit_2x", steps=10), "does not fit this model at 10 steps"),
    (dict(method="magic"), "method 'magic' is not offered"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(space.SpaceInputError, match=re.escape(message)):
        space.generate(**kwargs)


def test_hub_id_that_cannot_be_loaded_and_a_pipeline_without_transformer(tmp_path):
    with pytest.raises(space.SpaceInputError, match=r"^Could not (download|load) 'dualcache-tests/no-such-pipeline"):
        space.generate(model="hub", hub_id="dualcache-tests/no-such-pipeline")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "unet-pipe")
    with pytest.raises(space.SpaceInputError, match=r"cannot be cached: DDPMPipeline .* has no diffusion transformer"):
        space.generate(model="hub", hub_id=str(tmp_path / "unet-pipe"))


def test_grid_tiles_images_and_clips():
    images = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    grid = space.to_grid(images, min_side=32, pad=2)
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert np.array_equal(np.asarray(grid)[2:34, 2:34], (np.repeat(np.repeat(images[0], 4, 0), 4, 1) * 255).round())
    clips = np.zeros((2, 5, 8, 8, 3), dtype=np.float32)
    clips[:, 4] = 1.0  # the last frame white: it must be the right end of each strip
    strip = np.asarray(space.to_grid(clips, min_side=8, pad=0))
    assert strip.shape == (8, 2 * 40, 3) and strip[:, 32:40].min() == 255 and strip[:, :32].max() == 0
    same = np.asarray(space.difference_map(images, images, gain=4.0))
    changed = images.copy()
    changed[1, 2:4, 2:4] = np.clip(changed[1, 2:4, 2:4] + 0.5, 0, 1)
    moved = np.asarray(space.difference_map(changed, images, gain=4.0))
    assert same.shape == moved.shape == np.asarray(space.to_grid(images)).shape
    assert len(np.unique(same[2:-2, 2:-2].reshape(-1, 3), axis=0)) <= 2  # one colour (zero) plus the padding
    assert (np.abs(moved.astype(int) - same).sum(axis=-1) > 0).sum() == 4 * 16 * 16  # the changed 2x2 pixels x 16^2


def test_dualcache_app_subcommand_is_registered():
    assert main(["app", "--help"]) == 0  # main() imports SUBCOMMAND_MODULES, dualcache_diffusers.space among them
    args = build_parser().parse_args(["app", "--port", "7999"])
    assert args.port == 7999 and args._run is space._run_app


# ------------------------------------------------------------------------------------------- served app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    app = space.launch("127.0.0.1", port, prevent_thread_lock=True, quiet=True)  # what `dualcache app` runs
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_gradio_client_calls_the_named_endpoint(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    assert "/generate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    uncached, cached, difference, table, plan, status = client.predict(
        model="dit", hub_id="", method="duca", budget=2.5, seed=2, condition="4", steps=STEPS, num_images=4,
        api_name="/generate",
    )
    for path in (uncached, cached, difference, plan):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 128
    with Image.open(uncached) as a, Image.open(cached) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))  # cached, so not identical
    assert re.search(r"\| FLOPs ratio \| (\d+\.\d+)x", table) and "class 4" in status
    with pytest.raises(AppError, match="The class is empty"):
        client.predict(model="dit", hub_id="", method="duca", budget=2.5, seed=2, condition="", steps=STEPS,
                       num_images=4, api_name="/generate")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"{name} is not installed (apt-get install -y chromium chromium-driver; .ci/run does it as root)"
    return None


@pytest.fixture
def browser(tmp_path):
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    # an explicit driver path: selenium-manager must not try to download one
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DUALCACHE_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_browser_generates_side_by_side_and_shows_errors(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    wait = WebDriverWait(browser, 40)
    browser.get(app_url)
    button = wait.until(ec.element_to_be_clickable((By.ID, "generate")))

    # the budget: type 3 into the slider's number box; the range input follows
    number = browser.find_element(By.CSS_SELECTOR, "#budget input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("3", Keys.TAB)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#budget input[type=range]").get_attribute("value") == "3")

    button.click()
    wait.until(lambda d: "FLOPs ratio" in d.find_element(By.ID, "results").text)
    for elem_id in ("uncached", "cached", "difference", "plan"):
        image = wait.until(lambda d, e=elem_id: d.find_element(By.CSS_SELECTOR, f"#{e} img"))
        wait.until(lambda d, i=image: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i))
    results = browser.find_element(By.ID, "results").text
    ratio = float(re.search(r"FLOPs ratio\s+(\d+\.\d+)x", results).group(1))
    psnr = re.search(r"PSNR\s+(\S+) dB", results).group(1)
    assert ratio > 1.5 and math.isfinite(float(psnr)), results
    assert "knob search for 3x" in results, results  # the slider's value reached the server
    shot = _artifacts(tmp_path) / "space_browser.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot of the Space after a generation: {shot}")

    # an error path: an empty class shows a message in the page, and the app keeps serving
    condition = browser.find_element(By.CSS_SELECTOR, "#condition textarea")
    condition.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    button.click()
    wait.until(lambda d: "The class is empty" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and "File \"" not in body
    condition.send_keys("nine")
    button.click()
    wait.until(lambda d: "class 9" in d.find_element(By.ID, "status").text)

    # another model: PixArt takes a prompt (the page relabels the box and fills in its default); empty -> a message
    browser.find_element(By.CSS_SELECTOR, "#model input").click()
    wait.until(lambda d: [li for li in d.find_elements(By.CSS_SELECTOR, "li") if "PixArt" in li.text])[0].click()
    wait.until(lambda d: "Prompt" in d.find_element(By.ID, "condition").text)
    assert condition.get_attribute("value") == space.MODELS["pixart"].default_condition
    condition.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    button.click()
    wait.until(lambda d: "The prompt is empty" in d.find_element(By.TAG_NAME, "body").text)
    condition.send_keys("a thin two")
    button.click()
    wait.until(lambda d: "'a thin two'" in d.find_element(By.ID, "status").text)
    assert "PixArt" in browser.find_element(By.ID, "status").text
    print(f"browser session: {time.perf_counter() - start:.1f} s")


def test_the_shipped_video_model_is_served_as_clips():
    result = space.generate("video", "duca", 2.0, 0, "a seven moving left", 20, 1)
    assert result.numbers["flops_ratio"] > 1.5 and math.isfinite(result.numbers["psnr"])
