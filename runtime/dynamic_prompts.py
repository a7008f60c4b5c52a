"""The sd-dynamic-prompts extension (`alwayson_scripts["Dynamic Prompts v2.17.1"]`).

Prompt templates (`a {red|green|blue} car`, `__colors__` wildcards...) are
expanded into one prompt per image by the `dynamicprompts` library, the one
the A1111 extension runs, so a seed picks the same prompts as in A1111.

- **When.** Only with the entry sent switched on (`args[0]` true). A1111 with
  the extension installed expands templates even without an entry (it is on
  by default in its UI); here a prompt holding a literal `{` stays untouched
  unless the client asks for the extension. The key matches
  case-insensitively, with or without its version suffix.
- **`args`** (the extension's `ui()` order): `is_enabled, is_combinatorial,
  combinatorial_batches, is_magic_prompt, is_feeling_lucky,
  is_attention_grabber, min_attention, max_attention, magic_prompt_length,
  magic_temp_value, use_fixed_seed, unlink_seed_from_prompt,
  disable_negative_prompt, enable_jinja_templates, no_image_generation,
  max_generations, magic_model, magic_blocklist_regex`; missing trailing ones
  take the extension's defaults. Magic prompt, I'm feeling lucky, attention
  grabber (language models or a web service), Jinja2 templates and "Don't
  generate images" are refused when on, naming the argument.
- **Random mode**: image i's prompt is sampled with image i's seed
  (`seed + i`); `use_fixed_seed` gives every image the first seed (so one
  prompt), `unlink_seed_from_prompt` draws the prompts from fresh random seeds,
  a variation seed (`subseed_strength` > 0) freezes one prompt for all images.
  The negative prompt is expanded the same way (`disable_negative_prompt`
  only keeps the language-model features off it, as in the extension).
- **Combinatorial mode**: every combination (at most `max_generations`; 0 =
  all) times `combinatorial_batches`, each combination with each expanded
  negative prompt; `batch_size` stays, `n_iter` becomes what the count needs.
  More images than the runtime's `SDEKS_MAX_IMAGES` is refused.
- **Wildcards** `__name__` are the text files `wildcards/<name>.txt` of the
  models bucket (one value per line, `#` comments), fetched when a template
  names them; an unknown wildcard, one that names itself (directly or not),
  a template nested deeper than `MAX_DEPTH` or with more than `MAX_OPTIONS`
  options is refused before any sampling.

Each group of images with the same prompts is rendered as its own request
(`Renderer.generate`), so every stage (hires, refiner, ADetailer, LoRAs named
in a variant) sees that image's own prompt. The result carries the expanded
prompts in `all_prompts` / `all_negative_prompts` and the infotexts, and the
template in `prompt`; with the option `dp_write_raw_template` the infotexts
end with `Template:` / `Negative Template:` lines, as the extension writes them.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Any

from runtime import seeds, styles
from runtime.values import lax_bool, lax_number
from sdeks.errors import InvalidParameterError, ModelNotFoundError

if TYPE_CHECKING:
    from runtime.a1111 import GenerationRequest, Img2ImgRequest
    from runtime.control import JobControl
    from runtime.models import Models
    from runtime.render import Renderer
    from runtime.stages.types import RenderResult

log = logging.getLogger(__name__)

#: `/sdapi/v1/scripts` lists it as A1111 does: the lower-cased title without version.
SCRIPT = "dynamic prompts"
#: The extension's `ui()` return order.
ARGS = (
    "is_enabled",
    "is_combinatorial",
    "combinatorial_batches",
    "is_magic_prompt",
    "is_feeling_lucky",
    "is_attention_grabber",
    "min_attention",
    "max_attention",
    "magic_prompt_length",
    "magic_temp_value",
    "use_fixed_seed",
    "unlink_seed_from_prompt",
    "disable_negative_prompt",
    "enable_jinja_templates",
    "no_image_generation",
    "max_generations",
    "magic_model",
    "magic_blocklist_regex",
)
#: Switches that need a language model, a web service or a template engine: refused on.
REFUSED = {
    "is_magic_prompt": "Magic prompt needs a language model",
    "is_feeling_lucky": "I'm feeling lucky queries a web service",
    "is_attention_grabber": "Attention grabber needs a language model",
    "enable_jinja_templates": "Jinja2 templates are not supported",
    "no_image_generation": "a render always makes images",
}
WILDCARDS_PREFIX = "wildcards/"
#: Bounds on a template (the parser is recursive and about 3 ms per option).
MAX_TEMPLATE_CHARS = 20_000
MAX_DEPTH = 10
MAX_OPTIONS = 1_000
#: Wildcard files: bytes each, and how deep wildcards may name other wildcards.
MAX_WILDCARD_BYTES = 4 * 2**20
MAX_WILDCARD_DEPTH = 10

_KEY_RE = re.compile(r"^dynamic prompts(?:\s+v?\d+(?:\.\d+)*)?$")


def is_key(key: Any) -> bool:
    """Whether an `alwayson_scripts` key names the extension ("Dynamic Prompts v2.17.1")."""
    return isinstance(key, str) and bool(_KEY_RE.match(key.strip().lower()))


@dataclass(frozen=True)
class DynamicPromptsArgs:
    is_combinatorial: bool = False
    combinatorial_batches: int = 1
    use_fixed_seed: bool = False
    unlink_seed_from_prompt: bool = False
    max_generations: int = 0


def parse_args(alwayson_scripts: Mapping[str, Any]) -> DynamicPromptsArgs | None:
    """The switched-on entry's arguments, or None (absent, empty or switched off)."""
    from runtime.builtin_scripts import args_of

    found = [(k, v) for k, v in alwayson_scripts.items() if is_key(k)]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidParameterError(
            f"`alwayson_scripts` names Dynamic Prompts {len(found)} times: "
            f"{', '.join(repr(k) for k, _ in found)}"
        )
    key, value = found[0]
    where = f"alwayson_scripts.{key}.args"
    args = args_of(value)
    if args is None:
        raise InvalidParameterError(f"`{where}` must be a list, got {type(value).__name__}")
    if not args or args[0] is None or not lax_bool(args[0], f"{where}[0]"):
        return None

    def arg(name: str, default: Any) -> Any:
        i = ARGS.index(name)
        return args[i] if i < len(args) and args[i] is not None else default

    def flag(name: str) -> bool:
        return lax_bool(arg(name, False), f"{where}[{ARGS.index(name)}] ({name})")

    for name, why in REFUSED.items():
        if flag(name):
            raise InvalidParameterError(
                f"`{where}[{ARGS.index(name)}]` ({name}) is on: {why} in this runtime "
                "(send it false)"
            )

    def count(name: str, low: int, high: int, default: int) -> int:
        where_i = f"{where}[{ARGS.index(name)}] ({name})"
        return int(lax_number(arg(name, default), where_i, integer=True, low=low, high=high))

    return DynamicPromptsArgs(
        is_combinatorial=flag("is_combinatorial"),
        combinatorial_batches=count("combinatorial_batches", 1, 1000, 1),
        use_fixed_seed=flag("use_fixed_seed"),
        unlink_seed_from_prompt=flag("unlink_seed_from_prompt"),
        max_generations=count("max_generations", 0, 10**9, 0),
    )


@dataclass
class Expansion:
    """One prompt, negative prompt, seed and subseed per image."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]
    template: str
    negative_template: str


# the template checks ------------------------------------------------------------------


@dataclass(frozen=True)
class Syntax:
    variant_start: str = "{"
    variant_end: str = "}"
    wildcard_wrap: str = "__"
    ignore_whitespace: bool = False

    @classmethod
    def of(cls, opts: Mapping[str, Any]) -> Syntax:
        """The extension's parser settings (`dp_parser_*`, `dp_ignore_whitespace`)."""
        values = {}
        for field, option in (
            ("variant_start", "dp_parser_variant_start"),
            ("variant_end", "dp_parser_variant_end"),
            ("wildcard_wrap", "dp_parser_wildcard_wrap"),
        ):
            value = opts.get(option)
            if value is None:
                continue
            if not isinstance(value, str) or not 1 <= len(value) <= 4 or value.isspace():
                raise InvalidParameterError(
                    f"`{option}` must be 1 to 4 characters, got {value!r:.40}"
                )
            values[field] = value
        ignore = opts.get("dp_ignore_whitespace")
        ignore_whitespace = False if ignore is None else lax_bool(ignore, "dp_ignore_whitespace")
        return cls(**values, ignore_whitespace=ignore_whitespace)


def check_template(text: str, field: str, syntax: Syntax) -> None:
    """Refuse what would make the recursive parser crash or crawl (depth, size)."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise InvalidParameterError(
            f"`{field}` is {len(text)} characters, over the Dynamic Prompts template limit "
            f"of {MAX_TEMPLATE_CHARS}"
        )
    depth = deepest = 0
    start, end = syntax.variant_start, syntax.variant_end
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text.startswith(start, i):
            depth += 1
            deepest = max(deepest, depth)
            i += len(start)
            continue
        if text.startswith(end, i):
            depth = max(0, depth - 1)
            i += len(end)
            continue
        i += 1
    if deepest > MAX_DEPTH:
        raise InvalidParameterError(
            f"`{field}` nests Dynamic Prompts variants {deepest} deep, over the limit of {MAX_DEPTH}"
        )
    options = text.count("|") + text.count(start)
    if options > MAX_OPTIONS:
        raise InvalidParameterError(
            f"`{field}` has {options} Dynamic Prompts options, over the limit of {MAX_OPTIONS}"
        )


# wildcards from the models bucket -------------------------------------------------------


def _wildcard_manager(models: Models, syntax: Syntax) -> Any:
    """A `WildcardManager` over the bucket's `wildcards/*.txt`, each fetched when sampled."""
    from dynamicprompts.utils import is_empty_line
    from dynamicprompts.wildcards import WildcardManager
    from dynamicprompts.wildcards.collection import WildcardCollection

    class BucketWildcardFile(WildcardCollection):
        def __init__(self, key: str) -> None:
            self.key = key
            self._values: list[str] | None = None

        def __repr__(self) -> str:
            return self.key

        def get_values(self) -> list[str]:
            if self._values is None:
                path = models.fetch_file(self.key)
                size = path.stat().st_size
                if size > MAX_WILDCARD_BYTES:
                    raise InvalidParameterError(
                        f"wildcard file {self.key} is {size} bytes, over the limit of "
                        f"{MAX_WILDCARD_BYTES}"
                    )
                text = path.read_text(encoding="utf-8", errors="ignore")
                self._values = [
                    line.strip() for line in text.splitlines() if not is_empty_line(line)
                ]
            return self._values

    wrap = syntax.wildcard_wrap
    ref_re = re.compile(re.escape(wrap) + r"(.+?)" + re.escape(wrap))

    class BucketWildcards(WildcardManager):  # type: ignore[misc]
        """Refuses unknown wildcards and wildcards that name themselves, before the
        library recurses into them (it would until Python's recursion limit)."""

        def __init__(self) -> None:
            super().__init__(wildcard_wrap=wrap, root_map={"": [bucket_files(False)]})
            self.refs: dict[str, set[str]] = {}
            self.relisted = False

        def get_values(self, wildcard: str) -> Any:
            values = super().get_values(wildcard)
            name = wildcard.strip()
            if not values.string_values and not self.relisted:
                # Perhaps uploaded since the bucket was last listed: list it once more.
                self.relisted = True
                self._root_map = {"": [bucket_files(True)]}
                self.clear_cache()
                values = super().get_values(wildcard)
            if not values.string_values:
                raise InvalidParameterError(
                    f"Dynamic Prompts wildcard {wrap}{name}{wrap} not found: no "
                    f"{WILDCARDS_PREFIX}{name}.txt in the models bucket"
                )
            if name not in self.refs:
                self.refs[name] = {
                    m.group(1).strip() for v in values.string_values for m in ref_re.finditer(v)
                }
                self._check_cycles(name)
            return values

        def _check_cycles(self, start: str) -> None:
            def walk(name: str, path: list[str]) -> None:
                if len(path) > MAX_WILDCARD_DEPTH:
                    raise InvalidParameterError(
                        "Dynamic Prompts wildcards name each other over "
                        f"{MAX_WILDCARD_DEPTH} deep: {' -> '.join(path)}"
                    )
                for ref in self.refs.get(name, ()):
                    if ref in path:
                        chain = " -> ".join(f"{wrap}{n}{wrap}" for n in [*path, ref])
                        raise InvalidParameterError(f"Dynamic Prompts wildcard recursion: {chain}")
                    walk(ref, [*path, ref])

            walk(start, [start])

    def bucket_files(relist: bool) -> dict[str, Any]:
        return {
            key[len(WILDCARDS_PREFIX) : -len(".txt")]: BucketWildcardFile(key)
            for key in models.file_keys(WILDCARDS_PREFIX, relist=relist)
            if key.endswith(".txt")
        }

    return BucketWildcards()


# expansion -------------------------------------------------------------------------------


def expand(
    template: str,
    negative_template: str,
    args: DynamicPromptsArgs,
    seed_plan: seeds.SeedPlan,
    *,
    max_images: int,
    models: Models,
    syntax: Syntax,
) -> Expansion:
    """The prompts, negative prompts and seeds of every image (the extension's `process`)."""
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.parser.parse import ParserConfig

    for text, field in ((template, "prompt"), (negative_template, "negative_prompt")):
        check_template(text, field, syntax)
    config = ParserConfig(
        variant_start=syntax.variant_start,
        variant_end=syntax.variant_end,
        wildcard_wrap=syntax.wildcard_wrap,
    )
    manager = _wildcard_manager(models, syntax)
    count = len(seed_plan.all_seeds)
    seed, subseed = seed_plan.seed, seed_plan.subseed

    def run(field: str, call: Any) -> list[str]:
        try:
            return [str(p) for p in call()]
        except (InvalidParameterError, ModelNotFoundError):
            raise
        except RecursionError as exc:
            raise InvalidParameterError(
                f"`{field}`: the Dynamic Prompts template nests too deep"
            ) from exc
        except Exception as exc:  # pyparsing's ParseException, the library's own errors
            message = " ".join(str(exc).split())[:200]
            raise InvalidParameterError(
                f"`{field}` is not a valid Dynamic Prompts template: {message}"
            ) from exc

    if args.is_combinatorial:
        batches = args.combinatorial_batches
        limit = args.max_generations or None
        # Ask for one over the bound: more than that is refused, never enumerated.
        wanted = min(limit or max_images + 1, max_images + 1)
        comb = CombinatorialPromptGenerator(
            manager, ignore_whitespace=syntax.ignore_whitespace, parser_config=config
        )
        prompts = run("prompt", lambda: comb.generate(template, wanted)) or [""]
        negatives = run("negative_prompt", lambda: comb.generate(negative_template, wanted)) or [""]
        if limit is None:
            pairs = list(product(prompts, negatives))[: max_images + 1]
        else:
            pairs = [(p, negatives[i % len(negatives)]) for i, p in enumerate(prompts)]
        total = len(pairs) * batches
        if total > max_images:
            raise InvalidParameterError(
                f"`alwayson_scripts.Dynamic Prompts` combinatorial generation makes "
                f"{'over ' if len(pairs) > max_images else ''}{total} images "
                f"(combinations x combinatorial_batches {batches}), over the limit of "
                f"{max_images} images; set max_generations (args[15]) lower"
            )
        all_prompts = [p for _ in range(batches) for p, _n in pairs]
        all_negatives = [n for _ in range(batches) for _p, n in pairs]
        per_batch = len(pairs)
        if args.use_fixed_seed:
            image_seeds = [seed + i // per_batch for i in range(total)]
            subseeds = [subseed] * total
        else:
            strength = seed_plan.subseed_strength
            image_seeds = [seed + (i if strength == 0 else 0) for i in range(total)]
            subseeds = [subseed + i for i in range(total)]
        return Expansion(
            all_prompts, all_negatives, image_seeds, subseeds, template, negative_template
        )

    image_seeds, subseeds = list(seed_plan.all_seeds), list(seed_plan.all_subseeds)
    if args.use_fixed_seed:
        image_seeds, subseeds = [seed] * count, [subseed] * count
    if seed_plan.subseed_strength > 0:
        prompt_seeds = [image_seeds[0]] * count  # a variation seed keeps one prompt
    elif args.unlink_seed_from_prompt:
        prompt_seeds = [secrets.randbelow(seeds.RANDOM_SEED_LIMIT) for _ in range(count)]
    else:
        prompt_seeds = image_seeds
    gen = RandomPromptGenerator(
        manager, seed=seed, ignore_whitespace=syntax.ignore_whitespace, parser_config=config
    )
    prompts = run("prompt", lambda: gen.generate(template, count, seeds=prompt_seeds))
    negatives = run(
        "negative_prompt",
        lambda: gen.generate(
            negative_template, count, seeds=prompt_seeds if negative_template else None
        ),
    )
    negatives = [negatives[i % len(negatives)] for i in range(count)] if negatives else [""] * count
    return Expansion(
        prompts or [""] * count, negatives, image_seeds, subseeds, template, negative_template
    )


# the render --------------------------------------------------------------------------------


def run(
    renderer: Renderer,
    request: GenerationRequest,
    img: Img2ImgRequest | None,
    args: DynamicPromptsArgs,
    *,
    options: Mapping[str, Any],
    model: str | None,
    control: JobControl,
) -> RenderResult:
    """Expand the templates, render each group of equal prompts, merge as one result."""
    from runtime import builtin_scripts
    from runtime.stages.prepare import check_generation, effective_settings

    settings, models = renderer.settings, renderer.models
    builtin_scripts.apply(request)  # A1111's Seed script may set the seed the prompts use
    check_generation(request, settings)
    opts = effective_settings(options, request)
    template, negative_template = styles.apply(
        models, request.styles, request.prompt, request.negative_prompt
    )
    count = request.batch_size * request.n_iter
    seed_plan = seeds.plan_seeds(request.seed, request.subseed, request.subseed_strength, count)
    expansion = expand(
        template,
        negative_template,
        args,
        seed_plan,
        max_images=settings.max_images,
        models=models,
        syntax=Syntax.of(opts),
    )
    log.info("dynamic prompts: %d images from template %.80r", len(expansion.prompts), template)
    results = []
    for sub in _groups(request, expansion, seed_plan.subseed_strength):
        control.check()
        results.append(
            renderer.generate(
                sub,  # type: ignore[arg-type]
                sub if img is not None else None,  # type: ignore[arg-type]
                options=options,
                model=model,
                control=control,
            )
        )
    return _merge(request, expansion, results, opts)


def _groups(
    request: GenerationRequest, expansion: Expansion, strength: float
) -> list[GenerationRequest]:
    """Sub-requests, one per run of images in one A1111 batch with the same prompts and
    the seeds a request of that size would draw (so its render is exactly theirs)."""
    total = len(expansion.prompts)
    size = request.batch_size
    base_scripts = {
        k: v
        for k, v in request.alwayson_scripts.items()
        if not is_key(k) and str(k).lower() != "seed"  # folded in already
    }
    hr_follows = {
        name: getattr(request, name, "") in ("", getattr(request, main))
        for name, main in (("hr_prompt", "prompt"), ("hr_negative_prompt", "negative_prompt"))
    }

    def matches(start: int, k: int) -> bool:
        plan = seeds.plan_seeds(expansion.seeds[start], expansion.subseeds[start], strength, k)
        return (
            plan.all_seeds == expansion.seeds[start : start + k]
            and plan.all_subseeds == expansion.subseeds[start : start + k]
        )

    def sub(start: int, k: int, n_iter: int = 1) -> GenerationRequest:
        update: dict[str, Any] = {
            "prompt": expansion.prompts[start],
            "negative_prompt": expansion.negative_prompts[start],
            "styles": [],  # applied to the template already
            "seed": expansion.seeds[start],
            "subseed": expansion.subseeds[start],
            "batch_size": k,
            "n_iter": n_iter,
            "alwayson_scripts": dict(base_scripts),
        }
        for name, follows in hr_follows.items():
            if follows and name in type(request).model_fields:
                update[name] = ""
        return request.model_copy(update=update)

    same = len(set(zip(expansion.prompts, expansion.negative_prompts, strict=True))) == 1
    if same and total == size * request.n_iter and matches(0, total):
        return [sub(0, size, request.n_iter)]
    out: list[GenerationRequest] = []
    start = 0
    while start < total:
        batch_end = min(total, (start // size + 1) * size)
        k = 1
        while start + k < batch_end and (
            expansion.prompts[start + k] == expansion.prompts[start]
            and expansion.negative_prompts[start + k] == expansion.negative_prompts[start]
            and matches(start, k + 1)
        ):
            k += 1
        out.append(sub(start, k))
        start += k
    return out


def _merge(
    request: GenerationRequest,
    expansion: Expansion,
    results: Sequence[RenderResult],
    opts: Mapping[str, Any],
) -> RenderResult:
    from runtime.stages.types import RenderResult

    first = results[0]
    images = [im for r in results for im in r.images]
    texts = [t for r in results for t in r.infotexts]
    raw = opts.get("dp_write_raw_template")
    if raw is not None and lax_bool(raw, "dp_write_raw_template"):
        extra = ""
        if expansion.template:
            extra += f"\nTemplate: {expansion.template}"
        if expansion.negative_template:
            extra += f"\nNegative Template: {expansion.negative_template}"
        texts = [t + extra for t in texts]
    count = len(images)
    info = dict(first.info)
    info.update(
        prompt=expansion.template,
        all_prompts=[p for r in results for p in r.info.get("all_prompts", [])],
        negative_prompt=expansion.negative_template,
        all_negative_prompts=[p for r in results for p in r.info.get("all_negative_prompts", [])],
        seed=expansion.seeds[0] if expansion.seeds else first.info.get("seed"),
        all_seeds=[s for r in results for s in r.info.get("all_seeds", [])],
        all_subseeds=[s for r in results for s in r.info.get("all_subseeds", [])],
        batch_size=request.batch_size,
        n_iter=math.ceil(count / request.batch_size) if count else request.n_iter,
        infotexts=texts,
        styles=request.styles or [],
    )
    return RenderResult(
        images=images,
        infotexts=texts,
        info=info,
        parameters=request.model_dump(exclude={"init_images", "mask"}),
        seeds=[s for r in results for s in r.seeds],
        model=first.model,
        model_load_ms=sum(r.model_load_ms for r in results),
        inference_ms=sum(r.inference_ms for r in results),
    )
