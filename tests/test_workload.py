
import pytest

from conftest import make_tokenizer, write_jsonl
from uspx.io import UspxError
from uspx.workload import encode, load_workload, split_of


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(UspxError, match=r"w\.jsonl:3: not valid JSON"):
        load_workload(p)


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "w.jsonl"
    # line 3 holds a Latin-1 "é" (byte 0xe9), not UTF-8; earlier lines hold valid multi-byte UTF-8
    p.write_bytes('{"prompt": "caf\u00e9"}\n{"prompt": "b"}\n'.encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UspxError, match=r"w\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_workload(p)

    (tmp_path / "docs" / "code").mkdir(parents=True)
    (tmp_path / "docs" / "code" / "good.py").write_text("print('\u00e9')\n")
    (tmp_path / "docs" / "code" / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(UspxError, match=r"bad\.txt:2: not valid UTF-8 \(byte 0xff at column 6\)"):
        load_workload(tmp_path / "docs")


@pytest.mark.parametrize(
    "line, message",
    [
        ({"completion": "x"}, "exactly one of"),
        ({"prompt": "a", "text": "b"}, "exactly one of"),
        ({"prompt": 3}, "must be a string"),
        ({"prompt": "a", "split": "train"}, "'split' must be one of"),
        ({"messages": [{"role": "user"}]}, "'messages' must be a list"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_fields(tmp_path, line, message):
    p = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(UspxError, match=message) as info:
        load_workload(p)
    assert "w.jsonl:2" in str(info.value)


def test_empty_items_skipped_and_counted(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "   "}\n{"messages": []}\n{"prompt": "a"}\n{"text": "b"}\n')
    wl = load_workload(p)
    assert [i.prompt for i in wl.items] == ["a", "b"]
    assert wl.summary.lines == 6
    assert wl.summary.skipped_empty == 3  # blank line, whitespace prompt, empty messages
    assert wl.summary.duplicates == 1
    assert "3 empty and 1 duplicate items skipped" in wl.summary.lines_of_text()[0]


def test_split_is_stable_when_lines_are_appended(tmp_path):
    rows = [{"prompt": f"item {i}"} for i in range(200)]
    a = load_workload(write_jsonl(tmp_path / "a.jsonl", rows))
    b = load_workload(write_jsonl(tmp_path / "b.jsonl", rows + [{"prompt": f"new {i}"} for i in range(100)]))
    before = {i.id: i.split for i in a.items}
    after = {i.id: i.split for i in b.items}
    assert all(after[k] == v for k, v in before.items())
    share = sum(v == "heldout" for v in after.values()) / len(after)
    assert 0.1 < share < 0.3  # 20% by default, hash-distributed
    # an explicit split wins over the hash
    c = load_workload(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "item 0", "split": "heldout"}]))
    assert c.items[0].split == "heldout"
    assert split_of("x", 0.0) == "calibration" and split_of("x", 1.0) == "heldout"


def test_folder_workload_family_from_subfolder(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "shell").mkdir()
    (tmp_path / "code" / "a.py").write_text("print(1)\n")
    (tmp_path / "shell" / "b.sh").write_text("ls -la\n")
    (tmp_path / "shell" / "empty.txt").write_text("")
    wl = load_workload(tmp_path)
    assert sorted((i.family, i.prompt) for i in wl.items) == [("code", "print(1)\n"), ("shell", "ls -la\n")]
    assert wl.summary.skipped_empty == 1


def test_encode_truncates_prompt_first_and_counts(tmp_path):
    tok = make_tokenizer()
    p = write_jsonl(tmp_path / "w.jsonl", [
        {"prompt": "abcdefghij", "completion": "XYZ"},
        {"prompt": "ab", "completion": "cd"},
        {"text": "0123456789abcdef"},
    ])
    wl = load_workload(p)
    enc = {e.id: e for e in encode(wl, tok, max_length=8)}
    by_prompt = {i.prompt: enc[i.id] for i in wl.items}
    long = by_prompt["abcdefghij"]
    assert tok.decode(long.input_ids) == "fghijXYZ"  # prompt start cut, completion whole
    assert long.completion_start == 5
    short = by_prompt["ab"]
    assert tok.decode(short.input_ids) == "abcd" and short.completion_start == 2
    text = by_prompt["0123456789abcdef"]
    assert len(text.input_ids) == 8 and text.completion_start == 0  # no completion: every token counts
    assert wl.summary.truncated == 2 and wl.summary.truncated_tokens == (13 - 8) + (16 - 8)


def test_messages_use_chat_template(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    p = write_jsonl(tmp_path / "w.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "completion": "yo"}])
    enc = encode(load_workload(p), tok, 64)[0]
    assert tok.decode(enc.input_ids) == "[user]hiyo"
    assert tok.decode(enc.input_ids[enc.completion_start :]) == "yo"


def test_bundled_name_and_missing(tmp_path):
    with pytest.raises(UspxError, match="not a bundled workload"):
        load_workload(tmp_path / "nope.jsonl")
