"""Text normalisation for speech: numbers and common symbols become words (English), plus the
cleaning upstream applied to training text (curly quotes, emoji, repeated commas; spec §6)."""
from __future__ import annotations

import re

from num2words import num2words

_EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF]")
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}
_SYMBOLS = [("&", " and "), ("+", " plus "), ("@", " at "), ("°C", " degrees Celsius"), ("°F", " degrees Fahrenheit"),
            ("°", " degrees"), ("=", " equals ")]
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_MAX_WORD_DIGITS = 15  # longer digit runs are codes or ids: read digit by digit


def _digits(digits: str) -> str:
    return " ".join(num2words(int(d)) for d in digits)


def _integer(digits: str) -> str:
    if len(digits) > _MAX_WORD_DIGITS and "," not in digits:
        return _digits(digits)
    try:
        return num2words(int(digits.replace(",", "")))
    except OverflowError:  # beyond num2words' largest named power
        return _digits(digits.replace(",", ""))


def _number(token: str) -> str:
    # The fraction is read digit by digit from the text, never through a float: 2.0 stays
    # "two point zero" and long numbers keep their digits.
    whole, _, frac = token.partition(".")
    words = _integer(whole)
    return f"{words} point {_digits(frac)}" if frac else words


def _money(m: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCY[m.group(1)]
    whole, _, frac = m.group(2).replace(",", "").partition(".")
    units = int(whole or "0")
    cents = int(frac[:2].ljust(2, "0")) if frac else 0
    words = f"{_integer(whole or '0')} {one if units == 1 else many}"
    if cents:
        cent_words = f"{num2words(cents)} {sub_one if cents == 1 else sub_many}"
        words = f"{words} and {cent_words}" if units else cent_words
    return words


def _time(m: re.Match) -> str:
    h, mins = int(m.group(1)), int(m.group(2))
    if h > 24 or mins > 59:  # not a clock time (a score, a ratio): numbers are read one by one
        return m.group(0)
    if mins == 0:
        return f"{num2words(h)} o'clock"
    return f"{num2words(h)} {'oh ' + num2words(mins) if mins < 10 else num2words(mins)}"


def _sub(pattern: str, words, text: str) -> str:
    """re.sub that keeps the spoken words apart from letters glued to the number (10am, A4)."""
    def replace(m: re.Match) -> str:
        out = words(m)
        if out == m.group(0):
            return out
        before = m.string[m.start() - 1] if m.start() else ""
        after = m.string[m.end()] if m.end() < len(m.string) else ""
        return f"{' ' if before.isalpha() else ''}{out}{' ' if after.isalpha() else ''}"
    return re.sub(pattern, replace, text)


def clean_text(text: str) -> str:
    text = text.replace("‘", "'").replace("’", "'").replace("“", '"').replace("”", '"')
    text = _EMOJI.sub("", text)
    return re.sub(r",{2,}", ",", text).strip()  # trimmed last: removed emoji may leave spaces


def normalize_text(text: str, language: str = "en") -> str:
    """Spell out numbers, money, percentages, ordinals, years, times and symbols (English only;
    other languages are cleaned but left as written)."""
    text = clean_text(text)
    if language != "en":
        return text
    text = _sub(rf"([$€£])\s?({_NUM}|\.\d+)", _money, text)
    text = _sub(rf"({_NUM})\s?%", lambda m: f"{_number(m.group(1))} percent", text)
    text = _sub(r"(?<![\d:])(\d{1,2}):(\d{2})(?![\d:])", _time, text)
    text = _sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: num2words(int(m.group(1)), to="ordinal"), text)
    text = _sub(r"\b(1[1-9]\d{2}|20\d{2})\b(?![.,]\d)", lambda m: num2words(int(m.group(1)), to="year"), text)
    text = re.sub(r"(?<![\w.-])-(?=\d)", "minus ", text)
    text = _sub(_NUM, lambda m: _number(m.group(0)), text)
    for symbol, words in _SYMBOLS:
        text = text.replace(symbol, words)
    return re.sub(r"[ \t]{2,}", " ", text).strip()
