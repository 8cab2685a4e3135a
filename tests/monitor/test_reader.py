"""Reading JSON lines with offsets: times, bad lines, unfinished lines, folders and stdin."""

import io
import json

import pytest

from gptforge.errors import DataError
from gptforge.monitor.reader import NO_KEY, BadLine, Inputs, Item, iso_time, parse_line, parse_time


@pytest.mark.parametrize("value, expected", [
    ("2026-12-07T09:30:00Z", 1796635800.0),
    ("2026-12-07T10:30:00+01:00", 1796635800.0),
    ("2026-12-07T09:30:00", 1796635800.0),          # naive: UTC
    ("2026-12-07 09:30:00.500Z", 1796635800.5),
    (1796635800, 1796635800.0),
    (1796635800.25, 1796635800.25),
    ("1796635800", 1796635800.0),
])
def test_times_are_iso_8601_or_epoch_seconds(value, expected):
    assert parse_time(value) == expected
    assert parse_time(iso_time(expected)) == expected


@pytest.mark.parametrize("value", ["yesterday", "", True, [1], float("nan")])
def test_bad_times_are_refused(value):
    with pytest.raises(ValueError):
        parse_time(value)


def test_a_line_becomes_an_item_with_its_offset_key_and_time():
    item = parse_line(b'{"text": "Acme up", "key": "ACME", "time": 5, "extra": 1}', "f.jsonl", 3, 120)
    assert isinstance(item, Item)
    assert (item.source, item.line, item.offset, item.key, item.time, item.time_from) == ("f.jsonl", 3, 120, "ACME",
                                                                                       5.0, "item")
    assert item.record["extra"] == 1
    plain = parse_line(b'{"text": "no key, no time", "key": 7}', "f", 1, 10)
    assert plain.key == "7" and plain.time_from == "arrival"
    assert parse_line(b'{"text": "x"}', "f", 1, 1).key == NO_KEY


@pytest.mark.parametrize("raw, fragment", [
    (b'{"text": "x"', "not valid JSON"),
    (b'["text"]', "must be a JSON object, got a JSON list"),
    (b'{"title": "x"}', 'needs a non-empty "text" string'),
    (b'{"text": "   "}', 'needs a non-empty "text" string'),
    (b'{"text": 5}', 'needs a non-empty "text" string'),
    (b'{"text": "x", "time": "soon"}', "neither ISO 8601"),
    (b'{"text": "x", "key": {"a": 1}}', '"key" must be a non-empty string or a number'),
    (b'{"text": "bad \\ud800 escape"}', "lone surrogate"),
    (b'{"text": "caf\xe9"}', "byte 0xe9 is not valid UTF-8"),
])
def test_bad_lines_say_why(raw, fragment):
    bad = parse_line(raw, "news.jsonl", 7, 99)
    assert isinstance(bad, BadLine)
    assert fragment in bad.message
    assert bad.describe().startswith("news.jsonl:7: ")


def test_an_unfinished_last_line_is_left_until_its_newline_arrives(tmp_path):
    path = tmp_path / "news.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "tw')
    inputs = Inputs(str(path), {})
    lines = inputs.poll(10)
    assert [(s, n, o) for s, n, o, _ in lines] == [("news.jsonl", 1, 16)]
    assert inputs.poll(10) == []
    with open(path, "ab") as f:
        f.write(b'o"}\n\n{"text": "three"}\n')
    lines = inputs.poll(10)
    assert [(n, json.loads(raw)["text"]) for _, n, _, raw in lines] == [(2, "two"), (4, "three")]  # 3 is blank
    assert lines[-1][2] == path.stat().st_size


def test_at_the_end_a_whole_object_without_newline_is_taken_and_a_fragment_is_not(tmp_path, caplog):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'{"text": "one"}\n{"text": "two"}')
    b.write_bytes(b'{"text": "one"}\n{"text": "tw')
    inputs = Inputs(str(tmp_path), {})
    assert len(inputs.poll(10)) == 2
    last = inputs.final_lines()
    assert [(s, n, o) for s, n, o, _ in last] == [("a.jsonl", 2, a.stat().st_size)]
    assert "b.jsonl ends with an unfinished line" in caplog.text


def test_a_folder_is_read_in_name_order_from_recorded_positions_and_new_files_join(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n{"text": "a2"}\n')
    (tmp_path / "notes.txt").write_text("not read\n")
    inputs = Inputs(str(tmp_path), {"a.jsonl": (15, 1)})  # a1 was done
    assert [json.loads(raw)["text"] for _, _, _, raw in inputs.poll(10)] == ["a2", "b1", "b2"]
    (tmp_path / "c.jsonl").write_text('{"text": "c1"}\n')
    assert [(s, n) for s, n, _, _ in inputs.poll(10)] == [("c.jsonl", 1)]


def test_a_file_removed_from_a_folder_is_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n')
    inputs = Inputs(str(tmp_path), {})
    assert len(inputs.poll(10)) == 2
    (tmp_path / "a.jsonl").unlink()
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n')
    assert [(s, n) for s, n, _, _ in inputs.poll(10)] == [("b.jsonl", 2)]
    assert "a.jsonl was removed" in caplog.text and list(inputs.sources) == ["b.jsonl"]


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "news.jsonl"
    path.write_text('{"text": "one"}\n')
    with pytest.raises(DataError, match="shorter .* it was truncated or replaced"):
        Inputs(str(path), {"news.jsonl": (500, 9)}).poll(10)


def test_missing_input_is_one_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Inputs(str(tmp_path / "nope.jsonl"), {})


def test_stdin_lines_have_stream_offsets():
    stream = io.BytesIO(b'{"text": "one"}\n{"text": "two"}\n')
    inputs = Inputs("-", {}, stdin=stream)
    lines = inputs.poll(10)
    assert [(s, n, o) for s, n, o, _ in lines] == [("-", 1, 16), ("-", 2, 32)]
    assert inputs.poll(10) == [] and inputs.at_end
