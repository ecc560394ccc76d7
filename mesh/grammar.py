"""What a GBNF grammar may ask of llama.cpp: checked before ``llama_sampler_init_grammar`` sees it.

Both ends use this: the coordinator on every grammar it makes, the final stage on every grammar a
peer sends. llama.cpp's grammar code trusts its input, and some grammars end the process or stall
it (measured on this build, a thread with an 8 MiB stack; ``tests/test_structured_stage.py``):

- its parser recurses once per nested parenthesis: ~18,500 levels overflow the stack (SIGSEGV);
- its left-recursion check recurses along rules that can start a rule (``a ::= b ...``,
  ``b ::= c ...``): ~65,000 overflow; it never memoizes, so 16 rules of ``r ::= s "a" | s "b"``
  take 14 s (2^n paths), and the initial stacks then number 2^n, deduplicated in O(n^2);
- left recursion through a rule that is only indirectly empty (``n ::= m``, ``m ::= "z"?``)
  escapes that check and expands the stack forever;
- a sequence of many optional items makes as many stacks (50,000: 2.5 s, quadratic);
- ``{m,n}`` copies the preceding item m times and makes n - m rules.

This module reads the grammar the way llama.cpp's parser does (same tokens, same generated rules,
same repetition expansion, with a depth bound of its own) and refuses it unless every one of these
stays within ``mesh.transport.wire``'s limits: bytes, nesting, rules, elements, repetition bounds,
the longest chain of leading rule references, the calls of llama.cpp's left-recursion check, and
the number of stacks one position can expand to. It also refuses left recursion (through any
nullable prefix), undefined rules, a missing ``root`` and NUL bytes, which llama.cpp would either
refuse itself or not survive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import InvalidInputError
from mesh.transport.wire import (
    MAX_GRAMMAR_BYTES,
    MAX_GRAMMAR_CHAIN,
    MAX_GRAMMAR_ELEMENTS,
    MAX_GRAMMAR_LEFT_CALLS,
    MAX_GRAMMAR_NESTING,
    MAX_GRAMMAR_REPEAT,
    MAX_GRAMMAR_RULES,
    MAX_GRAMMAR_WIDTH,
)

_LLAMA_REPETITION_THRESHOLD = 2000  # llama.cpp's own MAX_REPETITION_THRESHOLD

_SPACE_NL = re.compile(r"(?:[ \t\r\n]+|#[^\r\n]*)*")
_SPACE = re.compile(r"(?:[ \t]+|#[^\r\n]*)*")
_NAME = re.compile(r"[a-zA-Z0-9-]+")
_ESC = r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[trn\\\"\[\]-])"
_LITERAL = re.compile(r'"((?:[^"\\]|' + _ESC + r')*)"')
_CLASS = re.compile(r"\[\^?((?:[^\]\\]|" + _ESC + r")*)\]")
_TOKEN = re.compile(r"!?<(?:\[[0-9]+\]|[^>]*)>")
_INT = re.compile(r"[0-9]+")


def _matched(match: re.Match[str] | None) -> re.Match[str]:
    """A match of a pattern that matches here (it may match the empty string)."""
    if match is None:
        raise RuntimeError("a grammar pattern did not match where it must")
    return match


def _refuse(why: str) -> InvalidInputError:
    return InvalidInputError(f"the grammar {why}")


@dataclass(frozen=True)
class GrammarStats:
    """What a checked grammar costs llama.cpp (each within its wire limit)."""

    rules: int  # named and generated, as llama.cpp counts symbols
    elements: int  # llama_grammar_elements after repetitions are expanded
    nesting: int  # deepest parenthesis
    chain: int  # longest chain of rules reached without consuming a character
    left_calls: int  # bound on llama.cpp's left-recursion check calls
    width: int  # most stacks one position expands to


class _Parser:
    """llama.cpp's GBNF parser (llama-grammar.cpp ``llama_grammar_parser``), on Python lists.

    A rule is a list of alternatives; an alternative a list of items: a rule id (>= 0), or minus
    the element count of a terminal (a literal, a character class, a token, ``.``)."""

    def __init__(self, text: str):
        self.src = text
        self.symbols: dict[str, int] = {}
        self.rules: dict[int, list[list[int]]] = {}
        self.elements = 0
        self.nesting = 0

    # -- symbols ---------------------------------------------------------------------------
    def _count(self) -> None:
        if len(self.symbols) > MAX_GRAMMAR_RULES:
            raise _refuse(f"has more than {MAX_GRAMMAR_RULES} rules")

    def symbol(self, name: str) -> int:
        ident = self.symbols.setdefault(name, len(self.symbols))
        self._count()
        return ident

    def generate(self, base: str) -> int:
        ident = len(self.symbols)
        self.symbols[f"{base}_{ident}"] = ident  # llama.cpp may overwrite a name here; so do we
        self._count()
        return ident

    def add(self, size: int) -> None:
        self.elements += size
        if self.elements > MAX_GRAMMAR_ELEMENTS:
            raise _refuse(f"expands to more than {MAX_GRAMMAR_ELEMENTS} elements")

    # -- text ------------------------------------------------------------------------------
    def space(self, pos: int, newline_ok: bool) -> int:
        return _matched((_SPACE_NL if newline_ok else _SPACE).match(self.src, pos)).end()

    def char(self, pos: int) -> str:
        return self.src[pos] if pos < len(self.src) else ""

    # -- grammar ---------------------------------------------------------------------------
    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.src):
            pos = self.rule(pos)
        for ident in self.symbols.values():
            if ident not in self.rules:
                raise _refuse("uses a rule it does not define")
        if "root" not in self.symbols:
            raise _refuse("has no root rule")

    def rule(self, pos: int) -> int:
        name = _NAME.match(self.src, pos)
        if name is None:
            raise _refuse(f"expects a rule name at offset {pos}")
        ident = self.symbol(name.group())
        pos = self.space(name.end(), False)
        if not self.src.startswith("::=", pos):
            raise _refuse(f"expects ::= at offset {pos}")
        pos = self.alternates(self.space(pos + 3, True), name.group(), ident, 0)
        if self.src.startswith("\r\n", pos):
            pos += 2
        elif self.char(pos) in ("\r", "\n"):
            pos += 1
        elif pos < len(self.src):
            raise _refuse(f"expects a newline at offset {pos}")
        return self.space(pos, True)

    def alternates(self, pos: int, name: str, ident: int, depth: int) -> int:
        alternatives: list[list[int]] = []
        items: list[int] = []
        pos = self.sequence(pos, name, items, depth)
        alternatives.append(items)
        while self.char(pos) == "|":
            self.add(1)  # ALT
            items = []
            pos = self.sequence(self.space(pos + 1, True), name, items, depth)
            alternatives.append(items)
        self.add(1)  # END
        self.rules[ident] = alternatives
        return pos

    def sequence(self, pos: int, name: str, items: list[int], depth: int) -> int:
        nested = depth > 0
        src = self.src
        last = len(items)  # llama.cpp's last_sym_start
        prev_rules = 1  # llama.cpp's n_prev_rules
        while pos < len(src):
            c = src[pos]
            if c in '"[':
                pattern, what = (_LITERAL, "literal") if c == '"' else (_CLASS, "character class")
                m = pattern.match(src, pos)
                if m is None:
                    raise _refuse(f"has a malformed {what} at offset {pos}")
                last, prev_rules = len(items), 1
                if m.group(1):
                    items.append(-len(m.group(1)))
                    self.add(len(m.group(1)))
                pos = self.space(m.end(), nested)
            elif c in "<!":
                m = _TOKEN.match(src, pos)
                if m is None:
                    raise _refuse(f"has a malformed token at offset {pos}")
                last, prev_rules = len(items), 1
                items.append(-1)
                self.add(1)
                pos = self.space(m.end(), nested)
            elif c == ".":
                last, prev_rules = len(items), 1
                items.append(-1)
                self.add(1)
                pos = self.space(pos + 1, nested)
            elif c == "(":
                if depth + 1 > MAX_GRAMMAR_NESTING:
                    raise _refuse(f"nests parentheses deeper than {MAX_GRAMMAR_NESTING}")
                self.nesting = max(self.nesting, depth + 1)
                pos = self.space(pos + 1, True)
                before = len(self.symbols)
                sub = self.generate(name)
                pos = self.alternates(pos, name, sub, depth + 1)
                prev_rules = max(1, len(self.symbols) - before)
                last = len(items)
                items.append(sub)
                self.add(1)
                if self.char(pos) != ")":
                    raise _refuse(f"expects ')' at offset {pos}")
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                pos = self.space(pos + 1, nested)
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                prev_rules = self.repeat(name, items, last, low, high, prev_rules, pos)
            elif c == "{":
                pos, low, high = self.bounds(pos, nested)
                prev_rules = self.repeat(name, items, last, low, high, prev_rules, pos)
            elif c.isascii() and (c.isalnum() or c == "-"):
                m = _matched(_NAME.match(src, pos))  # c starts a name
                last, prev_rules = len(items), 1
                items.append(self.symbol(m.group()))
                self.add(1)
                pos = self.space(m.end(), nested)
            else:
                break
        return pos

    def bounds(self, pos: int, nested: bool) -> tuple[int, int, int | None]:
        pos = self.space(pos + 1, nested)
        m = _INT.match(self.src, pos)
        if m is None:
            raise _refuse(f"has a malformed {{m,n}} repetition at offset {pos}")
        low, high = int(m.group()), None
        pos = self.space(m.end(), nested)
        if self.char(pos) == "}":
            high = low
        elif self.char(pos) == ",":
            pos = self.space(pos + 1, nested)
            m = _INT.match(self.src, pos)
            if m is not None:
                high = int(m.group())
                pos = self.space(m.end(), nested)
            if self.char(pos) != "}":
                raise _refuse(f"has a malformed {{m,n}} repetition at offset {pos}")
        else:
            raise _refuse(f"has a malformed {{m,n}} repetition at offset {pos}")
        if low > MAX_GRAMMAR_REPEAT or (high is not None and not low <= high <= MAX_GRAMMAR_REPEAT):
            raise _refuse(f"repetitions need m <= n <= {MAX_GRAMMAR_REPEAT}")
        return self.space(pos + 1, nested), low, high

    def repeat(self, name: str, items: list[int], last: int, low: int, high: int | None,
               prev_rules: int, pos: int) -> int:
        """llama.cpp's handle_repetitions: S{m,n} is m copies of S and n - m generated rules
        (S{m,} one, recursive)."""
        if last == len(items):
            raise _refuse(f"repeats nothing at offset {pos}")
        prev = items[last:]
        size = sum(-i if i < 0 else 1 for i in prev)
        total = high if high else (low or 1)
        if prev_rules * total >= _LLAMA_REPETITION_THRESHOLD:
            raise _refuse("nests repetitions past llama.cpp's limit")
        n_opt = 1 if high is None else high - low
        self.add(size * max(low - 1, 0) + n_opt * (size + 3) - (size if low == 0 else 0))
        if low == 0:
            del items[last:]
        else:
            items.extend(prev * (low - 1))
        rec = -1
        for i in range(n_opt):
            ident = self.generate(name)
            tail = [ident if high is None else rec] if (i > 0 or high is None) else []
            self.rules[ident] = [prev + tail, []]
            rec = ident
        if n_opt > 0:
            items.append(rec)
            self.add(1)
        return prev_rules * total


def _analyse(rules: dict[int, list[list[int]]]) -> tuple[int, int, int]:
    """(chain, left_calls, width) of parsed rules; refuses left recursion."""
    # Nullable rules, in linear time: an alternative is nullable once all its items are.
    pending: dict[tuple[int, int], int] = {}
    users: dict[int, list[tuple[int, int]]] = {}
    nullable: set[int] = set()
    ready: list[int] = []
    for ident, alternatives in rules.items():
        for k, items in enumerate(alternatives):
            if any(i < 0 for i in items):
                continue
            pending[ident, k] = len(items)
            if not items:
                ready.append(ident)
            for i in items:
                users.setdefault(i, []).append((ident, k))
    while ready:
        ident = ready.pop()
        if ident in nullable:
            continue
        nullable.add(ident)
        for key in users.get(ident, ()):
            pending[key] -= 1
            if pending[key] == 0 and key[0] not in nullable:
                ready.append(key[0])

    # Leading references: what llama.cpp's left-recursion check and stack expansion follow.
    leading: dict[int, list[int]] = {}
    for ident, alternatives in rules.items():
        out = []
        for items in alternatives:
            for i in items:
                if i < 0:
                    break
                out.append(i)
                if i not in nullable:
                    break
        leading[ident] = out

    # Topological order (children first); a cycle is left recursion.
    order: list[int] = []
    state: dict[int, int] = {}  # 1 on the path, 2 done
    for start in rules:
        if state.get(start):
            continue
        stack = [(start, 0)]
        state[start] = 1
        while stack:
            ident, k = stack[-1]
            children = leading[ident]
            if k < len(children):
                stack[-1] = (ident, k + 1)
                child = children[k]
                s = state.get(child)
                if s == 1:
                    raise _refuse("is left-recursive")
                if s is None:
                    state[child] = 1
                    stack.append((child, 0))
            else:
                state[ident] = 2
                order.append(ident)
                stack.pop()

    cap = max(MAX_GRAMMAR_LEFT_CALLS, MAX_GRAMMAR_WIDTH) + 1
    depth: dict[int, int] = {}
    calls: dict[int, int] = {}
    stacks: dict[int, int] = {}  # stacks a rule's alternatives expand to (exits not counted)
    for ident in order:
        children = leading[ident]
        depth[ident] = 1 + max((depth[c] for c in children), default=0)
        calls[ident] = min(cap, 1 + sum(calls[c] for c in children))
        total = 0
        for items in rules[ident]:
            total += _leading_stacks(items, stacks, nullable, cap)
        stacks[ident] = min(cap, total)
    chain = max(depth.values(), default=0)
    left_calls = min(cap, sum(calls.values()))
    width = 0
    for alternatives in rules.values():
        for items in alternatives:
            width = max(width, _widest(items, stacks, nullable, cap))
    return chain, left_calls, width


def _leading_stacks(items: list[int], stacks: dict[int, int], nullable: set[int],
                    cap: int) -> int:
    """Stacks an alternative expands to from its start, leaving it not counted."""
    total = 0
    for i in items:
        if i < 0:
            return min(cap, total + 1)
        total += stacks[i]
        if i not in nullable:
            break
    return min(cap, total)


def _widest(items: list[int], stacks: dict[int, int], nullable: set[int], cap: int) -> int:
    """The most stacks llama.cpp makes from one position of an alternative (plus one for
    leaving it), right to left."""
    best = 0
    after = 1  # past the end: the continuation below, deduplicated by llama.cpp to one
    for i in reversed(items):
        if i < 0:
            here = 1
        else:
            here = min(cap, stacks[i] + (after if i in nullable else 0))
        best = max(best, here)
        after = here
    return best


def check_grammar(grammar: bytes | str) -> GrammarStats:
    """Refuse (``InvalidInputError``) a grammar llama.cpp could not take safely; return its
    costs otherwise. ``bytes`` must be UTF-8."""
    try:
        data = grammar.encode("utf-8") if isinstance(grammar, str) else grammar
        text = data.decode("utf-8")
    except UnicodeError:
        raise _refuse("is not UTF-8 text") from None
    if len(data) > MAX_GRAMMAR_BYTES:
        raise _refuse(f"is over {MAX_GRAMMAR_BYTES} bytes")
    if "\x00" in text:
        raise _refuse("holds a NUL byte (llama.cpp would read only what comes before it)")
    parser = _Parser(text)
    parser.parse()
    chain, left_calls, width = _analyse(parser.rules)
    if chain > MAX_GRAMMAR_CHAIN:
        raise _refuse(f"chains more than {MAX_GRAMMAR_CHAIN} rules without a character")
    if left_calls > MAX_GRAMMAR_LEFT_CALLS:
        raise _refuse(f"needs more than {MAX_GRAMMAR_LEFT_CALLS} steps to check for left "
                      "recursion")
    if width > MAX_GRAMMAR_WIDTH:
        raise _refuse(f"expands one position to more than {MAX_GRAMMAR_WIDTH} alternatives")
    return GrammarStats(rules=len(parser.symbols), elements=parser.elements,
                        nesting=parser.nesting, chain=chain, left_calls=left_calls, width=width)
