"""The wheel as a user gets it: built from this tree, installed in a fresh venv, run.

The slow test of the suite (about 20-40 s, most of it pip): it builds the
wheel with pip (in an isolated build environment unless hatchling is
importable here), checks what the wheel holds, installs it with the
``examples`` extra in a new virtual environment and runs
``python -m pmhub.demo`` from there, outside the repository, so only the
installed package can be imported: the page, its scripts, the login and a
WebSocket must all work from the wheel alone.

It needs a package index (PyPI, or whatever pip is configured with): without
one it is skipped, or fails under ``PMHUB_REQUIRE_SERVICES=1``, as the tests of
the other services do. It is marked ``slow``: ``-m "not slow"`` leaves it out.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import anyio
import httpx
import pytest
from servers import free_port, open_ws, recv_json

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
#: Generous bounds for a slow machine: pip may have to download (or build) a lot.
BUILD_TIMEOUT, INSTALL_TIMEOUT = 300.0, 600.0
START_TIMEOUT = STOP_TIMEOUT = 60.0  # a fresh venv imports without bytecode
#: What the wheel must hold: the package's data files as well as its modules.
REQUIRED = [
    "pmhub/__init__.py",
    "pmhub/py.typed",
    "pmhub/demo.py",
    "pmhub/adapters/websockets.py",
    "pmhub/web/client.js",
    "pmhub/web/chat.html",
    "pmhub/web/chat.js",
    "pmhub/web/chat.css",
]
#: What pip prints when it cannot reach an index (as opposed to a real failure).
NETWORK_ERRORS = (
    "Failed to establish a new connection",
    "NewConnectionError",
    "ConnectTimeoutError",
    "ProxyError",
    "Read timed out",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Could not fetch URL",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients (websockets, httpx) run on asyncio


def unavailable(reason: str) -> None:
    """Skip, or fail under ``PMHUB_REQUIRE_SERVICES=1`` (as ``conftest.require_service``)."""
    if os.environ.get("PMHUB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; PMHUB_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(f"{reason}; give pip a package index to run this test")


def run(command: list[str], what: str, timeout: float, cwd: Path) -> str:
    """Run a pip command; its output. Skips (see :func:`unavailable`) if no index answers.

    pip runs in its own process group, so a timeout also ends the interpreter
    that ``pip --python`` starts.
    """
    with subprocess.Popen(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            unavailable(f"{what} did not finish within {timeout:.0f} s (a slow network?)")
    if process.returncode != 0:
        lines = [line for line in output.splitlines() if any(e in line for e in NETWORK_ERRORS)]
        if lines:
            unavailable(f"{what} failed, no package index answers: {lines[0].strip()[:300]}")
        pytest.fail(f"{what} failed with status {process.returncode}:\n{output}")
    return output


def environment(venv: Path) -> dict[str, str]:
    """The environment of a shell with ``venv`` activated, and nothing on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this working tree, as ``pip wheel`` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:  # no build environment to install
        command.insert(4, "--no-build-isolation")
    run(command, "pip wheel", BUILD_TIMEOUT, out)
    (built,) = out.glob("pmhub-*.whl")
    return built


@pytest.fixture
def venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment with ``<wheel>[examples]`` installed, and nothing else."""
    venv = tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    # pip >= 22.3 installs into another interpreter: the venv then needs no pip of
    # its own, which saves the ~10 s ensurepip takes.
    if tuple(int(part) for part in version("pip").split(".")[:2]) < (22, 3):
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    else:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
        )
    install = [*pip, "install", "--no-compile", "--disable-pip-version-check", f"{wheel}[examples]"]
    run(install, "pip install pmhub[examples]", INSTALL_TIMEOUT, tmp_path)
    # Run outside the repository, pmhub must come from the wheel, not from src/
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pmhub; print(pmhub.__file__)"],
        cwd=tmp_path,
        env=environment(venv),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve() / "lib"), where
    assert not Path(where).resolve().is_relative_to(ROOT), where
    return venv


def test_the_wheel_holds_the_package_its_data_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}; it holds {names}"
    dist_info = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/"
    stray = [name for name in names if not name.startswith(("pmhub/", dist_info))]
    assert not stray, f"{wheel.name} holds files outside the package: {stray}"
    tests = [
        name
        for name in names
        if Path(name).name.startswith(("test_", "conftest"))
        or Path(name).name.endswith("_test.py")
        or {"tests", "examples", "benchmarks", "docs"} & set(Path(name).parts)
    ]
    assert not tests, f"{wheel.name} holds test or example files: {tests}"
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


async def test_the_installed_wheel_serves_the_demo_page_login_and_websocket(
    tmp_path: Path, venv: Path
) -> None:
    python, env = str(venv / "bin" / "python"), environment(venv)
    port, log = free_port(), tmp_path / "demo.log"
    base = f"http://127.0.0.1:{port}"
    command = [python, "-m", "pmhub.demo", "--port", str(port), "--db", str(tmp_path / "demo.db")]
    with log.open("wb") as stderr:
        process = await anyio.open_process(
            command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        with anyio.fail_after(START_TIMEOUT):
            while "Uvicorn running on" not in log.read_text(errors="replace"):
                if process.returncode is not None:
                    pytest.fail("the demo exited before serving:\n" + log.read_text())
                await anyio.sleep(0.05)  # poll interval only; the wait is on the log line

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            page = await http.get("/")
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/html")
            assert '<script type="module" src="chat.js">' in page.text
            for script in ("/chat.js", "/client.js"):
                response = await http.get(script)
                assert response.status_code == 200, (script, response.text)
                assert response.headers["content-type"].startswith("text/javascript"), script
                assert response.text.strip(), script
            login = await http.post("/api/login", json={"username": "alice", "password": "alice"})
            assert login.status_code == 200, login.text
            assert login.json() == {"id": 1, "username": "alice"}
            session = login.cookies.get("session")
            assert session, f"no session cookie in {login.headers!r}"

        async with open_ws(f"ws://127.0.0.1:{port}/ws", session) as ws:
            welcome = await recv_json(ws, timeout=30)
            assert welcome["type"] == "system", welcome

        process.send_signal(signal.SIGTERM)  # as a service manager stops it
        with anyio.fail_after(STOP_TIMEOUT):
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
    text = log.read_text(errors="replace")
    assert status == 0, text
    assert "Traceback" not in text, text
