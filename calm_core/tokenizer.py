"""Byte-level BPE tokenizer (HF ``tokenizers``) with the special tokens the pipeline needs.

Special tokens: ``<|endoftext|>`` ends every document and ``<|pad|>`` fills the last chunk of a
document up to a multiple of K (the ``document`` layout, ``calm_core.chunking``),
``<|begin_of_text|>`` starts every document in the ``packed`` layout (the official code's; the same
name as Llama-3's BOS), ``<|mask|>`` replaces input tokens during autoencoder training (token
masking). Tokenizers trained before BOS existed have none (``bos_id`` None) and stay as they are:
the packed layout refuses them. A tokenizer is identified by the sha256 of its serialised JSON;
every artifact that depends on it records that hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from calm_core.errors import ArtifactError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
BOS = "<|begin_of_text|>"
SPECIAL_TOKENS = (EOT, PAD, MASK)  # what every tokenizer of the project has (an existing file gains them)
# The official CALM release uses the Llama-3 tokenizer with an appended "[PAD]" (vocabulary 128,257):
# its end-of-text and padding tokens are recognised under their own names, and since the official
# AE masks input tokens with id 0 during training, a tokenizer in that convention (no "<|mask|>")
# gets mask id 0 instead of a new token (which would change the vocabulary the weights were made for).
OFFICIAL_EOT, OFFICIAL_PAD, OFFICIAL_BOS = "<|end_of_text|>", "[PAD]", BOS
OFFICIAL_MASK_ID = 0


class CalmTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of the pipeline's special tokens (``bos_id``: the
    begin-of-text the packed layout puts before every document; None when the tokenizer has none)."""

    def __init__(self, tok: Tokenizer):
        official = (tok.token_to_id(EOT) is None and tok.token_to_id(OFFICIAL_EOT) is not None
                    and tok.token_to_id(PAD) is None and tok.token_to_id(OFFICIAL_PAD) is not None)
        if official:
            self.eot_id: int = tok.token_to_id(OFFICIAL_EOT)
            self.pad_id: int = tok.token_to_id(OFFICIAL_PAD)
            mask = tok.token_to_id(MASK)
            self.mask_id: int = OFFICIAL_MASK_ID if mask is None else mask
            self.bos_id: int | None = tok.token_to_id(OFFICIAL_BOS)
        else:
            missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
            if missing:
                tok.add_special_tokens(missing)  # an existing tokenizer.json gains what it lacks
            self.eot_id = tok.token_to_id(EOT)
            self.pad_id = tok.token_to_id(PAD)
            self.mask_id = tok.token_to_id(MASK)
            self.bos_id = tok.token_to_id(BOS)
        self.tok = tok

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "CalmTokenizer":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[*SPECIAL_TOKENS, BOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def with_bos(self) -> "CalmTokenizer":
        """This tokenizer with a begin-of-text token (added when it has none: a new run adopting an
        existing tokenizer.json; never applied to a run's own tokenizer, whose size its models fix)."""
        if self.bos_id is None:
            self.tok.add_special_tokens([BOS])
            self.bos_id = self.tok.token_to_id(BOS)
        return self

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer.json") -> "CalmTokenizer":
        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises plain Exceptions with long messages
            raise ArtifactError(f"{source}: not a valid tokenizers JSON file ({str(e)[:120]})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "CalmTokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ArtifactError(f"tokenizer file '{p}' does not exist")
        return cls.from_str(p.read_text(encoding="utf-8"), source=str(p))

    # ------------------------------------------------------------------ identity and I/O
    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def sha256(self) -> str:
        # canonical JSON so that formatting differences do not change the identity
        canon = json.dumps(json.loads(self.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "tokenizer.json"
        path.write_text(self.to_str(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
