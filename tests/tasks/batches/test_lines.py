"""The batch file parser: every bad line reported by its number (as an editor counts them) with what to
fix; too many lines, none, or bytes that are not UTF-8 refuse the file as a whole."""

from __future__ import annotations

import json

import pytest

from tasks.batches.lines import MAX_ERRORS, BadFile, parse


def _line(custom_id="a", url="/v1/chat/completions", method="POST", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})


def _errors(text: str, max_lines: int = 100) -> list[tuple]:
    with pytest.raises(BadFile) as bad:
        parse(text.encode(), max_lines)
    return [(e.line, e.code, e.param) for e in bad.value.errors]


def test_a_good_file_gives_its_requests_in_order_skipping_blank_lines():
    text = _line("x") + "\n\n" + _line("y", url="/v1/completions", model="m", prompt="p") + "\n"
    got = parse(text.encode(), 10)
    assert [(r.number, r.custom_id, r.url) for r in got] == [(1, "x", "/v1/chat/completions"), (3, "y", "/v1/completions")]
    assert got[1].body == {"model": "m", "prompt": "p"}


def test_every_bad_line_is_reported_with_its_number_and_what_to_fix():
    text = "\n".join([
        _line("ok"),
        '{"custom_id": "b", "method": "POST",',                  # 2: not JSON
        "[1, 2]",                                                 # 3: not an object
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),  # 4: no custom_id
        _line("ok"),                                              # 5: duplicate
        _line("c", method="GET"),                                 # 6
        _line("d", url="/v1/embeddings"),                         # 7
        json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": "hi"}),  # 8
        json.dumps({"custom_id": "f", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}),  # 9
    ])
    assert _errors(text) == [(2, "invalid_json_line", None), (3, "invalid_json_line", None),
                             (4, "missing_custom_id", "custom_id"), (5, "duplicate_custom_id", "custom_id"),
                             (6, "invalid_method", "method"), (7, "invalid_url", "url"), (8, "invalid_request", "body"),
                             (9, "invalid_request", "extra")]
    with pytest.raises(BadFile) as bad:
        parse(text.encode(), 100)
    assert "line 5: custom_id 'ok' is already used on line 1" in str(bad.value)


def test_the_file_as_a_whole_too_many_lines_none_or_not_utf8():
    assert _errors("\n".join(_line(str(i)) for i in range(4)), max_lines=3) == [(None, "too_many_requests", None)]
    assert _errors("\n \n") == [(None, "empty_file", None)]
    with pytest.raises(BadFile) as bad:
        parse((_line("a") + "\n").encode() + b'{"custom_id": "\xff"}\n', 10)
    assert [(e.line, e.code) for e in bad.value.errors] == [(2, "invalid_encoding")]


def test_a_file_of_bad_lines_reports_the_first_hundred_and_how_many_more():
    with pytest.raises(BadFile) as bad:
        parse("\n".join("not json" for _ in range(150)).encode(), 1000)
    assert len(bad.value.errors) == MAX_ERRORS and bad.value.more == 50
    assert str(bad.value).endswith("and 140 more")
