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


def test_upper_case_sidecar_is_read_and_edited_in_place(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "a.TXT").write_text("upper case\n", encoding="utf-8")
    assert [i.caption for i in read_captions(tmp_path, None)] == ["upper case"]
    assert set_caption(tmp_path / "a.png", "edited", tmp_path, None) == tmp_path / "a.TXT"
    assert not (tmp_path / "a.txt").exists() and (tmp_path / "a.TXT").read_text() == "edited\n"


def test_unreadable_caption_files_are_named_not_shown_empty(tmp_path):
    import pytest

    from lora_scripts.errors import DatasetError

    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("cp1252"))
    (tmp_path / "b.txt").mkdir()
    with pytest.raises(DatasetError) as err:
        read_captions(tmp_path, None)
    assert f"{tmp_path / 'a.txt'}: caption file is not UTF-8" in str(err.value)
    assert f"{tmp_path / 'b.txt'}: is a folder, not a caption file" in str(err.value)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="metadata.csv: not UTF-8 text"):
        read_captions(tmp_path, tmp_path / "metadata.csv")


def test_linked_folders_are_listed_once_and_hidden_ones_skipped(tmp_path):
    from lora_scripts.data.captions import list_images

    _images(tmp_path / "elsewhere", ["x.png"])
    _images(tmp_path / "data" / ".cache", ["hidden.png"])
    (tmp_path / "data" / "10_x").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert list_images(tmp_path / "data") == [tmp_path / "data" / "10_x" / "x.png"]
