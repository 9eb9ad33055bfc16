"""The one metadata.csv reader: what it accepts, and how it words what it cannot read."""

import pytest

from lora_scripts.data.metadata_csv import MetadataCsvError, read_metadata_csv


def test_excel_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes("file_name,text\na.png,a cat\n".encode("utf-8-sig"))
    meta = read_metadata_csv(path)
    assert meta.columns == ["file_name", "text"] and meta.rows == [{"file_name": "a.png", "text": "a cat"}]


def test_caption_column_is_text_or_caption_and_a_missing_one_is_reported(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("file_name,caption,text\na.png,old,new\n", encoding="utf-8")
    assert read_metadata_csv(path).text_col == "text"  # 'text' wins when both are there
    path.write_text("file_name,caption\na.png,a cat\n", encoding="utf-8")
    meta = read_metadata_csv(path)
    assert (meta.text_col, meta.has_text_col) == ("caption", True)
    path.write_text("file_name,score\na.png,1\n", encoding="utf-8")
    meta = read_metadata_csv(path)
    assert (meta.text_col, meta.has_text_col) == ("text", False)


def test_missing_file_name_column_names_the_columns_and_the_header_to_write(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("image,text\na.png,a cat\n", encoding="utf-8")
    with pytest.raises(MetadataCsvError) as err:
        read_metadata_csv(path)
    assert err.value.kind == "file_name"
    assert err.value.problem == f"{path}: no 'file_name' column (columns: ['image', 'text'])"
    assert err.value.fix == "metadata.csv needs a header line: file_name,text"
    assert read_metadata_csv(path, require_file_name=False).rows == [{"image": "a.png", "text": "a cat"}]


def test_non_utf8_names_the_byte_and_its_position(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(MetadataCsvError) as err:
        read_metadata_csv(path)
    assert err.value.kind == "encoding"
    assert err.value.problem == f"{path}: not UTF-8 text (byte 0xe9 at position 24)"
    assert err.value.fix == "Re-save it as UTF-8 (in Excel: Save As > CSV UTF-8)."


def test_a_file_that_cannot_be_opened_keeps_the_os_error_as_its_cause(tmp_path):
    folder = tmp_path / "metadata.csv"
    folder.mkdir()  # a folder under the CSV's name: open() refuses it on every platform
    with pytest.raises(MetadataCsvError) as err:
        read_metadata_csv(folder)
    assert err.value.kind == "csv" and isinstance(err.value.__cause__, OSError)
    assert err.value.problem.startswith(f"{folder}: cannot read it as a CSV file (")
