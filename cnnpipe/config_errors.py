"""Config error messages: pydantic's validation errors -> one readable line naming the key.

Every config mistake is one `ConfigError` that names the full dotted key, the value
received and what was expected; an unknown key also suggests the nearest valid one.
Kept apart from the schema (`cnnpipe.config`) so the schema module stays one job.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "describe", "suggest", "short"]


class ConfigError(ValueError):
    """A config mistake: names the dotted key, the value and what was expected."""


def describe(exc: ValidationError, schema: type[BaseModel], *, prefix: str = "",
              sep: str = "", set_keys: Mapping[str, str] = {}) -> str:
    """One readable line per problem, joined with '; ' (no pydantic dump)."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        key = prefix + (sep if prefix and loc else "") + _dotted(loc)
        origin = next((f" (from --set {v!r})" for k, v in set_keys.items()
                       if key == k or key.startswith(k + ".") or k.startswith(key + ".")), "")
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        if kind == "extra_forbidden":
            valid = _fields_at(schema, loc[:-1])
            parent = key[: len(key) - len(str(loc[-1]))]
            hint = suggest(str(loc[-1]), valid, prefix=parent)
            lines.append(f"unknown key {key!r}{origin}{hint or ''}"
                         f"{'' if hint else '; valid keys here: ' + ', '.join(valid)}")
            continue
        if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
            lines.append(f"{ctx['error']}{origin}")
            continue
        if kind == "missing" and loc and isinstance(loc[-1], int):
            parent = key.rsplit("[", 1)[0]
            lines.append(f"{parent}: got {short(value)}{origin}; expected more items (item {loc[-1]} is missing)")
            continue
        if kind == "missing":
            lines.append(f"{key}: missing; this key is required")
            continue
        expected = _expected(kind, ctx, err["msg"])
        if lines and lines[-1].startswith(f"{key}: got ") and not kind.startswith("model"):
            # the next branch of a union (`auto | an integer`): one line, the branches joined by "or"
            first = lines[-1].rsplit("; expected ", 1)
            single = first[1].startswith("one of '") and first[1].count("'") == 2   # one literal, e.g. 'auto'
            lines[-1] = f"{first[0]}; expected {first[1].removeprefix('one of ') if single else first[1]}" \
                        f" or {expected.removeprefix('one of ')}"
            continue
        lines.append(f"{key}: got {short(value)}{origin}; expected {expected}")
    # a union of mappings and lists (e.g. `model`) reports each branch; keep the first line per key
    seen, unique = set(), []
    for line in lines:
        head = line.split(":")[0]
        if head not in seen:
            seen.add(head)
            unique.append(line)
    return "; ".join(unique)


def _expected(kind: str, ctx: Mapping[str, Any], msg: str) -> str:
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds and ctx:
        bound = next(iter(ctx.values()))
        what = "an integer" if isinstance(bound, int) else "a number"
        return f"{what} {bounds[kind]} {bound:g}"
    named = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string",
             "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping of keys", "model_attributes_type":
             "a mapping of keys"}
    if kind == "literal_error":
        return f"one of {ctx.get('expected', '?')}"
    if kind == "too_short" or kind == "too_long":
        return f"a list of {ctx.get('max_length', ctx.get('min_length'))} items" if "tuple" in msg else msg
    return named.get(kind, msg[0].lower() + msg[1:] if msg else "a valid value")


def _fields_at(schema: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    for part in loc:
        field = schema.model_fields.get(str(part)) if isinstance(part, str) else None
        sub = getattr(field, "annotation", None) if field else None
        # an optional block (`EarlyStoppingConfig | None`): the mapping's own schema
        models = [t for t in (typing.get_args(sub) or (sub,)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return []
        schema = models[0]
    return list(schema.model_fields)


def suggest(word: str, choices: Sequence[str], *, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union branch ("str", "tuple[...]") into the location
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "constrained-int",
                                                             "constrained-float"))


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
