"""Text chunking (spec §3.1 speaker turns, §3.4 byte-length splitting) and English normalisation
(numbers, money, times, symbols; spec §6 cleaning)."""
from __future__ import annotations

import re

import pytest

from engine.text.chunks import MAX_TURNS_PER_CHUNK, split_speaker_turns, split_text
from engine.text.normalize import clean_text, normalize_text


def nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def letters(s: str) -> str:
    """Letters and digits only: what must survive chunking (a lone trailing '。' may be dropped)."""
    return re.sub(r"[\W_]", "", s)


# ----------------------------------------------------------------------------- split_text

LONG_TEXTS = [
    "Hello there. How are you today? I am fine, thank you! The weather is going to be sunny "
    "tomorrow, and then we will walk to the museum together; it opens at 10:30 "
    "and costs 1,000 yen.",
    "Grüße aus Köln, schöne Größe. Ähm, öffnen Sie die Tür! Straße für Straße, Haus für Haus.",
    "日本語のテキストです。次の文です！とても長い文章なので、分割する必要があります。最後の文。",
    "你好，世界！这是一个很长的句子，需要被分成几个部分。第二句话来了。",
    "supercalifragilisticexpialidocious-and-then-some-more-text-without-any-spaces-at-all",
    "Pi is 3.14159 and e is 2.71828. The ratio 16:9 is common, 1,234,567 people agree.",
]


@pytest.mark.parametrize("text", LONG_TEXTS)
@pytest.mark.parametrize("limit", [12, 20, 40, 75])
def test_chunks_respect_the_byte_limit_and_keep_every_character(text, limit):
    chunks = split_text(text, limit)
    assert chunks
    for c in chunks:
        assert 0 < nbytes(c) <= limit, (c, nbytes(c))
        assert c == c.strip()
        c.encode("utf-8").decode("utf-8")  # never cut inside a character
    assert letters("".join(chunks)) == letters(text)  # no word lost
    pos = 0
    for c in chunks:  # each chunk is a verbatim slice of the text, in order: nothing inserted
        found = text.find(c, pos)
        assert found >= 0, (c, chunks)
        pos = found + len(c)


def test_text_within_the_limit_is_one_chunk_and_zero_limit_disables_splitting():
    assert split_text("  Hello there. How are you?  ", 100) == ["Hello there. How are you?"]
    assert split_text("Hello there. How are you?", 0) == ["Hello there. How are you?"]


@pytest.mark.parametrize("text,limit,expected", [
    # sentence ends first
    ("Hello there. How are you? I am fine!", 15, ["Hello there.", "How are you?", "I am fine!"]),
    # then clauses, merged greedily while they fit
    ("one, two, three, four", 12, ["one, two,", "three, four"]),
    # then spaces
    ("alpha beta gamma delta", 11, ["alpha beta", "gamma delta"]),
    # then a hard cut
    ("abcdefghijkl", 5, ["abcde", "fghij", "kl"]),
    # a sentence split is preferred to a clause split when both are possible
    ("Aa, bbbbb. Cc, dd.", 12, ["Aa, bbbbb.", "Cc, dd."]),
    # a sentence may end inside quotes
    ('He said "Stop." Then he left.', 20, ['He said "Stop."', "Then he left."]),
    # CJK sentence and clause marks need no space, and no space is inserted when merging
    ("一二三，四五六，七八九，十", 25, ["一二三，四五六，", "七八九，十"]),
    ("日本語です。次の文。", 18, ["日本語です。", "次の文。"]),
])
def test_split_priority(text, limit, expected):
    assert split_text(text, limit) == expected


@pytest.mark.parametrize("text,limit,expected", [
    ("こんにちは世界", 7, ["こん", "にち", "は世", "界"]),  # 3-byte characters, two per chunk
    ("éééé", 3, ["é", "é"] * 2),  # 2-byte characters never split
    ("ab😀cd", 5, ["ab", "😀c", "d"]),  # a 4-byte emoji stays whole
])
def test_hard_cut_counts_utf8_bytes(text, limit, expected):
    assert split_text(text, limit) == expected


@pytest.mark.parametrize("text,limit,keep", [
    ("The value is 3.14 exactly. Next one is 2.5 more.", 30, ["3.14", "2.5"]),
    ("Value 3.14159265 is long.", 15, ["3.14159265"]),  # the merge could not undo a cut here
    ("We have 1,000,000 apples, yes", 20, ["1,000,000"]),
    ("Meet me at 10:30, then at 11:45, bye", 14, ["10:30", "11:45"]),
])
def test_numbers_are_not_split(text, limit, keep):
    chunks = split_text(text, limit)
    for token in keep:
        assert any(token in c for c in chunks), (token, chunks)


def test_punctuation_only_pieces_are_dropped():
    assert split_text("Hello. ... !!! World.", 8) == ["Hello.", "World."]
    assert split_text("?!...", 10) == []
    assert split_text("   \n ", 10) == []
    assert split_text("…", 1) == []


# ----------------------------------------------------------------------------- speaker turns


def _turns(n: int, words: str = "hello there") -> str:
    return " ".join(f"<|speaker:{i % 2}|>{words} {i}" for i in range(n))


def test_speaker_turns_group_at_most_five_per_chunk():
    chunks = split_text(_turns(7), 1000)
    assert [c.count("<|speaker:") for c in chunks] == [MAX_TURNS_PER_CHUNK, 2] == [5, 2]
    for c in chunks:
        assert all(line.startswith("<|speaker:") for line in c.split("\n"))
    assert chunks[0].split("\n")[0] == "<|speaker:0|>hello there 0"


def test_speaker_turns_group_within_the_byte_limit():
    turn = nbytes("<|speaker:0|>hello there 0")  # 26 bytes each
    chunks = split_text(_turns(6), 2 * turn + 1 + 5)  # two turns and their newline fit, three do not
    assert [c.count("<|speaker:") for c in chunks] == [2, 2, 2]
    assert all(nbytes(c) <= 2 * turn + 6 for c in chunks)


def test_a_long_turn_stays_whole():
    long_turn = "<|speaker:1|>" + "word " * 40
    chunks = split_text(f"<|speaker:0|>Hi. {long_turn}<|speaker:0|>Bye.", 60)
    assert chunks == ["<|speaker:0|>Hi.", long_turn.strip(), "<|speaker:0|>Bye."]


def test_text_before_the_first_tag_is_kept():
    assert split_speaker_turns("Intro words. <|speaker:0|>Hi <|speaker:1|>Yo") == [
        "Intro words.", "<|speaker:0|>Hi", "<|speaker:1|>Yo"]
    assert split_text("Intro words. <|speaker:0|>Hi <|speaker:1|>Yo", 200) == [
        "Intro words.\n<|speaker:0|>Hi\n<|speaker:1|>Yo"]


def test_bare_speaker_tags_are_not_turns():
    assert split_speaker_turns("<|speaker:0|>Hi <|speaker:1|> <|speaker:2|>... <|speaker:0|>Yo") == [
        "<|speaker:0|>Hi", "<|speaker:0|>Yo"]
    assert split_text("<|speaker:0|>", 100) == []


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("text,expected", [
    # money
    ("It costs $5.50.", "It costs five dollars and fifty cents."),
    ("$1", "one dollar"),
    ("€1,234", "one thousand, two hundred and thirty-four euros"),
    ("£0.01", "one penny"),
    ("$.50", "fifty cents"),
    ("£3.05", "three pounds and five pence"),
    # percent
    ("50% off", "fifty percent off"),
    ("12.5 %", "twelve point five percent"),
    # ordinals
    ("the 1st, 2nd, 3rd and 21st", "the first, second, third and twenty-first"),
    # years
    ("In 1999 and 2024.", "In nineteen ninety-nine and twenty twenty-four."),
    ("Since 1150", "Since eleven fifty"),
    # times
    ("at 7:05", "at seven oh five"),
    ("12:00", "twelve o'clock"),
    ("23:45", "twenty-three forty-five"),
    ("10:30pm", "ten thirty pm"),
    # decimals and plain numbers
    ("3.14", "three point one four"),
    ("2.0", "two point zero"),
    ("1.10", "one point one zero"),
    ("1,000,000 people", "one million people"),
    ("Room 101", "Room one hundred and one"),
    ("-5 degrees", "minus five degrees"),
    ("1.5k", "one point five k"),
    # symbols
    ("A & B", "A and B"),
    ("1 + 2 = 3", "one plus two equals three"),
    ("me@home", "me at home"),
    ("25°C or 77°F", "twenty-five degrees Celsius or seventy-seven degrees Fahrenheit"),
    # cleaning
    ("I ‘love’ it", "I 'love' it"),
    ("“Quoted”", '"Quoted"'),
    ("Hi 😀🚀 there", "Hi there"),
    ("wait,,, what", "wait, what"),
])
def test_normalize_text_examples(text, expected):
    assert normalize_text(text) == expected


def test_normalised_text_has_no_digits_left():
    text = "On 3/4 at 9:15 I paid $12.99 (15% off) for 2 tickets, row 21st; 1,500 seats; 0.5 km."
    out = normalize_text(text)
    assert not re.search(r"\d", out), out


def test_long_digit_runs_are_read_digit_by_digit_instead_of_crashing():
    assert normalize_text("code 4111111111111111") == "code " + " ".join(["four"] + ["one"] * 15)
    out = normalize_text("9" * 400)  # beyond num2words' largest number
    assert out == " ".join(["nine"] * 400)
    assert normalize_text("12345678901234567890.5").endswith("nine zero point five")


def test_clean_text_follows_the_upstream_rules():
    assert clean_text("  ‘a’ 😀,,,b 🇫🇷  ") == "'a' ,b"
    assert clean_text("keeps 🤖") == "keeps 🤖"  # outside the upstream emoji ranges


def test_other_languages_are_cleaned_but_not_spelled_out():
    assert normalize_text("Il a 3 chats ‘oui’,, 😀", language="fr") == "Il a 3 chats 'oui',"
