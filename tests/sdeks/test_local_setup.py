"""`sdeks local up` / `down` mistakes: a taken port, a second stack, a stale record;
models named after their folders. No pods are started here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdeks import cli
from sdeks.local import LocalStack, LocalStackError, StateFile, choose_port


@pytest.fixture
def held_port():
    """A port another program (LocalStack, say) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def moto_children() -> list[int]:
    """Live child processes of this test process running the embedded AWS."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and b"sdeks.moto_server" in cmdline:
            out.append(int(pid))
    return out


def test_an_explicit_port_that_is_taken_fails_in_one_line(held_port, tmp_path, capsys):
    code = cli.main(["local", "up", "--port", str(held_port), "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == cli.EXIT_SETUP
    assert out.startswith(f"error: port {held_port} is taken") and out.count("\n") == 1
    assert "--port 0" in out
    assert moto_children() == []


def test_the_default_port_falls_back_to_a_free_one(monkeypatch):
    monkeypatch.setattr("sdeks.local.port_is_free", lambda port, host="127.0.0.1": False)
    port, note = choose_port(None)
    assert port == 0 and "4566 is taken" in note
    with pytest.raises(LocalStackError, match="taken"):
        choose_port(4566)


def test_a_stack_on_a_taken_port_fails_and_leaves_no_process(held_port, tmp_path):
    # Something already listens there: moto must not be reported up on it.
    stack = LocalStack(workdir=tmp_path, moto_port=held_port)
    with pytest.raises(LocalStackError, match=f"port {held_port} .*is taken"):
        stack.start()
    assert moto_children() == []


def test_local_down_stops_the_recorded_stack(tmp_path, capsys):
    up = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "local.json").write_text(
            json.dumps({"pid": up.pid, "endpoint": "http://127.0.0.1:1", "exports": {}})
        )
        assert cli.main(["local", "down", "--workdir", str(tmp_path)]) == cli.EXIT_OK
        assert up.wait(timeout=10) is not None
        assert "stopped" in capsys.readouterr().out
        assert not (tmp_path / "local.json").exists()
    finally:
        up.kill()
        up.wait()


def test_local_down_without_a_stack_says_so(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "local.json").write_text(json.dumps({"pid": dead.pid, "endpoint": "x"}))
    assert cli.main(["local", "down", "--workdir", str(tmp_path)]) == cli.EXIT_OK
    assert "no local stack is up" in capsys.readouterr().out
    assert not (tmp_path / "local.json").exists()  # the stale record is cleared


def test_local_up_refuses_a_second_stack(tmp_path, capsys):
    (tmp_path / "local.json").write_text(
        json.dumps({"pid": os.getpid(), "endpoint": "http://127.0.0.1:4566"})
    )
    assert StateFile(tmp_path).read() is not None
    assert cli.main(["local", "up", "--workdir", str(tmp_path)]) == cli.EXIT_SETUP
    out = capsys.readouterr().out
    assert "already up" in out and "sdeks local down" in out


def _fake_diffusers_folder(path: Path) -> None:
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")


@pytest.mark.parametrize(
    ("layout", "served", "default"),
    [
        ("tiny-xl", "tiny-xl", "tiny-xl"),  # --models DIR/tiny-xl (a diffusers folder)
        ("a1111/Stable-diffusion/tiny-xl", "tiny-xl", ""),  # --models DIR (A1111 folder)
        ("ckpts/tiny-xl", "tiny-xl", ""),  # --models DIR (the checkpoints themselves)
    ],
)
def test_local_models_are_named_after_their_folders(aws, stack, tmp_path, layout, served, default):
    from sdeks.models import list_models

    _fake_diffusers_folder(tmp_path / layout)
    given = tmp_path / layout.split("/")[0] if "/" in layout else tmp_path / layout
    local = LocalStack(workdir=tmp_path / "work", models_dir=given)
    local.resources = stack
    local._install_model(aws.s3)

    names = [row.name for row in list_models(aws.s3, stack.models_bucket)]
    assert names == [served]
    assert local.default_model == default  # "": the pod takes its first checkpoint
