"""A1111 prompt semantics: emphasis parsing, chunking past 77 tokens, encoding."""

from __future__ import annotations

import pytest

from runtime.prompts import chunk_tokens, encode, parse_prompt_attention, tokenize


@pytest.mark.parametrize(
    ("text", "parsed"),
    [  # the examples of A1111's `parse_prompt_attention` docstring
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_prompt_attention_matches_a1111(text, parsed):
    assert parse_prompt_attention(text) == parsed


def test_chunks_of_75_and_break():
    chunks = chunk_tokens([(list(range(160)), 1.0)])
    assert [len(ids) for ids, _ in chunks] == [75, 75, 10]
    broken = chunk_tokens([([1, 2], 1.2), ([], -1.0), ([3], 1.0)])
    assert broken == [([1, 2], [1.2, 1.2]), ([3], [1.0])]
    assert chunk_tokens([]) == [([], [])]


@pytest.fixture(scope="module")
def pipes():
    from runtime.tiny import build_tiny_pipeline

    return {family: build_tiny_pipeline(family) for family in ("sd15", "sdxl")}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_plain_short_prompt_encodes_as_diffusers(pipes, family, clip_skip):
    import torch

    pipe = pipes[family]
    ours = encode(pipe, "a red cube", "blurry", clip_skip, batch=2)
    if family == "sd15":
        # diffusers 0.42 reads `text_encoder.text_model` for clip skip, which
        # transformers 5 flattened away; alias it for the reference computation.
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
        theirs, negative = pipe.encode_prompt(
            "a red cube", "cpu", 2, True, "blurry", clip_skip=clip_skip
        )
        expected = {"prompt_embeds": theirs, "negative_prompt_embeds": negative}
    else:
        out = pipe.encode_prompt(
            "a red cube",
            device="cpu",
            num_images_per_prompt=2,
            negative_prompt="blurry",
            clip_skip=clip_skip,
        )
        keys = (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
        expected = dict(zip(keys, out, strict=True))
    assert set(ours) == set(expected)
    if clip_skip:
        # diffusers skips layers for the prompt only; A1111 (and we) for the negative
        # too, so the negative is encoded exactly as a prompt would be.
        expected = {k: v for k, v in expected.items() if not k.startswith("negative")}
        as_prompt = encode(pipe, "blurry", "x", clip_skip, batch=2)["prompt_embeds"]
        assert torch.equal(ours["negative_prompt_embeds"], as_prompt)
    for key, value in expected.items():
        assert torch.allclose(ours[key], value, atol=1e-5), key


def test_emphasis_and_long_prompts_change_the_embedding(pipes):
    import torch

    pipe = pipes["sd15"]
    plain = encode(pipe, "a red cube", "", None, batch=1)["prompt_embeds"]
    emphasised = encode(pipe, "a (red:1.5) cube", "", None, batch=1)["prompt_embeds"]
    assert plain.shape == emphasised.shape
    assert not torch.allclose(plain, emphasised)

    long_prompt = ", ".join(["a red cube"] * 40)
    assert len(tokenize(pipe.tokenizer, long_prompt)) > 1
    out = encode(pipe, long_prompt, "short", None, batch=1)
    # Two or more 77-token chunks, and the negative side padded to the same length.
    assert out["prompt_embeds"].shape[1] % 77 == 0 and out["prompt_embeds"].shape[1] > 77
    assert out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape
