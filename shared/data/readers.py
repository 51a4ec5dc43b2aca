"""Reading rows from local files and turning rows into records, with file:line errors.

Local layouts (one JSON object per line in .jsonl; a JSON array or JSON lines in .json):

- pairwise: {"prompt", "chosen", "rejected"}  (DeepSpeed-Chat's local json)
- nemo_comparison: {"text": prompt + sep + good} then {"text": prompt + sep + bad}, pair by pair
  (NeMo-RLHF's reward-model JSONL); `sep` is DataConfig.prompt_response_separator
- ranking: {"prompt", "responses": [best, ..., worst]} with at least two responses
- prompt: {"prompt"}, optionally {"reference"} or {"answer"} (used only by eval metrics)
- sft: {"prompt", "response"} (or "chosen" in place of "response")
- text: {"text"}, or a .txt file with one document per line (ptx data)

A missing field, a wrong type, malformed JSON, a line longer than `data.max_line_bytes` or bytes
that are not UTF-8 raise `DataError` naming file and line. A row with a null field, an empty
response or identical chosen/rejected is skipped and counted.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from shared.data.records import (
    DataError,
    DataReport,
    PairwiseExample,
    PromptExample,
    RankingExample,
    Record,
    SFTExample,
    TextExample,
)

Row = tuple[Mapping[str, Any], str]
"""A row's fields and where it came from ("file.jsonl:12" or "name[train] row 11")."""

LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")
"""Files read here; any other local file or directory goes through `datasets`."""


class SkipRow(Exception):
    """Raised by row parsers for a row to drop; `reason` becomes the report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


DEFAULT_MAX_LINE_BYTES = 16 * 2**20
"""`DataConfig.max_line_bytes`' default: 16 MiB."""


def read_lines(
    path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, str]]:
    """Yields (line number, text) of a UTF-8 file, split at "\\n" (a trailing "\\r" dropped).

    A line longer than `max_line_bytes` raises `DataError` once that many bytes (and two for
    the line end) are read, never holding more of it; bytes that are not UTF-8 raise one
    naming the line, column and byte. A UTF-8 byte-order mark at the start is skipped.
    """
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 2)  # the limit, "\r\n", and nothing more
            if not raw:
                return
            lineno += 1
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            if len(body) > max_line_bytes:
                raise DataError(
                    f"{path}:{lineno}: line longer than data.max_line_bytes = {max_line_bytes} "
                    "bytes; split the record, or raise data.max_line_bytes if it is meant to "
                    "be this long"
                )
            if lineno == 1 and body.startswith(b"\xef\xbb\xbf"):
                body = body[3:]
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(body[: e.start].decode("utf-8", errors="replace")) + 1
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{body[e.start]:02x} at column "
                    f"{column}: {e.reason}); re-encode the file as UTF-8"
                ) from None
            yield lineno, text


def read_local_rows(
    path: str,
    report: DataReport,
    label: str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Row]:
    """Yields (fields, "path:line") from a .json, .jsonl or .txt file; errors name the line.

    Lines are read one at a time through `read_lines` (at most `max_line_bytes` each, UTF-8);
    a .json file holding one JSON array is joined and decoded item by item.
    """
    lines = read_lines(path, max_line_bytes)
    rows = 0
    if path.endswith(".txt"):
        for lineno, line in lines:
            if not line.strip():
                report.add(f"{label}/skipped/blank_line")
                continue
            rows += 1
            yield {"text": line}, f"{path}:{lineno}"
    else:
        head: list[str] = []
        for _, line in lines:  # a .json file may hold an array: look at its first text
            head.append(line)
            if line.strip():
                break
        if path.endswith(".json") and head and head[-1].lstrip().startswith("["):
            text = "\n".join(head + [line for _, line in lines])
            for row, lineno in _json_array_items(text, path):
                rows += 1
                yield _as_object(row, f"{path}:{lineno}"), f"{path}:{lineno}"
        else:
            numbered = itertools.chain(enumerate(head, start=1), lines)
            for lineno, line in numbered:
                if not line.strip():
                    report.add(f"{label}/skipped/blank_line")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                    ) from None
                rows += 1
                yield _as_object(row, f"{path}:{lineno}"), f"{path}:{lineno}"
    if rows == 0:
        raise DataError(f"{path}: file is empty (no rows)")


def _json_array_items(text: str, path: str) -> Iterator[tuple[Any, int]]:
    """Decodes a top-level JSON array item by item, so each item's line is known."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, what: str) -> DataError:
        return DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: malformed JSON ({what})")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        yield item, line
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise fail(pos + 1, "extra data after the array")
            return
        else:
            raise fail(pos, "expected ',' or ']' after an array item")


def _as_object(row: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def get_str(row: Mapping[str, Any], key: str, where: str, fmt: str) -> str:
    """The string field `key`; missing or wrong type raises, null skips the row."""
    if key not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: missing field {key!r} for format {fmt!r} (found: {keys})")
    value = row[key]
    if value is None:
        raise SkipRow("null_field")
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r:.40})"
        )
    return value


def _response(text: str) -> str:
    if not text.strip():
        raise SkipRow("empty_response")
    return text


def make_pair(prompt: str, chosen: str, rejected: str) -> PairwiseExample:
    """A PairwiseExample, skipping empty or identical responses."""
    if chosen == rejected:
        raise SkipRow("identical_responses")
    return PairwiseExample(prompt, _response(chosen), _response(rejected))


def _parse_pairwise(row: Mapping[str, Any], where: str) -> PairwiseExample:
    return make_pair(
        get_str(row, "prompt", where, "pairwise"),
        get_str(row, "chosen", where, "pairwise"),
        get_str(row, "rejected", where, "pairwise"),
    )


def _parse_ranking(row: Mapping[str, Any], where: str) -> RankingExample:
    prompt = get_str(row, "prompt", where, "ranking")
    if "responses" not in row:
        raise DataError(f"{where}: missing field 'responses' for format 'ranking'")
    responses = row["responses"]
    if responses is None:
        raise SkipRow("null_field")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: field 'responses' must be a list of strings, best first")
    if len(responses) < 2:
        raise DataError(f"{where}: field 'responses' needs at least 2 items, got {len(responses)}")
    for response in responses:
        _response(response)
    if len(set(responses)) != len(responses):
        raise SkipRow("identical_responses")
    return RankingExample(prompt, tuple(responses))


def _parse_sft(row: Mapping[str, Any], where: str) -> SFTExample:
    key = "response" if "response" in row or "chosen" not in row else "chosen"
    prompt = get_str(row, "prompt", where, "sft")
    return SFTExample(prompt, _response(get_str(row, key, where, "sft")))


def _parse_prompt(row: Mapping[str, Any], where: str) -> PromptExample:
    prompt = get_str(row, "prompt", where, "prompt")
    for key in ("reference", "answer"):
        if row.get(key) is not None:
            return PromptExample(prompt, get_str(row, key, where, "prompt"))
    return PromptExample(prompt)


def _parse_text(row: Mapping[str, Any], where: str) -> TextExample:
    text = get_str(row, "text", where, "text")
    if not text.strip():
        raise SkipRow("empty_text")
    return TextExample(text)


ROW_PARSERS = {
    "pairwise": _parse_pairwise,
    "ranking": _parse_ranking,
    "sft": _parse_sft,
    "prompt": _parse_prompt,
    "text": _parse_text,
}


def detect_format(row: Mapping[str, Any], where: str) -> str:
    """Guesses the format of `format: auto` data from the fields of its first row."""
    keys = set(row)
    if "responses" in keys:
        return "ranking"
    if {"chosen", "rejected"} <= keys:
        return "pairwise"
    if "prompt" in keys and ({"response", "chosen"} & keys):
        return "sft"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{where}: cannot detect the format from fields {sorted(keys)}; set `format` to one of "
        "pairwise, nemo_comparison, ranking, prompt, sft, text"
    )


def split_common_prompt(first: str, second: str, marker: str) -> tuple[str, str, str] | None:
    """Splits two texts sharing a prompt at the last `marker` inside their common prefix.

    Returns (prompt, rest_of_first, rest_of_second), the prompt ending with `marker`, or None
    when the common prefix holds no marker.
    """
    n = 0
    limit = min(len(first), len(second))
    while n < limit and first[n] == second[n]:
        n += 1
    cut = first.rfind(marker, 0, n)
    if cut < 0 or cut + len(marker) > n:
        return None
    end = cut + len(marker)
    return first[:end], first[end:], second[end:]


def parse_nemo_comparisons(
    rows: Iterable[Row], separator: str, report: DataReport, label: str
) -> list[Record]:
    """Pairs NeMo comparison lines (good then bad, same prompt) into PairwiseExamples."""
    records: list[Record] = []
    pending: Row | None = None
    for row, where in rows:
        text = get_str(row, "text", where, "nemo_comparison")
        if separator not in text:
            raise DataError(f"{where}: prompt/response separator {separator!r} not found in text")
        if pending is None:
            pending = (row, where)
            continue
        good_where = pending[1]
        good = pending[0]["text"]
        pending = None
        split = split_common_prompt(good, text, separator)
        if split is None:
            raise DataError(
                f"{where}: prompt differs from the prompt of its 'good' line {good_where} "
                "(NeMo comparisons are good/bad line pairs sharing the prompt)"
            )
        try:
            records.append(make_pair(*split))
        except SkipRow as skip:
            report.add(f"{label}/skipped/{skip.reason}")
    if pending is not None:
        raise DataError(
            f"{pending[1]}: odd number of comparison lines; this 'good' line has no 'bad' partner"
        )
    return records


def parse_rows(rows: Iterable[Row], fmt: str, report: DataReport, label: str) -> list[Record]:
    """Applies the row parser of `fmt` to every row, counting skipped rows."""
    parse = ROW_PARSERS[fmt]
    records: list[Record] = []
    for row, where in rows:
        try:
            records.append(parse(row, where))
        except SkipRow as skip:
            report.add(f"{label}/skipped/{skip.reason}")
    return records
