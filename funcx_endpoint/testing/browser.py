"""Debian's Chromium, headless, driven by Selenium through Debian's chromedriver.

Nothing is downloaded at run time: Selenium is given the driver's path (so its
Selenium Manager has nothing to find) and told to stay offline, and Chromium is
the system's ``/usr/bin/chromium`` (``scripts/bootstrap-system.sh browser``
installs both).  :func:`missing` says why a browser cannot run here (None: it can).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

__all__ = ["CHROMEDRIVER", "CHROMIUM", "first_contentful_paint", "headless_chromium", "missing"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing() -> Optional[str]:
    """Why no browser test can run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (
                f"{path} is missing: install Debian's {package} "
                f"(scripts/bootstrap-system.sh browser, run by `make test`)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def headless_chromium(width: int = 1280, height: int = 900) -> Any:
    """A new headless Chromium session (Selenium WebDriver); ``quit()`` it when done.

    It accepts the service's private CA's certificates (the test services make
    their own CA), and has a profile of its own that ``quit()`` leaves behind in
    the temporary directory (removed here at the next start).
    """
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--ignore-certificate-errors",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    profile = tempfile.mkdtemp(prefix="funcx-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    quit_driver = driver.quit

    def quit_and_clean() -> None:
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean  # type: ignore[method-assign]
    return driver


def first_contentful_paint(driver: Any) -> Optional[float]:
    """The page's first-contentful-paint time (ms after navigation start), if painted."""
    value = driver.execute_script(
        "const e = performance.getEntriesByName('first-contentful-paint');"
        "return e.length ? e[0].startTime : null;"
    )
    return None if value is None else float(value)
