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


def _number(token: str) -> str:
    value = token.replace(",", "")
    return num2words(float(value) if "." in value else int(value))


def _money(m: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCY[m.group(1)]
    whole, _, frac = m.group(2).replace(",", "").partition(".")
    words = f"{num2words(int(whole))} {one if int(whole) == 1 else many}"
    if frac and int(frac[:2].ljust(2, "0")):
        cents = int(frac[:2].ljust(2, "0"))
        words += f" and {num2words(cents)} {sub_one if cents == 1 else sub_many}"
    return words


def _time(m: re.Match) -> str:
    h, mins = int(m.group(1)), int(m.group(2))
    if mins == 0:
        return f"{num2words(h)} o'clock"
    return f"{num2words(h)} {'oh ' + num2words(mins) if mins < 10 else num2words(mins)}"


def clean_text(text: str) -> str:
    text = text.strip().replace("‘", "'").replace("’", "'").replace("“", '"').replace("”", '"')
    text = _EMOJI.sub("", text)
    return re.sub(r",{2,}", ",", text)


def normalize_text(text: str, language: str = "en") -> str:
    """Spell out numbers, money, percentages, ordinals, years, times and symbols (English only;
    other languages are cleaned but left as written)."""
    text = clean_text(text)
    if language != "en":
        return text
    text = re.sub(rf"([$€£])\s?({_NUM})", _money, text)
    text = re.sub(rf"({_NUM})\s?%", lambda m: f"{_number(m.group(1))} percent", text)
    text = re.sub(r"\b(\d{1,2}):(\d{2})\b", _time, text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: num2words(int(m.group(1)), to="ordinal"), text)
    text = re.sub(r"\b(1[1-9]\d{2}|20\d{2})\b(?![.,]\d)", lambda m: num2words(int(m.group(1)), to="year"), text)
    text = re.sub(_NUM, lambda m: _number(m.group(0)), text)
    for symbol, words in _SYMBOLS:
        text = text.replace(symbol, words)
    return re.sub(r"[ \t]{2,}", " ", text).strip()
