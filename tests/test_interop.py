"""Interop: files we write or convert load everywhere with every key applied, and the LoRA arithmetic is exact."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import seed_config, write_dataset
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.families.loading import load_base_model
from lora_scripts.generation.pipelines import make_pipeline
from lora_scripts.interop.describe import describe
from lora_scripts.interop.lora_file import read_lora
from lora_scripts.interop.ops import combine, resize
from lora_scripts.interop.table import family_table
from lora_scripts.interop.verify import verify
from lora_scripts.training.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ckpt):
    """A tiny UNet + text-encoder LoRA with alpha != rank (so a lost alpha shows as a 2x strength error)."""
    root = tmp_path_factory.mktemp("interop")
    write_dataset(root)
    cfg = load_config(seed_config(root, tiny_ckpt, max_train_steps=4, lora_rank=8, lora_alpha=4, learning_rate=5e-3,
                                  train_text_encoder=True, save_precision="fp32"))
    result = train(cfg)
    return result, tiny_ckpt


def _mixed_alphas(src, dst):
    """Give every other module its own alpha, as files from some trainers have."""
    state = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    alphas = sorted(k for k in state if k.endswith(".alpha"))
    for k in alphas[::2]:
        state[k] = torch.tensor(2.0)
    save_file(state, str(dst), metadata=meta)
    return dst


@torch.no_grad()
def _outputs(base, lora=None, weight=1.0, base_is_merged=False):
    model = load_base_model(base)
    pipe = make_pipeline(model)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="x")
        pipe.set_adapters(["x"], [weight])
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a red circle, neon"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]
    sample = torch.randn(1, 4, 4, 4, generator=g)
    return hidden, pipe.unet(sample, torch.tensor([500]), hidden).sample


def test_the_training_run_verified_its_own_file(trained):
    result, _ = trained
    assert result.verified and "0 unmatched keys" in result.verified


def test_convert_round_trip_kohya_diffusers_kohya_is_bit_identical(trained, tmp_path):
    result, base = trained
    src = _mixed_alphas(result.lora_path, tmp_path / "mixed.safetensors")
    assert main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--base", str(base)]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    original, back = load_file(str(src)), load_file(str(tmp_path / "k.safetensors"))
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)  # alphas included, no folding needed
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "8"
    # What A1111's additional-networks hashes on disk: the bytes after the header, for the file as written.
    assert meta["sshs_model_hash"] == _payload_sha256(tmp_path / "k.safetensors")
    assert _payload_sha256(result.lora_path) == _meta(result.lora_path)["sshs_model_hash"]
    assert back["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4  # 1x1 conv stays 4-D


def _payload_sha256(path):
    import hashlib

    blob = path.read_bytes()
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_converted_file_gives_the_same_outputs_in_diffusers(trained, tmp_path):
    result, base = trained
    main(["convert", str(result.lora_path), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--base", str(base)])
    plain_h, plain_u = _outputs(base)
    kohya_h, kohya_u = _outputs(base, result.lora_path)
    diff_h, diff_u = _outputs(base, tmp_path / "d.safetensors")
    assert (kohya_u - plain_u).abs().max() > 1e-4 and (kohya_h - plain_h).abs().max() > 1e-4  # the LoRA acts
    torch.testing.assert_close(diff_h, kohya_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff_u, kohya_u, rtol=1e-5, atol=1e-5)


def test_per_module_alphas_survive_conversion_and_verify_flags_loaders_that_drop_them(trained, tmp_path):
    """Measured with diffusers 0.42.1: a kohya file whose modules have different alphas is applied with the
    wrong strength by load_lora_weights (its alpha_pattern keys come out in the old attn-processor naming and
    are ignored). Our diffusers file keeps every alpha: it gives what the baked checkpoint (our own
    arithmetic, as A1111/ComfyUI apply it) gives; and verify reports the kohya file's diffusers problem."""
    result, base = trained
    mixed = _mixed_alphas(result.lora_path, tmp_path / "mixed.safetensors")
    main(["convert", str(mixed), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--base", str(base)])
    main(["merge", "--base", str(base), "--lora", str(mixed), "--out", str(tmp_path / "baked.safetensors")])
    diff_h, diff_u = _outputs(base, tmp_path / "d.safetensors")
    baked_h, baked_u = _outputs(tmp_path / "baked.safetensors")
    torch.testing.assert_close(diff_h, baked_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff_u, baked_u, rtol=1e-5, atol=1e-5)
    assert verify(tmp_path / "d.safetensors", base).ok
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):
        report = verify(mixed, base)
    assert report.wrong_strength and not report.unmatched


def test_merged_checkpoint_equals_the_lora_applied_at_run_time(trained, tmp_path):
    result, base = trained
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(base), "--lora", f"{result.lora_path}:0.8", "--out", str(merged)]) == 0
    live_h, live_u = _outputs(base, result.lora_path, weight=0.8)
    baked_h, baked_u = _outputs(merged)
    torch.testing.assert_close(baked_h, live_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(baked_u, live_u, rtol=1e-5, atol=1e-5)
    with safe_open(str(merged), "pt") as f, safe_open(str(base), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # same layout: A1111/ComfyUI load it as any checkpoint
        assert f.metadata()["lora_scripts.architecture"] == g.metadata()["lora_scripts.architecture"]


def test_merging_loras_into_one_is_exact_when_ranks_are_stacked(trained, tmp_path):
    result, _ = trained
    a = read_lora(result.lora_path)
    b = read_lora(_mixed_alphas(result.lora_path, tmp_path / "b.safetensors"))
    merged, _ = combine([(a, 0.8), (b, -0.3)])
    for name, m in merged.modules.items():
        expected = 0.8 * a.modules[name].delta() - 0.3 * b.modules[name].delta()
        torch.testing.assert_close(m.delta(), expected, rtol=1e-5, atol=1e-7)
    assert {m.rank for m in merged.modules.values()} == {16}
    assert main(["merge", "--lora", f"{result.lora_path}:0.8", "--lora", f"{tmp_path / 'b.safetensors'}:0.5",
                 "--rank", "4", "--out", str(tmp_path / "m4.safetensors")]) == 0
    assert {m.rank for m in read_lora(tmp_path / "m4.safetensors").modules.values()} == {4}


def test_resize_to_full_rank_is_lossless_and_a_cut_keeps_the_reported_energy(trained, tmp_path, capsys):
    result, _ = trained
    lora = read_lora(result.lora_path)
    full, kept = resize(lora, 8)
    for name, m in full.modules.items():
        torch.testing.assert_close(m.delta(), lora.modules[name].delta(), rtol=1e-4, atol=1e-6)
    assert all(k.energy == pytest.approx(1.0, abs=1e-6) for k in kept)
    cut, kept = resize(lora, 2)
    for k in kept:
        d, approx = lora.modules[k.name].delta(), cut.modules[k.name].delta()
        residual = float((d - approx).norm() ** 2 / d.norm() ** 2)
        assert k.rank_after == 2 and k.energy == pytest.approx(1 - residual, abs=1e-4)
    assert main(["resize", str(result.lora_path), str(tmp_path / "r2.safetensors"), "--rank", "2"]) == 0
    assert "kept energy" in capsys.readouterr().out
    assert verify(tmp_path / "r2.safetensors", trained[1]).ok


def test_verify_reports_a_mangled_key(trained, tmp_path, capsys):
    result, base = trained
    state = load_file(str(result.lora_path))
    victim = next(k for k in sorted(state) if k.startswith("lora_unet_") and "attn1_to_q" in k)
    module = victim.split(".")[0]
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        state[f"{module.replace('attn1_to_q', 'attn1_toq')}.{suffix}"] = state.pop(f"{module}.{suffix}")
    bad = tmp_path / "mangled.safetensors"
    save_file(state, str(bad))
    report = verify(bad, base)
    assert not report.ok and report.unmatched == [module.replace("attn1_to_q", "attn1_toq")]
    assert main(["verify", str(bad), "--base", str(base)]) == 1
    assert "1 modules match no layer of the base" in capsys.readouterr().err


def test_verify_catches_a_lost_alpha(trained, tmp_path):
    """A file whose alphas were dropped loads everywhere but at the wrong strength: that must not pass as fine."""
    result, base = trained
    state = load_file(str(result.lora_path))
    no_alpha = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    save_file(no_alpha, str(tmp_path / "no_alpha.safetensors"))
    d = describe(tmp_path / "no_alpha.safetensors")
    assert any("no .alpha" in w for w in d.warnings)
    # Without alphas every loader uses alpha = rank; our own reading agrees, so verify passes (consistent) ...
    assert verify(tmp_path / "no_alpha.safetensors", base).ok
    # ... and the strength really doubled against the original file (alpha 4, rank 8).
    a, b = read_lora(result.lora_path), read_lora(tmp_path / "no_alpha.safetensors")
    name = next(iter(a.modules))
    torch.testing.assert_close(b.modules[name].delta(), 2 * a.modules[name].delta())


def test_inspect_reports_format_ranks_tags_and_what_loaders_drop(trained, tmp_path, capsys):
    result, _ = trained
    assert main(["inspect", str(result.lora_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["ranks"] == {"8": info["modules"]} and info["alphas"] == {"4.0": info["modules"]}
    assert "neon lighting" in info["trigger_words"] and info["warnings"] == []
    assert set(info["blocks"]) >= {"text_encoder", "unet.down_0", "unet.mid"}
    state = load_file(str(result.lora_path))
    state["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = torch.zeros(2, 2)  # LyCORIS LoHa key
    save_file(state, str(tmp_path / "odd.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    d = describe(tmp_path / "odd.safetensors")
    assert any("would be dropped" in w and "hada_w1_a" in w for w in d.warnings)


def test_sd15_table_names_every_golden_module_and_its_checkpoint_key():
    """The kohya names of all three presets (golden lists) resolve to weights of SD1.5's original layout."""
    from conftest import REPO

    table = family_table("sd1")
    for path in (REPO / "tests" / "golden").glob("sd15_*.txt"):
        for name in path.read_text().split():
            entry = table[name]
            assert entry.ldm_key.startswith(("model.diffusion_model.", "cond_stage_model.transformer.text_model."))
    e = table["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert e.ldm_key == "model.diffusion_model.input_blocks.1.1.proj_in.weight" and e.shape == (320, 320, 1, 1)
    e = table["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"]
    assert e.ldm_key == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    assert e.shape == (320, 768)


# --- careless inputs (issue 16): what a message says is what was written; nothing is written on a refusal --------
def _ranks(path):
    return sorted({m.rank for m in read_lora(path).modules.values()})


def test_resize_and_merge_say_the_rank_they_wrote(tmp_path, capsys):
    from helpers.bad_cases_interop import lora

    a, b = lora(tmp_path, "a.safetensors", rank=4), lora(tmp_path, "b.safetensors", rank=8)
    cases = [(["resize", b, str(tmp_path / "r_big.safetensors"), "--rank", "100000"], [8],
              "kept rank 8 (the file's rank; a LoRA cannot gain rank"),
             (["resize", b, str(tmp_path / "r2.safetensors"), "--rank", "2"], [2], "rank 8 -> 2,"),
             (["merge", "--lora", a, "--lora", b, "--out", str(tmp_path / "m.safetensors")], [12],
              "ranks stacked to rank 12 (exact)"),
             (["merge", "--lora", a, "--lora", b, "--rank", "100000", "--out", str(tmp_path / "m_big.safetensors")],
              [12], "kept rank 12 (the sum of the inputs' ranks"),
             (["merge", "--lora", a, "--lora", b, "--rank", "3", "--out", str(tmp_path / "m3.safetensors")], [3],
              "rank 3 by SVD")]
    for argv, ranks, said in cases:
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert said in out, out
        written = argv[argv.index("--out") + 1] if "--out" in argv else argv[2]
        assert _ranks(written) == ranks, argv
    meta = _meta(tmp_path / "r_big.safetensors")
    assert meta["ss_network_dim"] == "8" and "resized to rank 8 " in meta["ss_training_comment"]


@pytest.mark.parametrize("rank", ["0", "-1", "four"])
def test_a_rank_below_one_is_refused_before_anything_is_read(tmp_path, capsys, rank):
    from helpers.bad_cases_interop import lora

    for argv in (["resize", lora(tmp_path), str(tmp_path / "r.safetensors"), "--rank", rank],
                 ["merge", "--lora", lora(tmp_path), "--rank", rank, "--out", str(tmp_path / "r.safetensors")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "argument --rank" in capsys.readouterr().err
    assert not (tmp_path / "r.safetensors").exists()


def test_an_existing_output_is_kept_without_force_and_a_folder_is_never_an_output(tmp_path):
    from helpers.bad_cases_interop import lora

    src, other = lora(tmp_path, "a.safetensors"), lora(tmp_path, "b.safetensors", rank=8)
    before = (tmp_path / "b.safetensors").read_bytes()
    for argv in (["convert", src, other, "--to", "kohya"], ["resize", src, other, "--rank", "2"],
                 ["merge", "--lora", src, "--out", other]):
        assert main(argv) == 2
    assert (tmp_path / "b.safetensors").read_bytes() == before
    folder = tmp_path / "outputs"
    folder.mkdir()
    for argv in (["convert", src, str(folder), "--to", "kohya", "--force"],
                 ["resize", src, str(folder), "--rank", "2", "--force"]):
        assert main(argv) == 2
    assert folder.is_dir() and not any(folder.iterdir())
    assert main(["convert", src, other, "--to", "kohya", "--force"]) == 0  # --force does replace a file


def test_nan_loras_and_mismatched_shapes_write_nothing(tmp_path, capsys):
    from helpers.bad_cases_interop import lora

    nan = lora(tmp_path, "nan.safetensors", poison=float("nan"))
    good, wide = lora(tmp_path, "good.safetensors"), lora(tmp_path, "wide.safetensors", widen=2)
    out = tmp_path / "out.safetensors"
    for argv in (["convert", nan, str(out), "--to", "kohya"], ["resize", nan, str(out), "--rank", "2"],
                 ["merge", "--lora", good, "--lora", nan, "--out", str(out)],
                 ["merge", "--lora", good, "--lora", wide, "--out", str(out)]):
        assert main(argv) == 2, argv
        assert not out.exists()
    assert "different shapes" in capsys.readouterr().err


def test_verify_fails_a_nan_lora_instead_of_passing_it(tmp_path, tiny_ckpt):
    from helpers.bad_cases_interop import lora

    report = verify(lora(tmp_path, poison=float("inf")), tiny_ckpt)
    assert not report.ok and "NaN or infinite" in report.problems()[0]


@pytest.fixture(scope="module")
def diffusers_base(tmp_path_factory, tiny_ckpt):
    """The tiny SD1 base saved as a diffusers folder (what `base_model` also accepts)."""
    from diffusers import StableDiffusionPipeline

    m = load_base_model(tiny_ckpt)
    folder = tmp_path_factory.mktemp("diffusers_base") / "tiny-sd15"
    StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                            scheduler=m.noise_scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_convert_with_a_diffusers_folder_base_writes_what_the_single_file_base_writes(trained, diffusers_base,
                                                                                      tmp_path):
    result, base = trained
    file_out, folder_out = tmp_path / "file.safetensors", tmp_path / "folder.safetensors"
    for out, b in ((file_out, base), (folder_out, diffusers_base)):
        assert main(["convert", str(result.lora_path), str(out), "--to", "diffusers", "--base", str(b)]) == 0
    # Same tensors and metadata (the header's key order is not stable between writes, so bytes are not compared).
    from_file, from_folder = load_file(str(file_out)), load_file(str(folder_out))
    assert set(from_file) == set(from_folder) and all(torch.equal(from_file[k], from_folder[k]) for k in from_file)
    assert _meta(file_out) == _meta(folder_out)


def test_verify_with_a_diffusers_folder_base_checks_names_in_the_single_file_layout(trained, diffusers_base, tmp_path,
                                                                                     capsys):
    result, _ = trained
    assert verify(result.lora_path, diffusers_base).ok
    assert main(["verify", str(result.lora_path), "--base", str(diffusers_base)]) == 0
    state = load_file(str(result.lora_path))
    module = next(k for k in sorted(state) if k.startswith("lora_te_") and "q_proj" in k).split(".")[0]
    renamed = module.replace("q_proj", "qproj")
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        state[f"{renamed}.{suffix}"] = state.pop(f"{module}.{suffix}")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    report = verify(tmp_path / "renamed.safetensors", diffusers_base)
    assert not report.ok and report.unmatched == [renamed]
    assert main(["verify", str(tmp_path / "renamed.safetensors"), "--base", str(diffusers_base)]) == 1
    assert "1 modules match no layer of the base" in capsys.readouterr().err


def test_merge_into_a_diffusers_folder_base_writes_the_single_file_checkpoint(trained, diffusers_base, tmp_path):
    result, base = trained
    file_out, folder_out = tmp_path / "file.safetensors", tmp_path / "folder.safetensors"
    for out, b in ((file_out, base), (folder_out, diffusers_base)):
        assert main(["merge", "--base", str(b), "--lora", f"{result.lora_path}:0.8", "--out", str(out)]) == 0
    from_file, from_folder = load_file(str(file_out)), load_file(str(folder_out))
    assert set(from_file) == set(from_folder)  # the single-file (LDM) layout A1111/ComfyUI load
    assert all(torch.equal(from_file[k], from_folder[k]) for k in from_file)
    load_base_model(folder_out)  # loads at the folder's own (tiny) size


def test_training_on_a_diffusers_folder_runs_the_self_test(tmp_path, diffusers_base):
    write_dataset(tmp_path)
    cfg = load_config(seed_config(tmp_path, diffusers_base, max_train_steps=1, lora_rank=4, batch_size=2))
    result = train(cfg)
    assert result.verified and "0 unmatched keys" in result.verified
