"""The typed values passed between the render stages, and the two extension protocols.

- `Plan` (stage 1's output): everything known about a request before any model
  work: checkpoint, sampler, seeds, prompt, LoRA files, VAE, init image and mask.
- `StageContext` (stage 2's output): the job's own pipeline and what it was
  built from, shared by every later stage.
- `Batch`: one `n_iter` batch between the passes, as latents or as images.
- `Conditioning`: extra conditioning a feature adds to the denoise calls.
- `PostStage`: a stage that rewrites the finished images (face restoration, ADetailer).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from PIL import Image

if TYPE_CHECKING:
    from pathlib import Path

    from runtime import samplers, seeds
    from runtime.a1111 import GenerationRequest, Img2ImgRequest
    from runtime.control import JobControl
    from runtime.hires import HiresPlan
    from runtime.models import Models, PipelineKind
    from runtime.refiner import RefinerPlan
    from runtime.settings import RuntimeSettings


@dataclass(frozen=True)
class Loaded:
    """What the results say about the model a render used (from the store's lease)."""

    #: The store's name for the checkpoint (`sub/foo.safetensors`, `bar`): unlike
    #: `title`, it stays the same once the hash becomes known.
    name: str
    title: str
    model_name: str
    hash: str | None
    load_ms: int
    inpainting_unet: bool

    @classmethod
    def of(cls, lease: Any) -> Loaded:
        name = lease.name
        for suffix in (".safetensors", ".ckpt"):
            name = name.removesuffix(suffix)
        unet = getattr(lease.pipeline, "unet", None)
        return cls(
            name=lease.name,
            title=lease.title,
            model_name=name,
            hash=lease.hash,
            load_ms=lease.timings.model_load_ms,
            inpainting_unet=bool(unet is not None and unet.config.in_channels == 9),
        )


@dataclass
class RenderResult:
    images: list[Image.Image]
    infotexts: list[str]
    info: dict[str, Any]
    parameters: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    model: str | None = None
    model_load_ms: int = 0
    inference_ms: int = 0


@dataclass
class Plan:
    """Stage 1's output: a request checked and resolved, before any model work."""

    request: GenerationRequest
    #: The img2img request (same object as `request`) or None for txt2img.
    img: Img2ImgRequest | None
    #: A1111 options in force for this request (persisted options + override_settings).
    opts: dict[str, Any]
    checkpoint: str
    kind: PipelineKind
    choice: samplers.SamplerChoice
    plan: seeds.SeedPlan
    #: The prompt to encode: styles applied, without its `<lora:...>` tags.
    prompt: str
    #: The negative prompt, styles applied.
    negative_prompt: str
    #: The prompt as the infotext shows it: styles applied, `<lora:...>` tags kept.
    display_prompt: str
    #: (name, local file, weight) of each prompt LoRA.
    loras: list[tuple[str, Path, float]]
    clip_skip: int | None
    vae_name: str
    init_image: Image.Image | None
    mask: Image.Image | None
    #: Denoising strength of the first pass (img2img; 0.75 when absent, as A1111).
    strength: float
    #: A1111's `initial_noise_multiplier` of the img2img first pass (1.0: none; txt2img 1.0).
    noise_multiplier: float = 1.0
    #: Infotext fields features add (A1111 `p.extra_generation_params`), in order.
    extra_params: dict[str, Any] = field(default_factory=dict)
    #: Extra conditioning for the denoise calls, built by `runtime.conditioning`.
    conditioning: list[Conditioning] = field(default_factory=list)
    #: The hires pass (stage 4), or None.
    hires: HiresPlan | None = None
    #: The refiner (stage 5), or None.
    refiner: RefinerPlan | None = None
    #: The textual-inversion embeddings the prompts name (model-store entries).
    embeddings: list[Any] = field(default_factory=list)

    @property
    def changes_weights(self) -> bool:
        """Whether the render changes the shared weights (LoRAs, tiling): it runs alone."""
        return bool(self.loras) or bool(self.request.tiling) or bool(self.embeddings)


@dataclass
class StageContext:
    """Stage 2's output, shared by the later stages of one render."""

    pipe: Any
    loaded: Loaded
    control: JobControl
    models: Models
    settings: RuntimeSettings
    device: str
    #: The checkpoint's `runtime.families.Family` (to derive other pipeline kinds).
    family: Any = None
    #: "lora0: 0.8, ..." for the infotext, or None.
    lora_note: str | None = None
    #: The checkpoint's own scheduler config, before stage 2 set this request's sampler
    #: on `pipe` (a pass with another sampler starts from it, so the render's options,
    #: Karras sigmas for one, do not leak into it).
    base_scheduler_config: Any = None
    #: `(checkpoint, like, vae_name) -> VAE`: stage 2's VAE cache, for passes that
    #: decode with another VAE (ADetailer's `ad_vae`); None: load it.
    vae_loader: Any = None
    #: The refiner's UNet, swapped in by the last pass's step hook (stage 5).
    refiner_unet: Any = None
    #: An SDXL-architecture refiner's own conditioning (`runtime.refiner`), else None.
    refiner_conditioning: Any = None
    #: What stage 2 changed in the shared weights, undone when the render ends.
    undo: ExitStack = field(default_factory=ExitStack)


@dataclass
class Batch:
    """One `n_iter` batch between the passes: latents (a pass follows) or images."""

    #: Which `n_iter` batch (0-based).
    index: int
    #: Indices of its images among all images of the request.
    indices: range
    latents: Any = None
    images: list[Image.Image] | None = None
    #: Where the batch's denoising stopped (refiner: `refiner_switch_at`); 1.0 = done.
    denoised_to: float = 1.0


PassName = Literal["first", "hires"]


class Conditioning(Protocol):
    """Extra conditioning for the denoise calls of one render (e.g. ControlNet units).

    Built per request by a `ConditioningProvider` (`runtime.conditioning`); the
    denoise stage calls `pipeline` once on the job's pipeline and merges
    `call_kwargs` into every pipeline call of every pass.
    """

    def pipeline(self, pipe: Any, ctx: StageContext) -> Any:
        """The pipeline to denoise with: `pipe`, or a `from_pipe` copy with extra
        components (a ControlNet pipeline sharing `pipe`'s weights)."""
        ...

    def call_kwargs(
        self, batch: Batch, pass_name: PassName, width: int, height: int
    ) -> dict[str, Any]:
        """Arguments added to the pipeline call (`image=` control images, scales)."""
        ...

    def release(self) -> None:
        """Unpin what `build` pinned (the render calls it once, whatever happened)."""
        ...


class PostStage(Protocol):
    """A stage that rewrites the finished images (stage 6), in `POST_STAGES` order."""

    #: The `alwayson_scripts` key this stage reads (e.g. "adetailer"), or None.
    script: str | None

    def check(self, plan: Plan, models: Models, settings: RuntimeSettings) -> None:
        """Refuse what this stage cannot do, before any model work."""
        ...

    def enabled(self, plan: Plan) -> bool: ...

    def run(self, images: list[Image.Image], plan: Plan, ctx: StageContext) -> list[Image.Image]:
        """The images rewritten (same count and order); may add `plan.extra_params`."""
        ...
