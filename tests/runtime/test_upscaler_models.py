"""runtime/upscaler_models.py: A1111 upscaler names, spandrel loading through the
model store's tiers, and tiled upscaling with bounded tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import upscaler_models as um
from runtime.model_source import LocalSource
from runtime.model_store import ModelStore, StoreLimits
from runtime.tiny_kinds import make_tiny_upscalers
from sdeks.errors import InvalidParameterError, ModelNotFoundError


@pytest.fixture(scope="module")
def upscalers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    make_tiny_upscalers(root)
    return root


@pytest.fixture
def store(upscalers_dir: Path, tmp_path: Path) -> ModelStore:
    return ModelStore(LocalSource(upscalers_dir), cache_dir=tmp_path / "cache")


def _image(size: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def test_available_upscalers_use_a1111_names(store: ModelStore) -> None:
    infos = um.available(store.entries(um.UPSCALER))
    names = {i.name: i for i in infos}
    # THEN A1111's display names for its built-ins, file stems for the rest
    assert set(names) == {"R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "4x-UltraSharp", "SwinIR 4x"}
    assert names["R-ESRGAN 4x+"].entry.key == "RealESRGAN/RealESRGAN_x4plus.safetensors"
    assert names["4x-UltraSharp"].scale == 4.0
    item = names["SwinIR 4x"].item(store.source.url)
    assert item["model_name"] == "SwinIR_4x" and item["model_path"].endswith(
        "SwinIR_4x.safetensors"
    )


@pytest.mark.parametrize(
    ("requested", "key"),
    [
        ("R-ESRGAN 4x+", "RealESRGAN/RealESRGAN_x4plus.safetensors"),
        ("RealESRGAN_x4plus", "RealESRGAN/RealESRGAN_x4plus.safetensors"),
        ("4x-UltraSharp", "ESRGAN/4x-UltraSharp.pth"),
        ("4x-UltraSharp.pth", "ESRGAN/4x-UltraSharp.pth"),
        ("SwinIR 4x", "SwinIR/SwinIR_4x.safetensors"),
    ],
)
def test_names_clients_send_resolve_to_files(store: ModelStore, requested: str, key: str) -> None:
    entry = um.find(store.entries(um.UPSCALER), requested)
    assert entry is not None and entry.key == key


def test_unknown_and_unsupported_names_fail_clearly(store: ModelStore) -> None:
    names = [i.name for i in um.available(store.entries(um.UPSCALER))]
    assert um.find(store.entries(um.UPSCALER), "R-ESRGAN 4x+ Anime6B") is None
    err = um.unknown_upscaler("upscaler_1", "R-ESRGAN 4x+ Anime6B", names)
    assert isinstance(err, InvalidParameterError) and "is not installed" in err.message
    assert "`upscaler_1`" in err.message and "R-ESRGAN 4x+ Anime6B" in err.message
    assert "4x-UltraSharp" in err.message  # lists what exists
    ldsr = um.unknown_upscaler("hr_upscaler", "LDSR", names)
    assert isinstance(ldsr, InvalidParameterError) and "latent diffusion" in ldsr.message


def test_model_kind_lives_in_the_store_tiers(upscalers_dir: Path, tmp_path: Path) -> None:
    # GIVEN a RAM budget that holds one tiny upscaler but not two
    probe = ModelStore(LocalSource(upscalers_dir), cache_dir=tmp_path / "p")
    with probe.use_weights(um.UPSCALER, "R-ESRGAN 4x+") as lease:
        one = lease.timings and probe.state()["bytes"]["ram"]
    assert one > 0
    store = ModelStore(
        LocalSource(upscalers_dir),
        cache_dir=tmp_path / "c",
        limits=StoreLimits(ram_bytes=one + one // 2),
    )
    # WHEN the same upscaler is used twice
    with store.use_weights(um.UPSCALER, "R-ESRGAN 4x+") as first:
        assert first.timings.found_in == "disk"
        state = store.state()
        assert state["kinds"] == {
            "upscaler": {
                "gpu": ["RealESRGAN_x4plus.safetensors"],
                "ram": ["RealESRGAN_x4plus.safetensors"],
            }
        }
        assert state["ram"] == []  # checkpoint lists stay checkpoints only
    with store.use_weights(um.UPSCALER, "RealESRGAN_x4plus") as second:
        # THEN it is loaded once and shared
        assert second.timings.found_in == "gpu" and second.model is first.model
    # WHEN another one is used, THEN the least recently used one is evicted
    with store.use_weights(um.UPSCALER, "4x-UltraSharp"):
        pass
    assert store.state()["kinds"]["upscaler"]["ram"] == ["4x-UltraSharp.pth"]
    assert store.state()["bytes"]["ram"] <= one + one // 2


def test_pinned_weights_are_not_evicted(upscalers_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(
        LocalSource(upscalers_dir), cache_dir=tmp_path / "c", limits=StoreLimits(ram_bytes=1)
    )
    with store.use_weights(um.UPSCALER, "R-ESRGAN 4x+"):
        with store.use_weights(um.UPSCALER, "SwinIR 4x"):
            assert len(store.state()["kinds"]["upscaler"]["ram"]) == 2
    assert store.state()["kinds"] == {}


def test_unknown_weights_name_lists_the_kind(store: ModelStore) -> None:
    with pytest.raises(ModelNotFoundError, match="upscaler 'nope' not found.*4x-UltraSharp"):
        store.acquire_weights(um.UPSCALER, "nope")


def test_model_output_differs_from_lanczos(store: ModelStore) -> None:
    image = _image(24)
    with store.use_weights(um.UPSCALER, "R-ESRGAN 4x+") as lease:
        out = um.upscale_with(lease.model, image, 48, 48, tile=0)
    lanczos = image.resize((48, 48), Image.Resampling.LANCZOS)
    assert out.size == (48, 48)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(lanczos, dtype=np.int16))
    assert diff.mean() > 5


def _recording(descriptor):
    shapes: list[tuple[int, ...]] = []
    handle = descriptor.model.register_forward_pre_hook(
        lambda _m, args: shapes.append(tuple(args[0].shape))
    )
    return shapes, handle


@pytest.mark.parametrize("name", ["R-ESRGAN General 4xV3", "R-ESRGAN 4x+", "SwinIR 4x"])
def test_tiled_matches_untiled_with_bounded_tiles(store: ModelStore, name: str) -> None:
    image = _image(40, seed=3)
    with store.use_weights(um.UPSCALER, name) as lease:
        pixels = um.to_tensor(image, "cpu", torch.float32)
        whole = um.run_tiled(lease.model, pixels, tile=0, overlap=0)
        shapes, handle = _recording(lease.model)
        try:
            tiled = um.run_tiled(lease.model, pixels, tile=24, overlap=10)
        finally:
            handle.remove()
    assert tiled.shape == whole.shape == (1, 3, 160, 160)
    # THEN the model only ever saw tiles (padded to its size rules at most)
    assert len(shapes) >= 9 and max(h * w for *_, h, w in shapes) <= 24 * 24
    if name == "R-ESRGAN General 4xV3":
        # 4 3x3 convolutions see 4 pixels around: within half the overlap, so identical
        torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    else:
        assert (tiled - whole).abs().mean() < 0.05


def test_spans_cover_every_pixel_once() -> None:
    for size, tile, overlap in [(40, 16, 6), (17, 16, 4), (100, 33, 8), (8, 16, 2)]:
        spans = um._spans(size, tile, overlap)
        covered = [p for _, _, c0, c1 in spans for p in range(c0, c1)]
        assert covered == list(range(size))
        assert all(e - s <= max(tile, 1) or tile == 0 for s, e, _, _ in spans)
        assert all(s <= c0 and c1 <= e for s, e, c0, c1 in spans)


def test_tile_options_are_validated() -> None:
    assert um.tile_options({}) == (192, 8)
    assert um.tile_options({"ESRGAN_tile": 0}) == (0, 8)
    for bad in (
        {"ESRGAN_tile": "big"},
        {"ESRGAN_tile": 5000},
        {"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 8},
    ):
        with pytest.raises(InvalidParameterError, match="ESRGAN_tile"):
            um.tile_options(bad)


def test_pass_sizes_are_counted_before_running() -> None:
    # a 4x model asked for 1.1x still makes the whole 4x image first
    assert um.pass_sizes(24, 24, 4, 26, 26) == [(96, 96)]
    # a 2x model runs up to MAX_PASSES times, the rest is a resize
    assert um.pass_sizes(10, 10, 2, 100, 100) == [(20, 20), (40, 40), (80, 80)]
    assert um.pass_sizes(64, 64, 4, 64, 64) == []
    with pytest.raises(InvalidParameterError, match=r"`upscaler_2` 'x' is a 4x model.*96x96"):
        um.check_passes(
            _image(24), 4, 26, 26, field_name="upscaler_2", name="x", max_pixels=95 * 95
        )
