"""Stage 2, the job's pipeline: the lease's pipeline with this request's scheduler, VAE,
LoRAs and extra conditioning.

The lease's pipeline is already this job's own object (the store hands out
`from_pipe` copies sharing the weights), so setting its scheduler or VAE never
touches another job. LoRAs are injected into the shared weights; the renderer
holds the weights lock exclusively while they are in (`SharedWeightsLock`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runtime.a1111 import is_no_vae
from runtime.control import JobControl
from runtime.models import Models
from runtime.settings import RuntimeSettings
from runtime.stages.types import Loaded, Plan, StageContext
from sdeks.errors import InvalidParameterError


class SharedWeightsLock:
    """Readers-writer lock over the shared model weights.

    Plain renders share them; a render with prompt LoRAs injects adapters into
    the shared UNet/text encoder (diffusers `load_lora_weights`), so it waits
    for the others and runs alone until the LoRAs are unloaded again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class JobPipelines:
    """Builds each job's pipeline; holds what is shared between jobs (VAEs, compiled UNets)."""

    def __init__(self, models: Models, settings: RuntimeSettings) -> None:
        self.models = models
        self.settings = settings
        self.device = models.device
        self._vae_cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._compiled_unets: dict[int, tuple[Any, Any]] = {}

    @contextmanager
    def job(
        self, pipe: Any, loaded: Loaded, plan: Plan, control: JobControl, family: Any = None
    ) -> Iterator[StageContext]:
        """The job's pipeline for the `with` block; what it put into the shared weights
        (LoRAs, embeddings, tiling, the refiner's lease) is undone when the block ends,
        and also when building it fails half way."""
        ctx = StageContext(
            pipe=pipe,
            loaded=loaded,
            control=control,
            models=self.models,
            settings=self.settings,
            device=self.device,
            family=family,
            vae_loader=self.cached_vae,
        )
        try:
            self._build(ctx, plan)
            yield ctx
        finally:
            self.release(ctx, plan)

    def _build(self, ctx: StageContext, plan: Plan) -> None:
        """Stage 2 on `ctx`. Every change to the shared weights is registered on
        `ctx.undo` (or undone by `release`) as it is made, so a failure at any point
        leaves nothing behind."""
        from runtime.families import diffusers_attr
        from runtime.refiner import check_base

        check_base(plan, ctx.family)  # an SDXL refiner is no base model
        pipe, choice = ctx.pipe, plan.choice
        scheduler_cls = diffusers_attr(choice.scheduler_class)
        ctx.base_scheduler_config = pipe.scheduler.config
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **choice.scheduler_kwargs)
        pipe.set_progress_bar_config(disable=True)
        if self.settings.compile and self.device.startswith("cuda"):
            pipe.unet = self.compiled(pipe.unet)
        vae = self._vae(pipe, ctx.loaded, plan.vae_name)
        if vae is not None:
            pipe.vae = vae
        ctx.lora_note = apply_loras(pipe, plan.loras)
        if plan.embeddings:
            from runtime import embeddings

            hashes = embeddings.attach(pipe, self.models, plan.embeddings, ctx.undo)
            if hashes:
                plan.extra_params["TI hashes"] = ", ".join(hashes)
        for conditioning in plan.conditioning:
            ctx.pipe = conditioning.pipeline(ctx.pipe, ctx)
        if plan.request.tiling:
            from runtime.tiling import circular

            ctx.undo.enter_context(circular(ctx.pipe))
        if plan.refiner is not None:
            from runtime.refiner import attach

            attach(plan, ctx, ctx.undo)

    def release(self, ctx: StageContext, plan: Plan) -> None:
        """Undo what stage 2 put into the shared weights (tiling, embeddings, LoRAs);
        the LoRAs go even when undoing the rest fails."""
        try:
            ctx.undo.close()
        finally:
            if plan.loras:
                # Also after a partial `apply_loras`: the adapters loaded before the
                # failing one are in the shared UNet/text encoder.
                ctx.pipe.unload_lora_weights()

    def compiled(self, unet: Any) -> Any:
        """`torch.compile` of a (shared) UNet, once per UNet: the first render pays the
        compile, later ones of the same shapes run the compiled graph."""
        import torch

        with self._lock:
            compiled = self._compiled_unets.get(id(unet))
            if compiled is None or compiled[0] is not unet:
                compiled = (unet, torch.compile(unet, mode="max-autotune-no-cudagraphs"))
                self._compiled_unets[id(unet)] = compiled
            return compiled[1]

    def _vae(self, pipe: Any, loaded: Loaded, vae_name: str) -> Any:
        """`sd_vae`: "Automatic"/"None" keep the checkpoint's VAE; a name loads `VAE/<name>`."""
        if is_no_vae(vae_name):
            return None
        # Keyed by the checkpoint's name: its title gains ` [hash]` once the hash is
        # known, which would load the same VAE again.
        return self.cached_vae(loaded.name, pipe.vae, vae_name)

    def cached_vae(self, checkpoint: str, like: Any, vae_name: str) -> Any:
        """`VAE/<vae_name>` shaped like `checkpoint`'s VAE `like`, loaded once per pair."""
        key = (checkpoint, vae_name)
        with self._lock:
            if key in self._vae_cache:
                return self._vae_cache[key]
        path = self.models.fetch_vae(vae_name)
        from runtime.vae import load_vae

        vae = load_vae(path, like, self.device)
        with self._lock:
            self._vae_cache[key] = vae
        return vae


def apply_loras(pipe: Any, loras: list[tuple[str, Any, float]]) -> str | None:
    """Inject the prompt LoRAs as adapters; the infotext's note, or None."""
    if not loras:
        return None
    names = []
    for i, (name, path, _weight) in enumerate(loras):
        adapter = f"lora{i}"
        try:
            pipe.load_lora_weights(str(path), adapter_name=adapter)
        except Exception as exc:
            raise InvalidParameterError(
                f"`prompt` LoRA {name!r} could not be loaded: {exc}"[:400]
            ) from exc
        names.append(adapter)
    pipe.set_adapters(names, adapter_weights=[w for _, _, w in loras])
    return ", ".join(f"{n}: {w:g}" for n, _, w in loras)
