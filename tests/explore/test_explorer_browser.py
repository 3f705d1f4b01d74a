"""The explorer in a real browser: headless Chromium driven by Selenium (Debian's ``chromium`` and
``chromium-driver``; ``make test`` installs both) against the explorer on a small real run.

Covers: the first page shows images (every tile's image decoded, the ids of the 50 highest-VoG
examples in rank order); a filter narrows the rows to the count computed from the run's Parquet;
paging (next, previous, the last page's remainder); the example page shows the VoG heat map (and
its pixel mean next to the table's raw VoG); every string from the data (ids, class names, a keep
column's name and values) is text, never markup (no element it could create, no alert); and no
page logs anything to the console.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.explorerun import CLASS_NAMES, EVIL_CLASS, EVIL_COLUMN, EVIL_ID, EVIL_VALUE
from vog_ray.explore.server import ExplorerServer
from vog_ray.runs import open_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for exe, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(exe):
            pytest.fail(f"{exe} is missing: install Debian's {pkg!r} package (make browser)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
              "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(explore_run, browser):
    with ExplorerServer(explore_run.url) as srv:
        yield srv, browser, open_run(explore_run.url).scores().to_pandas()


def visit(driver, url: str) -> None:
    """Load a page, wait for its images, and fail on anything in the console."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    logs = driver.get_log("browser")
    assert logs == [], logs


def loaded_images(driver, css: str) -> list[int]:
    return driver.execute_script(f"return Array.from(document.querySelectorAll({css!r})).map(i => i.naturalWidth)")


def tile_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows [data-id]')).map(e => e.getAttribute('data-id'))")


def test_console_check_detects_errors(browser):
    """The console check itself: a page that logs an error is caught."""
    browser.get("data:text/html,<p>x</p><script>console.error('oops')</script>")
    assert any("oops" in e["message"] for e in browser.get_log("browser"))


def test_first_page_shows_images(site):
    srv, d, t = site
    visit(d, srv.url + "/?split=train")
    train = t[t.split == "train"].sort_values("rank")
    assert tile_ids(d) == train.id.tolist()[:50]
    widths = loaded_images(d, "#rows img")
    assert len(widths) == 50 and all(w >= 96 for w in widths)      # every image decoded
    assert d.find_element("id", "total").text == str(len(train))


def test_filter_narrows_the_rows(site):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    srv, d, t = site
    visit(d, srv.url + "/")
    form = d.find_element("css selector", "form.filters")
    Select(form.find_element("name", "split")).select_by_value("train")
    Select(form.find_element("name", f"keep.{EVIL_COLUMN}")).select_by_value(EVIL_VALUE)
    Select(form.find_element("name", "flagged")).select_by_value("no")
    form.find_element("name", "pct_min").send_keys("40")
    form.find_element("css selector", "button[type=submit]").click()
    # the submit navigates: wait for the filtered URL (on a busy machine the click returns first)
    WebDriverWait(d, 120).until(lambda drv: "split=train" in drv.current_url)
    visit(d, d.current_url)
    want = t[(t.split == "train") & (t[EVIL_COLUMN] == EVIL_VALUE) & ~t.flagged & (t.percentile >= 40)]
    assert 0 < len(want) < (t.split == "train").sum()
    assert d.find_element("id", "total").text == str(len(want))
    assert tile_ids(d) == want.sort_values("rank").id.tolist()[:50]


def test_paging(site):
    srv, d, t = site
    train = t[t.split == "train"].sort_values("rank").id.tolist()
    visit(d, srv.url + "/?split=train&view=table&per_page=100")
    assert tile_ids(d) == train[:100]
    d.find_element("id", "next").click()
    visit(d, d.current_url)
    assert tile_ids(d) == train[100:200] and "page 2 of 3" in d.find_element("id", "pageno").text
    d.find_element("id", "next").click()
    visit(d, d.current_url)
    assert tile_ids(d) == train[200:] and len(train[200:]) == len(train) - 200
    assert d.find_elements("id", "next") == []
    d.find_element("id", "prev").click()
    visit(d, d.current_url)
    assert tile_ids(d) == train[100:200]


def test_example_page_shows_the_heat_map(site):
    srv, d, t = site
    visit(d, srv.url + "/?split=test")
    first = d.find_element("css selector", "#rows [data-id] a")
    eid = first.find_element("xpath", "..").get_attribute("data-id")
    first.click()
    visit(d, d.current_url)
    assert d.find_element("id", "example-id").text == eid
    widths = loaded_images(d, "#image, #heatmap, #heatmap-alone")
    assert len(widths) == 3 and all(w >= 224 for w in widths)
    row = t[(t.split == "test") & (t.id == eid)].iloc[0]
    check = d.find_element("id", "heat-check").text
    assert f"{row[f'vog_{srv.explorer.tables.primary}']:.6g}" in check
    keys = d.find_elements("css selector", "#keys tbody tr")
    assert len(keys) == len(srv.explorer.tables.keys)
    assert len(d.find_elements("css selector", "#signals svg")) >= 3
    # another key's heat map
    d.find_element("link text", "early_softmax").click()
    visit(d, d.current_url)
    assert all(w >= 224 for w in loaded_images(d, "#heatmap, #heatmap-alone"))


def test_strings_from_the_data_stay_text(site):
    from selenium.common.exceptions import NoAlertPresentException

    srv, d, t = site
    nine = t[(t.split == "train") & (t.label == 9)].sort_values("rank")
    visit(d, srv.url + "/?split=train&label=9&view=table&per_page=200")
    body = d.find_element("tag name", "body").text
    assert EVIL_CLASS in body and EVIL_COLUMN in body and EVIL_VALUE in body    # shown as text
    # no element was made from them
    assert d.execute_script("return document.querySelectorAll('script, img[src=x]').length") == 0
    assert not d.execute_script("return Array.from(document.querySelectorAll('b, i'))"
                                ".some(e => ['grp', 'tilted', 'alert(1)'].includes(e.textContent))")
    assert tile_ids(d) == nine.id.tolist()[:200]
    # the hostile id: in the grid, on its page, in its image URL (a working image)
    visit(d, srv.url + "/?split=train&per_page=200")
    assert EVIL_ID in tile_ids(d)
    link = d.find_element("css selector", "#rows [data-id] a[href*='onerror']")
    link.click()
    visit(d, d.current_url)
    assert d.find_element("id", "example-id").text == EVIL_ID
    assert all(w > 0 for w in loaded_images(d, "#image, #heatmap"))
    assert d.execute_script("return document.querySelectorAll('img[src=x], script').length") == 0
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text
    # the class select lists the hostile class name as text
    visit(d, srv.url + "/classes?split=train")
    assert f"9: {EVIL_CLASS}" in d.find_element("id", "classes").text
    assert CLASS_NAMES[3] in d.find_element("id", "classes").text


def test_every_view_is_clean(site):
    """The remaining views load without a console message (visit() checks it)."""
    srv, d, _ = site
    for path in ("/rejected", "/rejected?split=train", "/classes?split=test", "/?split=test&sort=sig_loss&order=asc",
                 "/?keep.is_noisy=true&mismatch=1", "/example?split=train&id=bad-bytes"):
        visit(d, srv.url + path)
