"""The headline workflow against the real running system: `svc ui` (dagster dev: webserver + daemon, sensors on).

Adding a singer (CLI route and `dvc add` route) and appending recordings must materialize exactly the affected
partitions, counted through the webserver's GraphQL API; the asset graph page is screenshotted with Chromium.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from assets.workspace import Workspace
from orchestration.build import build, open_instance
from orchestration.jobs import PER_SINGER_ASSETS
from orchestration.singers import add_singer
from tests.conftest import clip, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ARTIFACTS = Path(__file__).parent / "artifacts"
SVC = str(Path(sys.executable).parent / "svc")
IN_FLIGHT = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]


class DagsterDev:
    """`svc ui` in its own process group, with a GraphQL client."""

    def __init__(self, ws: Workspace, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # svc ui sets the workspace's own
        self.proc = subprocess.Popen([SVC, "-C", str(ws.root), "ui", "--port", str(self.port)],
                                     stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/server_info", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev did not answer on {self.url} in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def graphql(self, query: str, **variables) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def materialization_counts(self) -> dict[tuple[str, str], int]:
        """``{(asset, partition): number of materializations}`` for every per-singer asset."""
        counts = collections.Counter()
        for asset in PER_SINGER_ASSETS:
            data = self.graphql("""query($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
                ... on Asset { assetMaterializations(limit: 10000) { partition } } } }""", key={"path": [asset]})
            for event in data["assetOrError"].get("assetMaterializations", []):
                counts[(asset, event["partition"])] += 1
        return dict(counts)

    def runs(self, statuses: list[str] | None = None) -> list[dict]:
        data = self.graphql("""query($filter: RunsFilter) { runsOrError(filter: $filter) {
            ... on Runs { results { runId status jobName tags { key value } } } } }""",
                            filter={"statuses": statuses} if statuses else {})
        return data["runsOrError"]["results"]

    def wait_for(self, done, what: str, timeout: float = 900) -> dict:
        """Poll until ``done(counts)`` holds and no run is in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.materialization_counts()
            if done(counts) and not self.runs(IN_FLIGHT):
                time.sleep(20)  # two more sensor ticks: nothing else may start
                if not self.runs(IN_FLIGHT):
                    return self.materialization_counts()
            failed = self.runs(["FAILURE"])
            assert not failed, f"run(s) failed while waiting for {what}: {failed}\n{self.log_tail()}"
            time.sleep(5)
        raise TimeoutError(f"{what} did not happen in {timeout} s; counts {self.materialization_counts()}; "
                           f"runs {self.runs()}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def two_singers_built(workspace, voices_dir) -> Workspace:
    instance = open_instance(workspace)
    for singer, voice in (("alice", "speaker-a"), ("bob", "speaker-b")):
        add_singer(workspace, singer, clip(voices_dir, voice, 2), instance=instance, push=False, log=lambda _: None)
    build(workspace, instance=instance, log=lambda _: None)
    instance.dispose()
    return workspace


@pytest.fixture
def dagster_dev(two_singers_built, tmp_path):
    server = DagsterDev(two_singers_built, tmp_path / "dagster-dev.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(server.log_path, ARTIFACTS / "dagster-dev.log")
    assert server.proc.returncode is not None, "dagster dev must be stopped"


def test_adding_singers_materializes_only_their_partitions_under_dagster_dev(dagster_dev, two_singers_built,
                                                                            voices_dir, chromium):
    ws, server = two_singers_built, dagster_dev
    before = server.materialization_counts()
    assert before == {(a, s): 1 for a in PER_SINGER_ASSETS for s in ("alice", "bob")}

    # Route 1: the CLI. Route 2: a folder dropped into data/raw and `dvc add`, picked up by the singer sensor.
    added = subprocess.run([SVC, "-C", str(ws.root), "add-singer", "carol",
                            *map(str, clip(voices_dir, "speaker-c", 2)), "--no-push"],
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    dave = ws.singer_raw_dir("dave")
    dave.mkdir()
    for path in clip(voices_dir, "speaker-d", 2):
        shutil.copy(path, dave)
    ws.run_tool("dvc", "add", "-q", "data/raw/dave")

    new = {(a, s) for a in PER_SINGER_ASSETS for s in ("carol", "dave")}
    after = server.wait_for(lambda c: new <= c.keys(), "carol's and dave's partitions")
    assert after == {**before, **{key: 1 for key in new}}, "exactly one of each for the new singers, none for the others"
    # Both routes end the same way: one automation run builds each new singer.
    for singer in ("carol", "dave"):
        runs = [r for r in server.runs() if {"key": "dagster/partition", "value": singer} in r["tags"]]
        assert len(runs) == 1, (singer, runs)

    # Changed recordings: only alice's partitions rebuild.
    appended = subprocess.run([SVC, "-C", str(ws.root), "add-singer", "alice", "--append",
                               str(clip(voices_dir, "speaker-a", 3)[2]), "--no-push"], capture_output=True, text=True)
    assert appended.returncode == 0, appended.stderr
    changed = server.wait_for(lambda c: all(c.get((a, "alice")) == 2 for a in PER_SINGER_ASSETS),
                              "alice's rebuild")
    assert changed == {**after, **{(a, "alice"): 2 for a in PER_SINGER_ASSETS}}

    # The training set is marked for a rebuild, and training is not launched on its own.
    data = server.graphql("""{ assetNodes(assetKeys: [{path: ["training_set"]}]) { staleStatus } }""")
    assert data["assetNodes"][0]["staleStatus"] in ("STALE", "MISSING")
    assert not [r for r in server.runs() if r["jobName"] == "train"]

    _screenshot_asset_graph(server.url, chromium)


def _screenshot_asset_graph(url: str, chromium: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/asset-groups", wait_until="networkidle")
            try:  # a newsletter dialog that the webserver shows on some first visits
                page.get_by_text("Join the Dagster community").wait_for(timeout=8000)
                page.get_by_role("button", name="Skip").click()
            except PlaywrightTimeout:
                pass
            page.locator('[aria-label="settings"]').last.click()  # the graph's settings menu
            page.get_by_role("menuitem", name="Expand all groups").click()
            page.keyboard.press("Escape")
            for name in ("clean_audio", "speaker_embedding", "training_set"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(ARTIFACTS / "dagster-asset-graph.png"))
            text = page.inner_text("body")
        finally:
            browser.close()
    for name in ("raw_recordings", "clean_audio", "pitch", "ppg", "vec", "speaker_embedding", "training_set",
                 "svc_checkpoint", "evaluation_report", "production_model"):
        assert name in text, f"{name} is not on the asset graph page"
