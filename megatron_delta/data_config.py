"""The `data:` section of a run config, checked without importing any data or tokenizer code
(megatron_delta.data builds the datasets and tokenizers it describes)."""

from __future__ import annotations

import dataclasses
import math

TOKENIZERS = ("byte", "huggingface")


class DataError(ValueError):
    """Bad data input or configuration, reported before anything is written or built."""


def _weight(item) -> float | None:
    """The number that a blend item spells, or None for a prefix."""
    try:
        return float(item)
    except (TypeError, ValueError):
        return None


def check_blend(blend: list) -> list[str]:
    """A Megatron blend list ([prefix, ...] or [w1, prefix1, w2, prefix2, ...]), its items stripped,
    for megatron.core's get_blend_from_list. Megatron reads an odd-length list as prefixes only, so that a missing weight or prefix turns a
    weight into a path; any number in the list therefore asks for the weighted form, checked here."""
    expected = "expected [prefix, ...] or [weight1, prefix1, weight2, prefix2, ...]"
    if not isinstance(blend, (list, tuple)) or not blend:
        raise DataError(f"data.blend={blend!r}: {expected}")
    items = [str(item).strip() for item in blend]
    if not all(items):
        raise DataError(f"data.blend={blend!r}: an empty prefix; {expected}")
    if any(_weight(item) is not None for item in items):
        if len(items) % 2:
            raise DataError(f"data.blend={blend!r}: {len(items)} items, but weights and prefixes come in pairs; "
                            f"{expected}")
        for weight, prefix in zip(items[::2], items[1::2]):
            value = _weight(weight)
            if value is None or _weight(prefix) is not None:
                raise DataError(f"data.blend={blend!r}: {weight!r}, {prefix!r} is not a weight, prefix pair; {expected}")
            if not (math.isfinite(value) and value > 0):
                raise DataError(f"data.blend={blend!r}: every weight must be > 0 and finite, not {weight} (of {prefix})")
    return items


@dataclasses.dataclass
class DataConfig:
    """The `data:` section of a run config.

    Attributes:
        blend: Megatron blend, [prefix] or [w1, prefix1, w2, prefix2, ...] (weights need not sum
            to 1); None trains on the built-in demo corpus (see ensure_demo_corpus).
        split: train,valid,test weights over each prefix's sequences; a 0 weight gives no dataset.
        tokenizer: "byte" (built in, no files) or "huggingface" (tokenizer_path).
        tokenizer_path: local directory of a Hugging Face tokenizer.
        cache_dir: where the demo corpus goes, and GPTDataset's index cache (index-cache/) under
            torch.distributed.
        num_workers: DataLoader worker processes.
        eod_mask_loss: GPTDatasetConfig.eod_mask_loss (no loss on predicting end-of-document).
        create_attention_mask: GPTDatasetConfig.create_attention_mask (False when the attention
            kernel builds its own causal mask).
        seed: GPTDataset's shuffling seed (the sample order); None: training.seed. Set it to
            vary the initialisation with training.seed over the same data order (as
            `megatron-delta compare` does).
    """

    blend: list | None = None
    split: str = "969,30,1"
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    cache_dir: str = "runs/data"
    num_workers: int = 0
    eod_mask_loss: bool = False
    create_attention_mask: bool = True
    seed: int | None = None

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise DataError(f"data.tokenizer={self.tokenizer!r} is unknown; choose one of {', '.join(TOKENIZERS)}")
        if self.tokenizer == "huggingface" and not self.tokenizer_path:
            raise DataError("data.tokenizer='huggingface' needs data.tokenizer_path: a local tokenizer directory")
        if self.blend is None and self.tokenizer != "byte":
            raise DataError(
                "data.blend is empty, which selects the byte-tokenized demo corpus; set data.tokenizer: byte, "
                "or point data.blend at data preprocessed with your tokenizer"
            )
        if self.blend is not None:
            check_blend(self.blend)
        try:
            weights = [float(weight) for weight in str(self.split).split(",")]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
            raise DataError(
                f"data.split={self.split!r}: expected 'train,valid,test' weights >= 0 with train > 0, e.g. '969,30,1'"
            )
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"data.num_workers={self.num_workers!r} must be an integer >= 0")
