"""Auto-labelling into metadata.csv: the basic captioner, and BLIP and WD14 run for real on tiny local models."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from lora_scripts.cli import main


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["file_name"]: r["text"] for r in csv.DictReader(f)}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "sci_lab_train"
    d.mkdir()
    Image.new("RGB", (64, 64), (22, 28, 90)).save(d / "robot_arm_01.png")
    im = Image.new("RGB", (64, 64), (10, 10, 30))
    im.paste((40, 230, 240), (20, 20, 44, 44))
    im.save(d / "neon_console.png")
    Image.new("RGB", (64, 64), (240, 240, 235)).save(d / "white_room.jpg")
    (d / "white_room.txt").write_text("my own caption, kept", encoding="utf-8")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_basic_writes_four_part_captions_and_keeps_existing_ones(folder, capsys):
    assert main(["label", str(folder), "--trigger", "sci_lab"]) == 0
    rows = _rows(folder / "metadata.csv")
    assert set(rows) == {"robot_arm_01.png", "neon_console.png", "white_room.jpg"}
    assert rows["white_room.jpg"] == "my own caption, kept"
    arm = rows["robot_arm_01.png"].split(", ")
    assert arm[0] == "sci_lab" and arm[1].startswith("robot arm in navy") and arm[2] == "sci lab"
    assert "dim low-key lighting" in rows["robot_arm_01.png"]
    assert "neon lighting" in rows["neon_console.png"] and "cyan" in rows["neon_console.png"]
    out = capsys.readouterr()
    assert "broken.png" in out.err and "2 new captions, 1 kept" in out.out
    assert main(["label", str(folder), "--overwrite", "--template", "{subject}; {lighting}"]) == 0
    assert _rows(folder / "metadata.csv")["white_room.jpg"].endswith("bright high-key lighting")


def test_auto_label_py_with_the_articles_arguments(folder):
    out = folder / "metadata.csv"
    proc = subprocess.run([sys.executable, str(REPO / "auto_label.py"), "--input", str(folder), "--output", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    assert text.startswith("file_name,text\n") and '"' in text  # captions with commas are quoted
    assert not list(folder.glob(".*.tmp"))


def _tiny_blip(path):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    import torch

    torch.manual_seed(0)  # random weights: unseeded, some draws generate an empty caption
    path.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "lab", "with", "neon", "robot", "arm"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    BlipForConditionalGeneration(cfg).save_pretrained(path)
    tok = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(path)
    return path


def test_blip_backend_captions_through_transformers(folder, tmp_path):
    model = _tiny_blip(tmp_path / "tiny-blip")
    assert main(["label", str(folder), "--backend", "blip", "--model", str(model), "--trigger", "sci_lab"]) == 0
    rows = _rows(folder / "metadata.csv")
    vocab = {"a", "lab", "with", "neon", "robot", "arm", "[unk]", "[mask]", "[cls]"}
    for name in ("robot_arm_01.png", "neon_console.png"):
        first, _, rest = rows[name].partition(", ")
        assert first == "sci_lab" and rest and set(rest.lower().split()) <= vocab, rows[name]
    assert rows["white_room.jpg"] == "my own caption, kept"


def test_blip_backend_without_a_local_model_says_so(folder, tmp_path, capsys):
    assert main(["label", str(folder), "--backend", "blip", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no BLIP model there or in the local Hugging Face cache" in capsys.readouterr().err


def _tiny_wd14(path, size=32):
    """A 'tagger' that sees mean colour: tag k fires when channel k (in the BGR input) is bright."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path.mkdir()
    weights = np.zeros((3, 4), np.float32)
    weights[2, 0] = 0.1  # R (BGR index 2) -> red_thing
    weights[0, 1] = 0.1  # B -> blue_thing
    weights[2, 2] = 0.1  # R -> a character tag
    weights[1, 3] = 0.1  # G -> a rating tag (never a caption tag)
    bias = np.full(4, -12.0, np.float32)
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
             helper.make_node("Add", ["logits0", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["output"])]
    graph = helper.make_graph(
        nodes, "tiny_wd14", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"), numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path / "model.onnx"))
    (path / "selected_tags.csv").write_text("tag_id,name,category,count\n1,red_thing,0,10\n2,blue_thing,0,10\n"
                                            "3,some_character,4,10\n4,general_rating,9,10\n")
    return path


def test_wd14_backend_tags_through_onnxruntime(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (48, 32), (250, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (32, 32), (10, 10, 250)).save(folder / "blue.png")
    Image.new("RGB", (32, 32), (10, 250, 10)).save(folder / "green.png")
    model = _tiny_wd14(tmp_path / "wd14")
    assert main(["label", str(folder), "--backend", "wd14", "--model", str(model), "--threshold", "0.35"]) == 0
    rows = _rows(folder / "metadata.csv")
    # red: mean R over the white-padded square is high -> red thing; the character tag needs 0.85 and gets it too
    assert rows["red.png"] == "red thing, some character" or rows["red.png"] == "some character, red thing"
    assert rows["blue.png"] == "blue thing"
    assert rows["green.png"] == ""  # only the rating tag fired, and ratings are not caption tags


# --- careless inputs (issue 16) ------------------------------------------------------------------------------------
def test_empty_folder_is_refused_naming_the_formats(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert main(["label", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"error: no images found in {tmp_path / 'empty'} (sub-folders included, hidden ones skipped)" in err
    assert ".png, .jpg, .jpeg, .jfif, .webp" in err
    assert not (tmp_path / "empty" / "metadata.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--output", "{folder}"], "--output {folder} is a folder; give a file name, e.g. {folder}/metadata.csv"),
    (["--output", "{folder}/cap.png"], "--output {folder}/cap.png: captions are written as a .csv file"),
    (["--output", "{folder}/robot_arm_01.png/x.csv"], "robot_arm_01.png is a file, not a folder"),
    (["--threshold", "2"], "--threshold 2.0: a tag probability between 0 and 1"),
    (["--threshold", "nan"], "--threshold nan: a tag probability between 0 and 1"),
    (["--backend", "wd14", "--model", "{folder}/missing"], "--model {folder}/missing: no such folder; a WD14 tagger"),
    (["--backend", "wd14", "--model", "{folder}/robot_arm_01.png"], "robot_arm_01.png: not a folder; a WD14 tagger"),
    (["--backend", "blip", "--model", "{folder}/robot_arm_01.png"], "robot_arm_01.png is a file; BLIP needs the model's folder"),
])
def test_bad_label_arguments_are_refused_with_one_message(folder, capsys, argv, message):
    before = sorted(p.name for p in folder.iterdir())
    assert main(["label", str(folder)] + [a.format(folder=folder) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(folder=folder) in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_damaged_wd14_model_and_tags_are_named(folder, tmp_path, capsys):
    model = _tiny_wd14(tmp_path / "wd14")
    (model / "selected_tags.csv").write_text("id,label\n1,red\n")
    assert main(["label", str(folder), "--backend", "wd14", "--model", str(model)]) == 2
    assert "selected_tags.csv needs the columns tag_id,name,category,count" in capsys.readouterr().err
    (model / "model.onnx").write_bytes(b"not an onnx model")
    assert main(["label", str(folder), "--backend", "wd14", "--model", str(model)]) == 2
    assert "model.onnx cannot be loaded as a WD14 tagger" in capsys.readouterr().err


def test_existing_csv_columns_are_kept_and_unreadable_ones_refused(folder, capsys):
    csv_path = folder / "metadata.csv"
    csv_path.write_text("file_name,text,score\nrobot_arm_01.png,my arm caption,5\n", encoding="utf-8")
    assert main(["label", str(folder)]) == 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = {r["file_name"]: r for r in csv.DictReader(f)}
    assert rows["robot_arm_01.png"] == {"file_name": "robot_arm_01.png", "text": "my arm caption", "score": "5"}
    assert rows["neon_console.png"]["score"] == "" and rows["neon_console.png"]["text"]
    csv_path.write_bytes("file_name,text\nrobot_arm_01.png,caf\xe9\n".encode("latin-1"))
    assert main(["label", str(folder)]) == 2
    assert f"{csv_path}: not UTF-8 text (byte 0xe9" in capsys.readouterr().err
    csv_path.write_text("image,caption\nrobot_arm_01.png,mine\n", encoding="utf-8")
    assert main(["label", str(folder)]) == 2
    assert "has no file_name column (columns: ['image', 'caption']); label would replace it" in capsys.readouterr().err
    assert csv_path.read_text() == "image,caption\nrobot_arm_01.png,mine\n"


def test_sidecar_captions_in_upper_case_are_kept_and_unreadable_ones_refused(folder, capsys):
    (folder / "robot_arm_01.TXT").write_text("an upper-case caption, kept", encoding="utf-8")
    assert main(["label", str(folder)]) == 0
    assert _rows(folder / "metadata.csv")["robot_arm_01.png"] == "an upper-case caption, kept"
    (folder / "neon_console.txt").write_bytes("caf\xe9 console".encode("cp1252"))
    assert main(["label", str(folder), "--output", str(folder / "other.csv")]) == 2
    assert f"{folder / 'neon_console.txt'}: caption file is not UTF-8" in capsys.readouterr().err
    assert not (folder / "other.csv").exists()


def test_labels_linked_images_and_names_broken_links(folder, tmp_path, capsys):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "outside.png")
    (folder / "linked.png").symlink_to(tmp_path / "outside.png")
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    assert main(["label", str(folder)]) == 0
    assert "linked.png" in _rows(folder / "metadata.csv")
    out = capsys.readouterr()
    assert f"{folder / 'gone.png'}: broken link" in out.err


@pytest.mark.parametrize("template, why", [("{foo}", "unknown field {foo}"),
                                           ("{subject", "not a valid template (expected '}' before end of string)")])
def test_a_bad_template_is_refused_before_any_work(folder, capsys, template, why):
    assert main(["label", str(folder), "--template", template]) == 2
    assert f"--template {template!r}: {why}. Use the fields {{trigger}}, {{subject}}" in capsys.readouterr().err
    assert not (folder / "metadata.csv").exists()
