"""kohya's conv_dim / conv_alpha: LoRA also on the UNet's ResNet blocks and samplers, 3x3 convolutions at their own
rank and alpha, in one plain kohya file that A1111, ComfyUI and diffusers apply whole."""

import pytest
import torch

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.families import FAMILIES, FAMILY_KEY
from lora_scripts.interop.lora_file import read_lora
from lora_scripts.interop.table import module_table
from lora_scripts.training.adapters import choose_targets
from lora_scripts.training.loop import train


@pytest.mark.parametrize("family,total,names", [
    ("sd15", 278, ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                   "lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_up_blocks_0_upsamplers_0_conv"]),
    ("sdxl", 788, ["lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                   "lora_unet_middle_block_2_emb_layers_1", "lora_unet_output_blocks_2_2_conv",
                   "lora_unet_output_blocks_0_0_skip_connection", "lora_unet_output_blocks_8_0_out_layers_3"]),
])
def test_conv_targets_on_the_real_unet_as_sd_scripts_counts_them(tmp_path, tiny_ckpt, family, total, names):
    """sd-scripts logs 278 U-Net modules for SD1.5 with conv_dim (192 + 86 in 22 ResNets and 6 samplers), 788 for
    SDXL; each name resolves to a weight of the real single file with the shape its update has."""
    fam = FAMILIES[family]
    configs = fam.embedded_configs()
    unet = fam.meta_modules(configs)["unet"]
    (tmp_path / "d").mkdir()
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, train_data_dir=str(tmp_path / "d"), metadata_path=None,
                                  conv_rank=8))
    chosen, conv = choose_targets(fam, "unet", unet, cfg)
    assert len(chosen) == total and all(unet.get_submodule(c).kernel_size == (3, 3) for c in conv)
    table = module_table({**configs, FAMILY_KEY: family})
    ldm = fam.ldm_state_dict(fam.meta_modules(configs))
    kohya = {fam.kohya_name("unet", p) for p in chosen}
    assert set(names) <= kohya
    assert all(tuple(ldm[table[n].ldm_key].shape) == table[n].ldm_shape for n in kohya)


def test_conv_layers_train_at_their_own_rank_and_alpha_and_every_loader_applies_them(tmp_path, dataset, tiny_ckpt):
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=3, lora_rank=8, conv_rank=4, conv_alpha=2,
                                  learning_rate=1e-3, save_format="diffusers"))
    result = train(cfg)
    assert "0 unmatched" in result.verified  # by name, and by effect in diffusers
    lora = read_lora(result.lora_path)
    wide = {n: m for n, m in lora.modules.items() if m.down.dim() == 4 and m.down.shape[-1] == 3}
    assert wide and all((m.rank, m.alpha) == (4, 2.0) for m in wide.values())
    assert all((m.rank, m.alpha) == (8, 8.0) for n, m in lora.modules.items() if n not in wide)
    assert any(float(m.up.abs().max()) > 0 for m in wide.values())  # they trained
    assert '"conv_dim": "4", "conv_alpha": "2"' in lora.metadata["ss_network_args"]
    peft = read_lora(cfg.output_dir / "pytorch_lora_weights.safetensors")
    assert all(peft.modules[n].alpha == m.alpha and torch.equal(peft.modules[n].up, m.up) for n, m in lora.modules.items())


def test_conv_alpha_alone_is_refused_naming_the_key(tmp_path, dataset, tiny_ckpt):
    with pytest.raises(ConfigError, match="conv_alpha is set but conv_rank is not"):
        load_config(seed_config(tmp_path, tiny_ckpt, conv_alpha=4))
