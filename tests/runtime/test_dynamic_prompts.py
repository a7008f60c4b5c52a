"""sd-dynamic-prompts (runtime/dynamic_prompts.py): templates, seeds, bounds, a render."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from runtime import dynamic_prompts, infotext, seeds
from runtime.a1111 import Txt2ImgRequest
from runtime.dynamic_prompts import DynamicPromptsArgs, Syntax, expand, is_key, parse_args
from runtime.model_source import LocalSource
from runtime.model_store import ModelStore
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.errors import InvalidParameterError

CORPUS = Path(__file__).parents[2] / "benchmarks" / "corpus" / "58_dynamic_prompts_on.json"
OPTIONS = dict(DEFAULT_OPTIONS)
RANDOM = DynamicPromptsArgs()


def entry(*args) -> dict:
    """The extension's entry: its 18 defaults, `args` over the first ones."""
    full = [True, False, 1, False, False, False, 1.1, 1.5, 100, 0.7, False, False, True]
    full += [False, False, 0, "Gustavosta/MagicPrompt-Stable-Diffusion", ""]
    full[: len(args)] = args
    return {"args": full}


def on(*args) -> dict:
    return {"Dynamic Prompts v2.17.1": entry(*args)}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp-bucket")
    wild = root / "wildcards"
    (wild / "animals").mkdir(parents=True)
    (wild / "colors.txt").write_text("# the colours\nred\n\ngreen\nblue\n")
    (wild / "animals" / "cats.txt").write_text("tabby\nsiamese\n")
    (wild / "loop.txt").write_text("a __loop__\n")
    (wild / "ping.txt").write_text("__pong__\n")
    (wild / "pong.txt").write_text("__ping__\n")
    return root


@pytest.fixture(scope="module")
def store(bucket: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(LocalSource(bucket), cache_dir=tmp_path_factory.mktemp("dp-cache"))


def run(store, template, n=4, negative="", args=RANDOM, seed=100, strength=0.0, limit=16):
    plan = seeds.plan_seeds(seed, 7, strength, n)
    return expand(template, negative, args, plan, max_images=limit, models=store, syntax=Syntax())


# --- the entry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["Dynamic Prompts v2.17.1", "dynamic prompts", "Dynamic Prompts", "DYNAMIC PROMPTS v2.6"]
)
def test_the_key_matches_with_or_without_its_version(key):
    assert is_key(key)
    assert parse_args({key: entry()}) == RANDOM


@pytest.mark.parametrize("key", ["Dynamic Prompts Pro", "dynamic", "controlnet"])
def test_other_keys_are_not_it(key):
    assert not is_key(key)


@pytest.mark.parametrize("entry", [{}, {"args": []}, {"args": [False, True]}, {"args": ["false"]}])
def test_absent_or_switched_off_is_no_expansion(entry):
    assert parse_args({"Dynamic Prompts v2.17.1": entry}) is None
    assert parse_args({}) is None


def test_short_args_take_the_extension_defaults_and_values_are_read_by_position():
    assert parse_args({"dynamic prompts": {"args": [True]}}) == RANDOM
    args = parse_args(on(True, True, 3, *[False] * 7, True, True, True, False, False, 5))
    assert args == DynamicPromptsArgs(True, 3, True, True, 5)


@pytest.mark.parametrize(
    ("index", "name"),
    [(3, "is_magic_prompt"), (4, "is_feeling_lucky"), (5, "is_attention_grabber")]
    + [(13, "enable_jinja_templates"), (14, "no_image_generation")],
)
def test_switches_that_need_a_language_model_or_more_are_refused_naming_them(index, name):
    entry = on()
    entry["Dynamic Prompts v2.17.1"]["args"][index] = True
    with pytest.raises(InvalidParameterError, match=rf"args\[{index}\]` \({name}\) is on"):
        parse_args(entry)


@pytest.mark.parametrize(("index", "value"), [(2, 0), (2, "x"), (15, -1), (1, "maybe")])
def test_bad_values_are_refused_naming_the_arg(index, value):
    entry = on()
    entry["Dynamic Prompts v2.17.1"]["args"][index] = value
    with pytest.raises(InvalidParameterError, match=rf"args\[{index}\]"):
        parse_args(entry)


# --- the template syntax, class by class ---------------------------------------------------


def test_variants_pick_one_option(store):
    prompts = run(store, "a {red|green|blue} car", n=12).prompts
    assert set(prompts) <= {"a red car", "a green car", "a blue car"} and len(set(prompts)) > 1


def test_nested_variants(store):
    prompts = set(run(store, "{cat|{big|small} dog}", n=16).prompts)
    assert prompts <= {"cat", "big dog", "small dog"} and len(prompts) >= 2


def test_weights_bias_the_choice(store):
    prompts = run(store, "{0.01::rare|100::common}", n=16).prompts
    assert prompts.count("common") >= 14


def test_counts_ranges_and_separators(store):
    two = run(store, "{2$$a|b|c}", n=8).prompts
    assert all(len(set(p.split(","))) == 2 and set(p.split(",")) <= set("abc") for p in two)
    joined = run(store, "{2$$ and $$a|b|c}", n=8).prompts
    assert all(" and " in p for p in joined)
    ranged = run(store, "{1-3$$a|b|c}", n=16).prompts
    assert {len(p.split(",")) for p in ranged} <= {1, 2, 3} and len(set(ranged)) > 1


def test_wildcards_come_from_the_bucket(store):
    prompts = run(store, "a __colors__ __animals/cats__", n=16).prompts
    colours = {p.split()[1] for p in prompts}
    assert colours <= {"red", "green", "blue"} and len(colours) > 1  # comment and blank skipped
    assert {p.split()[2] for p in prompts} <= {"tabby", "siamese"}
    assert set(run(store, "__animals/*__", n=8).prompts) <= {"tabby", "siamese"}


def test_comments_are_dropped(store):
    assert run(store, "a car # not this", n=1).prompts == ["a car "]


def test_a1111_syntax_outside_variants_is_kept(store):
    text = "(best quality:1.2), <lora:foo:0.7>, [cat:dog:0.5], BREAK"
    assert run(store, text, n=1).prompts == [text]


# --- seeds -------------------------------------------------------------------------------


def test_random_mode_is_reproducible_per_seed_and_varies_across_the_batch(store):
    template = "{a|b|c} {d|e|f} {g|h|i}"
    first = run(store, template, n=8)
    assert run(store, template, n=8).prompts == first.prompts
    assert len(set(first.prompts)) > 1
    assert first.seeds == list(range(100, 108))
    # Image i's prompt comes from its own seed: the batch from seed 101 is this one shifted.
    assert run(store, template, n=7, seed=101).prompts == first.prompts[1:]
    assert run(store, template, n=8, seed=5000).prompts != first.prompts


def test_negative_prompts_are_expanded_with_the_image_seeds(store):
    out = run(store, "x", n=8, negative="{ugly|blurry|dark}")
    assert set(out.negative_prompts) <= {"ugly", "blurry", "dark"}
    assert len(set(out.negative_prompts)) > 1


def test_fixed_seed_gives_every_image_the_first_seed_and_prompt(store):
    out = run(store, "{a|b|c|d|e|f}", n=6, args=DynamicPromptsArgs(use_fixed_seed=True))
    assert out.seeds == [100] * 6 and len(set(out.prompts)) == 1


def test_a_variation_seed_freezes_the_prompt(store):
    out = run(store, "{a|b|c|d|e|f}", n=6, strength=0.5)
    assert len(set(out.prompts)) == 1 and out.subseeds == list(range(7, 13))


def test_unlinked_seed_still_gives_valid_prompts(store):
    out = run(store, "{a|b}", n=8, args=DynamicPromptsArgs(unlink_seed_from_prompt=True))
    assert set(out.prompts) <= {"a", "b"} and out.seeds == list(range(100, 108))


# --- combinatorial -----------------------------------------------------------------------


def test_combinatorial_makes_every_combination(store):
    comb = DynamicPromptsArgs(is_combinatorial=True)
    out = run(store, "{a|b|c} {x|y}", args=comb)
    assert out.prompts == ["a x", "a y", "b x", "b y", "c x", "c y"]
    assert out.seeds == list(range(100, 106))
    crossed = run(store, "{a|b}", negative="{n|m}", args=comb)
    assert list(zip(crossed.prompts, crossed.negative_prompts, strict=True)) == [
        ("a", "n"),
        ("a", "m"),
        ("b", "n"),
        ("b", "m"),
    ]


def test_combinatorial_max_generations_and_batches(store):
    capped = run(store, "{a|b|c|d|e}", args=DynamicPromptsArgs(True, max_generations=3))
    assert capped.prompts == ["a", "b", "c"]
    repeated = run(store, "{a|b}", args=DynamicPromptsArgs(True, 3, use_fixed_seed=True))
    assert repeated.prompts == ["a", "b"] * 3
    assert repeated.seeds == [100, 100, 101, 101, 102, 102]


def test_too_many_combinations_are_refused_without_enumerating_them(store):
    comb = DynamicPromptsArgs(is_combinatorial=True)
    with pytest.raises(InvalidParameterError, match="over the limit of 16 images"):
        run(store, "{a|b}" * 40, args=comb)  # 2^40 combinations
    with pytest.raises(InvalidParameterError, match=r"12 images.*combinatorial_batches 3"):
        run(store, "{a|b|c|d}", args=DynamicPromptsArgs(True, 3), limit=10)


# --- hostile templates: bounded, clear errors --------------------------------------------


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{" * 60 + "a" + "}" * 60, "nests Dynamic Prompts variants 60 deep"),
        ("x" * 30_000, "30000 characters"),
        ("{" + "|".join("o" * 3 for _ in range(1500)) + "}", "1500 Dynamic Prompts options"),
        ("a {red|green car", "`prompt` is not a valid Dynamic Prompts template"),
        ("__loop__", r"wildcard recursion: __loop__ -> __loop__"),
        ("__ping__", r"recursion: __p[io]ng__ -> __p[io]ng__ -> __p[io]ng__"),
        ("a __nope__ car", r"wildcard __nope__ not found: no wildcards/nope.txt"),
    ],
)
def test_hostile_templates_are_refused_clearly(store, template, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        run(store, template, n=2)


def test_a_huge_count_is_bounded_by_the_options(store):
    prompts = run(store, "{1-1000000$$a|b|c}", n=4).prompts
    assert all(set(p.split(",")) <= set("abc") for p in prompts)


def test_a_bad_negative_template_names_its_field(store):
    with pytest.raises(InvalidParameterError, match="`negative_prompt` is not a valid"):
        run(store, "x", negative="{a|b")


# --- a render ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_root(tiny_models_dir: Path, bucket: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dp-models")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", root / "Stable-diffusion")
    shutil.copytree(bucket / "wildcards", root / "wildcards")
    return root


@pytest.fixture(scope="module")
def renderer(models_root: Path, tmp_path_factory) -> Renderer:
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def test_a_render_carries_each_images_own_prompt(renderer):
    request = Txt2ImgRequest(
        prompt="a {red|green|blue} __animals/cats__",
        negative_prompt="{dark|blurry}",
        steps=2,
        width=64,
        height=64,
        seed=11,
        batch_size=2,
        n_iter=2,
        alwayson_scripts=on(),
        override_settings={"dp_write_raw_template": True},
    )
    result = renderer.txt2img(request, options=OPTIONS)
    plan = seeds.plan_seeds(11, -1, 0.0, 4)
    wanted = expand(
        request.prompt,
        request.negative_prompt,
        RANDOM,
        plan,
        max_images=16,
        models=renderer.models,
        syntax=Syntax(),
    )
    assert len(result.images) == 4
    assert result.info["all_prompts"] == wanted.prompts
    assert result.info["all_negative_prompts"] == wanted.negative_prompts
    assert result.info["all_seeds"] == [11, 12, 13, 14] and result.seeds == [11, 12, 13, 14]
    assert result.info["prompt"] == request.prompt
    for text, prompt, seed in zip(result.infotexts, wanted.prompts, [11, 12, 13, 14], strict=True):
        # The extension appends its lines after the parameters line, as here.
        parsed = infotext.parse(text.split("\nTemplate: ")[0])
        assert parsed["Prompt"] == prompt and parsed["Seed"] == str(seed)
        assert text.endswith(
            "\nTemplate: a {red|green|blue} __animals/cats__\nNegative Template: {dark|blurry}"
        )


def test_an_image_renders_as_its_own_prompt_would_alone(renderer):
    import numpy as np

    body = {"steps": 2, "width": 64, "height": 64, "seed": 5}
    dynamic = renderer.txt2img(
        Txt2ImgRequest(prompt="{a cat|a dog}", n_iter=3, alwayson_scripts=on(), **body),
        options=OPTIONS,
    )
    prompt = dynamic.info["all_prompts"][1]
    alone = renderer.txt2img(Txt2ImgRequest(prompt=prompt, **{**body, "seed": 6}), options=OPTIONS)
    assert np.array_equal(np.asarray(dynamic.images[1]), np.asarray(alone.images[0]))


def test_combinatorial_render_sets_the_image_count(renderer):
    request = Txt2ImgRequest(
        prompt="{a|b|c} car",
        steps=1,
        width=64,
        height=64,
        seed=1,
        batch_size=2,
        alwayson_scripts=on(True, True),
    )
    result = renderer.txt2img(request, options=OPTIONS)
    assert result.info["all_prompts"] == ["a car", "b car", "c car"]
    assert len(result.images) == 3 and result.info["n_iter"] == 2


def test_corpus_body_renders_through_the_api_with_expanded_prompts(models_root, tmp_path):
    from runtime.app import create_app

    body = json.loads(CORPUS.read_text())["body"]
    body.update(steps=2, width=64, height=64, seed=42, batch_size=3)
    settings = RuntimeSettings(default_model="tiny-sd15", models=str(models_root))
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path)
    with TestClient(create_app(settings, models=store)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        listed = client.get("/sdapi/v1/scripts").json()
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert len(answer.json()["images"]) == 3
    assert info["prompt"] == "a {red|green|blue} car"
    assert set(info["all_prompts"]) <= {"a red car", "a green car", "a blue car"}
    assert (
        dynamic_prompts.SCRIPT in listed["txt2img"] and dynamic_prompts.SCRIPT in listed["img2img"]
    )


def test_a_wildcard_uploaded_after_the_listing_is_found(tmp_path):
    from runtime.model_store import StoreLimits

    (tmp_path / "bucket" / "wildcards").mkdir(parents=True)
    (tmp_path / "bucket" / "wildcards" / "one.txt").write_text("first\n")
    fresh = ModelStore(
        LocalSource(tmp_path / "bucket"),
        cache_dir=tmp_path / "cache",
        limits=StoreLimits(relist_after_s=0),
    )
    assert run(fresh, "__one__", n=1).prompts == ["first"]
    (tmp_path / "bucket" / "wildcards" / "late.txt").write_text("later\n")
    assert run(fresh, "__late__", n=1).prompts == ["later"]
