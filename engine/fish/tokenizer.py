"""The two published tokenizer layouts behind one interface (spec §1.7).

* tiktoken (OpenAudio S1-mini, fish-speech 1.5): `tokenizer.tiktoken` (base64 token + rank per
  line) plus `special_tokens.json`, whose names get consecutive ids after the ranks, in file order.
  fish-speech-1.5 (tag v1.5.1) ignores that file and always uses its own built-in list.
* Hugging Face `tokenizer.json` (Fish Audio S2-Pro): byte-level BPE with added special tokens.

Template strings of our own prompt builder may contain special tokens; user text may not (it is
scrubbed by `encode_user`), so nobody can end a turn or forge codes from a request.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

IM_END = "<|im_end|>"
SEMANTIC_TEMPLATE = "<|semantic:{}|>"
_SEMANTIC_RE = re.compile(r"<\|semantic:(\d+)\|>")
_SPECIAL_LIKE = re.compile(r"<\|[^<>|]{1,64}\|>")
_SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")

# Upstream's "modified GPT-4o" pre-tokenisation pattern, reproduced literally (including the
# escaped `?` in the seventh alternative) so tokenisation is identical.
FISH_TIKTOKEN_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    r"\p{P}",
    r"[^\r\n\p{L}\p{N}]?\p{L}+",
    r"\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(\?!\S)",
    r"\s+",
])
MAX_ENCODE_CHARS = 400_000

# The S1-era built-in list, used when special_tokens.json is absent.
S1_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", IM_END,
    "<|phoneme_start|>", "<|phoneme_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
    "<|text|>", "<|voice|>", "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio|>",
    *[SEMANTIC_TEMPLATE.format(i) for i in range(4096)],
]

# The tag v1.5.1 built-in list (fish-speech-1.5), always used for that family (spec §1.7).
V15_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", IM_END,
    *[f"<|placeholder:{i}|>" for i in range(4)],
    "<|text|>", "<|voice|>", "<|interleave|>",
    *[SEMANTIC_TEMPLATE.format(i) for i in range(1024)],
]


class TokenizerError(ValueError):
    """Tokenizer files are missing or malformed."""


class FishTokenizer:
    """Common interface; construct with `FishTokenizer.from_dir(checkpoint_dir)`."""

    special_ids: dict[str, int]

    @staticmethod
    def from_dir(path: str | Path, family: str | None = None) -> FishTokenizer:
        d = Path(path)
        if family == "fish-speech-1.5":
            if not (d / "tokenizer.tiktoken").is_file():
                raise TokenizerError(f"no tokenizer.tiktoken in {d}: a fish-speech-1.5 checkpoint ships one")
            return TiktokenTokenizer(d, builtin_specials=V15_SPECIAL_TOKENS)
        if (d / "tokenizer.tiktoken").is_file():
            return TiktokenTokenizer(d)
        if (d / "tokenizer.json").is_file():
            return HFTokenizer(d)
        raise TokenizerError(f"no tokenizer in {d}: expected tokenizer.tiktoken (+ special_tokens.json) "
                             "or tokenizer.json")

    # --- implemented by the layouts
    def encode(self, text: str) -> list[int]:
        """Encode template text; special tokens written in the text become their ids."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    # --- shared
    def _init_specials(self) -> None:
        semantic = {int(m.group(1)): i for name, i in self.special_ids.items() if (m := _SEMANTIC_RE.fullmatch(name))}
        if not semantic:
            raise TokenizerError("the tokenizer has no <|semantic:i|> tokens")
        ids = [semantic[i] for i in sorted(semantic)]
        begin, end = min(ids), max(ids)
        if sorted(semantic) != list(range(len(semantic))) or end - begin + 1 != len(ids) or ids != sorted(ids):
            raise TokenizerError("the <|semantic:i|> tokens must be numbered 0..N-1 with contiguous ids")
        self.semantic_begin_id, self.semantic_end_id = begin, end
        if IM_END not in self.special_ids:
            raise TokenizerError(f"the tokenizer has no {IM_END} token")
        self.im_end_id = self.special_ids[IM_END]

    @property
    def num_semantic_tokens(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    def token_id(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise TokenizerError(f"unknown special token {name!r}") from None

    def scrub(self, text: str) -> str:
        """Remove special-token strings from user text; speaker tags stay (they are prompt text).

        Repeated until nothing changes: removing one token must not splice a new one together
        (`<|im_<|pad|>end|>` would otherwise become `<|im_end|>`)."""
        def drop(m: re.Match) -> str:
            s = m.group(0)
            return s if _SPEAKER_TAG.fullmatch(s) or s not in self.special_ids else ""
        other = self._other_added_re()
        while True:
            cleaned = _SPECIAL_LIKE.sub(drop, text)
            if other is not None:
                cleaned = other.sub("", cleaned)
            if cleaned == text:
                return text
            text = cleaned

    def _other_added_re(self) -> re.Pattern | None:
        """Added tokens not shaped `<|...|>` (Qwen-style `<think>`, `<tool_call>`): the HF layout
        matches them anywhere in the text too."""
        if not hasattr(self, "_other_added"):
            names = sorted((n for n in self.special_ids if n and not _SPECIAL_LIKE.fullmatch(n)),
                           key=len, reverse=True)
            self._other_added = re.compile("|".join(map(re.escape, names))) if names else None
        return self._other_added

    def encode_user(self, text: str) -> list[int]:
        return self.encode(self.scrub(text))


class TiktokenTokenizer(FishTokenizer):
    def __init__(self, directory: Path, builtin_specials: list[str] | None = None) -> None:
        """`builtin_specials` replaces special_tokens.json (fish-speech-1.5 ignores that file)."""
        import tiktoken

        ranks = self._read_ranks(directory / "tokenizer.tiktoken")
        if builtin_specials is not None:
            names = list(builtin_specials)
        else:
            names = self._read_special_names(directory / "special_tokens.json")
        self.special_ids = {name: len(ranks) + i for i, name in enumerate(names)}
        self._encoding = tiktoken.Encoding(name=directory.name or "fish", pat_str=FISH_TIKTOKEN_PATTERN,
                                           mergeable_ranks=ranks, special_tokens=self.special_ids)
        self._init_specials()

    @staticmethod
    def _read_ranks(path: Path) -> dict[bytes, int]:
        ranks: dict[bytes, int] = {}
        try:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line:
                    continue
                token, rank = line.split()
                if token == "=":  # how the empty byte string is written
                    continue
                ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{path} is malformed: {exc}") from exc
        if not ranks:
            raise TokenizerError(f"{path} holds no ranks")
        return ranks

    @staticmethod
    def _read_special_names(path: Path) -> list[str]:
        if not path.is_file():
            return list(S1_SPECIAL_TOKENS)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path} is malformed: {exc}") from exc
        if not isinstance(data, dict) or not data:
            raise TokenizerError(f"{path} must be a non-empty name -> id object")
        return list(data)  # ids in the file are not consulted: file order decides (S1-era rule)

    def encode(self, text: str) -> list[int]:
        pieces = [text[i:i + MAX_ENCODE_CHARS] for i in range(0, len(text), MAX_ENCODE_CHARS)]
        out: list[int] = []
        for piece in pieces:
            out += self._encoding.encode(piece, allowed_special="all", disallowed_special=())
        return out

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


class HFTokenizer(FishTokenizer):
    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise TokenizerError(f"cannot read {path}: {exc}") from exc
        self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._init_specials()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
