"""ControlNet and IP-Adapter at generation: files in the layouts users have (tiny ones built from each family's
tiny UNet), family checks, the control maps, what weight/scale 0 and the control image do, PNG info as A1111's
ControlNet extension writes it, and all of it with a LoRA in one command."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lora_scripts.cli import main
from lora_scripts.errors import LoraScriptsError
from lora_scripts.families.controlnet import ControlNetError, load_controlnet
from lora_scripts.families.loading import load_base_model
from lora_scripts.families.tiny import build_tiny_controlnet, write_tiny_controlnet, write_tiny_ip_adapter
from lora_scripts.formats.controlnet import controlnet_to_ldm
from lora_scripts.generation import control_maps
from lora_scripts.generation.control import ControlUnit, parse_units
from lora_scripts.generation.ip_adapter import IpAdapterUnit
from lora_scripts.generation.pipelines import generate, rescaled_guidance
from lora_scripts.generation.pnginfo import parse_parameters, read_parameters
from lora_scripts.generation.render import Renderer, Settings

FAST = Settings(steps=2, cfg=5.0, scheduler="ddim")


def _drawing(path, shape: str, size=(64, 64)):
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    (d.rectangle if shape == "box" else d.ellipse)((10, 12, 44, 50), outline="black", width=3)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def sd15(tmp_path_factory, tiny_ckpt):
    """The tiny SD1 base, a ControlNet and an IP-Adapter for it, two layouts and two reference images."""
    root = tmp_path_factory.mktemp("control")
    model = load_base_model(tiny_ckpt)
    files = {"cn": write_tiny_controlnet(root / "models" / "ControlNet" / "control_tiny_canny.pth", model.denoiser),
             "ip": write_tiny_ip_adapter(root / "ipadapter" / "ip-adapter_tiny.safetensors", model.denoiser),
             "box": _drawing(root / "box.png", "box"), "ring": _drawing(root / "ring.png", "ring")}
    Image.new("RGB", (48, 40), (200, 30, 30)).save(root / "red.png")
    Image.new("RGB", (48, 40), (30, 30, 200)).save(root / "blue.png")
    return root, model, files


def test_controlnets_load_from_every_layout_users_have(sd15, tiny_sdxl_ckpt, tiny_sd2_ckpt, tmp_path):
    """lllyasviel's original layout (.pth, and inside a ControlNet-1.0 checkpoint under control_model.), diffusers'
    single file and folder; SDXL's (label_emb) too: every tensor arrives where the ControlNet was built with it."""
    _, model, _ = sd15
    expected = build_tiny_controlnet(model.denoiser).state_dict()
    for name in ("cn.pth", "cn_diffusers.safetensors", "cn_folder"):
        net = load_controlnet(write_tiny_controlnet(tmp_path / name, model.denoiser), model.denoiser, "SD1.x")
        assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items()), name
    from safetensors.torch import load_file, save_file

    inside = {f"control_model.{k}": v for k, v in load_file(write_tiny_controlnet(tmp_path / "v10.safetensors",
                                                                                  model.denoiser)).items()}
    save_file({**inside, "model.diffusion_model.out.0.weight": torch.ones(4)}, str(tmp_path / "control_sd15_v10.safetensors"))
    net = load_controlnet(tmp_path / "control_sd15_v10.safetensors", model.denoiser, "SD1.x")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    for fixture, text_time in ((tiny_sdxl_ckpt, True), (tiny_sd2_ckpt, False)):
        other = load_base_model(fixture)
        path = write_tiny_controlnet(tmp_path / f"{fixture.stem}-cn.safetensors", other.denoiser, text_time=text_time)
        net = load_controlnet(path, other.denoiser, other.family.label)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in build_tiny_controlnet(other.denoiser).state_dict().items())


def test_original_layout_is_the_one_diffusers_own_converter_reads(sd15):
    """Golden check of our key map against an independent one: diffusers' converter (default hint encoder)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    _, model, _ = sd15
    net = ControlNetModel.from_unet(model.denoiser)  # the default hint encoder, which diffusers' converter assumes
    state = net.state_dict()
    back = convert_controlnet_checkpoint(controlnet_to_ldm(state, net.config.layers_per_block), dict(net.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_wrong_files_and_families_are_refused_by_name(sd15, tiny_sdxl_ckpt, tmp_path):
    root, model, files = sd15
    xl = load_base_model(tiny_sdxl_ckpt)
    sdxl_net = write_tiny_controlnet(tmp_path / "control_xl.safetensors", xl.denoiser, text_time=True)
    with pytest.raises(ControlNetError, match=r"control_xl\.safetensors is a ControlNet for an SDXL-like model .*"
                                              r"but the base model is SD1\.x"):
        load_controlnet(sdxl_net, model.denoiser, "SD1.x")
    with pytest.raises(ControlNetError, match=r"is an IP-Adapter \(give it to --ip-adapter\)"):
        load_controlnet(files["ip"], model.denoiser, "SD1.x")
    from lora_scripts.families.ip_adapter import IpAdapterError, attach_ip_adapter

    with pytest.raises(IpAdapterError, match=r"IP-Adapter for a model with text width 32, but the base model is SDXL"):
        attach_ip_adapter(None, files["ip"], files["ip"].parent / "image_encoder", xl.denoiser, "SDXL")
    with pytest.raises(IpAdapterError, match=r"control_tiny_canny\.pth is not an IP-Adapter .*a ControlNet"):
        attach_ip_adapter(None, files["cn"], files["ip"].parent / "image_encoder", model.denoiser, "SD1.x")


def test_variants_and_damaged_files_are_refused_not_half_loaded(sd15, tmp_path):
    from safetensors.torch import load_file, save_file

    _, model, files = sd15
    state = load_file(write_tiny_controlnet(tmp_path / "cn_diffusers.safetensors", model.denoiser))
    save_file({**state, "task_embedding": torch.zeros(8, 32)}, str(tmp_path / "union_diffusers.safetensors"))
    with pytest.raises(ControlNetError, match=r"holds 1 weights a plain ControlNet has no place for \(e\.g\. "
                                              r"task_embedding\): a variant \(a union ControlNet\?\)"):
        load_controlnet(tmp_path / "union_diffusers.safetensors", model.denoiser, "SD1.x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "cn_diffusers.safetensors").read_bytes()[:5000])
    with pytest.raises(ControlNetError, match=r"cut\.safetensors: not a complete \.safetensors file"):
        load_controlnet(cut, model.denoiser, "SD1.x")


def test_pnginfo_quoting_round_trips_backslashes_and_quotes():
    from lora_scripts.generation.pnginfo import Parameters

    value = 'Module: none, Model: C:\\models\\ [ab], Note: "x"\\'
    params = Parameters("p", "", 2, "ddim", 5.0, 1, (64, 64), "m", extra={"ControlNet 0": value, "Other": "a, b"})
    info = parse_parameters(params.text())
    assert info["ControlNet 0"] == value and info["Other"] == "a, b" and info["Seed"] == "1"


def test_control_maps():
    im = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(im).rectangle((20, 15, 60, 45), outline="black", width=2)
    for kind in ("canny", "softedge", "lineart"):
        m = np.asarray(control_maps.control_map(im, kind, (80, 60)))[:, :, 0]
        assert m.shape == (60, 80)
        assert m[14:18, 25:55].max() > 100, kind  # the top edge is drawn
        assert m[25:35, 30:50].max() < 30 and m[:8].max() < 30, kind  # nothing inside or far outside
    assert control_maps.control_map(im, "none", (40, 40)).size == (40, 40)  # crop and resize: cover, cut the middle


def test_control_image_steers_the_picture_weight_zero_is_none_and_pnginfo_names_it(sd15, tiny_ckpt):
    root, _, files = sd15
    plain = Renderer(tiny_ckpt, [], FAST).render("a lab", [3])[0]
    box = Renderer(tiny_ckpt, [], FAST, controls=[ControlUnit("canny", files["cn"], files["box"])])
    ring = Renderer(tiny_ckpt, [], FAST, controls=[ControlUnit("canny", files["cn"], files["ring"])])
    off = Renderer(tiny_ckpt, [], FAST, controls=[ControlUnit("canny", files["cn"], files["box"], weight=0.0)])
    late = Renderer(tiny_ckpt, [], FAST, controls=[ControlUnit("canny", files["cn"], files["box"], start=0.5)])
    px = {k: np.asarray(r.render("a lab", [3])[0].image, dtype=np.int16) for k, r in
          (("box", box), ("ring", ring), ("off", off), ("late", late))}
    assert np.array_equal(px["off"], np.asarray(plain.image, dtype=np.int16))  # weight 0: no ControlNet at all
    # ... also through the ControlNet itself at scale 0 (the renderer skips it then): its residuals add nothing.
    size = (64, 64)
    zero = generate(box.control_pipe, "a lab", [3], size, steps=2, cfg=5.0,
                    **box.model.family.control_call(box.control_maps(size), [0.0], [0.0], [1.0], [None]))[0]
    assert np.array_equal(np.asarray(zero, dtype=np.int16), np.asarray(plain.image, dtype=np.int16))
    assert np.abs(px["box"] - px["ring"]).mean() > 0.5  # the layout decides (1.4 measured; none: exactly 0)
    assert np.abs(px["box"] - px["late"]).mean() > 0.3  # so does when it acts
    again = box.render("a lab", [3])[0]
    assert np.array_equal(np.asarray(again.image, dtype=np.int16), px["box"])  # same seed, same image
    from lora_scripts.generation.pnginfo import save_png

    info = parse_parameters(read_parameters(save_png(again.image, root / "out.png", again.params)))
    unit = dict(item.split(": ", 1) for item in info["ControlNet 0"].split(", "))  # as the extension parses it
    assert unit["Module"] == "canny" and unit["Model"].startswith("control_tiny_canny [") and unit["Weight"] == "1.0"
    assert (unit["Threshold A"], unit["Threshold B"], unit["Guidance End"]) == ("100.0", "200.0", "1.0")
    assert len(unit) == 11


def test_lora_controlnet_and_ip_adapter_in_one_command(sd15, tiny_ckpt):
    from test_generation import _random_lora

    root, _, files = sd15
    _random_lora(root / "loras" / "neon.safetensors", tiny_ckpt, 1)
    args = ["generate", "--base", str(tiny_ckpt), "--prompt", "a lab, <lora:neon:0.8>", "--lora-dir", str(root / "loras"),
            "--steps", "2", "--scheduler", "ddim", "--control", "lineart:control_tiny_canny", "--control-image",
            str(files["box"]), "--control-weight", "0.8", "--ip-adapter", str(files["ip"]), "--ip-image",
            str(root / "red.png"), "--ip-scale", "0.7", "--control-preview",
            "--out", str(root / "gen")]
    import os

    cwd = os.getcwd()
    os.chdir(root)  # the ControlNet is found by name in ./models/ControlNet
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    info = parse_parameters(read_parameters(root / "gen" / "00000-0.png"))
    assert info["ControlNet 0"].startswith("Module: lineart_standard (from white bg & black line), Model: control_tiny_")
    assert "Weight: 0.8" in info["ControlNet 0"]
    assert info["ControlNet 1"].startswith("Module: ip-adapter-auto, Model: ip-adapter_tiny [") and "Weight: 0.7" in info["ControlNet 1"]
    assert info["Lora hashes"].startswith("neon: ")
    assert (root / "gen" / "00001-control-0-lineart.png").is_file()


def test_ip_adapter_reference_steers_and_scale_zero_is_none(sd15, tiny_ckpt):
    root, _, files = sd15
    plain = np.asarray(Renderer(tiny_ckpt, [], FAST).render("a lab", [4])[0].image, dtype=np.int16)
    px = {}
    for name, image, scale in (("red", root / "red.png", 1.0), ("blue", root / "blue.png", 1.0), ("off", root / "red.png", 0.0)):
        r = Renderer(tiny_ckpt, [], FAST, ip_adapter=IpAdapterUnit(files["ip"], image, scale))
        px[name] = np.asarray(r.render("a lab", [4])[0].image, dtype=np.int16)
    assert np.array_equal(px["off"], plain)
    assert np.abs(px["red"] - px["blue"]).mean() > 1.0


def test_sdxl_draws_with_a_controlnet_and_an_ip_adapter(tiny_sdxl_ckpt, tmp_path):
    xl = load_base_model(tiny_sdxl_ckpt)
    net = write_tiny_controlnet(tmp_path / "control_xl.safetensors", xl.denoiser, text_time=True)
    ip = write_tiny_ip_adapter(tmp_path / "ip" / "ip-adapter_xl.safetensors", xl.denoiser)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    r = Renderer(tiny_sdxl_ckpt, [], FAST, controls=[ControlUnit("softedge", net, _drawing(tmp_path / "b.png", "box"))],
                 ip_adapter=IpAdapterUnit(ip, tmp_path / "red.png"))
    out = r.render("a lab", [1])[0]
    assert r.retune(r.controls, IpAdapterUnit(ip, tmp_path / "red.png", 0.0))
    no_ip = r.render("a lab", [1])[0]
    size = r.model.native_size
    r.pipe.unload_ip_adapter()
    plain = generate(r.pipe, "a lab", [1], (size[1], size[0]), steps=2, cfg=5.0)[0]
    pixels = lambda im: np.asarray(im, dtype=np.int16)  # noqa: E731
    assert np.abs(pixels(no_ip.image) - pixels(plain)).mean() > 1.0  # the ControlNet
    assert np.abs(pixels(out.image) - pixels(no_ip.image)).mean() > 1.0  # the IP-Adapter
    assert "Module: softedge_sobel" in out.params.text() and "ControlNet 1" in out.params.text()


def test_guidance_rescale_where_the_pipeline_has_none_equals_diffusers_own(tiny_sd2_ckpt):
    """The ControlNet pipelines lack guidance_rescale, which zero-terminal-SNR models (the toy base) need: our
    hook on the UNet gives what the plain pipeline's own argument gives."""
    r = Renderer(tiny_sd2_ckpt, [], Settings(steps=3, cfg=6.0, scheduler="ddim"), zero_terminal_snr=True)
    call = dict(num_inference_steps=3, guidance_scale=6.0, height=64, width=64, output_type="np")
    native = r.pipe("a lab", generator=torch.Generator().manual_seed(2), guidance_rescale=0.7, **call).images
    with rescaled_guidance(r.pipe, 6.0, 0.7):
        hooked = r.pipe("a lab", generator=torch.Generator().manual_seed(2), **call).images
    plain = r.pipe("a lab", generator=torch.Generator().manual_seed(2), **call).images
    assert np.abs(native - hooked).max() < 1e-4 and np.abs(native - plain).max() > 1e-2


def test_unit_options_are_checked_before_anything_loads(sd15):
    root, _, files = sd15
    cn = str(files["cn"])
    with pytest.raises(LoraScriptsError, match=r"2 --control given with 1 --control-image"):
        parse_units([f"canny:{cn}", f"none:{cn}"], [str(files["box"])])
    with pytest.raises(LoraScriptsError, match=r"--control-weight given 2 times for 3 ControlNets"):
        parse_units([f"canny:{cn}"] * 3, [str(files["box"])] * 3, weights=[1.0, 0.5])
    with pytest.raises(LoraScriptsError, match=r"--control-start 0\.6 is not before --control-end 0\.4"):
        parse_units([f"canny:{cn}"], [str(files["box"])], starts=[0.6], ends=[0.4])
    with pytest.raises(LoraScriptsError, match=r"unknown preprocessor 'hed'"):
        parse_units([f"hed:{cn}"], [str(files["box"])])
    with pytest.raises(LoraScriptsError, match=r"ControlNet 'control_nope' not found"):
        parse_units(["canny:control_nope"], [str(files["box"])])
    units = parse_units([f"depth:{cn}", f"canny:{cn}"], [str(files["box"])] * 2, weights=[0.5], thresholds=["50,150"])
    assert [u.kind for u in units] == ["none", "canny"] and [u.weight for u in units] == [0.5, 0.5]
    assert units[1].low == 50 and units[1].high == 150


def test_the_studio_draws_with_a_controlnet_and_an_ip_adapter_from_the_workspace(sd15, tiny_ckpt, tmp_path):
    import shutil

    from test_ui_api import HEADERS, client

    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    root, _, files = sd15
    shutil.copy(tiny_ckpt, ws / "models" / "base.safetensors")
    shutil.copy(files["cn"], ws / "models" / "control.pth")
    shutil.copytree(files["ip"].parent, ws / "ipadapter")
    shutil.copy(files["box"], ws / "box.png")
    shutil.copy(root / "red.png", ws / "red.png")
    c = client(ws)
    body = {"base_model": "models/base.safetensors", "prompt": "a lab", "seed": 1, "steps": 2, "sampler": "ddim",
            "control": [{"type": "canny", "model": "models/control.pth", "image": "box.png", "weight": 0.9}],
            "ip_adapter": "ipadapter/ip-adapter_tiny.safetensors", "ip_image": "red.png", "ip_scale": 0.6}
    r = c.post("/api/generate", headers=HEADERS, json=body)
    assert r.status_code == 200, r.text
    info = parse_parameters(read_parameters(ws / r.json()["image"]))
    assert "Weight: 0.9" in info["ControlNet 0"] and "Weight: 0.6" in info["ControlNet 1"]
    renderer = c.app.state.studio._renderer
    body["control"][0]["weight"], body["ip_scale"] = 0.4, 0.3
    again = parse_parameters(read_parameters(ws / c.post("/api/generate", headers=HEADERS, json=body).json()["image"]))
    assert "Weight: 0.4" in again["ControlNet 0"] and "Weight: 0.3" in again["ControlNet 1"]
    assert c.app.state.studio._renderer is renderer  # a slider moved: nothing loaded again
    outside = c.post("/api/generate", headers=HEADERS, json={**body, "ip_image": str(root / "red.png")})
    assert outside.status_code == 403 and "give a path inside the workspace" in outside.text
    half = c.post("/api/generate", headers=HEADERS, json={**body, "ip_image": None})
    assert half.status_code == 400 and "reference image" in half.text


def test_flux_draws_with_a_diffusers_layout_controlnet_and_families_do_not_mix(sd15, tiny_flux_files, tmp_path):
    from lora_scripts.families.base import LoadSettings
    from lora_scripts.families.tiny import write_tiny_flux_controlnet

    _, sd, files = sd15
    other = {k: v for k, v in tiny_flux_files.items() if k in ("clip_l", "t5xxl", "ae")}
    base, tokenizer = tiny_flux_files["base_model"], tiny_flux_files["tokenizer_dir"]
    flux = load_base_model(base, LoadSettings(files=other, tokenizer_dir=tokenizer))
    net = write_tiny_flux_controlnet(tmp_path / "flux-canny-tiny.safetensors", flux.denoiser)
    settings = Settings(steps=2, size=(64, 64))
    r = Renderer(base, [], settings, files=other, tokenizer_dir=tokenizer,
                 controls=[ControlUnit("canny", net, files["box"])])
    out = np.asarray(r.render("a lab", [1])[0].image, dtype=np.int16)
    plain = np.asarray(generate(r.pipe, "a lab", [1], (64, 64), steps=2, cfg=r.settings.cfg)[0], dtype=np.int16)
    assert np.abs(out - plain).mean() > 1.0
    with pytest.raises(ControlNetError, match=r"flux-canny-tiny\.safetensors is a ControlNet for Flux\.1, but the "
                                              r"base model is SD1\.x"):
        load_controlnet(net, sd.denoiser, "SD1.x")
    with pytest.raises(ControlNetError, match=r"control_tiny_canny\.pth is a ControlNet for a model with "
                                              r"cross-attention width 32, but the base model is Flux\.1"):
        flux.family.load_controlnet(files["cn"], flux)
    folder = write_tiny_flux_controlnet(tmp_path / "flux-folder", flux.denoiser)
    with pytest.raises(ControlNetError, match=r"flux-folder is a ControlNet for Flux\.1; the base model is SD1\.x"):
        load_controlnet(folder, sd.denoiser, "SD1.x")
    union = write_tiny_flux_controlnet(tmp_path / "flux-union.safetensors", flux.denoiser, num_mode=3)
    with pytest.raises(LoraScriptsError, match=r"flux-union\.safetensors is a union ControlNet with 3 control types: "
                                               r"choose one with --control-mode N"):
        Renderer(base, [], settings, files=other, tokenizer_dir=tokenizer,
                 controls=[ControlUnit("canny", union, files["box"])])
    by_mode = [np.asarray(Renderer(base, [], settings, files=other, tokenizer_dir=tokenizer, controls=[
        ControlUnit("canny", union, files["box"], mode=m)]).render("a lab", [1])[0].image, dtype=np.int16)
        for m in (0, 2)]
    assert not np.array_equal(by_mode[0], by_mode[1])  # the mode is passed and used (ignored: bit-identical)
