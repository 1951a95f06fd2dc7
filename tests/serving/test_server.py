"""``skinlesion serve``: the port is taken before the model loads, so a port in use fails in
seconds with one line naming host and port, and uvicorn serves on the socket already bound."""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion.cli import main
from skinlesion.core.errors import AddressError
from skinlesion.inference import resolve
from skinlesion.serving import server


def _never_load(*_: object, **__: object) -> None:
    raise AssertionError("the model was loaded before the port was checked")


def test_a_port_in_use_fails_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(resolve, "resolve_model", _never_load)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with caplog.at_level(logging.INFO):
            assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert not [r for r in caplog.records if "serving" in r.getMessage()]


def test_a_port_in_use_fails_before_torch_is_imported() -> None:
    # A fresh process: the one line comes before the seconds of importing torch and the app.
    code = (
        "import sys; from skinlesion.cli import main; "
        "rc = main(['serve', '--port', sys.argv[1]]); print(rc, 'torch' in sys.modules)"
    )
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-c", code, str(port)], capture_output=True, text=True, timeout=120
        )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_an_address_not_on_this_machine_names_host_and_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resolve, "resolve_model", _never_load)
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(AddressError, match="cannot listen on 192.0.2.1:8123"):
        server.serve(None, "192.0.2.1", 8123)


def test_uvicorn_serves_on_the_socket_bound_before_loading(
    monkeypatch: pytest.MonkeyPatch, tiny_packaged: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    seen: dict[str, object] = {}
    load = resolve.resolve_model

    def load_after_bind(model, runtime, backend):  # type: ignore[no-untyped-def]
        # The port is held while the model loads: another bind to it fails.
        with socket.socket() as probe, pytest.raises(OSError) as err:
            probe.bind(("127.0.0.1", seen["port"]))
        seen["probe"] = err.value.errno
        return load(tiny_packaged, runtime, backend)

    def fake_run(self, sockets=None):  # type: ignore[no-untyped-def]
        seen["listening_on"] = [s.getsockname()[1] for s in sockets or []]

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        seen["port"] = free.getsockname()[1]
    monkeypatch.setattr(resolve, "resolve_model", load_after_bind)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    with caplog.at_level(logging.INFO):
        server.serve(None, "127.0.0.1", seen["port"], device="cpu", backend="torch")
    assert seen["probe"] == errno.EADDRINUSE
    assert seen["listening_on"] == [seen["port"]]
    logged = [r.getMessage() for r in caplog.records if "serving" in r.getMessage()]
    assert logged == [
        f"serving tiny (version 0.0-test, backend torch) on http://127.0.0.1:{seen['port']}"
    ]
