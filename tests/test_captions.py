"""Caption edits land where the caption lives, atomically, without disturbing the other rows."""

import csv

from PIL import Image

from lora_scripts.data.captions import read_captions, set_caption


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8)).save(folder / n)


def test_sidecar_captions_are_read_and_written(tmp_path):
    _images(tmp_path / "10_cat", ["a.png", "b.jpg"])
    (tmp_path / "10_cat" / "a.txt").write_text("a cat\n", encoding="utf-8")
    items = read_captions(tmp_path, None)
    assert [(i.path.name, i.caption) for i in items] == [("a.png", "a cat"), ("b.jpg", "")]
    written = set_caption(tmp_path / "10_cat" / "b.jpg", "a  black\ncat", tmp_path, None)
    assert written == tmp_path / "10_cat" / "b.txt" and written.read_text() == "a black cat\n"


def test_csv_edit_keeps_other_rows_and_columns_and_adds_missing_images(tmp_path):
    _images(tmp_path, ["x.png", "y.png", "z.png"])
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text("\ufefffile_name,text,score\nx.png,first,1\ny.png,\"second, with comma\",2\n", encoding="utf-8")
    assert [i.caption for i in read_captions(tmp_path, csv_path)] == ["first", "second, with comma", ""]
    set_caption(tmp_path / "y.png", "changed", tmp_path, csv_path)
    set_caption(tmp_path / "z.png", "new row", tmp_path, csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"file_name": "x.png", "text": "first", "score": "1"},
                    {"file_name": "y.png", "text": "changed", "score": "2"},
                    {"file_name": "z.png", "text": "new row", "score": ""}]
    assert not list(tmp_path.glob("*.tmp"))
