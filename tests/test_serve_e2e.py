"""``fedrec serve`` as a real process on 127.0.0.1: real HTTP requests, a hot reload when a
newer checkpoint lands (answers change, no request fails meanwhile), 4xx for bad requests,
and a log without user ids."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serving import write_changed_checkpoint
from tests.tiny import write_tiny_run

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fedrec serve exited with {proc.returncode}")
        try:
            got = httpx.get(f"{url}/health", timeout=2)
            if got.status_code == 200:
                return dict(got.json())
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("fedrec serve did not answer /health in time")


def test_a_served_platform_answers_reloads_and_refuses(tmp_path: Path) -> None:
    # Prepare: a run dir and the real command in its own process
    tiny = write_tiny_run(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    fedrec = Path(sys.executable).parent / "fedrec"
    proc = subprocess.Popen(
        [
            str(fedrec),
            "serve",
            str(tiny.run),
            "--channel",
            "finance",
            "--port",
            str(port),
            "--reload-every",
            "0.3",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FEDREC_DEBUG": ""},
    )
    try:
        health = wait_healthy(url, proc)
        lines = (tiny.world / "finance" / "interactions.csv").read_text().splitlines()
        user = lines[1].split(",")[0]
        with httpx.Client(base_url=url, timeout=10) as http:
            # Execute: requests while a newer checkpoint lands
            before = http.get("/recommend", params={"user": user, "k": 5}).json()
            failures: list[int] = []
            stop = threading.Event()

            def hammer() -> None:
                with httpx.Client(base_url=url, timeout=10) as h:
                    while not stop.is_set():
                        r = h.get("/recommend", params={"user": user, "k": 5})
                        if r.status_code != 200:
                            failures.append(r.status_code)

            load = threading.Thread(target=hammer)
            load.start()
            write_changed_checkpoint(tiny.run, 3)
            deadline = time.monotonic() + 60
            while http.get("/health").json()["model"]["round"] != 3:
                assert time.monotonic() < deadline, "the newer checkpoint was not loaded"
                time.sleep(0.2)
            stop.set()
            load.join()
            after = http.get("/recommend", params={"user": user, "k": 5}).json()
            inline = http.post("/recommend", json={"history": ["finance-0001"], "k": 3})
            search = http.get("/search", params={"q": "savings account", "k": 3})
            bad = {
                "unknown user": http.get("/recommend", params={"user": "nobody"}),
                "bad k": http.get("/recommend", params={"user": user, "k": -1}),
                "empty query": http.get("/search", params={"q": " "}),
                "unknown channel": http.get("/search", params={"q": "loan", "channel": "travel"}),
            }
            metrics = http.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    # Assert
    assert health["model"]["round"] == 2
    assert before["model"]["round"] == 2 and after["model"]["round"] == 3
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
    assert failures == []
    assert inline.status_code == 200 and len(inline.json()["items"]) == 3
    assert search.status_code == 200 and len(search.json()["items"]) == 3
    assert {k: r.status_code for k, r in bad.items()} == {
        "unknown user": 404,
        "bad k": 422,
        "empty query": 400,
        "unknown channel": 404,
    }
    assert all(r.json()["error"]["message"] for r in bad.values())
    assert "fedrec_model_round 3.0" in metrics
    text = (tmp_path / "serve.log").read_text()
    assert "GET /recommend 200" in text and "now serving round-0003.safetensors" in text
    assert user not in text and "nobody" not in text and "Traceback" not in text
