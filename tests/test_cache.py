"""Latent and text-embedding caches: same training as without them, hits, invalidation on edit, flips."""

import logging

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.data.images import fit_to_bucket, open_rgb, to_tensor
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer

RUN = dict(max_train_steps=6, batch_size=2, flip_aug=True, save_precision="fp32", learning_rate=1e-3,
           verify_after_training=False)


def test_cached_training_equals_uncached(tmp_path, dataset, tiny_ckpt):
    plain = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/plain", cache_latents=False,
                                          cache_text_encoder_outputs=False, **RUN)))
    cached = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/cached", **RUN)))
    a, b = load_file(str(plain.lora_path)), load_file(str(cached.lora_path))
    for k in a:  # the same draws from the same generators; only the VAE's batch-of-1 vs batch-of-2 rounding differs
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_up" in k)


def _setup(tmp_path, tiny_ckpt, **kw):
    return Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **{**RUN, "cache_latents_to_disk": True, **kw}))).setup()


def test_disk_cache_hits_and_an_edited_image_is_encoded_again(tmp_path, dataset, tiny_ckpt):
    first = _setup(tmp_path, tiny_ckpt)
    assert (first.latent_cache.encoded, first.latent_cache.hits) == (16, 0)  # 8 images x (plain, flipped)
    second = _setup(tmp_path, tiny_ckpt)
    assert (second.latent_cache.encoded, second.latent_cache.hits) == (0, 16)
    arr = np.asarray(Image.open(dataset / "img_003.png")).copy()
    arr[:4] = 255 - arr[:4]
    Image.fromarray(arr).save(dataset / "img_003.png")
    third = _setup(tmp_path, tiny_ckpt)
    assert (third.latent_cache.encoded, third.latent_cache.hits) == (2, 14)  # only the edited image, both flips
    fourth = _setup(tmp_path, tiny_ckpt, resolution=64, bucket_reso_steps=64)
    assert fourth.latent_cache.encoded == 16  # another resolution: other buckets, other entries


def test_flip_is_cached_as_its_own_encoding(tmp_path, dataset, tiny_ckpt):
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :8] = (250, 40, 40)  # a bar on the left: its mirror image differs
    Image.fromarray(arr).save(dataset / "img_000.png")
    t = _setup(tmp_path, tiny_ckpt)
    item = next(i for i in t.items if i.sample.path.name == "img_000.png")
    plain, flipped = t.latent_cache.get(item, False), t.latent_cache.get(item, True)
    assert not torch.equal(plain.mean, flipped.mean)
    pixels = to_tensor(fit_to_bucket(open_rgb(item.sample.path), item.bucket, None), flip=True)
    with torch.no_grad():
        direct = t.model.vae.to("cpu").encode(pixels[None]).latent_dist.mean[0]
    torch.testing.assert_close(flipped.mean, direct, rtol=1e-5, atol=1e-5)


def test_random_crop_turns_the_latent_cache_off_and_says_why(tmp_path, dataset, tiny_ckpt, caplog):
    with caplog.at_level(logging.INFO):
        t = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, random_crop=True, **RUN))).setup()
    assert t.latent_cache is None and "random_crop changes the pixels every step" in caplog.text
    assert t.text_cache is not None  # captions are still used as written


def test_text_cache_is_off_when_captions_change_per_step(tmp_path, dataset, tiny_ckpt):
    t = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, shuffle_caption=True, **RUN))).setup()
    assert t.text_cache is None and t.latent_cache is not None


def test_text_disk_cache_hits_and_is_keyed_by_tokens_and_encoders(tmp_path, dataset, tiny_ckpt):
    """Same embeddings read back as encoded; a longer token window or a changed encoder weight misses; a damaged
    file is encoded again, never trusted."""
    def setup(**kw):
        return Trainer(load_config(seed_config(tmp_path, tiny_ckpt, cache_text_encoder_outputs_to_disk=True,
                                               **dict(RUN, **kw)))).setup()

    first = setup()
    n = len(first.text_cache.entries)
    assert (first.text_cache.encoded, first.text_cache.hits) == (n, 0) and n > 1
    files = sorted((dataset / ".lora-scripts-cache").glob("text-*.safetensors"))
    assert len(files) == n
    second = setup()
    assert (second.text_cache.encoded, second.text_cache.hits) == (0, n)
    for caption, entry in first.text_cache.entries.items():
        assert torch.equal(second.text_cache.entries[caption].hidden, entry.hidden)
    assert setup(max_token_length=150).text_cache.encoded == n  # two 75-token windows: other ids, other entries
    files[0].write_bytes(b"not a safetensors file")
    assert setup().text_cache.encoded == 1

    from lora_scripts.data.cache import encoders_identity

    encoders = second.model.text_encoders
    before = encoders_identity(encoders)
    name = next(n for n, _ in next(iter(encoders.values())).named_parameters() if "final_layer_norm.weight" in n)
    with torch.no_grad():
        dict(next(iter(encoders.values())).named_parameters())[name][0] += 0.01
    assert encoders_identity(encoders) != before


def test_only_a_disk_cache_makes_the_other_processes_wait_for_the_main_one(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """Under several processes a disk cache is written by the main process and then read by the others; a cache in
    memory is filled by every process at once (in turn, the others would wait as long again for nothing)."""
    import contextlib

    from accelerate import Accelerator

    entered = []

    @contextlib.contextmanager
    def main_first(self):
        entered.append(True)
        yield

    monkeypatch.setattr(Accelerator, "main_process_first", main_first)
    trainer = _setup(tmp_path, tiny_ckpt)  # latents on disk, text embeddings in memory
    assert trainer.latent_cache is not None and trainer.text_cache is not None and len(entered) == 1
    entered.clear()
    _setup(tmp_path, tiny_ckpt, cache_latents_to_disk=False)
    assert entered == []
