from __future__ import annotations

import json

import pytest

from rankshrink.data import (Collection, atomic_write, read_qrels, read_run, read_topics, top_k, trec_order,
                             write_run)
from rankshrink.errors import InputError


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_run_round_trip_sorts_and_breaks_ties_like_trec_eval(tmp_path):
    run = {"q1": {"d1": 1.0, "d3": 2.0, "d2": 2.0}, "q2": {"x": -1.5}}
    path = tmp_path / "run.trec"
    write_run(run, path, tag="mine")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["q1 Q0 d3 1 2.000000 mine", "q1 Q0 d2 2 2.000000 mine", "q1 Q0 d1 3 1.000000 mine"]
    assert read_run(path) == run


def test_a_written_run_keeps_scores_apart_that_six_decimals_would_tie(tmp_path):
    """Six decimals would write 0.500000 twice, and trec_eval would then rank "a" (docid) above "b"."""
    run = {"q1": {"a": 0.5, "b": 0.50000004, "c": 0.1}, "q2": {"x": 2.0, "y": 1.0}}
    path = tmp_path / "run.trec"
    write_run(run, path)
    assert read_run(path) == run and [docid for docid, _ in trec_order(read_run(path)["q1"])] == ["b", "a", "c"]
    assert path.read_text().splitlines()[3:] == ["q2 Q0 x 1 2.000000 rankshrink", "q2 Q0 y 2 1.000000 rankshrink"]


def test_write_run_cuts_to_k(tmp_path):
    path = tmp_path / "run.trec"
    write_run({"q": {f"d{i}": float(i) for i in range(10)}}, path, k=3)
    assert [line.split()[2] for line in path.read_text().splitlines()] == ["d9", "d8", "d7"]
    assert top_k({"q": {"a": 1.0, "b": 3.0, "c": 2.0}}, 2) == {"q": {"b": 3.0, "c": 2.0}}
    assert trec_order({"a": 1.0, "b": 1.0}) == [("b", 1.0), ("a", 1.0)]
    with pytest.raises(InputError, match="k must be a positive integer, got 0"):
        write_run({"q": {"a": 1.0}}, path, k=0)
    with pytest.raises(InputError, match="docid 'doc a': a TREC run's ids cannot hold whitespace"):
        write_run({"q": {"doc a": 1.0}}, path)
    assert read_run(path) == {"q": {"d9": 9.0, "d8": 8.0, "d7": 7.0}}      # the file before either


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    bom = "\ufeff"
    assert read_topics(write(tmp_path / "t.tsv", bom + "1\tcat\n")) == {"1": "cat"}
    assert list(read_qrels(write(tmp_path / "q.txt", bom + "1 0 d1 2\n"))) == ["1"]
    assert list(read_run(write(tmp_path / "r.trec", bom + "1 Q0 d1 1 2.0 t\n"))) == ["1"]
    assert Collection(write(tmp_path / "c.tsv", bom + "d1\tone\nd2\ttwo\n"))["d1"] == "one"
    assert Collection(write(tmp_path / "c.jsonl", bom + '{"id": "d1", "contents": "one"}\n'))["d1"] == "one"


@pytest.mark.parametrize("content, expected", [
    ("q1 Q0 d1 1 1.0\n", r"bad\.trec:1: expected 6 columns"),
    ("q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 high t\n", r"bad\.trec:2: score 'high' is not a number"),
    ("q1 Q0 d1 1 nan t\n", r"bad\.trec:1: score 'nan' is not finite"),
    ("q1 Q0 d1 1 1.0 t\nq1 Q0 d1 2 0.5 t\n", r"bad\.trec:2: duplicate \(qid, docid\) = \(q1, d1\)"),
    ("", r"bad\.trec: empty run file"),
    ("\n\n", r"bad\.trec: empty run file"),
])
def test_bad_run_lines_name_file_and_line(tmp_path, content, expected):
    with pytest.raises(InputError, match=expected):
        read_run(write(tmp_path / "bad.trec", content))


@pytest.mark.parametrize("content, expected", [
    ("q1 0 d1\n", r"bad\.qrels:1: expected 4 columns"),
    ("q1 0 d1 1\nq1 0 d2 two\n", r"bad\.qrels:2: grade 'two' is not an integer"),
    ("q1 0 d1 1\nq1 0 d1 2\n", r"bad\.qrels:2: \(q1, d1\) judged twice"),
    ("", r"bad\.qrels: empty qrels file"),
])
def test_bad_qrels_lines_name_file_and_line(tmp_path, content, expected):
    with pytest.raises(InputError, match=expected):
        read_qrels(write(tmp_path / "bad.qrels", content))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(InputError, match="no such run file"):
        read_run(tmp_path / "absent.trec")
    with pytest.raises(InputError, match="absent.txt: no such qrels file"):
        read_qrels(tmp_path / "absent.txt")
    with pytest.raises(InputError, match="not an ir_datasets id"):
        read_topics("no-such-dataset/at-all")


def test_topics_tsv_trec_and_jsonl(tmp_path):
    tsv = write(tmp_path / "t.tsv", "1\thow do birds fly\n2\twhat is  a tab\n")
    assert read_topics(tsv) == {"1": "how do birds fly", "2": "what is  a tab"}
    trec = write(tmp_path / "t.txt", """<top>
<num> Number: 301
<title> international organized
crime
<desc> Description:
Identify organizations.
</top>

<top>
<num> Number: 302
<title> poliomyelitis
<desc> Description: x
</top>
""")
    assert read_topics(trec) == {"301": "international organized crime", "302": "poliomyelitis"}
    closed = write(tmp_path / "c.txt", "<top>\n<num> Number: 302 </num>\n<title> Post-Polio </title>\n"
                                       "<desc> the <title> and <num> tags in prose are words\n</top>\n"
                                       "<top><num>303</num><title>Hubble</title></top>\n")
    assert read_topics(closed) == {"302": "Post-Polio", "303": "Hubble"}
    with pytest.raises(InputError, match=r"u\.txt:3: topic has a <num> but no <title>"):
        read_topics(write(tmp_path / "u.txt", "<num> 1\n<title> a\n<num> 2\n<desc> b\n"))
    jsonl = write(tmp_path / "t.jsonl", json.dumps({"qid": 7, "query": "q seven"}) + "\n")
    assert read_topics(jsonl) == {"7": "q seven"}


@pytest.mark.parametrize("content, expected", [
    ("1 no tab here\n", r"t\.tsv:1: expected 'qid<TAB>query'"),
    ("1\ta\n1\tb\n", r"t\.tsv:2: qid 1 appears twice"),
    ("", r"t\.tsv: empty topics file"),
])
def test_bad_topics(tmp_path, content, expected):
    with pytest.raises(InputError, match=expected):
        read_topics(write(tmp_path / "t.tsv", content))


def test_jsonl_collection_streams_and_looks_up(tmp_path):
    rows = [{"id": "a", "contents": "first passage"}, {"id": "b", "contents": "Â° mojibake stays"},
            {"docid": "c", "title": "T", "text": "titled"}]
    path = write(tmp_path / "c.jsonl", "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    collection = Collection(path)
    assert [p.docid for p in collection] == ["a", "b", "c"]
    assert collection["b"] == "Â° mojibake stays"
    assert collection.texts(["c", "a"]) == ["T titled", "first passage"]
    assert "a" in collection and "zz" not in collection and len(collection) == 3
    with pytest.raises(InputError, match="docid 'zz' not found in collection"):
        collection.texts(["a", "zz"])


def test_tsv_collection(tmp_path):
    collection = Collection(write(tmp_path / "c.tsv", "1\tone\twith a tab\n2\ttwo\n"))
    assert collection["1"] == "one\twith a tab"
    assert [p.text for p in collection] == ["one\twith a tab", "two"]


def test_collection_bad_lines(tmp_path):
    no_id = write(tmp_path / "c.jsonl", '{"id": "a", "contents": "x"}\n{"contents": "y"}\n')
    with pytest.raises(InputError, match=r"c\.jsonl:2: passage has no 'id'"):
        list(Collection(no_id))
    broken = write(tmp_path / "d.jsonl", '{"id": "a", "contents": "x"\n')
    with pytest.raises(InputError, match=r"d\.jsonl:1: invalid JSON"):
        Collection(broken)["a"]


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"id": "a", "contents": "bad \xff byte"}\n')
    with pytest.warns(UserWarning, match=r"c\.jsonl:1: invalid UTF-8"):
        assert Collection(path)["a"] == "bad \ufffd byte"


def test_atomic_write_leaves_old_file_on_interrupt(tmp_path):
    path = write(tmp_path / "out.trec", "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as out:
            out.write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.trec"]


def test_real_dl19_files(dl19):
    run = read_run(dl19 / "runs" / "bm25.top100.trec")
    assert len(run) == 43 and all(len(docs) == 100 for docs in run.values())
    assert len(read_topics(dl19 / "topics.tsv")) == 43
    assert sum(len(g) for g in read_qrels(dl19 / "qrels.txt").values()) == 9260
    collection = Collection(dl19 / "passages.jsonl")
    assert len(collection) == 10852
    first_docid = next(iter(run["19335"]))
    assert collection[first_docid]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os
    path = tmp_path / "run.trec"
    write_run({"q": {"d": 1.0}}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
