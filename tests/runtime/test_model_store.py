"""runtime/model_store.py and its tiers: catalog, S3 source, disk cache, RAM, prefetch."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.model_catalog import Catalog, folder_sha256
from runtime.model_disk import DiskCache, file_sha256
from runtime.model_source import LocalSource, ObjectInfo, S3Source
from runtime.model_store import ModelStore, StoreLimits, clone_pipeline
from sdeks.errors import ModelLoadError, ModelNotFoundError

MiB = 2**20


# --- helpers ----------------------------------------------------------------


class GetObjectLog:
    """Every GetObject the client sends (key, range): real requests, counted."""

    def __init__(self, client) -> None:
        self.calls: list[tuple[str, str | None]] = []
        client.meta.events.register("before-parameter-build.s3.GetObject", self._record)

    def _record(self, params, **_kwargs) -> None:
        self.calls.append((params["Key"], params.get("Range")))

    def for_key(self, suffix: str) -> list[tuple[str, str | None]]:
        return [c for c in self.calls if c[0].endswith(suffix)]


def _render(pipe, seed: int = 7) -> np.ndarray:
    out = pipe(
        "a red cat",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


@pytest.fixture
def models_bucket(tiny_models_bucket: str) -> str:
    """The session's tiny-models bucket (tests here only read it)."""
    return tiny_models_bucket


@pytest.fixture
def empty_bucket(aws) -> str:
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    aws.s3.create_bucket(Bucket=bucket)
    return bucket


def _s3_store(aws, bucket: str, cache: Path, **kwargs) -> ModelStore:
    part_bytes = kwargs.pop("part_bytes", 8 * MiB)
    return ModelStore(
        S3Source(aws.s3, bucket, part_bytes=part_bytes, concurrency=4), cache_dir=cache, **kwargs
    )


# --- catalog (pure) ---------------------------------------------------------


def _obj(key: str, size: int = 10) -> ObjectInfo:
    return ObjectInfo(key=key, size=size, etag=f'"{key}"')


def test_catalog_names_folders_files_and_config_folders():
    catalog = Catalog(
        [
            _obj("Stable-diffusion/a/model_index.json"),
            _obj("Stable-diffusion/a/unet/config.json"),
            _obj("Stable-diffusion/a/unet/diffusion_pytorch_model.safetensors", 100),
            # Never downloaded: a pickle and an fp16 variant beside the safetensors.
            _obj("Stable-diffusion/a/unet/diffusion_pytorch_model.bin", 100),
            _obj("Stable-diffusion/a/unet/diffusion_pytorch_model.fp16.safetensors", 50),
            _obj("Stable-diffusion/sub/b.safetensors", 1000),
            _obj("Stable-diffusion/sub/b.config/model_index.json"),
            _obj("Stable-diffusion/sub/b.config/unet/config.json"),
            _obj("Stable-diffusion/c.ckpt", 1000),  # pickles are refused outright
            _obj("Lora/style.safetensors"),
            _obj("VAE/vae-ft-mse.safetensors"),
            _obj("VAE/sdxl-vae/config.json"),
            _obj("VAE/sdxl-vae/diffusion_pytorch_model.safetensors"),
        ]
    )
    names = {e.name: e for e in catalog.checkpoints}
    assert set(names) == {"a", "sub/b.safetensors"}
    assert names["a"].kind == "folder"
    assert {f.key.rsplit("/", 1)[1] for f in names["a"].files} == {
        "model_index.json",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    assert names["a"].size == 120
    assert names["sub/b.safetensors"].config_key == "Stable-diffusion/sub/b.config/"
    assert names["sub/b.safetensors"].model_name == "sub/b"
    assert [e.name for e in catalog.loras] == ["style.safetensors"]
    assert sorted(e.name for e in catalog.vaes) == ["sdxl-vae", "vae-ft-mse.safetensors"]


def test_checkpoint_stem_matches_state_names_to_requests():
    from runtime.model_catalog import checkpoint_stem

    for name in (
        "v1-5.safetensors [6ce0161689]",
        "v1-5.safetensors",
        " v1-5 ",
        "v1-5 [6ce0161689]",
    ):
        assert checkpoint_stem(name) == "v1-5"
    assert checkpoint_stem("sdxl-base") == "sdxl-base"
    assert checkpoint_stem("anime/foo.safetensors") == "anime/foo"


def test_catalog_resolves_a1111_names():
    catalog = Catalog([_obj("Stable-diffusion/v1-5-pruned-emaonly.safetensors")], source="s3://m")
    entry = catalog.checkpoints[0]
    for name in ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly", " v1-5-pruned-emaonly "):
        assert catalog.resolve(name) is entry
    # The hash is unknown until the bytes were read; a `[hash]` suffix still resolves by name.
    assert entry.title == "v1-5-pruned-emaonly.safetensors"
    assert catalog.resolve("v1-5-pruned-emaonly.safetensors [6ce0161689]") is entry
    entry.sha256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert entry.title == "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    for name in ("6ce0161689", entry.sha256, "v1-5-pruned-emaonly [6ce0161689]", entry.title):
        assert catalog.resolve(name) is entry
    # No substring guessing: a prefix of a name is not that model.
    with pytest.raises(ModelNotFoundError, match="available: v1-5-pruned-emaonly.safetensors"):
        catalog.resolve("v1-5")


# --- local source -------------------------------------------------------------


@pytest.fixture
def local_store(tiny_models_dir: Path, tmp_path: Path):
    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path / "cache")
    yield store
    store.close()


def test_local_store_loads_folder_and_single_file_same_image(local_store: ModelStore):
    with local_store.use("tiny-sd15") as folder:
        assert folder.family.name == "sd1"
        assert folder.timings.found_in == "disk"
        image = _render(folder.pipeline)
    with local_store.use("tiny-sd15-single", "txt2img") as single:
        assert single.name == "tiny-sd15-single.safetensors"
        np.testing.assert_array_equal(image, _render(single.pipeline))
    # A local folder is used in place: nothing was copied into the cache.
    assert local_store.disk.keys() == []


def test_local_store_hashes_and_name_forms(local_store: ModelStore, tiny_sd15_file: Path):
    sha = local_store.ensure_hash("tiny-sd15-single")
    assert sha == file_sha256(tiny_sd15_file)  # A1111: sha256 of the file
    short = sha[:10]
    entry = local_store.resolve("tiny-sd15-single.safetensors")
    assert entry.title == f"tiny-sd15-single.safetensors [{short}]"
    for name in (
        f"tiny-sd15-single [{short}]",
        f"tiny-sd15-single.safetensors [{short}]",
        short,
        "tiny-sd15-single [0123456789]",  # stale hash, right name: A1111 picks by name
    ):
        assert local_store.resolve(name).key == entry.key
    folder_sha = local_store.ensure_hash("tiny-sd15")
    assert folder_sha and local_store.resolve(f"tiny-sd15 [{folder_sha[:10]}]").name == "tiny-sd15"
    with pytest.raises(ModelNotFoundError):
        local_store.resolve("tiny-sd15-single.config")  # a config folder is not a model
    titles = [m["title"] for m in local_store.sd_models()]
    assert f"tiny-sd15-single.safetensors [{short}]" in titles


def _tiny_model_bytes(models: Path, cache: Path) -> int:
    """What one tiny SD 1.x model weighs in the store's RAM tier."""
    probe = ModelStore(LocalSource(models), cache_dir=cache)
    with probe.use("tiny-sd15"):
        one = probe.state()["bytes"]["ram"]
    probe.close()
    return one


def test_local_store_ram_lru_evicts_by_bytes(tiny_models_dir: Path, tmp_path: Path):
    one = _tiny_model_bytes(tiny_models_dir, tmp_path / "probe")
    # Room for one SD 1.x tiny model and a half.
    store = ModelStore(
        LocalSource(tiny_models_dir),
        cache_dir=tmp_path / "cache",
        limits=StoreLimits(ram_bytes=int(one * 1.5)),
    )
    with store.use("tiny-sd15"):
        pass
    with store.use("tiny-sd15-single"):
        pass
    assert store.state()["ram"] == ["tiny-sd15-single.safetensors"]
    # A pinned (rendering) model is never evicted, even over budget...
    with store.use("tiny-sd15-single") as held:
        with store.use("tiny-sd15"):
            assert set(store.state()["ram"]) == {"tiny-sd15", "tiny-sd15-single.safetensors"}
            assert store.state()["in_use"]
        assert held.pipeline.unet is not None
    # ...and the budget holds again once nothing is pinned.
    state = store.state()
    assert len(state["ram"]) == 1 and state["bytes"]["ram"] <= int(one * 1.5)
    store.close()


def test_concurrent_acquire_loads_once(local_store: ModelStore):
    barrier = threading.Barrier(2)
    leases = []

    def worker() -> None:
        barrier.wait()
        leases.append(local_store.acquire("tiny-sd15", "img2img"))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(leases) == 2
    a, b = leases
    assert a.pipeline.unet is b.pipeline.unet  # one load, shared weights
    assert a.pipeline is not b.pipeline and a.pipeline.scheduler is not b.pipeline.scheduler
    assert a.pipeline.tokenizer is not b.pipeline.tokenizer
    assert sum(1 for lease in leases if lease.timings.ram_ms > 0) == 1
    for lease in leases:
        lease.release()
    assert local_store.state()["in_use"] == []


def test_corrupt_models_fail_as_model_load_failed(tiny_models_dir: Path, tmp_path: Path):
    root = tmp_path / "models"
    shutil.copytree(tiny_models_dir, root)
    ckpt = root / "Stable-diffusion"
    (ckpt / "garbage.safetensors").write_bytes(os.urandom(4096))
    data = (ckpt / "tiny-sd15-single.safetensors").read_bytes()
    (ckpt / "cut.safetensors").write_bytes(data[: len(data) // 3])
    shutil.copy2(ckpt / "tiny-sd15-single.safetensors", ckpt / "no-config.safetensors")
    weights = ckpt / "tiny-sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}' + os.urandom(64))
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "cache")
    for name, match in [
        ("garbage", "not a safetensors"),
        ("cut", "truncated"),
        ("no-config", r"no config: upload .*no-config\.config/"),
        ("tiny-sd15", "cannot load tiny-sd15"),
    ]:
        with pytest.raises(ModelLoadError, match=match) as info:
            store.acquire(name)
        assert info.value.code == "model_load_failed"
    assert store.state()["ram"] == [] and store.state()["in_use"] == []
    store.close()


def test_clone_pipeline_shares_weights_on_same_device(local_store: ModelStore):
    with local_store.use("tiny-sd15") as lease:
        base = lease.pipeline
        clone = clone_pipeline(base, "cpu", torch.float32)
        assert clone.unet is not base.unet
        assert clone.unet.conv_in.weight.data_ptr() == base.unet.conv_in.weight.data_ptr()
        np.testing.assert_array_equal(_render(base), _render(clone))


# --- S3 source through the disk tier ----------------------------------------


def test_s3_load_goes_through_disk_cache(aws, models_bucket: str, tmp_path: Path, tiny_sd15_dir):
    cache = tmp_path / "cache"
    store = _s3_store(aws, models_bucket, cache)
    with store.use("tiny-sd15") as lease:
        assert lease.timings.found_in == "source"
        assert lease.timings.download_ms > 0 and lease.timings.model_load_ms > 0
        first = _render(lease.pipeline)
    # The folder's A1111 hash is a content hash: the same as the local folder's.
    local = folder_sha256(
        (p.relative_to(tiny_sd15_dir).as_posix(), file_sha256(p))
        for p in tiny_sd15_dir.rglob("*")
        if p.is_file()
    )
    assert lease.sha256 == local and lease.title == f"tiny-sd15 [{local[:10]}]"
    state = store.state()
    assert state["disk"] == ["tiny-sd15"] and state["ram"] == ["tiny-sd15"]
    assert state["gpu"] == ["tiny-sd15"]  # on CPU the RAM pipelines are the device's
    store.close()

    # A restarted pod adopts the cache: no object is read again.
    again = _s3_store(aws, models_bucket, cache)
    gets = GetObjectLog(aws.s3)
    # The hash survives the restart (kept in the cache's metadata).
    assert again.resolve(local[:10]).title == f"tiny-sd15 [{local[:10]}]"
    with again.use(f"tiny-sd15 [{local[:10]}]") as lease:
        assert lease.timings.found_in == "disk" and lease.timings.download_ms == 0
        np.testing.assert_array_equal(first, _render(lease.pipeline))
    assert gets.calls == []
    again.close()


def test_s3_single_file_ranged_download_verified(
    aws, models_bucket: str, tmp_path: Path, tiny_sd15_file: Path, tiny_sd15_dir: Path
):
    store = _s3_store(aws, models_bucket, tmp_path / "cache", part_bytes=1 * MiB)
    gets = GetObjectLog(aws.s3)
    with store.use("tiny-sd15-single.safetensors") as lease:
        image = _render(lease.pipeline)
    size = tiny_sd15_file.stat().st_size
    ranged = [
        c for c in gets.for_key("tiny-sd15-single.safetensors") if c[1] and c[1] != "bytes=0-7"
    ]
    assert len(ranged) >= size // MiB  # parallel parts, not one GET
    # The config came from the `.config/` folder beside it, through the same cache.
    assert gets.for_key("tiny-sd15-single.config/model_index.json")
    assert lease.sha256 == file_sha256(tiny_sd15_file)
    cached = [p for p in (tmp_path / "cache").rglob("tiny-sd15-single.safetensors")]
    assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).hexdigest() == lease.sha256
    # Same weights as the folder model, same pixels.
    with store.use("tiny-sd15") as folder:
        np.testing.assert_array_equal(image, _render(folder.pipeline))
    store.close()


def test_s3_missing_model_fails_at_once_without_download(aws, models_bucket: str, tmp_path: Path):
    store = _s3_store(aws, models_bucket, tmp_path / "cache")
    gets = GetObjectLog(aws.s3)
    for name in ("does-not-exist", "tiny", "tiny-sd15.safetensors [0123456789]x"):
        with pytest.raises(ModelNotFoundError) as info:
            store.acquire(name)
        assert info.value.code == "model_not_found"
        assert "tiny-sd15" in info.value.message  # lists what exists
    with pytest.raises(ModelNotFoundError):
        store.prefetch("does-not-exist")
    with pytest.raises(ModelNotFoundError):
        store.fetch_lora("nope")
    assert gets.calls == [] and store.disk.keys() == []
    store.close()


def test_s3_corrupt_file_fails_before_download(aws, empty_bucket: str, tmp_path: Path):
    aws.s3.put_object(
        Bucket=empty_bucket, Key="Stable-diffusion/broken.safetensors", Body=os.urandom(3 * MiB)
    )
    store = _s3_store(aws, empty_bucket, tmp_path / "cache")
    gets = GetObjectLog(aws.s3)
    with pytest.raises(ModelLoadError) as info:
        store.acquire("broken")
    assert info.value.code == "model_load_failed"
    assert gets.calls == [("Stable-diffusion/broken.safetensors", "bytes=0-7")]
    assert store.disk.keys() == []
    store.close()


def test_s3_prefetch_brings_model_to_disk_and_ram_while_rendering(
    aws, models_bucket: str, tmp_path: Path
):
    store = _s3_store(aws, models_bucket, tmp_path / "cache")
    with store.use("tiny-sd15") as lease:
        future = store.prefetch("tiny-sdxl")
        _render(lease.pipeline)  # renders while the other model downloads and loads
        timings = future.result(timeout=120)
    assert timings.found_in == "source" and timings.download_ms > 0 and timings.ram_ms > 0
    state = store.state()
    assert "tiny-sdxl" in state["disk"] and "tiny-sdxl" in state["ram"]
    with store.use("tiny-sdxl") as xl:
        assert xl.family.name == "sdxl"
        assert xl.timings.ram_ms == 0 and xl.timings.download_ms == 0
        assert _render(xl.pipeline).shape == (64, 64, 3)
    store.close()


def test_s3_prefix_and_aux_files(aws, empty_bucket: str, tmp_path: Path):
    bucket = empty_bucket
    lora, vae = os.urandom(1000), os.urandom(2000)
    aws.s3.put_object(Bucket=bucket, Key="team/a/Lora/style.safetensors", Body=lora)
    aws.s3.put_object(Bucket=bucket, Key="team/a/VAE/vae-ft-mse.safetensors", Body=vae)
    from runtime.model_source import open_source

    store = ModelStore(open_source(f"s3://{bucket}/team/a/", s3_client=aws.s3), cache_dir=tmp_path)
    assert store.fetch_lora("style").read_bytes() == lora
    assert store.fetch_vae("vae-ft-mse.safetensors").read_bytes() == vae
    assert [e.name for e in store.loras()] == ["style.safetensors"]
    store.close()


def test_disk_cache_lru_evicts_by_bytes_and_survives_restart(
    aws, empty_bucket: str, tmp_path: Path
):
    bucket = empty_bucket
    for name in "abcd":
        aws.s3.put_object(Bucket=bucket, Key=f"Lora/{name}.safetensors", Body=os.urandom(MiB))
    cache = tmp_path / "cache"
    store = ModelStore(
        S3Source(aws.s3, bucket),
        cache_dir=cache,
        limits=StoreLimits(disk_bytes=int(2.5 * MiB)),
    )
    a = store.fetch_lora("a")
    store.fetch_lora("b")
    store.fetch_lora("a")  # a is now the most recently used
    store.fetch_lora("c")  # evicts b, the least recently used
    assert store.disk.keys() == ["Lora/a.safetensors", "Lora/c.safetensors"]
    assert a.exists() and store.disk.used_bytes == 2 * MiB
    store.refresh()  # listing the source is not a use: the LRU order stays
    assert store.disk.keys() == ["Lora/a.safetensors", "Lora/c.safetensors"]

    # Entries being read are never evicted: with both pinned, d does not fit.
    with store.disk.pinned("Lora/a.safetensors"), store.disk.pinned("Lora/c.safetensors"):
        with pytest.raises(ModelLoadError, match="disk cache full"):
            store.fetch_lora("d")
    store.close()

    # A restarted pod adopts the cache in the same LRU order.
    adopted = DiskCache(cache, int(2.5 * MiB))
    assert adopted.keys() == ["Lora/a.safetensors", "Lora/c.safetensors"]
    too_big = ModelStore(
        S3Source(aws.s3, bucket),
        cache_dir=tmp_path / "small",
        limits=StoreLimits(disk_bytes=MiB // 2),
    )
    with pytest.raises(ModelLoadError, match="more than the whole disk cache"):
        too_big.fetch_lora("d")
    too_big.close()


def test_cuda_device_without_cuda_is_a_clear_error(tiny_models_dir: Path, tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path, device="cuda")


def test_device_tier_lru_by_bytes_and_pins(tiny_models_dir: Path, tmp_path: Path):
    """The GPU tier's bookkeeping, exercised on CPU with separate device copies."""
    one = _tiny_model_bytes(tiny_models_dir, tmp_path / "probe")
    store = ModelStore(
        LocalSource(tiny_models_dir),
        cache_dir=tmp_path / "cache",
        limits=StoreLimits(gpu_bytes=int(one * 1.5)),
        device_copies=True,
    )
    with store.use("tiny-sd15") as first:
        assert first.timings.found_in == "disk" and first.timings.device_ms > 0
        image = _render(first.pipeline)
    with store.use("tiny-sd15-single") as second:
        assert second.timings.device_ms > 0
    state = store.state()
    assert state["gpu"] == ["tiny-sd15-single.safetensors"]
    assert state["ram"] == ["tiny-sd15", "tiny-sd15-single.safetensors"]
    # Back from RAM: only the device copy is made again, and it renders the same.
    with store.use("tiny-sd15") as again:
        assert again.timings.found_in == "ram" and again.timings.ram_ms == 0
        np.testing.assert_array_equal(image, _render(again.pipeline))
        # Pinned on the device: loading the other one cannot evict it.
        with store.use("tiny-sd15-single"):
            assert set(store.state()["gpu"]) == {"tiny-sd15", "tiny-sd15-single.safetensors"}
    with store.use("tiny-sd15") as warm:
        assert warm.timings.found_in == "gpu" and warm.timings.device_ms == 0
    store.close()


def test_s3_range_broken_mid_stream_resumes(aws, empty_bucket: str, tmp_path: Path):
    """A body that breaks after its first bytes (a reset connection) is resumed
    from where it broke, with a new ranged GET; the file still verifies."""
    from botocore.exceptions import ResponseStreamingError

    data = os.urandom(3 * MiB + 123)
    aws.s3.put_object(
        Bucket=empty_bucket, Key="Lora/big.safetensors", Body=data, ChecksumAlgorithm="SHA256"
    )
    broken = []

    class BreaksOnce:
        def __init__(self, body) -> None:
            self.body, self.sent = body, 0

        def read(self, n: int) -> bytes:
            if self.sent:
                broken.append(self.sent)
                raise ResponseStreamingError(error="connection reset by peer")
            chunk = self.body.read(min(n, 1000))
            self.sent += len(chunk)
            return chunk

        def close(self) -> None:
            self.body.close()

    def break_first_body(parsed, **_kwargs) -> None:
        if (
            not broken
            and "Body" in parsed
            and parsed.get("ContentRange", "").startswith("bytes 0-")
        ):
            parsed["Body"] = BreaksOnce(parsed["Body"])

    aws.s3.meta.events.register("after-call.s3.GetObject", break_first_body)
    gets = GetObjectLog(aws.s3)
    store = ModelStore(S3Source(aws.s3, empty_bucket, part_bytes=MiB), cache_dir=tmp_path)
    path = store.fetch_lora("big")
    assert broken == [1000]
    assert ("Lora/big.safetensors", f"bytes=1000-{MiB - 1}") in gets.calls
    assert path.read_bytes() == data
    store.close()


def test_disk_cache_refuses_what_the_volume_cannot_hold(aws, empty_bucket: str, tmp_path: Path):
    from runtime.model_catalog import ModelEntry

    # A listing that announces more bytes than this volume has free (the byte
    # budget alone would allow it): refused before any GET.
    huge = shutil.disk_usage(tmp_path).free + 2**40
    entry = ModelEntry(
        name="huge.safetensors",
        kind="file",
        key="Stable-diffusion/huge.safetensors",
        files=(ObjectInfo("Stable-diffusion/huge.safetensors", huge, '"x"'),),
    )
    cache = DiskCache(tmp_path / "cache", capacity_bytes=huge * 2)
    gets = GetObjectLog(aws.s3)
    with pytest.raises(ModelLoadError, match="not enough free disk space"):
        cache.fetch(S3Source(aws.s3, empty_bucket), entry)
    assert gets.calls == [] and cache.keys() == []


@pytest.mark.parametrize(
    ("part_bytes", "concurrency", "gets"),
    [(MiB // 4, 8, 13), (0, 8, 1), (MiB, 1, 4)],
    ids=["ranges-out-of-order", "one-get-per-object", "ranges-one-at-a-time"],
)
def test_s3_download_hashes_while_it_writes(
    aws, empty_bucket: str, tmp_path: Path, part_bytes: int, concurrency: int, gets: int
):
    """The digest `download` returns is the sha256 of the bytes it wrote, however
    the ranges arrive; `part_bytes=0` is one GET for the whole object."""
    data = os.urandom(3 * MiB + 5)
    aws.s3.put_object(Bucket=empty_bucket, Key="VAE/v.safetensors", Body=data)
    source = S3Source(aws.s3, empty_bucket, part_bytes=part_bytes, concurrency=concurrency)
    log = GetObjectLog(aws.s3)
    dest = tmp_path / "v.safetensors"
    digest = source.download(source.head("VAE/v.safetensors"), dest)
    assert dest.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert len(log.calls) == gets


def test_s3_download_of_an_empty_object_hashes_nothing(aws, empty_bucket: str, tmp_path: Path):
    aws.s3.put_object(Bucket=empty_bucket, Key="VAE/empty.safetensors", Body=b"")
    source = S3Source(aws.s3, empty_bucket)
    digest = source.download(source.head("VAE/empty.safetensors"), tmp_path / "e")
    assert digest == hashlib.sha256(b"").hexdigest() and (tmp_path / "e").read_bytes() == b""


class _AlteredBody:
    """A GetObject body whose bytes are changed on the way (a corrupting proxy)."""

    def __init__(self, body, alter) -> None:
        self.body, self.alter = body, alter

    def read(self, n: int) -> bytes:
        return self.alter(self.body.read(n))

    def close(self) -> None:
        self.body.close()


@contextlib.contextmanager
def _alter_bodies(client, alter) -> Iterator[None]:
    """Alter every GetObject body of `client` (a session-wide fixture) while inside."""

    def hook(parsed, **_kwargs) -> None:
        if "Body" in parsed:
            parsed["Body"] = _AlteredBody(parsed["Body"], alter)

    client.meta.events.register("after-call.s3.GetObject", hook)
    try:
        yield
    finally:
        client.meta.events.unregister("after-call.s3.GetObject", hook)


def test_s3_bytes_altered_in_transit_fail_the_sha256_check(aws, empty_bucket: str, tmp_path: Path):
    """S3's stored sha256 is checked against the digest of what was written."""
    data = os.urandom(2 * MiB)
    aws.s3.put_object(
        Bucket=empty_bucket, Key="Lora/flip.safetensors", Body=data, ChecksumAlgorithm="SHA256"
    )
    store = ModelStore(S3Source(aws.s3, empty_bucket, part_bytes=MiB), cache_dir=tmp_path)
    flip = lambda chunk: bytes([chunk[0] ^ 1]) + chunk[1:] if chunk else chunk  # noqa: E731
    with _alter_bodies(aws.s3, flip), pytest.raises(ModelLoadError, match="sha256 mismatch"):
        store.fetch_lora("flip")
    assert not list(tmp_path.glob("flip*"))  # nothing half-made left in the cache
    store.close()


def test_s3_body_longer_than_its_range_is_refused(aws, empty_bucket: str, tmp_path: Path):
    """A body that sends more than the range it was asked for would overwrite the
    next range: refused, not written."""
    aws.s3.put_object(Bucket=empty_bucket, Key="VAE/long.safetensors", Body=os.urandom(2 * MiB))
    source = S3Source(aws.s3, empty_bucket, part_bytes=MiB)
    head = source.head("VAE/long.safetensors")
    longer = lambda chunk: chunk + b"extra" if chunk else chunk  # noqa: E731
    with _alter_bodies(aws.s3, longer), pytest.raises(ModelLoadError, match="overran"):
        source.download(head, tmp_path / "long")


def test_s3_part_size_and_concurrency_come_from_settings(tmp_path: Path, aws, empty_bucket: str):
    from runtime.models import build_store
    from runtime.settings import RuntimeSettings

    settings = RuntimeSettings(
        models=f"s3://{empty_bucket}", cache_dir=tmp_path, s3_part_mib=0, s3_concurrency=3
    )
    store = build_store(settings, "cpu", s3_client=aws.s3)
    assert isinstance(store.source, S3Source)
    assert (store.source.part_bytes, store.source.concurrency) == (0, 3)
    store.close()


def _mapped_under(folder: Path) -> list[str]:
    """Files under `folder` that this process has mapped into memory (Linux)."""
    gc.collect()
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if str(folder.resolve()) in line})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd15-single"])
def test_ram_tier_holds_the_weights_not_a_mapping_of_the_cache(
    aws, models_bucket: str, tmp_path: Path, name: str
):
    """The RAM tier holds real bytes: no weight file of the disk cache stays
    mapped once a model is loaded, and it renders the same as before."""
    cache = tmp_path / "cache"
    store = _s3_store(aws, models_bucket, cache)
    with store.use(name) as lease:
        assert lease.timings.found_in == "source"
        image = _render(lease.pipeline)
        assert _mapped_under(cache) == []
    # Removing the cache (an eviction) does not change what the RAM tier renders.
    shutil.rmtree(cache)
    with store.use(name) as lease:
        assert lease.timings.found_in == "gpu"  # CPU: the RAM pipeline is the device's
        np.testing.assert_array_equal(image, _render(lease.pipeline))
    store.close()


def test_prefix_hasher_fails_rather_than_waits_when_bytes_are_missing(tmp_path: Path):
    """Writers report the whole file written but it is shorter (e.g. truncated
    under it): the digest is an error, not a hang or a hash of fewer bytes."""
    from runtime.model_source import _PrefixHasher

    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = _PrefixHasher(fd, [0, 100], 200, threading.Event())
        thread = threading.Thread(target=hasher.run)
        thread.start()
        hasher.advance(0, 100)
        hasher.advance(1, 200)
        with pytest.raises(ModelLoadError, match="hashed 100 of 200 bytes"):
            hasher.result()
        thread.join(5)
        assert not thread.is_alive()
    finally:
        os.close(fd)


def test_checkpoints_and_other_kinds_resolve_names_by_one_rule(tmp_path: Path) -> None:
    """`Catalog.find` (checkpoints, LoRAs, VAEs) and the store's lookup of other kinds
    apply the same A1111 naming (`find_entry`); other kinds also take their display name."""
    from runtime.model_catalog import find_entry
    from runtime.model_store import ModelKind

    objects = [_obj("Stable-diffusion/sub/foo.safetensors"), _obj("Lora/sub/foo.safetensors")]
    catalog = Catalog(objects)
    for name in ("sub/foo.safetensors", "sub/foo", " sub/foo [0123abcd] "):
        assert catalog.find(name) is find_entry(catalog.checkpoints, name) is not None
    assert find_entry(catalog.checkpoints, "bar [0123abcd]") is None

    root = tmp_path / "models"
    (root / "Lora" / "sub").mkdir(parents=True)
    (root / "Lora" / "sub" / "foo.safetensors").write_bytes(b"x")
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "cache")
    kind = ModelKind(
        "lora-like", folders=("Lora/",), load=lambda p, e: p, display_name=lambda e: "Shown"
    )
    for name in ("Shown", "sub/foo", "sub/foo.safetensors", "sub/foo [0123abcd]"):
        assert store.resolve_weights(kind, name).key == "Lora/sub/foo.safetensors"
