"""A1111 infotext: format, quoting, and parsing back."""

from __future__ import annotations

from runtime import infotext


def test_format_then_parse_round_trips():
    params = {
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7.0,
        "Seed": 476701233,
        "Size": "512x512",
        "Model hash": None,
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": 0.75,
        "Version": "sdeks-runtime",
    }
    text = infotext.format_infotext("a cat, wizard\nsecond line", "blurry: bad, ugly", params)

    assert text.splitlines()[0] == "a cat, wizard"
    assert text.splitlines()[2] == "Negative prompt: blurry: bad, ugly"
    assert "Model hash" not in text
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == "a cat, wizard\nsecond line"
    assert parsed["Negative prompt"] == "blurry: bad, ugly"
    assert parsed["Steps"] == "20"
    assert parsed["CFG scale"] == "7.0"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["Model"] == "v1-5-pruned-emaonly"


def test_values_with_commas_are_quoted():
    text = infotext.format_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Model": "a, b: c"})
    assert 'Model: "a, b: c"' in text
    assert infotext.parse(text)["Model"] == "a, b: c"


def test_parses_a1111_sample_infotext():
    # From the A1111 response in the shared reference (seeds/000_*.txt).
    text = (
        "an astronaut riding a horse\nSteps: 30, Sampler: DPM++ SDE Karras, CFG scale: 7.0, "
        "Seed: 476701233, Size: 512x512, Model: deliberate_v2, Denoising strength: 0, "
        "Version: 1.5.1"
    )
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == "an astronaut riding a horse"
    assert parsed["Negative prompt"] == ""
    assert parsed["Sampler"] == "DPM++ SDE Karras"
    assert parsed["Seed"] == "476701233"
    assert parsed["Version"] == "1.5.1"


def test_prompt_only_text_is_all_prompt():
    assert infotext.parse("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
