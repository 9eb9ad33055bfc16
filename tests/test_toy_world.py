"""The toy world proves that LoRAs learn: measured on generated images, not just on the loss."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.config import load_config
from lora_scripts.families.loading import load_base_model
from lora_scripts.toy.assets import toy_base_path
from lora_scripts.toy.demo import SHEET_PROMPTS
from lora_scripts.toy.evaluate import Sampler
from lora_scripts.toy.scenes import (
    POSITIONS, Scene, arm_items, neon_caption, neon_items, random_scene, render, write_arm_set, write_neon_set)
from lora_scripts.toy.stats import (
    CLASSES, _labelled_example, arm_probability, class_probabilities, neon_fraction, progress, scene_attributes,
    style_distance, train_shape_classifier)
from lora_scripts.training.loop import train

SEEDS = (1, 2, 3)
# The combination statistics judge whether an arm is drawn, image by image: on 2 prompts x 3 seeds one flipped
# image moves the arm probability by 0.17, and CPU kernels differ between processors (the LoRAs and the
# classifier are trained in the test), so the same test read 0.423 on one machine and 0.482 on another against
# a margin of 0.15 over the base. Over 12 seeds per prompt the spread measured across thread counts and kernels
# (benchmarks/toy_combination_spread.py, docs/toy_world.md) stays far from the margins.
COMBO_SEEDS = tuple(range(1, 13))
ARM_PROMPTS = [Scene("robotic arm", c, b, p).caption for c, b, p in
               (("red", "white", "in the center"), ("blue", "gray", "on the left"), ("yellow", "black", "on the right"))]
# The combination prompt names both the new subject and the new style.
COMBO_PROMPTS = [neon_caption("robotic arm", "cyan", "in the center"), neon_caption("robotic arm", "magenta", "on the left")]


def _colour_noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def classifier():
    return train_shape_classifier(seed=0)


def toy_lora_configs(root):
    """The style set (neon lab) and subject set (robotic arm) written under root, and a config for each."""
    base = toy_base_path()
    write_neon_set(root / "neon_lab", count=60, seed=0)
    write_arm_set(root / "robotic_arm", count=60, seed=0)
    return base, {name: load_config(None, {
        "train_data_dir": str(root / name), "metadata_path": str(root / name / "metadata.csv"),
        "base_model": str(base), "output_dir": str(root / "out" / name), "lora_rank": 8, "batch_size": 8,
        "epochs": 40, "learning_rate": 1e-3, "resolution": 32, "bucket_reso_steps": 32, "save_steps": 0})
        for name in ("neon_lab", "robotic_arm")}


@pytest.fixture(scope="module")
def toy_loras(tmp_path_factory):
    """A style LoRA (neon lab) and a subject LoRA (robotic arm) trained on the shipped base, as users would."""
    base, configs = toy_lora_configs(tmp_path_factory.mktemp("toy"))
    return base, {name: train(cfg).lora_path for name, cfg in configs.items()}


def test_quick_rebuild_is_reproducible(tmp_path):
    """CI cannot afford the 20-minute pretraining; a short rebuild runs every stage and is deterministic."""
    from lora_scripts.cli import main
    from lora_scripts.hashes import file_sha256

    for name in ("a", "b"):
        assert main(["toy", "build-base", "--quick", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    assert file_sha256(tmp_path / "a.safetensors") == file_sha256(tmp_path / "b.safetensors")
    model = load_base_model(tmp_path / "a.safetensors")
    assert model.unet.config.block_out_channels == (32, 64, 64) or list(model.unet.config.block_out_channels) == [32, 64, 64]


def test_shipped_base_loads_like_a_real_checkpoint():
    model = load_base_model(toy_base_path())  # no architecture argument: the same path as v1-5-pruned.safetensors
    assert model.family.name == "sd15" and model.vae.config.scaling_factor != 0.18215
    assert model.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_style_statistic_separates_the_sets_and_ignores_noise():
    rng = random.Random(0)
    base_like = [render(random_scene(rng), 32, rng) for _ in range(60)]
    neon = [im for im, _ in neon_items(60, 32, seed=1)]
    noise = [Image.effect_noise((32, 32), 120).convert("RGB") for _ in range(10)]
    colour_noise = [_colour_noise(i) for i in range(10)]
    assert neon_fraction(base_like) == 0.0
    assert neon_fraction(neon) > 0.15
    # measured: grey noise 0.0, uniform colour noise 0.019, against 0.19 for the neon set
    assert neon_fraction(noise) < 0.01 and neon_fraction(colour_noise) < 0.03


def test_subject_classifier_is_accurate_and_not_fooled_by_noise(classifier):
    """Held out: fresh renders, half of them blurred, noisy or off-palette like generated samples (measured
    0.957; a classifier trained on crisp renders only scored 0.777 on these)."""
    rng = random.Random("held-out")
    examples = [_labelled_example(rng, 32) for _ in range(300)]
    pred = class_probabilities(classifier, [e[0] for e in examples]).argmax(-1)
    accuracy = (pred == torch.tensor([e[1] for e in examples])).float().mean().item()
    assert accuracy > 0.9, accuracy
    arms = [im for im, _ in arm_items(30, 32, seed=5)]
    assert arm_probability(classifier, arms) > 0.9
    others = [render(random_scene(rng), 32, rng) for _ in range(30)]
    assert arm_probability(classifier, others) < 0.1
    noise = [_colour_noise(i) for i in range(20)]
    assert arm_probability(classifier, noise) < 0.1
    assert CLASSES[-1] == "nothing"


def test_base_follows_prompts(classifier):
    """The base must draw what it is asked: held-out prompt combinations, judged by the shape classifier."""
    sampler = Sampler.open(toy_base_path())
    rng = random.Random("prompts")
    scenes = [random_scene(rng) for _ in range(12)]
    images = [sampler.images([s.caption], (7,), {})[0] for s in scenes]
    pred = class_probabilities(classifier, images).argmax(-1).tolist()
    shape_acc = sum(CLASSES[p] == s.shape for p, s in zip(pred, scenes)) / len(scenes)
    attrs = [scene_attributes(im) for im in images]
    colour_acc = sum(a[0] == s.colour for a, s in zip(attrs, scenes)) / len(scenes)
    bg_acc = sum(a[1] == s.background for a, s in zip(attrs, scenes)) / len(scenes)
    # chance: shape 1/3, colour 1/4, background 1/3
    assert shape_acc >= 0.6 and colour_acc >= 0.6 and bg_acc >= 0.6, (shape_acc, colour_acc, bg_acc)


def test_base_draws_white_background_scenes_as_asked():
    """Where the base is good: on white backgrounds the colour asked for is the colour drawn."""
    sampler = Sampler.open(toy_base_path())
    rng = random.Random("white")
    scenes = [Scene(rng.choice(["circle", "square", "triangle"]), c, "white", rng.choice(list(POSITIONS)))
              for c in ("red", "green", "blue", "yellow") for _ in range(2)]
    attrs = [scene_attributes(sampler.images([s.caption], (7,), {})[0]) for s in scenes]
    assert sum(a == (s.colour, "white") for a, s in zip(attrs, scenes)) / len(scenes) >= 0.75, attrs


@pytest.fixture(scope="module")
def style_images(toy_loras):
    """The sheet prompts at strengths 0 / 0.5 / 1, drawn once for the tests below, and the training set."""
    base, loras = toy_loras
    sampler = Sampler.open(base, {"neon_lab": loras["neon_lab"]})
    images = {w: sampler.images(SHEET_PROMPTS, SEEDS, {"neon_lab": w}) for w in (0.0, 0.5, 1.0)}
    return images, [im for im, _ in neon_items(60, 32, seed=0)]


def test_style_lora_reaches_the_training_set_at_full_strength(toy_loras, style_images):
    """Measured 2026-11-25 (v-prediction base, 320 LoRA steps): neon fraction 0.000 / 0.118 / 0.274 at strength
    0 / 0.5 / 1 (training set 0.193); colour-histogram distance 0.378 / 0.225 / 0.524 - full strength
    overshoots the set's palette (brighter, thicker glow), half strength is closest."""
    images, train_set = style_images
    start, end, target = neon_fraction(images[0.0]), neon_fraction(images[1.0]), neon_fraction(train_set)
    assert progress(end, start, target) >= 0.7, (start, end, target)
    assert style_distance(images[0.5], train_set) < 0.8 * style_distance(images[0.0], train_set)
    # Strength 0 is the base model, pixel for pixel.
    plain = Sampler.open(toy_loras[0]).images(SHEET_PROMPTS[:1], SEEDS[:1], {})[0]
    assert list(images[0.0][0].getdata()) == list(plain.getdata())


def test_style_effect_grows_with_strength(style_images):
    images, _ = style_images
    neon = [neon_fraction(images[w]) for w in (0.0, 0.5, 1.0)]
    assert neon[0] < neon[1] < neon[2], neon


def test_style_lora_lowers_held_out_loss(toy_loras):
    base, loras = toy_loras
    sampler = Sampler.open(base, {"neon_lab": loras["neon_lab"]})
    held_out = neon_items(24, 32, seed=99)  # images the LoRA never saw
    images, captions = [i for i, _ in held_out], [c for _, c in held_out]
    before = sampler.denoising_loss(images, captions, {"neon_lab": 0.0})
    after = sampler.denoising_loss(images, captions, {"neon_lab": 1.0})
    assert after <= 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def combo(toy_loras, classifier):
    """(neon fraction, arm probability) of the combination prompts at given strengths, each drawn once."""
    base, loras = toy_loras
    sampler = Sampler.open(base, loras)
    seen = {}

    def stats(style: float, subject: float) -> tuple[float, float]:
        if (style, subject) not in seen:
            ims = sampler.images(COMBO_PROMPTS, COMBO_SEEDS, {"neon_lab": style, "robotic_arm": subject})
            seen[style, subject] = neon_fraction(ims), arm_probability(classifier, ims)
        return seen[style, subject]

    return stats


def test_each_lora_moves_only_its_own_statistic(combo):
    """Measured 2026-11-25 on prompts naming a glowing robotic arm (seeds 1-3): base neon 0.000 / arm 0.234;
    style alone 0.185 / 0.001; subject alone 0.000 / 0.593."""
    base_neon, base_arm = combo(0.0, 0.0)
    style_neon, _ = combo(1.0, 0.0)
    subject_neon, subject_arm = combo(0.0, 1.0)
    assert style_neon > base_neon + 0.08, (base_neon, style_neon)
    assert subject_arm > base_arm + 0.15 and subject_neon < base_neon + 0.02, (base_arm, subject_arm, subject_neon)


def test_style_and_subject_combine(combo):
    """Like Lego: both LoRAs together give the new subject in the new style, with the style LoRA at 0.75 as
    users combine LoRAs (below 1 each). Measured 2026-11-30 over seeds 1-12 (benchmarks/toy_combination_spread.py)
    with 1 thread, 1 thread on AVX2 kernels and 2 threads: base neon 0.000 / arm 0.121, 0.121, 0.161; style 0.75 +
    subject 1 gives neon 0.205 / arm 0.509, 0.509, 0.504 - an arm gain of 0.34-0.39. One seed's arm value spreads
    with a standard deviation of 0.33 (the arm is drawn or not), so the 12-seed mean has 0.095: the margin of 0.12
    is 2.4 of those below the lowest measured gain, and fails nine times in ten if the effect is gone."""
    base_neon, base_arm = combo(0.0, 0.0)
    both_neon, both_arm = combo(0.75, 1.0)
    assert both_neon > base_neon + 0.04 and both_arm > base_arm + 0.12, (base_neon, base_arm, both_neon, both_arm)


def test_quick_controlnet_build_writes_a_controlnet_users_can_load(tmp_path):
    """`toy build-controlnet` runs every stage in seconds with --quick; its file is in the original layout."""
    from lora_scripts.cli import main
    from lora_scripts.families.controlnet import load_controlnet

    out = tmp_path / "toy-controlnet.safetensors"
    assert main(["toy", "build-controlnet", "--quick", "--out", str(out)]) == 0
    model = load_base_model(toy_base_path())
    net = load_controlnet(out, model.denoiser, model.family.label)
    assert net.config.conditioning_embedding_out_channels == (16, 32) or \
        list(net.config.conditioning_embedding_out_channels) == [16, 32]


def test_the_style_lora_is_drawn_on_a_given_layout(toy_loras, tmp_path):
    """The scenario end to end: the prompt asks for a circle in the centre, the layout (through the shipped toy
    canny ControlNet) puts a shape elsewhere; the picture follows the layout, in the LoRA's style."""
    from lora_scripts.toy.assets import toy_controlnet_asset
    from lora_scripts.toy.control_demo import LAYOUTS, control_report

    base, loras = toy_loras
    report = control_report(base, toy_controlnet_asset(), "neon_lab", loras["neon_lab"], tmp_path, LAYOUTS[:2], (1, 2))
    s = report.stats
    for plain, controlled in (("base", "base + ControlNet"), ("<lora:neon_lab:0.5>", "<lora:neon_lab:0.5> + ControlNet")):
        assert s[controlled]["at_layout_position"] >= s[plain]["at_layout_position"] + 0.5, s
        assert s[controlled]["edge_f1"] > s[plain]["edge_f1"] + 0.1, s
    assert s["<lora:neon_lab:0.5> + ControlNet"]["neon_fraction"] > s["base + ControlNet"]["neon_fraction"] + 0.05, s
