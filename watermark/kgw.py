"""A KGW green-list watermark (Kirchenbauer et al. 2023) as a transformers LogitsProcessor.

At each step the vocabulary splits into a green share γ and the rest; green logits get +δ. Which tokens
are green depends on a secret key and the h tokens before the one being chosen ("lefthash": the context
to the left, never the candidate itself). The split is a keyed pseudo-random function of
(context, token), computed for a whole batch x vocabulary at once with integer hashing: no generator
reseeding, no `randperm`, no Python loop per token.

Keys are per client: key_c = HMAC-SHA256(master secret, client id), so a detector can name the account
whose outputs a student learned from. Keys never appear in a repr, a log line, a report or an exception;
reports carry a fingerprint instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from guard.hf_teacher import HFTeacher
from guard.teacher import Caller, Completion, Defense, Sampling, callers_for

MASK64 = (1 << 64) - 1
TABLE_VOCAB_LIMIT = 8192  # h = 1 green lists are tabulated up to this vocabulary (64 MiB of bools)
TABLE_CHUNK = 1 << 20  # (context, token) pairs hashed at once while tabulating: 8 MiB per int64 buffer
BIAS_TABLE_VOCAB_LIMIT = 2048  # ... and their δ-bias rows as floats up to this one (16 MiB in float32)
_M1, _M2, _GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_(x: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bit patterns, into `out` (default: in place); torch's >> is
    arithmetic, so the sign bits it drags in are masked off."""
    out = torch.bitwise_right_shift(x, bits, out=x if out is None else out)
    out &= (1 << (64 - bits)) - 1
    return out


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrap-around arithmetic): a bijective 64-bit scrambler."""
    return _mix64_(x.clone())


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """`mix64` in place with one scratch tensor: on batch x vocabulary hashes, allocating a fresh tensor for
    every operation costs more than the arithmetic itself."""
    scratch = torch.empty_like(x)
    for bits, multiplier in ((30, _M1), (27, _M2), (31, None)):
        x ^= _shift_right_(x, bits, out=scratch)
        if multiplier is not None:
            x *= _signed(multiplier)
    return x


class WatermarkKey:
    """A secret watermark key. Its bytes stay inside; `fingerprint` names it in reports."""

    def __init__(self, secret: bytes, label: str = "key"):
        if len(secret) < 16:
            raise ValueError("a watermark key needs at least 16 bytes of secret")
        self._secret, self.label = secret, label
        digest = hashlib.sha256(b"distill-guard watermark v1" + secret).digest()
        self.context_seed = int.from_bytes(digest[:8], "little")
        self.token_seed = int.from_bytes(digest[8:16], "little")
        self.fingerprint = hashlib.sha256(b"fingerprint" + secret).hexdigest()[:12]

    @classmethod
    def for_client(cls, master: bytes, client: str) -> WatermarkKey:
        """key_c = HMAC-SHA256(master, client id)."""
        return cls(hmac.new(master, client.encode(), hashlib.sha256).digest(), label=client)

    def __repr__(self) -> str:
        return f"WatermarkKey({self.label!r}, fingerprint={self.fingerprint})"


MASTER_ENV = "DISTILL_GUARD_WATERMARK_KEY"


def master_secret(path: str | None = None, required: bool = True) -> bytes | None:
    """The provider's master secret: the file at `path`, else $DISTILL_GUARD_WATERMARK_KEY (base64url)."""
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the master key file {path}: {e.strerror}") from None
    else:
        value = os.environ.get(MASTER_ENV, "").strip()
    if not value:
        if required:
            raise ValueError(f"no watermark master secret: set {MASTER_ENV} or pass a key file "
                             "(make one with `distill-guard watermark keygen`)")
        return None
    try:
        secret = base64.urlsafe_b64decode(value.encode() + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("the watermark master secret is not base64url") from None
    if len(secret) < 16:
        raise ValueError("the watermark master secret must decode to at least 16 bytes")
    return secret


def new_master_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def load_keys(clients: list[str], keys_file: str | None = None, master_file: str | None = None,
              master: bytes | None = None) -> list[WatermarkKey]:
    """Client keys to test: ids derived from the master secret (`clients`, or a keys file with one id per
    line; the secret is `master`, else read by `master_secret(master_file)`), or a JSON keys file mapping
    client id -> secret."""
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the keys file {keys_file}: {e.strerror}") from None
        if text.lstrip().startswith("{"):
            try:
                mapping = json.loads(text)
                return [WatermarkKey(base64.urlsafe_b64decode(s.encode() + b"=" * (-len(s) % 4)), label=c)
                        for c, s in mapping.items()]
            except (json.JSONDecodeError, binascii.Error, ValueError, AttributeError):
                raise ValueError(f"{keys_file}: expected a JSON object of client id -> base64url secret "
                                 "(each at least 16 bytes)") from None
        clients = [*clients, *(line.strip() for line in text.splitlines() if line.strip())]
    if not clients:
        raise ValueError("no keys to test: give client ids (--key) or a keys file (--keys-file)")
    master = master or master_secret(master_file)
    return [WatermarkKey.for_client(master, c) for c in dict.fromkeys(clients)]


@dataclass(frozen=True)
class WatermarkConfig:
    gamma: float = 0.25  # share of the vocabulary that is green in each context
    # logit bias on green tokens: larger is easier to detect and costs the teacher more accuracy; the
    # measurements behind the default are in README's watermark section
    delta: float = 0.75
    context_width: int = 1  # h: how many preceding tokens pick the green list

    def __post_init__(self):
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if not 1 <= self.context_width <= 4:
            raise ValueError(f"context width h must be 1 to 4, got {self.context_width}")


class GreenList:
    """The keyed green/red split of a vocabulary for every context: green(context, token) with P = γ."""

    def __init__(self, key: WatermarkKey, vocab_size: int, config: WatermarkConfig = WatermarkConfig()):
        self.key, self.vocab_size, self.config = key, vocab_size, config
        self.gamma = config.gamma
        self.width = config.context_width
        self._threshold = int(config.gamma * 2**53)  # green when the top 53 hash bits fall below γ·2^53
        self._token_hash = mix64(torch.arange(vocab_size, dtype=torch.long) + _signed(key.token_seed))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"GreenList({self.key!r}, vocab={self.vocab_size}, {self.config})"

    def context_hash(self, windows: torch.Tensor) -> torch.Tensor:
        """[..., h] token windows (oldest first) -> [...] int64 context hashes."""
        h = torch.full(windows.shape[:-1], _signed(self.key.context_seed), dtype=torch.long, device=windows.device)
        for i in range(windows.shape[-1]):
            h = mix64(h ^ (windows[..., i].long() * _signed(_GOLDEN) + i + 1))
        return h

    def _is_green(self, context: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
        return _shift_right_(_mix64_(context ^ token_hash), 11) < self._threshold

    def green(self, windows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each token is green after its window: windows [..., h], tokens [...] -> bool [...]."""
        return self._is_green(self.context_hash(windows), self._token_hash.to(tokens.device)[tokens.long()])

    def mask(self, windows: torch.Tensor) -> torch.Tensor:
        """The green list of each context as a mask: windows [B, h] -> bool [B, vocab]."""
        if self.width == 1 and self.vocab_size <= TABLE_VOCAB_LIMIT:
            return self._table(windows.device)[windows[:, 0].long()]
        token_hash = self._token_hash.to(windows.device)
        return self._is_green(self.context_hash(windows)[:, None], token_hash[None, :])

    def _table(self, device: torch.device) -> torch.Tensor:
        """With h = 1 every context is one token, so all green lists fit in a vocab x vocab table (1 MiB for
        1,024 tokens), built once per device: generation then pays an index, not a hash, per step. Built
        a block of rows at a time, so hashing never holds more than the table and one small scratch."""
        if device not in self._tables:
            contexts = self.context_hash(torch.arange(self.vocab_size, device=device)[:, None])
            token_hash = self._token_hash.to(device)[None, :]
            table = torch.empty(self.vocab_size, self.vocab_size, dtype=torch.bool, device=device)
            rows = max(1, TABLE_CHUNK // self.vocab_size)
            for start in range(0, self.vocab_size, rows):
                table[start:start + rows] = self._is_green(contexts[start:start + rows, None], token_hash)
            self._tables[device] = table
        return self._tables[device]


class GreenListProcessor(LogitsProcessor):
    """Adds δ to the green logits of each row, the green list seeded by the row's last h tokens."""

    def __init__(self, green_list: GreenList):
        self.green_list, self.delta = green_list, green_list.config.delta
        self._bias_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _bias(self, input_ids: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        green_list = self.green_list
        if green_list.width == 1 and green_list.vocab_size <= BIAS_TABLE_VOCAB_LIMIT:
            # one gather per step: the δ-bias rows of every context, tabulated once per device and dtype
            key = (input_ids.device, dtype)
            if key not in self._bias_tables:
                self._bias_tables[key] = green_list.mask(torch.arange(green_list.vocab_size, device=input_ids.device)[:, None]).to(dtype) * self.delta
            return self._bias_tables[key][input_ids[:, -1]]
        return green_list.mask(input_ids[:, -green_list.width:]).to(dtype) * self.delta

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] < self.green_list.width:
            return scores
        bias = self._bias(input_ids, scores.dtype)
        if bias.shape[-1] == scores.shape[-1]:
            return scores + bias
        vocab = min(scores.shape[-1], bias.shape[-1])  # some models pad their embedding past the tokenizer
        scores = scores.clone()
        scores[:, :vocab] += bias[:, :vocab]
        return scores


class Watermark(Defense):
    """A teacher whose every generated token carries the watermark of the caller's account.

    key_c = HMAC(master, account), so a detector can name the account a student learned from; with `client`
    set, every account is served under that one client's key (an experiment's knob). Token-level, so it
    needs the model itself: it wraps an `HFTeacher` directly. Reported logprobs are those of the watermarked
    distribution.
    """

    def __init__(self, teacher: HFTeacher, master: bytes, config: WatermarkConfig = WatermarkConfig(),
                 client: str | None = None):
        if not isinstance(teacher, HFTeacher):
            raise TypeError(f"the watermark is applied inside generate, so it needs a local model (HFTeacher); "
                            f"got {type(teacher).__name__}. Put the watermark innermost, or watermark the model "
                            "where it is served.")
        if len(master) < 16:
            raise ValueError("the watermark master secret must be at least 16 bytes")
        super().__init__(teacher)
        self.config, self.client = config, client
        self.vocab_size = len(teacher.tokenizer)
        self._master = master
        self.green_list = lru_cache(maxsize=1024)(self._green_list)  # per account, bounded
        self.name = f"{teacher.name}+watermark"

    def __repr__(self) -> str:
        return f"Watermark({self.teacher.name!r}, master=<hidden>, {self.config})"

    def _green_list(self, account: str) -> GreenList:
        return GreenList(WatermarkKey.for_client(self._master, account), self.vocab_size, self.config)

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        callers = callers_for(prompts, callers)
        accounts = [self.client or c.account for c in callers]
        out: list[Completion | None] = [None] * len(prompts)
        for account in dict.fromkeys(accounts):
            rows = [i for i, a in enumerate(accounts) if a == account]
            processor = LogitsProcessorList([GreenListProcessor(self.green_list(account))])
            answers = self.teacher.complete([prompts[i] for i in rows], sampling, [callers[i] for i in rows],
                                            logits_processor=processor)
            for i, completion in zip(rows, answers):
                out[i] = completion
        return out
