"""Prompt loading: every supported layout, cleaning with line/row numbers, and teaching errors."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from craft import CraftError
from craft.stages.prompts import (PromptError, PromptSet, Skipped, clean_prompts, load_prompts,
                           normalize_prompt)


def _parquet(path, table: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path)


HPD_TEST = [  # HPDv2 test.json: prompt plus image paths, ranks and annotations per object
    {"prompt": "a cat in a hat", "image_path": ["0.jpg", "1.jpg"], "rank": [1, 2],
     "raw_annotations": [[1, 2]], "user_hash": ["u1"]},
    {"prompt": "A   dog\ton a skateboard", "image_path": ["2.jpg"], "rank": [1],
     "raw_annotations": [], "user_hash": []},
]

# (file name, writer(path), format argument, column argument, expected prompts, expected layout)
LAYOUTS = [
    ("p.txt", lambda p: p.write_text("# header comment\n\na cat\n  a   dog  \n#x\na bird\n"),
     "auto", None, ["a cat", "a dog", "a bird"], "txt"),
    ("p.csv", lambda p: p.write_text('id,prompt,score\n1,"a cat, sleeping",0.5\n'
                                     '2,"a dog\nrunning",0.1\n'),
     "auto", None, ["a cat, sleeping", "a dog running"], "csv"),
    ("p.csv", lambda p: p.write_text("Caption,url\na cat,http://x\na dog,http://y\n"),
     "auto", None, ["a cat", "a dog"], "csv"),
    ("p.csv", lambda p: p.write_text("desc,other\na cat,1\na dog,2\n"),
     "csv", "desc", ["a cat", "a dog"], "csv"),
    ("PartiPrompts.tsv", lambda p: p.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\t\n"
        "a red cube on top of a blue cube\tArtifacts\tPerspective\tcounting, colors\n"),
     "auto", None, ["bond", "a red cube on top of a blue cube"], "parti"),
    ("parti.txt", lambda p: p.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tA\tB\t\n"),
     "parti", None, ["bond"], "parti"),
    ("anime.json", lambda p: p.write_text(json.dumps(["a cat, anime style", "a dog"])),
     "auto", None, ["a cat, anime style", "a dog"], "json"),
    ("test.json", lambda p: p.write_text(json.dumps(HPD_TEST)),
     "auto", None, ["a cat in a hat", "A dog on a skateboard"], "hpdv2"),
    ("test.json", lambda p: p.write_text(json.dumps(HPD_TEST)),
     "hpdv2", None, ["a cat in a hat", "A dog on a skateboard"], "hpdv2"),
    ("p.jsonl", lambda p: p.write_text('{"text": "a cat", "n": 1}\n\n{"text": "a dog"}\n'),
     "auto", None, ["a cat", "a dog"], "jsonl"),
    ("lines.json", lambda p: p.write_text('{"caption": "a cat"}\n{"caption": "a dog"}\n'),
     "auto", None, ["a cat", "a dog"], "jsonl"),
    ("p.jsonl", lambda p: p.write_text('{"q": "a cat"}\n{"q": "a dog"}\n'),
     "jsonl", "q", ["a cat", "a dog"], "jsonl"),
    ("p.parquet", lambda p: _parquet(p, {"prompt": ["a cat", "a dog"], "n": [1, 2]}),
     "auto", None, ["a cat", "a dog"], "parquet"),
    ("pick.parquet", lambda p: _parquet(p, {
        "caption": ["a cat", "a cat", "a dog", "a cat"], "jpg_0": [b"\xff\xd8"] * 4,
        "jpg_1": [b"\xff\xd8"] * 4, "label_0": [1.0, 0.0, 0.5, 1.0],
        "label_1": [0.0, 1.0, 0.5, 0.0]}),
     "auto", None, ["a cat", "a dog"], "pickapic"),
    ("pick.csv", lambda p: p.write_text("caption,label_0,label_1\na cat,1,0\na cat,0,1\n"
                                        "a dog,1,0\n"),
     "pickapic", None, ["a cat", "a dog"], "pickapic"),
    ("pick.parquet", lambda p: _parquet(p, {"caption": ["a cat", "a cat"], "x": [1, 2]}),
     "pickapic", None, ["a cat"], "pickapic"),
]


@pytest.mark.parametrize("name,write,fmt,column,expected,layout", LAYOUTS,
                         ids=[f"{i}-{row[0]}-{row[2]}" for i, row in enumerate(LAYOUTS)])
def test_layouts(tmp_path, name, write, fmt, column, expected, layout):
    path = tmp_path / name
    write(path)
    ps = load_prompts(str(path), format=fmt, column=column)
    assert ps.prompts == expected
    assert ps.format == layout
    assert ps.source == str(path)


def test_txt_skips_with_physical_line_numbers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\na cat\n\nA  CAT\n" + "x" * 20 + "\na dog\n")
    ps = load_prompts(path, max_chars=10)
    assert ps.prompts == ["a cat", "a dog"]
    assert [(s.line, s.kind) for s in ps.skipped] == [(4, "duplicate"), (5, "too long")]
    assert ps.skipped[0].reason == "line 4 duplicates line 2 (ignoring case)"
    assert "20 chars > max_chars=10" in ps.skipped[1].reason
    assert ps.summary() == "kept 2, skipped 2 (1 duplicate, 1 too long)"


def test_csv_skips_with_row_numbers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,n\na cat,1\n,2\n   ,3\na cat,4\na dog\n")
    ps = load_prompts(path)
    assert ps.prompts == ["a cat", "a dog"]
    assert [(s.line, s.kind) for s in ps.skipped] == [(2, "empty"), (3, "empty"),
                                                      (4, "duplicate")]
    assert all("row" in s.reason for s in ps.skipped)
    assert ps.summary() == "kept 2, skipped 3 (1 duplicate, 2 empty)"


def test_json_and_jsonl_skips(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a cat"}, {"prompt": 3}, {"other": "x"},
                                {"prompt": None}, {"prompt": "a dog"}]))
    ps = load_prompts(path)
    assert ps.prompts == ["a cat", "a dog"]
    assert [(s.line, s.kind) for s in ps.skipped] == [(2, "not text"), (3, "missing field"),
                                                      (4, "empty")]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat"}\n{not json\n{"x": 1}\n"a dog"\n')
    ps = load_prompts(jl)
    assert ps.prompts == ["a cat", "a dog"]
    assert [(s.line, s.kind) for s in ps.skipped] == [(2, "invalid json"), (3, "missing field")]
    assert ps.skipped[0].reason.startswith("line 2 is not valid JSON")


def test_parquet_pickapic_duplicates_and_nulls(tmp_path):
    path = tmp_path / "pick.parquet"
    _parquet(path, {"caption": ["a cat", None, "A cat", "a dog", "a dog"], "label_0": [1] * 5})
    ps = load_prompts(path)
    assert ps.prompts == ["a cat", "a dog"]
    assert [(s.line, s.kind) for s in ps.skipped] == [(2, "empty"), (3, "duplicate"),
                                                      (5, "duplicate")]
    assert ps.skip_counts() == {"duplicate": 2, "empty": 1}


def test_max_prompts_first_and_seeded_sample(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(20)))
    first = load_prompts(path, max_prompts=5)
    assert first.prompts == [f"prompt {i}" for i in range(5)]
    assert first.summary() == "kept 5 of 20 usable (max_prompts=5), skipped 0"
    a = load_prompts(path, max_prompts=5, seed=1)
    b = load_prompts(path, max_prompts=5, seed=1)
    c = load_prompts(path, max_prompts=5, seed=2)
    assert a.prompts == b.prompts != c.prompts
    assert a.prompts == sorted(a.prompts, key=lambda p: int(p.split()[1]))  # source order kept
    assert len(load_prompts(path, max_prompts=50)) == 20


def test_builtin_sources():
    toy, heldout = load_prompts("toy"), load_prompts("toy-heldout")
    assert len(toy) == 120 and len(heldout) == 48
    assert not set(toy.prompts) & set(heldout.prompts)
    sample = load_prompts("sample")
    assert 50 <= len(sample) <= 80 and not sample.skipped
    assert sample.format == "txt" and sample.source == "sample"
    assert len(load_prompts("toy", max_prompts=7)) == 7


def test_relative_path_falls_back_to_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_prompts("assets/prompts/sample.txt")) == len(load_prompts("sample"))


def _write_pickle(p):
    p.write_bytes(pickle.dumps(["a cat"]))


# (file name, writer, kwargs, fragments the one-line message must contain)
BAD = [
    ("missing.txt", None, {}, ["'", "missing.txt", "not found", "built-in sets"]),
    ("p.pkl", _write_pickle, {}, ["p.pkl", "extension '.pkl'", "format="]),
    ("p.txt", lambda p: p.write_text("a"), {"format": "yaml"}, ["format='yaml'", "'txt'"]),
    ("p.csv", lambda p: p.write_text("url,score\nx,1\n"), {},
     ["p.csv", "no prompt column", "['url', 'score']", "column="]),
    ("p.csv", lambda p: p.write_text("prompt\na\n"), {"column": "desc"},
     ["no column 'desc'", "['prompt']", "column="]),
    ("p.jsonl", lambda p: p.write_text('{"url": "x"}\n'), {},
     ["no prompt field", "['url']", "column="]),
    ("p.parquet", lambda p: _parquet(p, {"url": ["x"]}), {},
     ["no prompt column", "['url']", "column="]),
    ("p.txt", lambda p: p.write_text("# only comments\n\n"), {},
     ["p.txt", "no usable prompts", "nothing to read"]),
    ("p.csv", lambda p: p.write_text("prompt\n\"\"\n\" \"\n"), {},
     ["no usable prompts", "2 empty", "column 'prompt'"]),
    ("p.txt", lambda p: p.write_bytes(b"a cat\x00\x01\x02"), {}, ["p.txt", "binary", "UTF-8"]),
    ("p.txt", lambda p: p.write_bytes(b"a cat\na \xe9t\xe9\n"), {},
     ["p.txt", "not valid UTF-8", "line 2", "re-save"]),
    ("p.txt", lambda p: p.write_text("a cat\n" * 100), {"max_bytes": 100},
     ["p.txt", "over the limit", "max_bytes=600"]),
    ("p.parquet", lambda p: _parquet(p, {"prompt": ["a cat" * 50] * 10}), {"max_bytes": 100},
     ["column 'prompt'", "uncompressed", "over the limit", "max_bytes="]),
    ("p.txt", lambda p: _parquet(p, {"prompt": ["a"]}), {}, ["parquet file", "format='parquet'"]),
    ("p.parquet", lambda p: p.write_text("a cat\n"), {}, ["not a readable parquet file"]),
    ("p.json", lambda p: p.write_text('{"prompt": "a cat"'), {}, ["not valid JSON", "line 1"]),
    ("p.json", lambda p: p.write_text('{"prompts": ["a cat"]}'), {},
     ["JSON dict", "list of strings"]),
    ("p.csv", lambda p: p.write_text(""), {}, ["no header row", "prompt column"]),
    ("p.csv", lambda p: p.write_text('prompt\na cat\n"a dog, running\na bird\nan owl\n'), {},
     ["quote opened in row 2 (line 3) is never closed", "close the quote"]),
    ("p.txt", lambda p: p.write_text("a"), {"max_prompts": 0}, ["max_prompts=0", ">= 1"]),
    ("p", lambda p: p.write_text("a"), {}, ["extension '(none)'", "format="]),
]


@pytest.mark.parametrize("name,write,kwargs,fragments", BAD,
                         ids=[f"{i}-{row[0]}" for i, row in enumerate(BAD)])
def test_bad_sources_teach(tmp_path, name, write, kwargs, fragments):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(PromptError) as info:
        load_prompts(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CraftError)


def test_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(PromptError, match="is not a file"):
        load_prompts(str(tmp_path))


def test_prompt_set_is_iterable():
    ps = PromptSet(["a", "b"], [Skipped(3, "a", "line 3 duplicates line 1", "duplicate")], "x")
    assert list(ps) == ["a", "b"] and len(ps) == 2
    assert ps.summary() == "kept 2, skipped 1 (1 duplicate)"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=12), st.none(), st.integers()), max_size=15))
def test_clean_prompts_invariants(values):
    prompts, skipped = clean_prompts(enumerate(values, 1), "row", max_chars=8)
    assert len(prompts) + len(skipped) == len(values)
    assert len({p.casefold() for p in prompts}) == len(prompts)
    assert all(p == normalize_prompt(p) and 0 < len(p) <= 8 for p in prompts)
    assert all(1 <= s.line <= len(values) and f"row {s.line}" in s.reason for s in skipped)
