"""PTB tokenisation of captions, as pycocoevalcap applies it before CIDEr.

pycocoevalcap calls the Stanford PTBTokenizer (Java, CoreNLP 3.4.1) with
``-preserveLines -lowerCase``. It then drops the tokens in :data:`PTB_PUNCTUATION`.
That list names the brackets in upper case (``-LRB-``), but the tokenizer writes them
in lower case, so ``-lrb-`` and ``-rrb-`` survive. This is an upstream quirk, kept.

:func:`ptb_tokenize_approx` reproduces that output in pure Python for ordinary
captions. The Java tokenizer runs only when ``java`` and the CoreNLP jar are available
(see :data:`PTB_JAR_ENV`).

Example:
    >>> ptb_tokenize_approx("A man's hat (red) isn't cheap, e.g. $5.")
    "a man 's hat -lrb- red -rrb- is n't cheap e.g. $ 5"
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

PTB_JAR_ENV = "TL_VLM_PTB_JAR"
"""Environment variable: the path of ``stanford-corenlp-3.4.1.jar``. It overrides the
jar that ships with an installed ``pycocoevalcap``."""

PTB_JAR_NAME = "stanford-corenlp-3.4.1.jar"

PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"})
"""pycocoevalcap's list of tokens dropped after PTB tokenisation."""

# Typographic quotes and dashes become their ASCII forms, as the Java tokenizer does.
_CHARACTERS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                             "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ",
                             "\u00a3": "#", "\u20ac": "$"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())

# Substitutions on the whole caption, in order. A replacement of " " drops a mark that
# would become a PUNCTUATIONS token anyway (quotes, "--", "...", single "!" or "?", ...).
_SUBSTITUTIONS: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r'"'), " "),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r"-{2,}"), " "),
    (re.compile(r"\.{2,}"), ". "),    # "a..." keeps one period: "a." may be an abbreviation
    (re.compile(r"[!?]+"), lambda m: " " if len(m.group()) == 1 else f" {m.group()} "),  # "?!" stays
    (re.compile(r"(?<!\d),|,(?!\d)"), " "),    # "1,000" stays one number
    (re.compile(r"(?<!\d):(?!//)|(?<=\d):(?!\d|//)"), " "),    # so do "10:30" and "http://"
    (re.compile(r";"), " "),
    (re.compile(r"[$%=*]|#(?![A-Za-z])"), lambda m: f" {m.group()} "),   # "#1", not "#tag"
    (re.compile(r"(?<![A-Z])&|&(?![A-Z])"), " & "),  # "AT&T" stays one token
)

# Words that PTB splits into two tokens.
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me"),
                "'tis": ("'t", "is"), "'twas": ("'t", "was")}
# Tokens that begin with an apostrophe and keep it.
_APOSTROPHE_WORDS = frozenset({"'s", "'re", "'ve", "'ll", "'d", "'m", "'t", "'n'"})
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_TIME_OF_DAY = re.compile(r"(?i)^(\d{1,2}:\d\d)([ap]m)$")

# Words whose final period the Java tokenizer keeps (checked against its output, case
# insensitive). Common words such as "no", "in", "min" are not among them.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc mt ft inc ltd co corp cos cie prof gen sen rep gov lt col "
    "sgt capt cpl pvt maj det insp supt atty cmdr comdr adm brig rev hon esq messrs mme mlle "
    "ave blvd rd ct ste bldg dept univ assn est sq cf al p tel ext "
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri "
    "calif fla ariz va ky mo mich minn nev okla tenn wis conn ga ind kan md neb colo penn "
    "wyo vt mont ala dak".split())
_INITIALS = re.compile(r"[a-z]|[a-z]+(?:\.[a-z]+)+")  # "e", "e.g", "u.s", "ph.d"


def _keeps_period(word: str, next_word: str) -> bool:
    stem = word[:-1].lower()
    return (stem in _ABBREVIATIONS or _INITIALS.fullmatch(stem) is not None
            or (stem == "no" and next_word[:1].isdigit()))      # "no. 5"


def _split_word(word: str, next_word: str) -> list[str]:
    """PTB tokens of one whitespace-separated word (after the global substitutions)."""
    if word.lower() in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word.lower()])
    if word in _BRACKET_TOKENS:
        return [word]
    # Opening quotes and hyphens come off the front ("'hi", "-dog"), except for a
    # clitic, "'90s" and a negative number.
    while len(word) > 1 and word[0] in "'`-":
        if word[0] == "'" and (word.lower().rstrip("'.-") in _APOSTROPHE_WORDS
                               or word.lower().startswith("'n'") or word[1].isdigit()):
            break
        if word[0] == "-" and word[1].isdigit():
            break
        word = word[1:]
    tail: list[str] = []
    while len(word) > 1:
        if word[-1] in "'-" and word.lower() != "'n'":     # closing quote, "dogs'"
            word = word[:-1]
        elif word[-1] == "/":                                # "w/" -> "w /"
            tail.insert(0, "/")
            word = word[:-1]
        elif word[-1] == "." and not _keeps_period(word, next_word):
            word = word[:-1]
        else:
            break
    time = _TIME_OF_DAY.match(word)
    if time:
        return [time.group(1), time.group(2), *tail]
    clitics: list[str] = []
    while (clitic := _CLITIC.match(word)) and word.lower() not in _APOSTROPHE_WORDS:
        word, suffix = clitic.groups()
        clitics.insert(0, suffix)
    return [word, *clitics, *tail]


def ptb_tokenize_approx(text: str) -> str:
    """Tokenise a caption like pycocoevalcap's PTB pipeline, in pure Python.

    The steps follow the Stanford PTBTokenizer as pycocoevalcap runs it. The text is
    lower-cased. ``n't`` and the clitics ``'s 're 've 'll 'd 'm`` are split off. Commas
    and colons are separated, except between digits ("1,000", "10:30"). So are ``; ! ?
    & $ % #``, "5:30pm" (into "5:30 pm") and a word's final period, unless the word is
    an abbreviation ("mr.", "u.s.", "e.g."). Brackets become ``-lrb-``, ``-rsb-`` and so
    on, and they survive the filter. Finally the tokens of :data:`PTB_PUNCTUATION` are
    dropped.

    The result equals the Java tokenizer's on ordinary captions, including all 1000 of
    pycocoevalcap's example captions. It can differ on rare forms: emoticons, URLs,
    unusual abbreviations and quotes inside words.

    Example:
        >>> ptb_tokenize_approx("A man riding a wave on top of a surfboard.")
        'a man riding a wave on top of a surfboard'
        >>> ptb_tokenize_approx("Two dogs don't play; they're running!")
        "two dogs do n't play they 're running"
        >>> ptb_tokenize_approx("Mr. Smith's 1,000 dogs at 5:30pm (U.S.)")
        "mr. smith 's 1,000 dogs at 5:30 pm -lrb- u.s. -rrb-"
    """
    if not isinstance(text, str):
        raise TypeError(f"ptb_tokenize_approx expects a str, got {type(text).__name__}: {text!r}")
    text = text.translate(_CHARACTERS)
    for pattern, replacement in _SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    words = text.split()
    tokens = [token for word, next_word in zip(words, words[1:] + [""])
              for token in _split_word(word, next_word)]
    return " ".join(t for t in (token.lower() for token in tokens) if t not in PTB_PUNCTUATION)


# ---------------------------------------------------------------------------------------
# The Java tokenizer

# Line breaks for the Java lexer. A caption must stay on one line for -preserveLines.
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\u2028\u2029\x0b\x0c\x85]")
_JAVA_TIMEOUT_S = 600


def find_ptb_jar() -> Path | None:
    """The CoreNLP jar for the Java tokenizer, or ``None`` when there is none.

    The jar is looked for in :data:`PTB_JAR_ENV` first, then in an installed
    ``pycocoevalcap`` (``pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar``). A
    variable that names a missing file is an error, not a silent fallback.

    Example:
        >>> jar = find_ptb_jar()            # e.g. .../pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar
        >>> jar is None or jar.is_file()
        True
    """
    configured = os.environ.get(PTB_JAR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{PTB_JAR_ENV}={configured} is not a file. Point it at {PTB_JAR_NAME} "
                f"(shipped in pycocoevalcap/tokenizer/), or unset it to use the jar of an "
                f"installed pycocoevalcap.")
        return path
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(folder) / "tokenizer" / PTB_JAR_NAME
        if jar.is_file():
            return jar
    return None


def java_ptb_unavailable_reason() -> str | None:
    """Why the Java tokenizer cannot run here, or ``None`` when it can.

    Example:
        >>> reason = java_ptb_unavailable_reason()
        >>> reason is None or isinstance(reason, str)
        True
    """
    if shutil.which("java") is None:
        return "no `java` on PATH"
    if find_ptb_jar() is None:
        return (f"no {PTB_JAR_NAME}: install pycocoevalcap (pip install 'pycocoevalcap==1.2') "
                f"or set {PTB_JAR_ENV}")
    return None


def ptb_tokenize_java(texts: Sequence[str]) -> list[str]:
    """Tokenise captions with the Stanford PTBTokenizer, as pycocoevalcap does.

    All captions go to one Java run, one caption per line. The command is ``java -cp
    <jar> edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``. The tokens
    of :data:`PTB_PUNCTUATION` are then dropped. Line breaks inside a caption become
    spaces, and blank captions are not sent to Java: they tokenise to "".

    Raises ``RuntimeError`` when Java is missing or fails (see
    :func:`java_ptb_unavailable_reason`).

    Example:
        >>> ptb_tokenize_java(["A man's hat (red).", ""])    # doctest: +SKIP
        ["a man 's hat -lrb- red -rrb-", '']
    """
    reason = java_ptb_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot run the Java PTBTokenizer: {reason}")
    lines = [_LINE_BREAKS.sub(" ", text) for text in texts]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    if not todo:
        return out
    with tempfile.TemporaryDirectory(prefix="tl_vlm_ptb_") as folder:
        source = Path(folder) / "captions.txt"
        source.write_bytes("\n".join(lines[i] for i in todo).encode("utf-8"))
        command = ["java", "-cp", str(find_ptb_jar()), "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", str(source)]
        done = subprocess.run(command, capture_output=True, timeout=_JAVA_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"the Java PTBTokenizer failed (exit {done.returncode}): "
                           f"{done.stderr.decode('utf-8', 'replace')[-2000:]}")
    tokenized = done.stdout.decode("utf-8").split("\n")
    if tokenized and tokenized[-1] == "" and len(tokenized) == len(todo) + 1:
        tokenized.pop()
    if len(tokenized) != len(todo):
        raise RuntimeError(f"the Java PTBTokenizer returned {len(tokenized)} lines for "
                           f"{len(todo)} captions; cannot align them")
    for i, line in zip(todo, tokenized):
        out[i] = " ".join(t for t in line.rstrip().split(" ") if t and t not in PTB_PUNCTUATION)
    return out
