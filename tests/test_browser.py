"""The /ui page in headless Chromium (Debian's package) against the real server and the fake vLLM on loopback."""

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fake_vllm import FakeVLLM, Reply
from playwright.async_api import Browser, Page, async_playwright, expect

from ui import STOPPED_NOTE

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 900}
WAIT_MS = 20_000
# Gradio 6.31's queue sets pandas options that pandas 3 deprecates; nothing for us to act on.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; in CI a missing browser fails the test instead of skipping it."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (gitignored); CI can keep them."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=LAUNCH_ARGS)
        yield launched
        await launched.close()


def watch_hosts(page: Page) -> set[str]:
    """Every host the page fetches from, to show that nothing comes from the internet."""
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlsplit(request.url).netloc)
            if request.url.startswith(("http:", "https:", "ws:", "wss:")) else None)
    return hosts


async def ask(page: Page, question: str) -> None:
    await page.get_by_placeholder("Ask the agent…").fill(question)
    await page.keyboard.press("Enter")


async def assert_input_above_the_fold(page: Page) -> None:
    box = await page.get_by_placeholder("Ask the agent…").bounding_box()
    assert box is not None and box["y"] + box["height"] <= VIEWPORT["height"]


async def wait_until_idle(page: Page) -> None:
    """The turn is over when Send is back in the input box."""
    await expect(page.get_by_test_id("submit-button")).to_be_visible(timeout=WAIT_MS)


async def test_chat_shows_tool_calls_and_survives_a_reload(
        browser: Browser, fake_vllm: FakeVLLM, live_server: Any, artifacts: Path) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        hosts = watch_hosts(page)
        await page.goto(f"{server.url}/")
        await expect(page.get_by_text("vLLM reachable")).to_be_visible(timeout=WAIT_MS)
        await assert_input_above_the_fold(page)
        await expect(page.get_by_label("Thinking")).to_be_hidden()  # the agent cannot tell that its model thinks
        await ask(page, "  ")
        await expect(page.get_by_text("Type a message first.")).to_be_visible()  # nothing sent: the examples stay

        await page.get_by_text("What is 2**16 / 7?").click()  # an example prompt runs at once
        await expect(page.get_by_text("The results: 9362.285714285714.")).to_be_visible(timeout=WAIT_MS)
        calculator = page.get_by_text("calculator(2**16 / 7) → 9362.285714285714")
        await expect(calculator).to_be_visible()
        await wait_until_idle(page)
        await ask(page, "What time is it in Seoul and in New York?")
        await expect(page.get_by_text(re.compile(r"^The results: .*America/New_York\)\.$"))).to_be_visible(
            timeout=WAIT_MS)
        await expect(page.get_by_text(re.compile(r"^get_current_time\(Asia/Seoul\) → 20"))).to_be_visible()
        await wait_until_idle(page)
        await calculator.click()  # open the call: its arguments and result are readable
        await expect(page.get_by_text("Result 9362.285714285714")).to_be_visible()
        # the agent keeps every stored turn, so the page offers no Retry or Undo that would show otherwise
        await expect(page.get_by_role("button", name=re.compile("^(Retry|Undo)$"))).to_have_count(0)
        await page.screenshot(path=artifacts / "ui-chat.png", animations="disabled")

        await page.reload()
        await expect(page.get_by_text("The results: 9362.285714285714.")).to_be_visible(timeout=WAIT_MS)
        await expect(calculator).to_be_visible()
        await expect(page.get_by_text(re.compile(r"^The results: .*America/New_York\)\.$"))).to_be_visible()

        other_tab = await context.new_page()
        await other_tab.goto(f"{server.url}/ui/")
        await expect(other_tab.get_by_text("What time is it in Seoul and in New York?")).to_be_visible(
            timeout=WAIT_MS)  # the examples of an empty chat
        await expect(other_tab.get_by_text("The results:")).to_have_count(0)

        await page.get_by_role("button", name="New conversation").click()
        await expect(page.get_by_text("The results:")).to_have_count(0)
        await page.reload()
        await expect(page.get_by_text("What is 2**16 / 7?")).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_text("The results:")).to_have_count(0)
        await context.close()
    assert hosts == {urlsplit(server.url).netloc}


async def test_stop_cancels_the_turn_on_the_server(browser: Browser, fake_vllm: FakeVLLM, live_server: Any) -> None:
    long_answer = "Chapter one.\n\n" * 40
    fake_vllm.script(long_answer, Reply(text="Once upon a time " * 100, token_delay_s=0.05), "The end.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        page = await browser.new_page(viewport=VIEWPORT)
        await page.goto(f"{server.url}/ui/")
        new_conversation = page.get_by_role("button", name="New conversation")
        await ask(page, "Tell me a long story")
        await expect(page.get_by_text("Chapter one.").last).to_be_visible(timeout=WAIT_MS)
        await wait_until_idle(page)
        await ask(page, "Another one")
        await expect(page.get_by_text(re.compile("^Once upon a time"))).to_be_visible(timeout=WAIT_MS)
        await expect(new_conversation).to_be_hidden()  # Stop takes its place while a turn runs
        await page.get_by_role("button", name="Stop").click()
        stopped = page.get_by_text(STOPPED_NOTE.strip("*"))
        await expect(stopped).to_be_visible(timeout=WAIT_MS)
        await wait_until_idle(page)
        await expect(new_conversation).to_be_visible()
        await assert_input_above_the_fold(page)  # the chat is taller than the page now, so it scrolls
        for _ in range(500):  # the fake sees the closed connection on a later turn of its loop
            if fake_vllm.disconnects:
                break
            await asyncio.sleep(0.01)
        await ask(page, "And then?")
        await expect(page.get_by_text("The end.")).to_be_visible(timeout=WAIT_MS)
        await expect(stopped).to_be_visible()  # the next turn keeps the stopped one as it was left
        conversations = (await server.app.state.agent.store.list_conversations(10, None)).conversations
        stored = await server.app.state.agent.store.load_messages(conversations[0].id)
        await page.close()
    assert fake_vllm.disconnects == 1
    assert [message["content"] for message in stored] == ["Tell me a long story", long_answer, "And then?", "The end."]


async def test_thinking_toggle_shows_when_the_model_thinks(browser: Browser, fake_vllm: FakeVLLM,
                                                           live_server: Any) -> None:
    async def model_thinks() -> bool:
        return True

    async with live_server(vllm_base_url=fake_vllm.url) as server:
        server.app.state.agent.model_thinks = model_thinks
        page = await browser.new_page(viewport=VIEWPORT)
        await page.goto(f"{server.url}/ui/")
        toggle = page.get_by_label("Thinking")
        await expect(toggle).to_be_visible(timeout=WAIT_MS)
        await expect(toggle).to_be_checked()
        await page.close()


async def test_api_key_guards_the_page_and_gradios_api(fake_vllm: FakeVLLM, live_server: Any,
                                                       http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, api_key="s3cret") as server:
        page = await http.get(f"{server.url}/ui/")
        refused = [
            (await http.get(f"{server.url}/ui/config")).status_code,
            (await http.get(f"{server.url}/ui/gradio_api/info")).status_code,
            (await http.post(f"{server.url}/ui/gradio_api/queue/join", json={})).status_code,
            (await http.post(f"{server.url}/ui/gradio_api/run/predict", json={})).status_code,
        ]
        wrong = await http.post(f"{server.url}/ui/login", data={"username": "me", "password": "guess"})
        right = await http.post(f"{server.url}/ui/login", data={"username": "me", "password": "s3cret"})
        config = await http.get(f"{server.url}/ui/config")  # the client keeps the login cookie
    assert page.status_code == 200 and "What is 2**16 / 7?" not in page.text  # the login form, not the chat
    assert refused == [401, 401, 401, 401]
    assert (wrong.status_code, wrong.json()) == (400, {"detail": "Incorrect credentials."})
    assert right.json() == {"success": True}
    assert config.status_code == 200 and "What is 2**16 / 7?" in config.text


@pytest.mark.parametrize("first_turn", [True, False], ids=["new-conversation", "later-turn"])
async def test_a_reload_in_the_middle_of_a_slow_turn_shows_the_answer_finish(
        first_turn: bool, browser: Browser, fake_vllm: FakeVLLM, live_server: Any) -> None:
    slow = "Word by word the story goes on. " * 12 + "The very end."
    earlier = [] if first_turn else ["Hi", "Hello."]
    fake_vllm.script(*earlier[1:], Reply(text=slow, token_delay_s=0.05))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        page = await browser.new_page(viewport=VIEWPORT)
        await page.goto(f"{server.url}/ui/")
        if earlier:
            await ask(page, "Hi")
            await expect(page.get_by_text("Hello.")).to_be_visible(timeout=WAIT_MS)
            await wait_until_idle(page)
        await ask(page, "Tell me a slow story")
        await expect(page.get_by_text(re.compile("^Word by word"))).to_be_visible(timeout=WAIT_MS)
        await page.reload()  # the run goes on without the tab; the page reattaches to it
        await expect(page.get_by_text("Tell me a slow story")).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_role("button", name="Stop")).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_text(re.compile(r"The very end\.$"))).to_be_visible(timeout=WAIT_MS)
        await wait_until_idle(page)
        await expect(page.get_by_role("button", name="New conversation")).to_be_visible()
        await expect(page.get_by_text("Hello.")).to_have_count(len(earlier) // 2)
        conversations = (await server.app.state.agent.store.list_conversations(10, None)).conversations
        stored = await server.app.state.agent.store.load_messages(conversations[0].id)
        await page.close()
    assert fake_vllm.disconnects == 0
    assert [message["content"] for message in stored] == [*earlier, "Tell me a slow story", slow]
