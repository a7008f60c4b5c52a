"""The X/Y/Z plot script (runtime/xyz_plot.py) and script_name handling (runtime/scripts.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import infotext
from runtime.a1111 import Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from sdeks.errors import InvalidParameterError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def xyz(*args, **fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 11}
    return Txt2ImgRequest(
        **{**base, **fields, "script_name": "X/Y/Z plot", "script_args": list(args)}
    )


def test_xyz_grid_and_one_image_per_cell_with_their_infotexts(renderer):
    # GIVEN A1111's layout: X = Seed (1) "1,2", Y = CFG Scale (6) "3,7", Z nothing,
    # draw_legend False, include_lone_images True
    request = xyz(1, "1,2", [], 6, "3,7", [], 0, "", [], False, True, False, False, 0)
    result = renderer.txt2img(request, options=OPTIONS)

    # THEN the grid (2 columns x 2 rows of 64px cells) then the 4 cells, x fastest
    assert len(result.images) == 5 and result.images[0].size == (128, 128)
    cells = [infotext.parse(t) for t in result.infotexts[1:]]
    assert [(c["Seed"], c["CFG scale"]) for c in cells] == [
        ("1", "3.0"),
        ("2", "3.0"),
        ("1", "7.0"),
        ("2", "7.0"),
    ]
    grid = infotext.parse(result.infotexts[0])
    assert grid["Script"] == "X/Y/Z plot"
    assert (grid["X Type"], grid["X Values"], grid["Y Type"], grid["Y Values"]) == (
        "Seed",
        "1,2",
        "CFG Scale",
        "3,7",
    )
    # each cell's pixels are the grid's, and equal a plain render of that cell's values
    grid_px = np.asarray(result.images[0])
    assert np.array_equal(grid_px[64:, :64], np.asarray(result.images[3]))
    alone = renderer.txt2img(
        Txt2ImgRequest(prompt="a red cube", steps=2, width=64, height=64, seed=2, cfg_scale=3),
        options=OPTIONS,
    )
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(result.images[2]))
    assert result.parameters["script_name"] == "X/Y/Z plot"


def test_xyz_axis_labels_ranges_steps_sampler_prompt_sr_checkpoint_denoising(renderer):
    request = xyz("Steps", "1-3", [], "Prompt S/R", "red,blue", [], 0, "", [], True, True)
    result = renderer.txt2img(request, options=OPTIONS)
    cells = [infotext.parse(t) for t in result.infotexts[1:]]
    assert [c["Steps"] for c in cells] == ["1", "2", "3"] * 2
    assert [c["Prompt"] for c in cells[3:]] == ["a blue cube"] * 3
    assert result.images[0].width > 3 * 64  # the legend adds a margin
    by_choice = renderer.txt2img(
        xyz(9, "", ["Euler", "DPM++ 2M"], 11, "", ["tiny-sd15", "tiny-sdxl"], 0, "", []),
        options=OPTIONS,
    )
    cells = [infotext.parse(t) for t in by_choice.infotexts[1:]]
    assert [(c["Sampler"], c["Model"]) for c in cells] == [
        ("Euler", "tiny-sd15"),
        ("DPM++ 2M", "tiny-sd15"),
        ("Euler", "tiny-sdxl"),
        ("DPM++ 2M", "tiny-sdxl"),
    ]
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 20, 200)).save(buf, format="PNG")
    from runtime.a1111 import Img2ImgRequest

    img = Img2ImgRequest(
        init_images=[base64.b64encode(buf.getvalue()).decode()],
        prompt="p",
        steps=2,
        width=64,
        height=64,
        seed=1,
        script_name="x/y/z plot",
        script_args=["Denoising", "0, 0.5", [], 0, "", [], 0, "", []],
    )
    denoised = renderer.img2img(img, options=OPTIONS)
    cells = [infotext.parse(t) for t in denoised.infotexts[1:]]
    assert [c["Denoising strength"] for c in cells] == ["0.0", "0.5"]
    assert np.asarray(denoised.images[1])[0, 0].tolist() == [90, 20, 200]  # strength 0


def test_script_name_empty_is_no_script_and_others_are_refused_by_name(renderer):
    plain = renderer.txt2img(
        Txt2ImgRequest(prompt="p", steps=2, width=64, height=64, script_name="", script_args=[]),
        options=OPTIONS,
    )
    assert len(plain.images) == 1
    with pytest.raises(InvalidParameterError, match="`script_name` 'Prompt matrix'.*X/Y/Z plot"):
        renderer.txt2img(
            Txt2ImgRequest(prompt="p", steps=2, width=64, height=64, script_name="Prompt matrix"),
            options=OPTIONS,
        )
    with pytest.raises(InvalidParameterError, match="axis 'Prompt order' is not supported"):
        renderer.txt2img(xyz(8, "a,b", [], 0, "", [], 0, "", []), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match="more than 64 values"):
        renderer.txt2img(xyz(1, "1-1000", [], 0, "", [], 0, "", []), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match="did not find 'green'"):
        renderer.txt2img(xyz(7, "green,blue", [], 0, "", [], 0, "", []), options=OPTIONS)


@pytest.mark.parametrize(
    "values",
    [
        "1-1000000000",
        "1-1000000000 (+1)",
        "1-10 [1000000000]",
        "0-1000000000 (+1)",  # on a float axis below
        f"1-{'9' * 4000}",  # len() of this range overflows
        f"1-{'9' * 5000}",  # past int()'s digit limit
    ],
)
def test_huge_ranges_are_refused_before_any_value_is_built(renderer, values):
    import tracemalloc

    axis = 6 if "(+1)" in values and values.startswith("0") else 1  # CFG Scale or Seed
    tracemalloc.start()
    try:
        with pytest.raises(InvalidParameterError) as info:
            renderer.txt2img(xyz(axis, values, [], 0, "", [], 0, "", []), options=OPTIONS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = info.value.message
    assert "`script_args` x_values" in message
    assert "more than 64 values" in message or "not a usable range" in message
    assert peak < 4 * 2**20  # a materialised 3-million item list alone is ~100 MiB


def test_ranges_just_under_the_cap_still_expand(renderer):
    from runtime.xyz_plot import AXES, _values

    seed = next(a for a in AXES if a.label == "Seed")
    cfg = next(a for a in AXES if a.label == "CFG Scale")
    assert _values(seed, "1-64", [], False, "x_values") == list(range(1, 65))
    assert _values(seed, "1-9 (+4), - 3-- 1", [], False, "x_values") == [1, 5, 9, -3, -2, -1]
    assert _values(seed, "0-10 [3]", [], False, "x_values") == [0, 5, 10]
    assert _values(cfg, "1-2 (+0.5)", [], False, "x_values") == [1.0, 1.5, 2.0]
    with pytest.raises(InvalidParameterError, match="more than 64 values"):
        _values(seed, "1-32, 40-72", [], False, "x_values")
