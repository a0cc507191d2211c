"""How far one agent turn travels through the service's own code (issue 13: "a newcomer reads it in one sitting").

One POST /api/v1/chat ("What is 12*7?" -> `calculator` -> "The results: 84."), or with --stream one streamed
turn, is sent to the service on the fake vLLM, both served on loopback in this process. While that turn runs,
a profiler notes every named function of agent_app.py and tools.py that is entered, in every thread (a streamed
turn's log writes included), and how many of them are on the stack at once (a coroutine's awaiting callers
count). A first turn, not traced,
warms the caches up (the model's context window, the prompt's head).

    .venv/bin/python bench/turn_trace.py                 # the non-streaming turn
    .venv/bin/python bench/turn_trace.py --stream        # the streamed turn (a run)
    .venv/bin/python bench/turn_trace.py --list          # and the functions, in the order first entered
    .venv/bin/python bench/turn_trace.py --root DIR      # the service as checked out in DIR (another commit)
"""

import argparse
import asyncio
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

MAIN_DIR = Path(__file__).resolve().parent.parent
OWN_FILES = ("agent_app.py", "tools.py")
QUESTION = "What is 12*7?"


class Tracer:
    """Own named functions entered while `active` (first entry order; comprehensions and lambdas are left out),
    and the deepest stack of them seen. Installed before the service starts, so that its threads have it too."""

    def __init__(self, root: Path) -> None:
        self.files = {str(root / name) for name in OWN_FILES}
        self.active = False
        self.entered: dict[str, None] = {}
        self.depth = 0

    def own(self, frame: FrameType) -> bool:
        return frame.f_code.co_filename in self.files and not frame.f_code.co_name.startswith("<")

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if not self.active or event != "call" or not self.own(frame):
            return
        self.entered[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_qualname}"] = None
        depth, current = 0, frame
        while current is not None:
            depth += self.own(current)
            current = current.f_back
        self.depth = max(self.depth, depth)

    def __enter__(self) -> "Tracer":
        threading.setprofile(self.profile)
        sys.setprofile(self.profile)
        return self

    def __exit__(self, *_exc: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


async def turn(http: httpx.AsyncClient, url: str, *, stream: bool) -> None:
    """One turn, checked: the answer names 84."""
    if not stream:
        response = await http.post(f"{url}/api/v1/chat", json={"content": QUESTION})
        assert response.status_code == 200 and "84" in response.json()["content"], response.text
        return
    async with http.stream("POST", f"{url}/api/v1/chat/stream", json={"content": QUESTION}) as response:
        body = "".join([text async for text in response.aiter_text()])
    assert response.status_code == 200 and "event: done" in body and "84" in body, body[-500:]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", action="store_true", help="trace a streamed turn instead")
    parser.add_argument("--list", action="store_true", help="print the functions entered")
    parser.add_argument("--root", type=Path, default=MAIN_DIR, help="where agent_app.py and tools.py are")
    args = parser.parse_args()
    root = args.root.resolve()
    sys.path[:0] = [str(root), str(MAIN_DIR / "tests")]
    import uvicorn
    from fake_vllm import FakeVLLM

    from agent_app import Settings, create_app

    with tempfile.TemporaryDirectory() as directory, Tracer(root) as tracer:
        async with FakeVLLM() as fake, httpx.AsyncClient(timeout=30) as http:
            settings = Settings(_env_file=None, vllm_base_url=fake.url, log_level="WARNING",
                                database_url=f"sqlite+aiosqlite:///{Path(directory) / 'trace.db'}")
            server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0,
                                                   log_level="warning", access_log=False))
            serving = asyncio.create_task(server.serve())
            for _ in range(500):
                if server.started:
                    break
                await asyncio.sleep(0.01)
            else:
                raise RuntimeError("uvicorn did not start")
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            await turn(http, url, stream=args.stream)
            tracer.active = True
            await turn(http, url, stream=args.stream)
            if args.stream:
                await asyncio.sleep(0.5)  # the run's log is written after its last event
            tracer.active = False
            server.should_exit = True
            await serving
    kind = "streamed turn" if args.stream else "non-streaming turn"
    print(f"one {kind} of {root}: {len(tracer.entered)} own functions entered "
          f"({', '.join(f'{sum(name.startswith(file) for name in tracer.entered)} in {file}' for file in OWN_FILES)}); "
          f"at most {tracer.depth} own frames on the stack at once")
    if args.list:
        print("\n".join(f"  {name}" for name in tracer.entered))


if __name__ == "__main__":
    asyncio.run(main())
