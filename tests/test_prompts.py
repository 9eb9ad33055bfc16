import pytest

from lora_scripts.prompts import LoraRef, parse_prompt


def test_lora_tags_are_parsed_and_removed():
    text, refs = parse_prompt("futuristic cyber lab, glowing interfaces, <lora:sci_lab_lora:0.8>, <lora:neon>")
    assert text == "futuristic cyber lab, glowing interfaces"
    assert refs == [LoraRef("sci_lab_lora", 0.8), LoraRef("neon", 1.0)]


def test_unreadable_weight_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt("a lab <lora:x:strong>")
