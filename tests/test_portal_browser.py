"""The portal in a real browser: Debian's Chromium, headless, driven by Selenium,
against a real service (the shared one: embedded in its own process, with the
shared RabbitMQ node) and a real endpoint daemon started here.

One test walks what a person does, in order (each step needs the one before):
sign in, see the endpoint online, send a function and see its result appear,
see an error's traceback, send a batch, look at the endpoint's charts, see the
endpoint go offline when it stops, sign out; then another user signs in and sees
none of it; a forged form post without the CSRF token is refused; a function
named ``<script>`` shows as text.  Screenshots of each page go to the test's
temporary directory (and to ``$FUNCX_PORTAL_SCREENSHOTS`` if set: the docs'
``docs/_static/portal/`` are made so).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.testing import browser
from tests.support import run_cli, sdk_client

EVIL_NAME = "<script>alert('x')</script>"


def add(a, b=10):
    return a + b


def raises(value):
    def inner(v):
        raise ValueError(f"bad value {v}")

    return inner(value)


class PortalInBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        why = browser.missing()
        if why is not None:
            raise SkipTest(why)
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        self.shots = os.path.abspath(self.mktemp())
        os.makedirs(self.shots)
        self.copies = os.environ.get("FUNCX_PORTAL_SCREENSHOTS")
        self.portal = self.service.root_url + "/portal"

    def client(self, env: dict) -> Any:
        return sdk_client(env)

    def start_endpoint(self, env: dict) -> EndpointDir:
        config_dir = self.mktemp()
        os.makedirs(config_dir)
        result = run_cli(
            config_dir,
            "configure",
            "portal",
            "--service-address",
            self.service.base_url,
            "--service-ca-file",
            self.service.ca_file,
            "--amqp-ca-file",
            self.service.broker_ca_file,
            env=env,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        ep = EndpointDir(config_dir, "portal")
        with open(ep.config_file) as f:
            text = f.read()
        text = text.replace('max_workers_per_node=float("inf"),', "max_workers_per_node=2,")
        # Reports every second: the list shows the workers without waiting 30 s.
        text = text.replace("heartbeat_period=30,", "heartbeat_period=1,")
        self.assertIn("heartbeat_period=1,", text)
        with open(ep.config_file, "w") as f:
            f.write(text)
        started = run_cli(config_dir, "start", "portal", env=env)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(run_cli, config_dir, "stop", "portal", env=env)
        self._stop_endpoint = lambda: run_cli(config_dir, "stop", "portal", env=env)
        return ep

    # -- the browser -------------------------------------------------------------------

    def shot(self, driver: Any, name: str) -> None:
        path = os.path.join(self.shots, f"{name}.png")
        driver.save_screenshot(path)
        if self.copies:
            os.makedirs(self.copies, exist_ok=True)
            shutil.copy(path, self.copies)

    def until(self, what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
        """``check()``'s first true value within ``timeout`` seconds, polling."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except Exception as e:  # the page is being replaced
                last = e
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.05)
        self.fail(f"not within {timeout} s: {what} (last: {last!r})")

    def text(self, driver: Any, css: str) -> str:
        from selenium.webdriver.common.by import By

        return str(driver.find_element(By.CSS_SELECTOR, css).text)

    def sign_in(self, driver: Any, client_id: str, secret: str, shot: Optional[str] = None) -> None:
        from selenium.webdriver.common.by import By

        driver.get(self.portal + "/signin")
        driver.find_element(By.ID, "client_id").send_keys(client_id)
        driver.find_element(By.ID, "client_secret").send_keys(secret)
        if shot:
            self.shot(driver, shot)
        driver.find_element(By.ID, "signin").click()
        self.until("signed in", lambda: driver.find_elements(By.ID, "signout"))

    def sign_out(self, driver: Any) -> None:
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "signout").click()
        self.until("signed out", lambda: driver.find_elements(By.ID, "signin-form"))

    def run_form(self, driver: Any, function_id: str, endpoint_id: str, args: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        driver.get(f"{self.portal}/run?function={function_id}&endpoint={endpoint_id}")
        form = driver.find_element(By.ID, "run-form")
        self.assertEqual(
            Select(form.find_element(By.NAME, "function_id")).first_selected_option.get_attribute(
                "value"
            ),
            function_id,
        )
        area = driver.find_element(By.ID, "args")
        area.clear()
        area.send_keys(args)
        driver.find_element(By.ID, "run").click()
        self.until("the task page", lambda: driver.find_elements(By.ID, "task-status"))

    # -- the walk ------------------------------------------------------------------------

    def test_a_person_uses_the_portal(self) -> None:
        from selenium.webdriver.common.by import By

        alice_id, alice_secret = self.service.create_client()
        bob_id, bob_secret = self.service.create_client()
        alice_env = self.service.client_env((alice_id, alice_secret))
        sdk = self.client(alice_env)
        add_id = sdk.register_function(add)
        raises_id = sdk.register_function(raises)
        sdk.register_function(add, function_name=EVIL_NAME)
        ep = self.start_endpoint(alice_env)
        endpoint_id = ep.endpoint_id()

        driver = browser.headless_chromium(1280, 1000)
        self.addCleanup(driver.quit)
        self.sign_in(driver, alice_id, alice_secret, shot="signin")

        # The endpoint, online (the list follows the reports live).
        row = f'tr[data-endpoint-id="{endpoint_id}"]'
        self.until(
            "the endpoint online",
            lambda: (
                driver.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "online"
                and self.text(driver, row + ' [data-field="workers"]') == "2"
            ),
            timeout=60,
        )
        self.assertEqual(self.text(driver, row + ' [data-field="status"]'), "online")
        self.shot(driver, "endpoints")

        # A function's result appears on its task page without reloading.
        self.run_form(driver, add_id, endpoint_id, "[1, 2]")
        self.until("the result", lambda: self.text(driver, "#result") == "3", timeout=30)
        self.assertEqual(self.text(driver, "#task-status"), "success")
        self.shot(driver, "task-result")

        # An error's traceback.
        self.run_form(driver, raises_id, endpoint_id, '["boom"]')
        self.until(
            "the traceback",
            lambda: "ValueError: bad value boom" in self.text(driver, "#traceback"),
            timeout=30,
        )
        self.assertEqual(self.text(driver, "#task-status"), "failed")
        self.shot(driver, "task-traceback")

        # A batch, followed live on its tasks page.
        driver.get(f"{self.portal}/run?function={add_id}&endpoint={endpoint_id}")
        batch = driver.find_element(By.ID, "batch")
        batch.clear()
        batch.send_keys("[[1], [2], [3], [4]]")
        driver.find_element(By.ID, "run-batch").click()
        self.until("the batch's page", lambda: "of batch" in self.text(driver, "h1"))
        self.until(
            "the batch done",
            lambda: (
                [
                    e.get_attribute("data-status")
                    for e in driver.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")
                ]
                == ["success"] * 4
            ),
            timeout=30,
        )
        self.shot(driver, "batch")
        driver.get(self.portal + "/tasks")
        self.assertIn("6 tasks", self.text(driver, "#task-count"))
        self.shot(driver, "tasks")

        # The endpoint's page: details, charts, recent tasks.
        driver.get(f"{self.portal}/endpoints/{endpoint_id}")
        self.assertEqual(len(driver.find_elements(By.CSS_SELECTOR, "svg.chart")), 3)
        self.assertEqual(len(driver.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")), 6)
        self.shot(driver, "endpoint")

        # Names are text: the function called <script> shows so, and runs nothing.
        driver.get(self.portal + "/functions")
        self.assertIn(EVIL_NAME, self.text(driver, "#functions"))
        self.assertEqual(driver.execute_script("return document.scripts.length"), 1)
        self.shot(driver, "functions")

        # A forged post (no CSRF token) from the portal's own origin is refused.
        status = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const body = new URLSearchParams({function_id: arguments[0], "
            "endpoint_id: arguments[1], args: '[1]'});"
            "fetch('/portal/run', {method: 'POST', body, credentials: 'same-origin'})"
            ".then(r => done(r.status), e => done(String(e)));",
            add_id,
            endpoint_id,
        )
        self.assertEqual(status, 403)
        driver.get(self.portal + "/tasks")
        self.assertIn("6 tasks", self.text(driver, "#task-count"))  # none made

        # The endpoint stops: the open list shows it offline by itself.
        driver.get(self.portal + "/endpoints")
        self._stop_endpoint()
        self.until(
            "the endpoint offline",
            lambda: self.text(driver, row + ' [data-field="status"]') == "offline",
            timeout=30,
        )
        self.shot(driver, "endpoints-offline")
        self.sign_out(driver)
        driver.get(self.portal + "/endpoints")
        self.assertIn("/portal/signin", driver.current_url)

        # Another user sees none of it.
        self.sign_in(driver, bob_id, bob_secret)
        self.assertEqual(driver.find_elements(By.CSS_SELECTOR, "tr[data-endpoint-id]"), [])
        self.assertTrue(driver.find_elements(By.ID, "no-endpoints"))
        for page in ("/functions", "/tasks", "/run"):
            driver.get(self.portal + page)
            source = driver.page_source
            for secret in (endpoint_id, add_id, raises_id, "alert("):
                self.assertNotIn(secret, source)
        driver.get(f"{self.portal}/endpoints/{endpoint_id}")
        self.assertEqual(self.text(driver, "h1"), "Error 404")
        self.sign_out(driver)
