"""Stage 6, post-processing: stages that rewrite the finished images, in order.

Each entry of `POST_STAGES` is a `runtime.stages.types.PostStage`: `check`
runs in stage 1 (refuse before model work), `enabled` says whether the request
asks for it, and `run(images, plan, ctx)` returns the rewritten images (same
count and order) while the checkpoint is still leased, so a stage that inpaints
(ADetailer) can use `ctx.pipe`'s weights. A stage adds its infotext fields to
`plan.extra_params`. Face restoration (`restore_faces`) and ADetailer plug in
here by adding themselves to `POST_STAGES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from runtime.face_restoration import FACE_RESTORATION

if TYPE_CHECKING:
    from runtime.stages.types import Plan, PostStage, StageContext


def _registered() -> list[PostStage]:
    from runtime.adetailer import STAGE as ADETAILER

    # Face restoration first, then ADetailer (A1111's order for restore_faces).
    return [FACE_RESTORATION, ADETAILER]


#: The post-processing stages, in the order they run.
POST_STAGES: list[PostStage] = _registered()


def run_post_stages(images: list[Image.Image], plan: Plan, ctx: StageContext) -> list[Image.Image]:
    for stage in POST_STAGES:
        if images and stage.enabled(plan):
            ctx.control.check()
            images = stage.run(images, plan, ctx)
    return images
