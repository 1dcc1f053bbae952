"""The browser page in headless Chromium against a server started in the test: it shows frames and steers the stream.

Chromium is driven through the DevTools protocol over a websocket (the `websockets` client), no extra packages.
"""

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from streamgen.pipeline import Pipeline
from streamgen.server import StreamServer

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")


class DevTools:
    """Just enough of the DevTools protocol: evaluate JavaScript in the page."""

    def __init__(self, ws):
        self.ws, self.next_id, self.session = ws, 0, None

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        await self.ws.send(json.dumps(message | ({"sessionId": self.session} if self.session else {})))
        while (answer := json.loads(await self.ws.recv())).get("id") != self.next_id:
            pass  # events
        assert "error" not in answer, answer
        return answer["result"]

    async def attach_to_page(self) -> None:
        targets = (await self.call("Target.getTargets"))["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = (await self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True))["sessionId"]

    async def evaluate(self, expression: str):
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30):
        """Poll until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            await asyncio.sleep(0.1)
        return value


def text_of(element_id: str) -> str:
    return f"document.readyState !== 'loading' && document.getElementById({element_id!r}).textContent"


def test_page_shows_live_frames_and_switches_the_prompt(tmp_path: Path):
    async def scenario():
        async with StreamServer(Pipeline.load(None), port=0) as server:
            browser = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
                 f"--user-data-dir={tmp_path}", f"http://127.0.0.1:{server.port}/"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                port_file = tmp_path / "DevToolsActivePort"  # Chromium writes its port and browser path here
                deadline = time.monotonic() + 30
                while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
                    assert time.monotonic() < deadline and browser.poll() is None, "Chromium did not start"
                    await asyncio.sleep(0.05)
                port, path = port_file.read_text().split()
                async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
                    page = DevTools(ws)
                    await page.attach_to_page()
                    await page.wait_for(f"Number({text_of('frame-count')}) >= 3")  # frames drawn
                    assert await page.evaluate(text_of("state")) == "playing"
                    assert int(await page.evaluate(text_of("fps"))) > 0
                    assert (await page.evaluate(text_of("latency"))).endswith(" ms")
                    await page.evaluate("document.getElementById('prompt').value = 'a blue square';"
                                        "document.getElementById('set-prompt').click()")
                    await page.wait_for(f"{text_of('prompt-version')} === '1'")  # chunks made under the new prompt
                    await page.evaluate("document.getElementById('steps').value = '1';"
                                        "document.getElementById('set-steps').click()")
                    await page.wait_for(f"{text_of('used-steps')} === '1'")
                    assert await page.evaluate(text_of("log")) == ""  # no error reached the page
            finally:
                browser.terminate()
                browser.wait(10)

    asyncio.run(asyncio.wait_for(scenario(), 90))
