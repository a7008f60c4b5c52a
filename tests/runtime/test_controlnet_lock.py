"""A single-file ControlNet's config is fetched before the store's construction lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest


def _lock_is_free() -> bool:
    """Whether another thread could take the diffusers construction lock now."""
    from runtime.model_store import _FROM_PRETRAINED_LOCK

    free: list[bool] = []

    def probe() -> None:
        got = _FROM_PRETRAINED_LOCK.acquire(blocking=False)
        if got:
            _FROM_PRETRAINED_LOCK.release()
        free.append(got)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free[0]


def test_single_file_config_is_fetched_outside_the_construction_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.controlnet import controlnet_kind
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.tiny_controlnet import make_tiny_controlnet

    root = tmp_path / "models"
    make_tiny_controlnet(root / "ControlNet" / "tiny-cn", family="sd15", single_file=True)
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "cache")
    kind = controlnet_kind(store, tmp_path / "work")
    fetches: list[tuple[str, bool]] = []
    fetch_file = store.fetch_file

    def watched(key: str) -> Path:
        fetches.append((key, _lock_is_free()))
        return fetch_file(key)

    monkeypatch.setattr(store, "fetch_file", watched)
    entry = store.resolve_weights(kind, "tiny-cn")
    with store.use_weights(kind, entry) as lease:
        assert lease.model.config.cross_attention_dim == 32

    key = "ControlNet/tiny-cn.config/config.json"
    # the download ran with the lock free; `load` reads the same file again from disk
    assert fetches[0] == (key, True)
    assert all(k == key for k, _ in fetches)
