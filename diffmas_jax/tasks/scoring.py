"""Answer extraction and comparison: pure functions, no task or model state.

Everything here must survive arbitrary model output (truncated LaTeX, megabytes of
text, adversarial expressions): functions return None / "" / False instead of
raising, and symbolic comparison is time-limited where the platform allows it.
"""
from __future__ import annotations

import decimal
import re
import threading
from fractions import Fraction
from typing import Sequence

# Longest answer string handed to symbolic comparison; longer ones are compared as
# strings only (sympy on huge expressions can take minutes).
MAX_SYMBOLIC_CHARS = 400
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# --------------------------------------------------------------------------- boxes

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the brace group opening at text[start] == "{", or None."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level \\boxed{...} (or \\fbox / \\framebox).

    Nested braces are balanced (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}); a box nested
    inside another box belongs to the outer one. If the last box is unbalanced or
    cut off, the answer is unknown and None is returned rather than an earlier box.
    The brace-less form "\\boxed 5" is accepted too.
    """
    if not text:
        return None
    found: str | None = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _balanced_group(text, i)
            if end is None:
                return None  # the last box is truncated
            found = text[i + 1:end - 1].strip()
            pos = end
        elif i > m.end() and i < len(text):  # "\boxed 5": one token
            tok = re.match(r"[^\s$]+", text[i:])
            found = tok.group(0) if tok else found
            pos = i + (tok.end() if tok else 1)
        else:
            pos = m.end()


# ------------------------------------------------------------------------ numbers

UNICODE_MINUS = "\u2212"  # what many tokenizers and LaTeX-to-text outputs write for "-"
_NUM_TOKEN = re.compile(
    r"(?<![\w.])(?:-(?:\\?\$)?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?"
    r"|(?<![\w.])-?\.\d+")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_PLAIN_NUM = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?$")
# unit words need a space before them so "5x" is never read as 5
_UNIT_TAIL = re.compile(r"(?:\s*\\text\{[^{}]*\}|\s*\\mbox\{[^{}]*\}|\s+[a-zA-Z][a-zA-Z .]*)$")


def _strip_decoration(s: str) -> str:
    """Remove money/percent/unit decoration around a number: "$1,000.00 dollars" -> "1,000.00"."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"^-\s*\\?\$\s*", "-", s)  # "-$5" is -5, not 5
    s = re.sub(r"^\\\(|\\\)$", "", s).strip()
    # a wrapper around the whole answer: \text{1,000}, \textbf{18 dollars}, \mathbf{5}
    while (m := re.fullmatch(r"\\(?:text|textbf|mathbf|mathrm|mbox)\s*\{([^{}]*)\}", s)):
        s = m.group(1).strip()
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = s.replace("\\,", "").replace("{,}", ",")
    s = s.rstrip(".").strip()
    # a trailing unit word ("18 dollars", "5 \text{ cm}") but never a bare variable
    if re.search(r"\d", s):
        s = _UNIT_TAIL.sub("", s).strip()
    return s.strip("$ ").rstrip(".")


def parse_number(s: str | None) -> Fraction | None:
    """Exact value of a plain numeric answer, or None if it is not just a number.

    Accepts "18", "18.0", "-3", "1,000", "$18", "18 dollars", "18%", "025",
    ".5", "3/4", "\\frac{3}{4}", "1e3". Thousands separators must be proper groups
    of three, so "1,2" (a tuple) is not a number.
    """
    if s is None:
        return None
    s = _strip_decoration(str(s).replace(UNICODE_MINUS, "-"))
    if not s or len(s) > 64:
        return None
    m = _FRAC_RE.match(s.replace(" ", ""))
    if m:
        try:
            val = Fraction(m.group(2)) / Fraction(m.group(3))
        except (ValueError, ZeroDivisionError):
            return None
        return -val if m.group(1) else val
    mixed = re.fullmatch(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)", s)  # "2 3/4" is 2.75, not 23/4
    if mixed:
        sign, whole, num, den = mixed.groups()
        if int(den) == 0:
            return None
        val = int(whole) + Fraction(int(num), int(den))
        return -val if sign else val
    if "/" in s:
        num, _, den = s.replace(" ", "").partition("/")
        a, b = parse_number(num), parse_number(den)
        if a is None or b is None or b == 0 or "/" in den:
            return None
        return a / b
    if re.search(r"\d\s+\d", s) and not re.fullmatch(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):
        return None  # "12 34" is two numbers; only "1 000" groups of three are one
    s = s.replace(" ", "")
    if not _PLAIN_NUM.match(s) or not re.search(r"\d", s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: 18, 0.5, -3, 2/3 (non-terminating stays a fraction)."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    with decimal.localcontext() as ctx:  # exact: the denominator only has 2s and 5s
        ctx.prec = 100
        text = format(decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def canonical_number(s: str) -> str:
    """Canonical form of a gold answer that is meant to be a number ("1,000" -> "1000")."""
    v = parse_number(s)
    return format_number(v) if v is not None else str(s).strip()


def extract_last_number(text: str) -> str | None:
    """Last number in free text, canonicalised: "The answer is 1,000." -> "1000"."""
    if not text:
        return None
    matches = _NUM_TOKEN.findall(text[-20000:])
    for tok in reversed(matches):
        v = parse_number(tok)
        if v is not None:
            return format_number(v)
    return None


_ANSWER_IS = re.compile(
    r"(?:final answer|answer)\s*(?:is|:)\s*[:\s]*(.+?)\s*(?:\.\s*)?$",
    re.IGNORECASE | re.MULTILINE)


def extract_answer_phrase(text: str) -> str | None:
    """Text after the last "answer is ..." / "Answer: ..." on its line, if any."""
    if not text:
        return None
    text = text[-20000:].replace("**", "")  # markdown bold: "**Answer:** 5"
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    ans = re.split(r"\.\s+(?=[A-Z])", matches[-1].group(1))[0]  # first sentence only
    ans = ans.strip().rstrip(".").strip().strip("$").strip()
    ans = re.sub(r"^\\[(\[]\s*(.*?)\s*\\[)\]]$", r"\1", ans)  # \( ... \)
    return ans or None


def extract_math(text: str, numeric: bool = False) -> str:
    """Prediction for a math answer: last box, else "answer is X", else (numeric
    tasks only) the last number in the text. "" when nothing is found."""
    text = text.replace(UNICODE_MINUS, "-")  # "−5" must not be read as 5
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    phrase = extract_answer_phrase(text)
    if numeric:
        if phrase is not None:  # the answer phrase itself, else its first number
            phrase = phrase.rsplit("=", 1)[-1]  # "6 * 3 = 18": the result, not the operand
            v = parse_number(phrase)
            if v is not None:
                return format_number(v)
            for tok in _NUM_TOKEN.findall(phrase):
                v = parse_number(tok)
                if v is not None:
                    return format_number(v)
        return extract_last_number(text) or ""
    return phrase or ""


# -------------------------------------------------------------------- equivalence

def normalize_math(s: str) -> str:
    """String form of a LaTeX answer for a cheap exact comparison."""
    s = str(s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""),
                     ("\\right", ""), ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""),
                     ("\\;", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", ""), ("%", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s


def _rhs(s: str) -> str:
    """"x = 5" -> "5" (only for a single simple left-hand side)."""
    m = re.match(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)$", s)
    return m.group(1) if m else s


def _too_costly(s: str) -> bool:
    """Inputs that can make sympy run for minutes (power towers, huge literals).

    Off the main thread there is no timeout, so these are compared as strings only.
    """
    return (len(s) > MAX_SYMBOLIC_CHARS or s.count("^") > 4 or "**" in s
            or re.search(r"\d{40,}", s) is not None or re.search(r"\^\s*\{?[^}]*\^", s) is not None
            # a factorial of a group or of a 3-digit number, a binomial of a 4-digit one
            or re.search(r"(?:[)}\]]|\d{3})\s*!", s) is not None
            or re.search(r"\\[dt]?binom\s*\{?\s*\d{4}", s) is not None)


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    """math_verify's verdict, None if it is unavailable or cannot parse either side."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # its timeouts use SIGALRM, which only works on the main thread
    limit = 3 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=limit)
        p = parse(f"${pred}$", parsing_timeout=limit)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=limit))
    except BaseException as e:  # includes its TimeoutException; never let scoring die
        if isinstance(e, KeyboardInterrupt):
            raise
        return None


# sympy fallback: only a small, safe subset of LaTeX, converted to sympy syntax
_SAFE_EXPR = re.compile(r"^[0-9a-z+\-*/().,\s]*$")
_SAFE_NAMES = {"sqrt", "pi", "e", "x", "y", "z", "n", "a", "b", "c", "k", "m", "t"}


def _latex_to_sympy_text(s: str) -> str | None:
    s = normalize_math(s)
    for _ in range(20):  # \frac{a}{b} -> ((a)/(b)), innermost first
        m = re.search(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", s)
        if not m:
            break
        s = s[:m.start()] + f"(({m.group(1)})/({m.group(2)}))" + s[m.end():]
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    if "\\" in s or not _SAFE_EXPR.match(s.replace("**", "*")):
        return None
    if set(re.findall(r"[a-z]+", s)) - _SAFE_NAMES:
        return None
    return s


def _sympy_equal(pred: str, gold: str) -> bool | None:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (implicit_multiplication_application,
                                                parse_expr, standard_transformations)
    except ImportError:
        return None
    a, b = _latex_to_sympy_text(pred), _latex_to_sympy_text(gold)
    if a is None or b is None:
        return None
    tr = standard_transformations + (implicit_multiplication_application,)
    try:
        diff = parse_expr(a, transformations=tr) - parse_expr(b, transformations=tr)
        return bool(sympy.simplify(diff) == 0)
    except Exception:
        return None


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether a predicted math answer equals the gold one.

    Order: exact string after normalisation; exact numeric value when both sides
    are plain numbers (decisive, so 0.33 != 1/3); math_verify; a small sympy
    fallback. Never raises.
    """
    if pred is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred:
        return False
    try:
        np_, ng = normalize_math(pred), normalize_math(gold)
        if np_ == ng:
            return True
        if "=" not in ng and "=" in np_:
            pred, np_ = _rhs(pred), normalize_math(_rhs(pred))
            if np_ == ng:
                return True
        a, b = parse_number(pred), parse_number(gold)
        if a is not None and b is not None:
            return a == b
        if _too_costly(pred) or _too_costly(gold):
            return False
        verdict = _math_verify_equal(pred, gold)
        if verdict is None:
            verdict = _sympy_equal(pred, gold)
        return bool(verdict)
    except Exception:
        return False


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Numeric answers (GSM8K, AIME): equal values, else fall back to math_equal."""
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return math_equal(pred, gold)


def text_equal(pred: str | None, gold: str) -> bool:
    """Free-form answers: case/space/punctuation-insensitive match, else math_equal."""
    if pred is None:
        return False
    norm = lambda s: re.sub(r"[\s.,;:!?\"'`]+", " ", normalize_math_text(s)).strip().lower()
    if norm(pred) and norm(pred) == norm(gold):
        return True
    return math_equal(pred, gold)


def normalize_math_text(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", str(s))
    return s.strip().strip("$").strip()


# ------------------------------------------------------------------ multiple choice

def label_to_letter(label, n_options: int | None = None) -> str | None:
    """"B" -> "B", "2" / 2 (1-based label) -> "B"; None when out of range."""
    s = str(label).strip().strip("().").strip()
    if len(s) == 1 and s.upper() in LETTERS and s.isalpha():
        idx = LETTERS.index(s.upper())
    elif s.isdigit() and int(s) >= 1:
        idx = int(s) - 1
    else:
        return None
    if n_options is not None and idx >= n_options:
        return None
    return LETTERS[idx] if idx < len(LETTERS) else None


def _norm_option(s: str) -> str:
    # ASCII punctuation goes; signs and other symbols stay, or "+1" / "-1" and "↓ ↑" collide
    s = normalize_math_text(s).lower().replace(UNICODE_MINUS, "-")
    s = re.sub(r"[!-*,./:-@\[-`{-~]", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _letter_from_span(span: str, n: int, choices: Sequence[str]) -> str | None:
    """A letter from a short answer span: "B", "(B)", "B.", "B) text", "B. text",
    "\\text{B}", "Option B", or the text of exactly one option."""
    s = normalize_math_text(span).strip().strip("*").strip()
    s = re.sub(r"^(?:option|choice)\s+", "", s, flags=re.IGNORECASE)
    # a letter alone, in parentheses, or followed by "." / ")" / ":" / " - "
    m = re.match(r"^\(([A-Za-z])\)|^([A-Za-z])(?:$|[.):]|\s+[-\u2013]\s)", s)
    if m:
        raw = m.group(1) or m.group(2)
        if raw.isupper() or m.group(1) or len(s) == 1:
            letter = raw.upper()
            if LETTERS.index(letter) < n:
                return letter
    if choices:
        target = _norm_option(s)
        hits = [i for i, c in enumerate(choices) if _norm_option(c) and _norm_option(c) == target]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


def _option_opening(span: str, choices: Sequence[str]) -> str | None:
    """The option whose whole text opens `span` (the longest, if several), else None."""
    ns = f"{_norm_option(span)} "
    hits = [i for i, c in enumerate(choices) if _norm_option(c) and ns.startswith(f"{_norm_option(c)} ")]
    longest = max((len(_norm_option(choices[i])) for i in hits), default=0)
    hits = [i for i in hits if len(_norm_option(choices[i])) == longest]
    return LETTERS[hits[0]] if len(hits) == 1 else None


_CHOICE_PHRASE = re.compile(
    r"(?:answer|(?:correct|best|right) (?:option|choice))\s*(?:is|:|would be|=)?\s*"
    r"(?:option|choice)?\s*[:\-]?\s*"
    r"(\(?[A-Za-z]\)?)(?![A-Za-z0-9])", re.IGNORECASE)


def extract_choice(text: str, choices: Sequence[str] = (), n_options: int | None = None) -> str:
    """Letter of the chosen option, or "" if none can be found.

    Tries, in order: the last \\boxed{...} ("B", "(B)", "B. text", option text);
    the last "answer is (B)" / "Answer: B" phrase; a reply that is just a letter;
    the text after the last "answer is" or the final line matching one option's text.
    """
    if not text:
        return ""
    n = n_options or len(choices) or 5
    n = min(n, len(LETTERS))
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _letter_from_span(boxed, n, choices)
        if letter:
            return letter
    tail = text[-20000:].replace("**", "")  # markdown bold: "**Answer:** C"
    for m in reversed(list(_CHOICE_PHRASE.finditer(tail))):
        raw = m.group(1)
        # a bare "a" or "i" after "answer is" is a word ("is a ..."), not an option
        if raw in ("a", "i"):
            continue
        # "The answer is A Season.": a letter that opens an option's text is that option
        if choices and not raw.startswith("("):
            words = re.split(r"[.;!?\n]", tail[m.start(1):], maxsplit=1)[0]
            letter = _option_opening(words, choices[:n])
            if letter:
                return letter
        letter = label_to_letter(raw.strip("()"), n)
        if letter:
            return letter
    stripped = tail.strip().strip("*").strip()
    if len(stripped) <= 40:
        letter = _letter_from_span(stripped, n, choices)
        if letter:
            return letter
    if choices:
        phrase = extract_answer_phrase(tail)
        lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
        for span in (phrase, lines[-1] if lines else None):
            if not span:
                continue
            ns = f" {_norm_option(span)} "
            hits = [i for i, c in enumerate(choices[:n])
                    if _norm_option(c) and f" {_norm_option(c)} " in ns]
            if len(hits) > 1:  # prefer the longest option contained in the span
                longest = max(len(_norm_option(choices[i])) for i in hits)
                hits = [i for i in hits if len(_norm_option(choices[i])) == longest]
            if len(hits) == 1:
                return LETTERS[hits[0]]
    return ""


# --------------------------------------------------------------------------- code

def _only_definitions(code: str) -> bool:
    """Whether a block is nothing but imports, functions and classes (safe to run first)."""
    import ast
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return bool(tree.body) and all(isinstance(node, kinds) for node in tree.body)


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The last ```python block (else the last fenced block; else an unclosed
    trailing ```python block; else the whole text).

    With ``entry_point``, the last block that defines that function wins, so a usage
    example after the solution is not what gets scored; earlier blocks holding only
    imports, functions and classes (helpers) are kept before it."""
    if not text:
        return ""
    blocks = _FENCE.findall(text)
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if entry_point and (py or blocks):
        bodies = py or [body for _, body in blocks]
        defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        hits = [i for i, body in enumerate(bodies) if defines.search(body)]
        if hits:
            helpers = [b.strip("\n") for b in bodies[:hits[-1]] if _only_definitions(b)]
            return "\n\n".join(helpers + [bodies[hits[-1]].strip("\n")])
    if py:
        return py[-1].strip("\n")
    if blocks:
        return blocks[-1][1].strip("\n")
    m = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*)$", text, re.DOTALL | re.IGNORECASE)
    if m:
        return m.group(1).strip("\n")
    return text.strip("\n")
