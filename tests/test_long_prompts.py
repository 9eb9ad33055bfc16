"""max_token_length 150/225: captions read in 75-token windows as sd-scripts does, for every family."""

import pytest
import torch

from conftest import make_images, seed_config
from lora_scripts.config import load_config
from lora_scripts.families.clip_tokenizer import write_clip_tokenizer_files
from lora_scripts.families.loading import load_base_model
from lora_scripts.families.long_prompts import chunked_ids, join_windows

LONG = "sci_lab, " + ", ".join(f"glowing console number {i} with blue light" for i in range(14)) + ", trigger_at_end"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("tok")
    return {pad: CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(root / name, pad_token=pad))
            for name, pad in (("l", "<|endoftext|>"), ("g", "!"))}


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_windows_are_framed_prompts_of_75_tokens(tokenizers, pad):
    tok = tokenizers[pad]
    plain = tok([LONG], truncation=False, add_special_tokens=False).input_ids[0]
    assert 75 < len(plain) < 150
    ids = chunked_ids(tok, [LONG, "a lab"], 3)
    bos, eos, pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids.shape == (2, 3, 77) and (ids[:, :, 0] == bos).all()
    assert ids[0, 0, 1:76].tolist() == plain[:75] and ids[0, 0, 76] == eos  # a cut window still ends
    assert ids[0, 1, 1:1 + len(plain) - 75].tolist() == plain[75:] and ids[0, 1, 1 + len(plain) - 75] == eos
    if pad != "<|endoftext|>":  # a window of padding only starts with an end token (sd-scripts' get_input_ids)
        assert ids[0, 2, 1] == eos and set(ids[0, 2, 2:].tolist()) == {pad_id}
    assert torch.equal(chunked_ids(tok, [LONG], 1)[:, 0], tok([LONG], padding="max_length", truncation=True,
                                                                max_length=77, return_tensors="pt").input_ids)


def test_join_keeps_one_start_every_inner_position_and_the_last_end():
    hidden = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(6, 77, 1)
    joined = join_windows(hidden, 2)
    assert joined.shape == (2, 227, 1)
    per = hidden.reshape(2, 3, 77, 1)
    assert joined[1, 0, 0] == per[1, 0, 0, 0] and joined[1, -1, 0] == per[1, 2, 76, 0]
    assert torch.equal(joined[1, 76:151], per[1, 1, 1:76])


@pytest.mark.parametrize("base", ["tiny_ckpt", "tiny_sdxl_ckpt"])
def test_words_past_75_tokens_reach_the_conditioning_only_with_long_windows(base, request):
    model = load_base_model(request.getfixturevalue(base))
    family = model.family

    def cond(caption, chunks):
        with torch.no_grad():
            return family.encode(model.text_encoders, family.tokenize(model.tokenizers, [caption], chunks), "cpu")

    short, long = cond(LONG, 1), cond(LONG.replace("trigger_at_end", "a red dragon"), 1)
    assert torch.equal(short.hidden, long.hidden)  # cut at 75: the end never reached the model
    a, b = cond(LONG, 3), cond(LONG.replace("trigger_at_end", "a red dragon"), 3)
    assert a.hidden.shape[1] == 227 and not torch.equal(a.hidden, b.hidden)
    # CLIP attends causally: the first window's start and 75 tokens are exactly what a 77-token prompt gives.
    torch.testing.assert_close(a.hidden[:, :76], short.hidden[:, :76], rtol=1e-5, atol=1e-6)
    if family.name == "sdxl":  # pooled from the first window, as sd-scripts takes it
        assert torch.equal(a.extras["pooled"], b.extras["pooled"]) and a.extras["pooled"].shape == (1, 48)


def test_an_sdxl_run_with_225_tokens_trains_and_says_so(tmp_path, tiny_sdxl_ckpt):
    from lora_scripts.data.check import dataset_warnings
    from lora_scripts.data.scan import scan_dataset
    from lora_scripts.interop.lora_file import read_lora
    from lora_scripts.training.loop import train

    folder = tmp_path / "data" / "sci_lab_train"
    for name in make_images(folder, 4):
        (folder / name).with_suffix(".txt").write_text(LONG)
    cfg = load_config(seed_config(tmp_path, tiny_sdxl_ckpt, metadata_path=None, max_train_steps=2, batch_size=2,
                                  max_token_length=225))
    samples = scan_dataset(cfg)
    assert not [f for f in dataset_warnings(samples, cfg) if "tokens" in f.message]  # 125 tokens fit in 225
    at_75 = cfg.model_copy(update={"max_token_length": 75})
    assert any("set max_token_length: 225" in f.message for f in dataset_warnings(samples, at_75))
    result = train(cfg)
    assert "0 unmatched" in result.verified
    assert read_lora(result.lora_path).metadata["ss_max_token_length"] == "225"
