"""Regenerate the SD1.5 kohya name lists from the architecture as written down here, independently of
the code under test: which blocks hold a Transformer2DModel, and which layers each one has.
Run: python tests/golden/make_sd15_golden.py (only if the architecture description below changes)."""

from pathlib import Path

HERE = Path(__file__).parent
# SD1.5: down blocks 0-2 and up blocks 1-3 are cross-attention blocks (2 and 3 transformers), plus the mid block.
TRANSFORMERS = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
                + ["mid_block_attentions_0"]
                + [f"up_blocks_{b}_attentions_{a}" for b in (1, 2, 3) for a in range(3)])
ATTN = [f"transformer_blocks_0_{attn}_{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
QV = [f"transformer_blocks_0_{attn}_{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_v")]
KOHYA = ["proj_in", "proj_out", "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"] + ATTN
TE_LAYER = {"kohya": ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"],
            "attn": ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"],
            "qv": ["self_attn_q_proj", "self_attn_v_proj"]}

if __name__ == "__main__":
    for preset, layers in (("kohya", KOHYA), ("attn", ATTN), ("qv", QV)):
        unet = sorted(f"lora_unet_{t}_{layer}" for t in TRANSFORMERS for layer in layers)
        te = sorted(f"lora_te_text_model_encoder_layers_{i}_{layer}" for i in range(12) for layer in TE_LAYER[preset])
        (HERE / f"sd15_{preset}_unet.txt").write_text("\n".join(unet) + "\n")
        (HERE / f"sd15_{preset}_te.txt").write_text("\n".join(te) + "\n")
        print(preset, len(unet), len(te))
