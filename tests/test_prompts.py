import pytest

from lora_scripts.generation.prompts import LoraRef, parse_prompt


def test_lora_tags_are_parsed_and_removed():
    text, refs = parse_prompt("futuristic cyber lab, glowing interfaces, <lora:sci_lab_lora:0.8>, <lora:neon>")
    assert text == "futuristic cyber lab, glowing interfaces"
    assert refs == [LoraRef("sci_lab_lora", 0.8), LoraRef("neon", 1.0)]


def test_unreadable_weight_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt("a lab <lora:x:strong>")


def test_spaces_extra_fields_negative_and_repeated_tags():
    text, refs = parse_prompt("<lora: neon lab : 0.5 >a lab,<lora:arm:-0.3:lbw=OUTD>, night <lora:neon lab>")
    assert text == "a lab, night"
    assert refs == [LoraRef("neon lab", 0.5), LoraRef("arm", -0.3), LoraRef("neon lab", 1.0)]


@pytest.mark.parametrize("bad", ["a lab <lora:neon:0.5", "a lab <lora::0.5>", "<lora:>"])
def test_unclosed_or_nameless_tags_are_errors(bad):
    with pytest.raises(ValueError, match="not closed|no name|not a number"):
        parse_prompt(bad)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_errors_every_caller_can_report(weight):
    from lora_scripts.errors import LoraScriptsError

    with pytest.raises(LoraScriptsError, match="not a finite number"):  # the CLI prints it; the UI answers 400
        parse_prompt(f"a lab <lora:neon:{weight}>")


def test_a_sweep_reads_tags_with_the_same_parser():
    from lora_scripts.errors import LoraScriptsError
    from lora_scripts.generation.sweeps import with_strength

    swept = with_strength("a lab, <lora: neon :0.3>, <lora:arm:1>", 0.5)
    assert swept == ("a lab, <lora:neon:0.5>, <lora:arm:1>", "neon")
    with pytest.raises(LoraScriptsError, match="'abc' is not a number"):  # not silently swept
        with_strength("a lab <lora:neon:0.3> <lora:arm:abc>", 0.5)
