"""AlpacaEval 1.0 as the paper ran it (Table 4): win rate against text-davinci-003's answers, judged by GPT-4 with
AlpacaEval's `alpaca_eval_gpt4` annotator.

The annotator is read from the pinned alpaca-eval 0.6.6 release: its prompt template (a ChatML system and user
message that asks for a ranking of "model_1" and "model_2" as a Python list of dicts) and its settings (model,
max_tokens, temperature, `ranking_parser`). AlpacaEval reads the judge's reply with `ast.literal_eval`; the kit
never evaluates a reply: `parse_ranking` reads the same Python-literal shapes with a strict parser of its own,
and a reply it cannot read is kept and counted as unparsed, never read as a preference.

AlpacaEval shows each pair once, in an order drawn per instruction (`switched`, exactly as alpaca_eval 0.6.6's
`RandomSwitchTwoColumnsProcessor` draws it), and maps the judge's answer back onto its preference scale (1: the
reference wins, 2: the model wins); so does the kit. With `evaluate.both_orders` the kit asks in both orders and
averages them, 1.5 (AlpacaEval's tie) where they disagree: an addition, not AlpacaEval's protocol. Identical
outputs are a tie without asking, as AlpacaEval does. The win rate and its standard error are AlpacaEval's:
mean(preference - 1) * 100 and the standard error of that mean (n - 1 in the variance).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from humpback_nb.config import ConfigError, EvaluateConfig

ANNOTATOR = "alpaca_eval_gpt4"
REFERENCE_HUB = "tatsu-lab/alpaca_eval"  # the hub dataset; its "alpaca_eval" config is text-davinci-003's outputs
REFERENCE_HUB_FILE = "alpaca_eval.json"  # the file that config reads

# How alpaca_eval 0.6.6 orders a pair (annotators/pairwise_evaluator.py, processors.py, utils.py): its
# PairwiseAnnotator switches output_1 (the reference) and output_2 (the model) where
# random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True]) says so, seed being the
# annotator's (0 as `alpaca_eval evaluate` makes it), and maps a switched preference x back to 3 - x.
SWITCH_COLUMN, SWITCH_SEED = "is_switched_outputs", 0

Messages = list[dict[str, str]]
Ask = Callable[[Messages], str]  # a conversation in, the judge's raw reply out


# -- the annotator -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Annotator:
    """An AlpacaEval annotator: its prompt template and the settings its completions are made with."""

    name: str
    template: str  # the whole template file: ChatML with {instruction}, {output_1}, {output_2}
    model: str
    max_tokens: int
    temperature: float
    parser: str


def load_annotator() -> Annotator:
    """AlpacaEval 1.0's annotator, `alpaca_eval_gpt4`, from the pinned alpaca-eval release."""
    from humpback_nb.infra.sources import fetch

    config = yaml.safe_load(fetch("alpaca_eval_gpt4_config").read_text(encoding="utf-8"))[ANNOTATOR]
    settings = config["completions_kwargs"]
    if config["fn_completion_parser"] != "ranking_parser" or config.get("batch_size", 1) != 1:
        raise ValueError(f"{ANNOTATOR}: expected ranking_parser with batch_size 1, got {config}")
    return Annotator(ANNOTATOR, fetch("alpaca_eval_gpt4_prompt").read_text(encoding="utf-8"),
                     settings["model_name"], int(settings["max_tokens"]), float(settings["temperature"]),
                     config["fn_completion_parser"])


def render_prompt(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """The template filled as AlpacaEval fills it: each placeholder, in the order it first appears, replaced at
    its first occurrence only, one after the other (so a placeholder written inside an earlier value is filled
    too, as there)."""
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    prompt = template
    for key in dict.fromkeys(re.findall(r"{([^ \s]+?)}", template)):
        prompt = prompt.replace("{" + key + "}", str(values[key]), 1)
    return prompt


def to_messages(prompt: str) -> Messages:
    """A ChatML prompt as chat messages, split as AlpacaEval splits it before sending it to a chat model."""
    prompt = prompt.strip()
    if not (prompt.startswith("<|im_start|>") and prompt.endswith("<|im_end|>")):
        raise ValueError("not a ChatML prompt")
    messages = []
    for part in prompt.split("<|im_start|>")[1:]:
        role, _, rest = part.partition("\n")
        messages.append({"content": rest.split("<|im_end|>", 1)[0].strip(), "role": role.strip()})
    return messages


# -- the parser ----------------------------------------------------------------------------------
class _Unreadable(Exception):
    """The reply is not one of the literal shapes `parse_ranking` reads."""


_TOKEN = re.compile(r"""
    (?P<space>[ \t]+|\\(?:\r\n|\r|\n))
  | (?P<newline>\r\n|\r|\n)
  | (?P<comment>\#[^\r\n]*)
  | (?P<triple>[uUrR]?(?:'{3}|"{3}))
  | (?P<string>[uUrR]?'(?:[^'\\\r\n]|\\(?:\r\n|[\s\S]))*'|[uUrR]?"(?:[^"\\\r\n]|\\(?:\r\n|[\s\S]))*")
  | (?P<number>(?:(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|0+|[1-9]\d*)(?![\w.]))
  | (?P<name>(?:True|False|None)(?!\w))
  | (?P<punct>[\[\](){}:,+-])
""", re.VERBOSE)
_ESCAPE = re.compile(r"""\\(?:(\r\n|\n|\r)|([\\'"abfnrtv])|([0-7]{1,3})|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})
                         |U([0-9a-fA-F]{8})|([xuUN])|([\s\S]))""", re.VERBOSE)
_SIMPLE = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
           "v": "\v"}
_CLOSE = {"[": "]", "(": ")", "{": "}"}
_MAX_DEPTH = 100  # Python's parser refuses 200 nested brackets; a ranking needs 2


def _unescape(match: re.Match) -> str:
    newline, simple, octal, x, u, big, bad, other = match.groups()
    if newline is not None:
        return ""
    if simple is not None:
        return _SIMPLE[simple]
    if bad is not None:  # \x, \u, \U without their digits, or \N{...}: not read here
        raise _Unreadable
    if other is not None:
        return "\\" + other  # Python keeps an unknown escape as it is
    code = int(octal, 8) if octal else int(x or u or big, 16)
    if code > 0x10FFFF:
        raise _Unreadable
    return chr(code)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _Unreadable
        tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


class _Literal:
    """A recursive-descent reader of the Python literals a ranking is written in: lists, tuples, dicts, strings
    (quoted with ' or ", plain, u or r; adjacent ones joined), numbers (with a sign), True, False, None;
    comments and line breaks where Python allows them in an expression read on its own."""

    def __init__(self, text: str):
        self.tokens, self.pos, self.depth = _tokens(text.lstrip(" \t")), 0, 0

    def read(self) -> Any:
        self._skip_blank_lines()
        value = self._expression_list()
        while self.pos and self.tokens[self.pos - 1][0] == "space":  # look again at what followed the expression
            self.pos -= 1
        self._rest_is_blank()
        return value

    # layout
    def _peek(self) -> tuple[str, str] | None:
        while self.pos < len(self.tokens):
            kind, _ = self.tokens[self.pos]
            if kind == "space" or (self.depth and kind in ("newline", "comment")):
                self.pos += 1
                continue
            return self.tokens[self.pos]
        return None

    def _skip_blank_lines(self) -> None:
        """Lines with nothing but a comment before the expression; the expression's line must not be indented."""
        while True:
            line_start, indented = self.pos, False
            while self.pos < len(self.tokens) and self.tokens[self.pos][0] == "space":
                indented, self.pos = True, self.pos + 1
            if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "comment":
                self.pos += 1
            if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "newline":
                self.pos += 1
                continue
            if indented and line_start > 0:
                raise _Unreadable
            self.pos = line_start
            return

    def _rest_is_blank(self) -> None:
        """After the expression: blank or comment lines only (an indented last line without a comment is not)."""
        lines: list[list[str]] = [[]]
        for kind, text in self.tokens[self.pos:]:
            if kind == "newline":
                lines.append([])
            elif kind == "comment" or (kind == "space" and not text.startswith("\\")):
                lines[-1].append(kind)
            else:
                raise _Unreadable
        if len(lines) > 1 and lines[-1] == ["space"]:
            raise _Unreadable  # Python reads an indented last line as an unexpected indent

    def _take(self, text: str | None = None, kind: str | None = None) -> str:
        token = self._peek()
        if token is None or (text is not None and token[1] != text) or (kind is not None and token[0] != kind):
            raise _Unreadable
        self.pos += 1
        return token[1]

    def _at(self, text: str) -> bool:
        token = self._peek()
        return token is not None and token[0] == "punct" and token[1] == text

    # grammar
    def _expression_list(self) -> Any:
        first = self._value()
        if not self._at(","):
            return first
        items = [first]
        while self._at(","):
            self._take(",")
            token = self._peek()
            if token is None or token[0] in ("newline", "comment") or token[1] in ")]}":
                break
            items.append(self._value())
        return tuple(items)

    def _value(self) -> Any:
        token = self._peek()
        if token is None:
            raise _Unreadable
        kind, text = token
        if kind == "string":
            return self._strings()
        if kind == "number" or (kind == "punct" and text in "+-"):
            return self._number()
        if kind == "name":
            self.pos += 1
            return {"True": True, "False": False, "None": None}[text]
        if kind == "punct" and text in _CLOSE:
            return self._container(text)
        raise _Unreadable

    def _strings(self) -> str:
        parts = []
        while (token := self._peek()) is not None and token[0] == "string":
            self.pos += 1
            prefix, body = token[1][0].lower(), token[1][token[1].index(token[1][-1]) + 1:-1]
            parts.append(body if prefix == "r" else _ESCAPE.sub(_unescape, body))
        return "".join(parts)

    def _number(self) -> int | float:
        sign = -1 if self._at("-") else 1
        if self._at("-") or self._at("+"):
            self.pos += 1
        text = self._take(kind="number")
        value = float(text) if any(c in text for c in ".eE") else int(text)
        return sign * value

    def _container(self, opening: str) -> Any:
        closing = _CLOSE[opening]
        self._take(opening)
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _Unreadable
        items, pairs, commas = [], [], 0
        while not self._at(closing):
            if opening == "{":
                key = self._value()
                self._take(":")
                pairs.append((key, self._value()))
            else:
                items.append(self._value())
            if not self._at(","):
                break
            self._take(",")
            commas += 1
        self._take(closing)
        self.depth -= 1
        if opening == "[":
            return items
        if opening == "(":
            return items[0] if len(items) == 1 and commas == 0 else tuple(items)
        if items:  # a set: never a ranking
            raise _Unreadable
        result = {}
        for key, value in pairs:
            try:
                result[key] = value
            except TypeError:  # an unhashable key
                raise _Unreadable from None
        return result


def parse_ranking(reply: str, model_1: str = "model_1") -> int | None:
    """The preference of `ranking_parser` (alpaca_eval_gpt4's parser) for a reply: 1 when output_1 is ranked
    first, 2 when output_2 is; None for a reply it would not read, which is then kept as unparsed.

    The reply must be a Python literal, alone; it is iterated, every item must be a dict with a "model" key, and
    the first item whose model is `model_1` must have a rank equal to 1 or 2. The literal is read by `_Literal`,
    never evaluated; literal forms it does not read (bytes, f-strings, triple quotes across lines, sets, hex, complex
    or underscored numbers, ...)
    leave a reply unparsed, so where it differs from AlpacaEval it only ever reads less."""
    if "\x00" in reply:  # Python refuses source text with a null byte
        return None
    try:
        ranking = _Literal(reply).read()
    except (_Unreadable, RecursionError, ValueError):
        return None
    if not isinstance(ranking, list | tuple):
        return None
    if not all(isinstance(item, dict) and "model" in item for item in ranking):
        return None
    firsts = [item for item in ranking if item["model"] == model_1]
    if not firsts or "rank" not in firsts[0]:
        return None
    rank = firsts[0]["rank"]
    if isinstance(rank, int | float) and rank in (1, 2):
        return int(rank)
    return None


# -- reference answers ---------------------------------------------------------------------------
def load_reference(source: str | Path) -> list[dict[str, Any]]:
    """Reference answers in AlpacaEval's model-outputs format (a JSON list of {instruction, output, generator,
    dataset}) from a file, or text-davinci-003's from the hub dataset when `source` is "tatsu-lab/alpaca_eval"."""
    path = _hub_reference() if str(source) == REFERENCE_HUB else Path(source)
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                             and isinstance(r.get("output"), str) for r in rows):
        raise ValueError(f"{source}: not AlpacaEval model outputs (a list of objects with instruction and output)")
    return rows


def _hub_reference() -> Path:
    """text-davinci-003's outputs on the 805 prompts: the file behind the hub dataset's "alpaca_eval" config."""
    from huggingface_hub import hf_hub_download

    from humpback_nb.infra.sources import from_hub

    with from_hub(f"{REFERENCE_HUB} ({REFERENCE_HUB_FILE})", "evaluate.reference",
                  "a local AlpacaEval model-outputs JSON file of the reference's answers"):
        return Path(hf_hub_download(REFERENCE_HUB, REFERENCE_HUB_FILE, repo_type="dataset"))


def match_reference(answers: list[dict[str, Any]], reference: list[dict[str, Any]]
                    ) -> tuple[list[tuple[dict[str, Any], str]], list[dict[str, Any]]]:
    """(answer, reference output) for each answer whose instruction text is in the reference (AlpacaEval's key),
    and the answers whose instruction is not. The first reference row wins for a repeated instruction."""
    by_instruction: dict[str, str] = {}
    for row in reference:
        by_instruction.setdefault(row["instruction"], row["output"])
    matched = [(a, by_instruction[a["instruction"]]) for a in answers if a["instruction"] in by_instruction]
    unmatched = [a for a in answers if a["instruction"] not in by_instruction]
    return matched, unmatched


# -- annotation and win rate ---------------------------------------------------------------------
def switched(instruction: str) -> bool:
    """True where AlpacaEval 1.0 shows this instruction's model output first and the reference second."""
    return random.Random(f"{SWITCH_COLUMN}{instruction}{SWITCH_SEED}").choices([False, True], k=1)[0]


def annotate_pair(ask: Ask, annotator: Annotator, instruction: str, reference: str, output: str,
                  both_orders: bool = False) -> dict[str, Any]:
    """One pair annotated as AlpacaEval does: once, in the order `switched` draws, the preference in AlpacaEval's
    frame (1: the reference wins, 2: the model wins); with `both_orders`, in both orders and their mean. None with
    the replies in `unparsed` when a reply cannot be read. Identical outputs are a tie (1.5) without asking."""
    if reference == output:
        return {"reference_first": 1.5, "output_first": 1.5, "preference": 1.5, "replies": {}}
    if not both_orders:
        order = "output_first" if switched(instruction) else "reference_first"
        shown = (output, reference) if order == "output_first" else (reference, output)
        reply = ask(to_messages(render_prompt(annotator.template, instruction, *shown)))
        ranked = parse_ranking(reply)
        preference = None if ranked is None else 3 - ranked if order == "output_first" else ranked
        record = {order: preference, "preference": preference, "replies": {order: reply}}
        return record if ranked is not None else record | {"unparsed": {order: reply}}
    replies = {"reference_first": ask(to_messages(render_prompt(annotator.template, instruction, reference, output))),
               "output_first": ask(to_messages(render_prompt(annotator.template, instruction, output, reference)))}
    first, second = parse_ranking(replies["reference_first"]), parse_ranking(replies["output_first"])
    record = {"reference_first": first, "output_first": None if second is None else 3 - second,
              "replies": replies}
    if first is None or second is None:
        unparsed = {k: r for k, r in replies.items() if parse_ranking(r) is None}
        return record | {"preference": None, "unparsed": unparsed}
    return record | {"preference": (first + 3 - second) / 2}


def win_rate(preferences: Sequence[float]) -> dict[str, Any]:
    """AlpacaEval's win rate of preferences in [1, 2] (1.5: a tie): mean(preference - 1) * 100, its standard
    error (of the mean, n - 1 in the variance) * 100, and the counts AlpacaEval reports."""
    shifted = [p - 1 for p in preferences]
    n = len(shifted)
    return {"win_rate": 100 * statistics.fmean(shifted) if n else None,
            "standard_error": 100 * statistics.stdev(shifted) / math.sqrt(n) if n > 1 else None,
            "n_wins": sum(s > 0.5 for s in shifted), "n_wins_base": sum(s < 0.5 for s in shifted),
            "n_draws": sum(p == 1.5 for p in preferences), "n_total": n}


def evaluate(ask: Ask, annotator: Annotator, answers: list[dict[str, Any]], reference: list[dict[str, Any]],
             partial: Path | None = None, progress: bool = False, desc: str = "AlpacaEval 1.0",
             both_orders: bool = False, workers: int = 1) -> dict[str, Any]:
    """AlpacaEval 1.0 win rate of `answers` against `reference`, with every annotation. Answers whose instruction
    is not in the reference are listed in `unmatched`; pairs with an unreadable reply are counted in `unparsed`
    and left out of the win rate. With `partial`, each annotated pair is appended there at once and a rerun
    annotates only the pairs missing there (for the very same texts and orders). `both_orders`: `annotate_pair`.
    `workers` pairs are annotated at once (an endpoint's requests in flight)."""
    from humpback_nb.infra.batches import in_batches

    pairs, unmatched = match_reference(answers, reference)
    keys = [_pair_key(a, ref, annotator, both_orders) for a, ref in pairs]

    def annotate(number: int, batch: list[int]) -> list[dict[str, Any]]:
        a, ref = pairs[batch[0]]
        return [{"id": keys[batch[0]], "dataset": a.get("dataset"),
                 **annotate_pair(ask, annotator, a["instruction"], ref, a["output"], both_orders)}]

    records = in_batches(keys, [[i] for i in range(len(keys))], annotate, partial=partial, progress=progress,
                         desc=desc, unit="pair", workers=workers)
    annotations = [record | {"id": a["id"]} for (a, _), record in zip(pairs, records, strict=True)]
    preferences = [r["preference"] for r in annotations if r["preference"] is not None]
    result = win_rate(preferences)
    # the same numbers in the shape of the kit's other win rates (winrates.compare), for its tables and plots
    overall = {"n": result["n_total"], "win_rate": result["win_rate"], "se": result["standard_error"],
               "wins": result["n_wins"], "ties": result["n_draws"], "losses": result["n_wins_base"],
               "pairs": len(pairs), "unparsed": len(pairs) - len(preferences)}
    return {"annotator": annotator.name,
            "generator": answers[0].get("generator") if answers else None,
            "reference": reference[0].get("generator") if reference else None,
            **result, "pairs": len(pairs), "unparsed": len(pairs) - len(preferences),
            "unmatched": [a["id"] for a in unmatched], "overall": overall, "annotations": annotations}


def _pair_key(answer: dict[str, Any], reference: str, annotator: Annotator, both_orders: bool = False) -> str:
    """The answer's id and a digest of what is judged, so a stored annotation is never read for other texts."""
    texts = json.dumps([answer["instruction"], answer["output"], reference, annotator.name, annotator.model]
                       + (["both orders"] if both_orders else []))
    return f"{answer['id']}#{hashlib.sha256(texts.encode()).hexdigest()[:16]}"


def endpoint_ask(judge, annotator: Annotator) -> Ask:
    """The judge's raw reply to a conversation, with the annotator's max_tokens and temperature."""
    return lambda messages: judge.chat(messages, annotator.max_tokens, annotator.temperature)


def protocol(settings: EvaluateConfig) -> str:
    """What the eval stage's win rates are, in words: AlpacaEval 1.0, or the kit's judge against the base model
    (not the paper's protocol). `ConfigError` for settings that mix the two."""
    if settings.annotator == "kit":
        if settings.reference != "base":
            raise ConfigError(f"evaluate.reference {settings.reference!r} needs evaluate.annotator: {ANNOTATOR}; "
                              "the kit's judge compares with the base model (reference: base)")
        judge = f"{settings.judge} judge with the kit's prompt" if settings.judge_url else "local judge"
        return f"{judge} vs base model: not the paper's protocol"
    if not settings.judge_url or settings.reference == "base":
        raise ConfigError(f"evaluate.annotator {ANNOTATOR} needs evaluate.judge_url (an OpenAI-compatible endpoint "
                          f"serving evaluate.judge, gpt-4 in the paper) and evaluate.reference (an AlpacaEval "
                          f"model-outputs file, or {REFERENCE_HUB!r} for text-davinci-003's outputs)")
    reference = "text-davinci-003" if settings.reference == REFERENCE_HUB else Path(settings.reference).name
    orders = ("; both orders averaged: an addition to AlpacaEval's one order per instruction"
              if settings.both_orders else "")
    return f"AlpacaEval 1.0 ({ANNOTATOR} annotator, {settings.judge} judge, {reference} reference{orders})"
