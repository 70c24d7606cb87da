"""The fleet console in a real headless Chromium (Debian's chromium and chromedriver, through
selenium), against a real controller, real agent processes on a real mosquitto: the fleet
page lists the agents with their versions; an operator's rollout, started on the rollouts
page, shows there and puts its markers on the device page's chart without a reload, and its
roll back (a signed request: back to the version the controller deployed before) takes the
agents back to the older version; an action without a login, or without the CSRF token, is
refused and changes nothing.

One controller, console and pair of agents serve the whole module (they take most of its
time). The database is a SQLite file: the console reads it through the same Store that
tests/host runs on SQLite and PostgreSQL. Screenshots go to the test's tmp dir, and the
device page's to docs/console.png (the README shows it).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_broker import broker, wait_until

from edgekit.host.cli._console import start_controller_console
from edgekit.host.console import ConsoleServer, hash_password
from edgekit.host.controller import Controller, load_config
from edgekit.host.db import RolloutState, Store
from edgekit.host.registry import Registry
from edgekit.signing import generate_keypair, load_private_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
from _digits import digits_data, write_digits_package  # noqa: E402

__all__ = ["broker"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "console-test-" + secrets.token_hex(4)
DEVICES = ("pi-1", "pi-2")

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@dataclass
class Env:
    fleet: str
    url: str
    store: Store
    controller: Controller
    console: ConsoleServer
    artifacts: Path


class _Traffic:
    """Labelled requests to each agent's HTTP API, so the charts have points."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.stop = threading.Event()
        self.x, self.y = digits_data()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.3):
            rows = slice(1300 + (i % 10) * 20, 1320 + (i % 10) * 20)
            i += 1
            for address in self.addresses.values():
                try:
                    reply = _post_json(address, "/predict", {"inputs": {"x": self.x[rows].tolist()}})
                    _post_json(address, "/feedback", {"prediction_id": reply["prediction_id"],
                                                      "labels": self.y[rows].tolist()})
                except (OSError, ValueError, KeyError):
                    continue  # an agent busy switching models answers the next round


def _post_json(address: str, path: str, doc: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(doc).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        found: dict[str, Any] = json.loads(reply.read())
        return found


def _agent(device: str, fleet: str, url: str, package: Path, trusted: Path,
           work: Path) -> subprocess.Popen[bytes]:
    """An agent trusting ``trusted`` for packages and for desired documents (one key plays
    the release and the operator role here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    env.update(PYTHONUNBUFFERED="1")
    with open(work / f"{device}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--device-id", device,
             "--fleet", fleet, "--broker", url, "--model", str(package),
             "--model-dir", str(work / device), "--trusted-key", str(trusted),
             "--intent-key", str(trusted),
             "--http", "127.0.0.1:0", "--telemetry-interval", "0.3"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def env(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("console")
    keys = generate_keypair(work / "signer")
    key = load_private_key(keys.private_path)
    x, y = digits_data()
    v1 = write_digits_package(work / "v1.edgepkg", version="1.0.0", sign_key=key, data=(x, y))
    v2 = write_digits_package(work / "v2.edgepkg", version="2.0.0", alpha=30.0, sign_key=key,
                              data=(x, y))
    db_url = f"sqlite:///{work / 'fleet.db'}"
    fleet = f"console-{secrets.token_hex(3)}"
    with Store(db_url) as store:
        registry = Registry(store, work / "store")
        registry.push(v1)
        registry.push(v2)
    cfg = load_config(overrides={
        "mqtt.broker": broker.url, "database.url": db_url, "registry.store": str(work / "store"),
        "controller.fleets": [fleet], "controller.tick_s": 0.1, "controller.lease_s": 5.0,
        "controller.signing_key": str(keys.private_path),
        "controller.operator_keys": [str(keys.public_path)], "rollout.canary": "1",
        "rollout.probation_requests": 0, "rollout.probation_seconds": 0.5,
        "rollout.device_timeout_s": 60.0, "ingest.workers": 1,
        "console.listen": "127.0.0.1:0", "console.password_hash": hash_password(PASSWORD),
        "console.operator_key": str(keys.private_path),
    })
    agents: list[subprocess.Popen[bytes]] = []
    traffic = None
    with Controller(cfg) as ctl, Store(db_url) as store:
        console = start_controller_console(ctl)
        assert console is not None
        try:
            agents = [_agent(d, fleet, broker.url, v1, keys.public_path, work) for d in DEVICES]
            wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 90,
                       "both agents online")
            # The fleet's model as the controller deployed it: what a roll back returns to.
            assert ctl.engine is not None
            first = ctl.engine.create(fleet, "digits", "1.0.0", source="test")
            wait_until(lambda: store.get_rollout(first.id).state == RolloutState.SUCCEEDED, 90,
                       "the rollout of 1.0.0")
            traffic = _Traffic({d.device: d.status["http"] for d in store.list_devices(fleet)
                                if d.status})
            traffic.thread.start()
            yield Env(fleet, console.url, store, ctl, console, work)
        finally:
            if traffic is not None:
                traffic.stop.set()
                traffic.thread.join(10)
            console.stop()
            for proc in agents:
                proc.kill()
                proc.wait(20)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait_js(driver: Any, script: str, timeout: float, what: str) -> Any:
    return wait_until(lambda: driver.execute_script(script), timeout, what, interval=0.2)


def test_fleet_page_lists_the_agents_with_their_versions(env: Env, browser: Any,
                                                         tmp_path: Path) -> None:
    browser.get(env.url)
    rows = _wait_js(browser, "const r = document.querySelectorAll('#devices tr[data-device]');"
                    " return r.length === 2 && [...r].map(e => [e.dataset.device,"
                    " e.dataset.version, e.textContent]);", 30, "the fleet table")
    assert sorted((device, version) for device, version, _ in rows) == \
        [("pi-1", "1.0.0"), ("pi-2", "1.0.0")]
    assert all("online" in text for _, _, text in rows)
    assert _wait_js(browser, "return document.getElementById('live').textContent === 'live';",
                    10, "the live stream")
    order = "return [...document.querySelectorAll('#devices tr[data-device]')].map(e =>" \
        " e.dataset.device).join(',');"
    assert browser.execute_script(order) == "pi-1,pi-2"
    browser.execute_script("[...document.querySelectorAll('#devices th')].find(th =>"
                           " th.textContent === 'device').click();")
    assert _wait_js(browser, order.replace("return", "const o =", 1) + " return o ==="
                    " 'pi-2,pi-1';", 10, "the devices sorted the other way")
    browser.save_screenshot(str(tmp_path / "fleet.png"))
    browser.execute_script("const s = document.querySelector('select[name=state]');"
                           " s.value = 'offline'; s.dispatchEvent(new Event('change'));")
    assert _wait_js(browser, "return document.querySelectorAll('#devices tr[data-device]')"
                    ".length === 0;", 10, "no offline device")


def _session(url: str) -> tuple[urllib.request.OpenerDirector, str]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(url + "api/session") as reply:
        return opener, json.loads(reply.read())["csrf"]


def _post_form(opener: Any, url: str, fields: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              **(headers or {})})
    try:
        with opener.open(request) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body.startswith(b"{") else None
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_actions_need_a_login_and_the_csrf_token(env: Env) -> None:
    before = len(env.store.list_rollouts(fleet=env.fleet))
    action = {"fleet": env.fleet, "model": "digits:2.0.0"}
    anonymous = urllib.request.build_opener()
    assert _post_form(anonymous, env.url + "actions/rollout", action)[0] == 403
    opener, csrf = _session(env.url)
    status, reply = _post_form(opener, env.url + "actions/rollout", {**action, "csrf_token": csrf})
    assert status == 403 and reply is not None and "log in" in reply["error"]
    # A login without the token is refused too (no login CSRF); a wrong password stays out.
    assert _post_form(opener, env.url + "login", {"password": PASSWORD})[0] == 403
    _post_form(opener, env.url + "login", {"password": "wrong", "csrf_token": csrf})
    assert _post_form(opener, env.url + "actions/rollout",
                      {**action, "csrf_token": csrf})[0] == 403
    # Logged in: the session is new (so is its token); without it, or from another site, 403.
    _post_form(opener, env.url + "login", {"password": PASSWORD, "csrf_token": csrf})
    with opener.open(env.url + "api/session") as reply:
        session = json.loads(reply.read())
    assert session["operator"] is True and session["csrf"] != csrf
    for fields, headers in (({**action}, {}), ({**action, "csrf_token": csrf}, {}),
                            ({**action, "csrf_token": session["csrf"]},
                             {"Origin": "http://evil.example"})):
        status, reply = _post_form(opener, env.url + "actions/rollout", fields, headers)
        assert status == 403, (fields, headers)
    assert len(env.store.list_rollouts(fleet=env.fleet)) == before
    # The token lets the request through to the controller, which answers (here: refuses
    # to abort a rollout that does not exist).
    status, reply = _post_form(opener, env.url + "actions/abort",
                               {"fleet": env.fleet, "model": "digits:2.0.0", "rollout": "999",
                                "csrf_token": session["csrf"]})
    assert status == 400 and reply is not None and "no rollout 999" in reply["error"]


def test_a_rollout_shows_live_on_the_rollouts_and_device_pages(env: Env, browser: Any,
                                                              tmp_path: Path) -> None:
    device_url = f"{env.url}device/{env.fleet}/pi-1"
    browser.get(device_url)
    _wait_js(browser, "const c = document.getElementById('charts');"
             " return c && Number(c.dataset.points) > 3;", 30, "the device charts")
    device_tab = browser.current_window_handle
    browser.execute_script("window.__sameDocument = 1;")
    before = browser.execute_script("return [...document.querySelectorAll('#markers td')]"
                                    ".map(td => td.textContent).join(' ');")
    assert "2.0.0" not in before

    browser.switch_to.new_window("tab")
    browser.get(env.url + "login")
    _wait_js(browser, "return document.querySelector('#login input[name=password]');", 10,
             "the login form")
    browser.find_element("css selector", "#login input[name=password]").send_keys(PASSWORD)
    browser.find_element("css selector", "#login button").click()
    _wait_js(browser, "return document.querySelector('.who .operator');", 10, "the login")
    browser.get(env.url + "rollouts")
    _wait_js(browser, "return document.querySelector('#start-rollout');", 10, "the start form")
    browser.execute_script("window.__sameDocument = 1;"
                           "document.querySelector('#start-rollout select[name=fleet]').value"
                           f" = {json.dumps(env.fleet)};"
                           "document.querySelector('#start-rollout select[name=model]').value"
                           " = 'digits:2.0.0';")
    # Clicked from a script: a live refresh may replace the page's nodes at any moment.
    browser.execute_script("document.querySelector('#start-rollout button').click();")
    rollout = wait_until(lambda: [r for r in env.store.list_rollouts(fleet=env.fleet)
                                  if r.model_version == "2.0.0"], 30,
                         "the rollout the console asked for")[-1]
    assert (rollout.model_version, rollout.plan["source"]) == ("2.0.0", "deploy")
    card = f"#rollout-{rollout.id}"
    _wait_js(browser, f"const c = document.querySelector('{card}'); return c &&"
             " c.dataset.state === 'succeeded';", 120, "the rollout to succeed on the page")
    text = browser.find_element("css selector", card).text
    assert "wave 0: 1" in text and "wave 1: 1" in text and text.count("succeeded") >= 3
    assert browser.execute_script("return window.__sameDocument;") == 1
    assert env.store.get_rollout(rollout.id).state == RolloutState.SUCCEEDED
    browser.save_screenshot(str(tmp_path / "rollouts.png"))
    rollouts_tab = browser.current_window_handle

    browser.switch_to.window(device_tab)
    markers = _wait_js(browser, "const t = [...document.querySelectorAll('#markers td')]"
                       ".map(td => td.textContent).join(' ');"
                       f" return t.includes('r{rollout.id} succeeded') &&"
                       " t.includes('update.succeeded') && t;", 30, "the rollout's markers")
    assert f"r{rollout.id} created" in markers
    assert browser.execute_script("return window.__sameDocument;") == 1, "the page reloaded"
    assert int(browser.execute_script(
        "return document.getElementById('charts').dataset.markers;")) >= 3
    wait_until(lambda: "2.0.0" in browser.execute_script(
        "return document.getElementById('summary').textContent;"), 30, "the new version")

    # Roll back: a signed request; the controller rolls out 1.0.0, the version it deployed
    # before, in documents that allow that downgrade (the agents refuse it otherwise).
    browser.switch_to.window(rollouts_tab)
    browser.execute_script("window.confirm = () => true;")
    _wait_js(browser, f"const b = document.querySelector('[data-rollback=\"{rollout.id}\"]');"
             " return b && (b.click(), true);", 30, "the roll back button")
    back = wait_until(lambda: (r := env.store.list_rollouts(fleet=env.fleet))[-1].id
                      != rollout.id and r[-1], 30, "the rollback rollout")
    assert (back.model_version, back.plan["back"]["rollout"]) == ("1.0.0", rollout.id)
    _wait_js(browser, f"const c = document.querySelector('#rollout-{back.id}'); return c &&"
             " c.dataset.state === 'succeeded';", 120, "the rollback to succeed on the page")
    assert browser.execute_script("return window.__sameDocument;") == 1
    wait_until(lambda: {d.model_version for d in env.store.list_devices(env.fleet)} == {"1.0.0"},
               30, "both agents back on 1.0.0")
    browser.switch_to.window(device_tab)
    _wait_js(browser, "return [...document.querySelectorAll('#markers td')].some(td =>"
             f" td.textContent === 'r{back.id} succeeded');", 30, "the rollback's markers")
    browser.execute_script("window.scrollTo(0, 0);")
    browser.save_screenshot(str(tmp_path / "device.png"))
    shutil.copyfile(tmp_path / "device.png", REPO / "docs" / "console.png")
    assert np.frombuffer((REPO / "docs" / "console.png").read_bytes()[:8], np.uint8).tolist() \
        == [137, 80, 78, 71, 13, 10, 26, 10]


def test_models_and_filtered_events(env: Env, browser: Any) -> None:
    browser.get(env.url + "models")
    rows = _wait_js(browser, "const r = [...document.querySelectorAll('#models tbody tr')];"
                    " return r.length === 2 && r.map(e => e.textContent);", 20, "the models")
    assert "2.0.0" in rows[0] and "1.0.0" in rows[1]  # newest first
    signer = env.store.get_model("digits", "2.0.0").key_id  # type: ignore[union-attr]
    assert signer and all(signer in row for row in rows)
    browser.get(env.url + "events")
    _wait_js(browser, "return document.querySelector('#event-filters');", 10, "the filters")
    browser.execute_script(
        "const f = document.querySelector('#event-filters');"
        "f.querySelector('[name=kind]').value = 'update.';"
        "f.querySelector('[name=device]').value = 'pi-2';"
        "f.querySelector('button[type=submit]').click();")
    shown = _wait_js(browser, "const r = [...document.querySelectorAll('#event-list tbody tr')]"
                     ".map(e => [...e.children].map(td => td.textContent));"
                     " return r.length > 3 && r.every(c => c[2] === 'pi-2') && r;", 20,
                     "the filtered events")
    assert all(kind.startswith("update.") for _, _, _, kind, _, _ in shown)
    assert {"update.succeeded"} <= {kind for _, _, _, kind, _, _ in shown}
    stored = env.store.list_events(fleet=env.fleet, device="pi-2")
    assert len(shown) == len([e for e in stored if e.kind.startswith("update.")])
