"""A1111's selectable scripts (`script_name`, `script_args`) and `/sdapi/v1/scripts`.

A script wraps the whole render: it gets the request and runs the renderer
(`Renderer.generate`) as often as it needs, with requests of its own, then
returns one `RenderResult` (A1111's `Script.run`). `script_name` absent, null
or "" is no script; a name is matched case-insensitively against A1111's
titles; any other name is refused, listing the supported ones. Register a
script by adding it to `SCRIPTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from sdeks.errors import InvalidParameterError

if TYPE_CHECKING:
    from runtime.a1111 import GenerationRequest, Img2ImgRequest
    from runtime.control import JobControl
    from runtime.render import Renderer
    from runtime.stages.types import RenderResult


class Script(Protocol):
    #: A1111's title ("X/Y/Z plot").
    title: str
    #: Where A1111 offers it: "txt2img", "img2img".
    kinds: tuple[str, ...]

    def run(
        self,
        renderer: Renderer,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        options: Mapping[str, Any],
        model: str | None,
        control: JobControl,
    ) -> RenderResult: ...


def _registered() -> list[Script]:
    from runtime.sd_upscale import SD_UPSCALE
    from runtime.xyz_plot import XYZ_PLOT

    return [XYZ_PLOT, SD_UPSCALE]


SCRIPTS: list[Script] = []


def _scripts() -> list[Script]:
    if not SCRIPTS:
        SCRIPTS.extend(_registered())
    return SCRIPTS


def find(request: GenerationRequest, kind: str) -> Script | None:
    """The script `script_name` selects, or None; an unknown name is refused."""
    name = request.script_name
    if name is None or not str(name).strip():
        return None
    wanted = str(name).strip().lower()
    for script in _scripts():
        if script.title.lower() == wanted and kind in script.kinds:
            return script
    supported = [s.title for s in _scripts() if kind in s.kinds]
    raise InvalidParameterError(
        f"`script_name` {name!r} is not supported for {kind}; supported scripts: "
        f"{', '.join(supported) or 'none'}"
    )


def listing() -> dict[str, list[str]]:
    """`/sdapi/v1/scripts`: the scripts a request may name, A1111's lowercase titles,
    then the `alwayson_scripts` some stage reads (ControlNet, ADetailer...)."""
    from runtime.stages.prepare import supported_alwayson_scripts

    alwayson = supported_alwayson_scripts()
    return {
        kind: [s.title.lower() for s in _scripts() if kind in s.kinds] + alwayson
        for kind in ("txt2img", "img2img")
    }
