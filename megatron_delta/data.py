"""Data pipeline: raw text -> Megatron indexed dataset (.bin/.idx) -> GPT train/valid/test datasets.

Everything below is megatron.core's own machinery; this module only wires it together and adds the
checks that keep bad input from failing late (or, for an empty split, from hanging forever).

`megatron-delta preprocess` (`main`, `preprocess`)
    Input, chosen by the file extension:
      *.txt              one document per paragraph: paragraphs are separated by one or more blank
                         (or whitespace-only) lines; a paragraph keeps its inner newlines and
                         indentation, and loses only its final line break.
      *.jsonl / *.json   one JSON object per line (Megatron's "loose JSON"); the document is the
                         string under --json-key.
    Output: PREFIX.bin + PREFIX.idx written with megatron.core's IndexedDatasetBuilder. With
    --split-sentences every document is stored as several sequences (one per sentence, the whitespace
    after a sentence kept with it, so the sentences concatenate back to the document) cut by an nltk
    Punkt model trained on the input itself (nothing is downloaded). --append-eod ends every document
    with the tokenizer's end-of-document token (GPT training wants it: GPTDataset packs documents
    back to back).
    Bad input: in JSONL, a line that is not UTF-8, not JSON, not an object with a string under the
    key, or whose text is blank is skipped and counted (blank lines are not records and are ignored).
    A .txt file that is not UTF-8 is an error naming the line: a wrong encoding affects the whole file.
    Output appears all at once or not at all: it is written under temporary names that are renamed
    only after the last document, and removed on any error or interrupt.
    Exit status: 0 written (skipped lines, if any, are counted on stderr); 2 bad input, nothing
    written (the reason on stderr: unreadable input, no documents left, tokenizer problem, bad
    command line);
    130 / 143 interrupted by SIGINT / SIGTERM (temporary files removed; those of a killed run, left
    as PREFIX.tmp-HOST-PID.*, are removed by the next preprocess to the same prefix).

Tokenizers (`build_tokenizer`): megatron.core's MegatronTokenizer.
    "byte"         its ByteLevelTokenizer: ids 0-255 are UTF-8 bytes, 256 is end-of-document, 257 is
                   padding (vocab 258); needs no files.
    "huggingface"  its HuggingFaceTokenizer on a local directory (tokenizer.json / vocab files);
                   needs the `transformers` package; never downloads.

Demo corpus (`ensure_demo_corpus`): the Python documentation topics that ship with every CPython in
the standard library module `pydoc_data.topics` (~470k characters), byte-tokenized, one document per
paragraph.

Training data (`build_datasets`): GPTDataset train/valid/test splits built by
BlendedMegatronDatasetBuilder from a Megatron blend (one prefix, or weighted prefixes).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import dataclasses
import fcntl
import importlib.util
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
from typing import Iterable, Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split, get_blend_from_list
from megatron.core.tokenizers import MegatronTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer
from tqdm import tqdm

from megatron_delta.data_config import TOKENIZERS, DataConfig, DataError, check_blend

TEXT_EXTENSIONS = (".txt",)
JSONL_EXTENSIONS = (".jsonl", ".json")

# Megatron's ByteLevelTokenizer defaults put end-of-document and padding on ids 0 and 1, which are
# also the bytes NUL and SOH; moving both past the 256 byte values keeps every byte a plain token.
BYTE_EOD, BYTE_PAD = 256, 257
BYTE_TOKENIZER_ARGS = dict(
    vocab_size=256,
    special_tokens=["<pad>", "<eod>"],  # ByteLevelTokenizer numbers these downwards from 257
    _eos_id=BYTE_EOD,
    _pad_id=BYTE_PAD,
)

# Punkt learns abbreviations and sentence starters from this much of the corpus: enough for stable
# statistics, and about 25 s of PunktTrainer (pure Python) whatever the corpus size.
PUNKT_TRAINING_CHARS = 4_000_000


def build_tokenizer(cfg: DataConfig):
    """The megatron.core tokenizer named by cfg (vocab_size, eod, pad, tokenize, detokenize)."""
    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)


def load_tokenizer(kind: str, path: str | None = None):
    """megatron.core's tokenizer of a kind in TOKENIZERS; path: the huggingface tokenizer directory."""
    if kind == "byte":
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "byte-level", "model_type": "gpt"}, **BYTE_TOKENIZER_ARGS
        )
    if not path or not os.path.isdir(path):
        raise DataError(
            f"tokenizer path {path!r} is not a directory; give a local Hugging Face tokenizer directory "
            "(data.tokenizer_path / --tokenizer-path)"
        )
    if importlib.util.find_spec("transformers") is None:
        raise DataError("the huggingface tokenizer needs the transformers package: pip install transformers")
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": "huggingface", "model_type": "gpt"}, use_fast=True
    )
    if tokenizer.eod is None:
        raise DataError(f"the tokenizer in {path} has no eos_token; GPT data needs one to mark document ends")
    return tokenizer


def write_hf_byte_tokenizer(directory: str) -> list[str]:
    """The byte tokenizer as Hugging Face tokenizer files, for exported models trained with it:
    id = byte value (GPT-2's byte-level alphabet, no merges), <eod> = 256 (also eos), <pad> = 257.
    Returns the files written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eod>", "<pad>"])  # ids 256, 257
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eod>", pad_token="<pad>")
    assert (wrapped.eos_token_id, wrapped.pad_token_id) == (BYTE_EOD, BYTE_PAD)
    return [os.path.basename(path) for path in wrapped.save_pretrained(directory)]


# ---------------------------------------------------------------------------------------------------
# preprocess: text / JSONL -> .bin/.idx


@dataclasses.dataclass
class PreprocessStats:
    """What `preprocess` wrote, and which input lines it skipped (reason -> count, first line)."""

    documents: int = 0
    sequences: int = 0  # == documents, or the number of sentences with split_sentences
    tokens: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_skipped_line: dict = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, line_number: int) -> None:
        self.skipped[reason] += 1
        self.first_skipped_line.setdefault(reason, line_number)

    def describe_skips(self) -> str:
        return ", ".join(
            f"{count} {reason} (first at line {self.first_skipped_line[reason]})"
            for reason, count in self.skipped.items()
        )


def _input_lines(path: str, desc: str, progress: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of every line, with a progress bar over the file's bytes."""
    with open(path, "rb") as stream, tqdm(
        total=os.path.getsize(path), desc=desc, unit="B", unit_scale=True, mininterval=1.0, disable=not progress
    ) as bar:
        for line_number, line in enumerate(stream, start=1):
            bar.update(len(line))
            # a byte-order mark (Windows editors) is no text, and json.loads rejects it
            yield line_number, line.removeprefix(codecs.BOM_UTF8) if line_number == 1 else line


def _text_documents(path: str, desc: str, progress: bool) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph) for every blank-line-separated paragraph of a UTF-8 text file."""
    paragraph, first_line = [], 0
    for line_number, raw in _input_lines(path, desc, progress):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
            ) from None
        if line.strip():
            if not paragraph:
                first_line = line_number
            paragraph.append(line)
        elif paragraph:
            yield first_line, "".join(paragraph).rstrip("\r\n")
            paragraph = []
    if paragraph:
        yield first_line, "".join(paragraph).rstrip("\r\n")


def _jsonl_documents(
    path: str, json_key: str, stats: PreprocessStats, desc: str, progress: bool
) -> Iterator[tuple[int, str]]:
    """(line number, record[json_key]) for every usable JSONL line; the others are counted in stats."""
    for line_number, raw in _input_lines(path, desc, progress):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats.skip("invalid UTF-8", line_number)
            continue
        except json.JSONDecodeError:
            stats.skip("invalid JSON", line_number)
            continue
        if not isinstance(record, dict) or json_key not in record:
            stats.skip(f"without key {json_key!r}", line_number)
        elif not isinstance(record[json_key], str):
            stats.skip(f"{json_key!r} not a string", line_number)
        elif not record[json_key].strip():
            stats.skip("blank text", line_number)
        else:
            yield line_number, record[json_key]


def _documents(path: str, json_key: str, stats: PreprocessStats, desc: str, progress: bool):
    if path.endswith(JSONL_EXTENSIONS):
        return _jsonl_documents(path, json_key, stats, desc, progress)
    return _text_documents(path, desc, progress)


def train_sentence_splitter(texts: Iterable[str]) -> PunktSentenceTokenizer:
    """An nltk Punkt sentence splitter trained on (the first PUNKT_TRAINING_CHARS of) the texts."""
    trainer = PunktTrainer()
    seen = 0
    for text in texts:
        trainer.train(text, finalize=False)
        seen += len(text)
        if seen >= PUNKT_TRAINING_CHARS:
            break
    trainer.finalize_training()
    return PunktSentenceTokenizer(trainer.get_params())


def _sentences(text: str, splitter: PunktSentenceTokenizer) -> list[str]:
    """The sentences of text, each with the whitespace that follows it, so that they join back to text."""
    starts = [start for start, _ in splitter.span_tokenize(text)]
    starts[0] = 0  # the leading whitespace (indentation) belongs to the first sentence
    return [text[begin:end] for begin, end in zip(starts, starts[1:] + [len(text)])]


def _remove_stale_temporaries(output_prefix: str) -> None:
    """Delete PREFIX.tmp-HOST-PID.bin/.idx left by a preprocess of this host that was killed
    (SIGKILL, power loss): its pid no longer runs. Temporaries of live or other hosts' processes
    stay; `.tmpPID` names are those of older versions, written on this host."""
    directory, base = os.path.split(os.path.abspath(output_prefix))
    pattern = re.compile(re.escape(base) + r"\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)\.(?:bin|idx)")
    for name in os.listdir(directory):
        match = pattern.fullmatch(name)
        if not match or match.group("host") not in (None, socket.gethostname()):
            continue
        try:
            os.kill(int(match.group("pid")), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                print(f"removed {os.path.join(directory, name)}, left by a killed preprocess", file=sys.stderr)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def _indexed_dataset_builder(output_prefix: str, vocab_size: int) -> Iterator[IndexedDatasetBuilder]:
    """An IndexedDatasetBuilder whose PREFIX.bin/.idx appear only if the with-block completes."""
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    _remove_stale_temporaries(output_prefix)
    temporary_prefix = f"{output_prefix}.tmp-{socket.gethostname()}-{os.getpid()}"
    builder = IndexedDatasetBuilder(temporary_prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    try:
        yield builder
        builder.finalize(temporary_prefix + ".idx")
        # Readers need both files (IndexedDataset.exists), so the .idx is the commit mark: drop an old
        # one first and move the new one in last. A crash in between leaves a .bin alone, never a
        # mismatched pair.
        with contextlib.suppress(FileNotFoundError):
            os.remove(output_prefix + ".idx")
        os.replace(temporary_prefix + ".bin", output_prefix + ".bin")
        os.replace(temporary_prefix + ".idx", output_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary_prefix + suffix)
        raise


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer,
    *,
    json_key: str = "text",
    split_sentences: bool = False,
    append_eod: bool = False,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize a .txt or .jsonl file into output_prefix.bin/.idx (see the module docstring)."""
    if not input_path.endswith(TEXT_EXTENSIONS + JSONL_EXTENSIONS):
        raise DataError(f"--input {input_path}: unknown format; name it *.txt (paragraphs) or *.jsonl (JSON lines)")
    if not os.path.isfile(input_path):
        raise DataError(f"--input {input_path}: no such file")
    if output_prefix.endswith((".bin", ".idx")):
        raise DataError(f"--output-prefix {output_prefix}: give the prefix, without .bin/.idx")

    splitter = None
    if split_sentences:
        texts = (text for _, text in _documents(input_path, json_key, PreprocessStats(), "punkt", progress))
        splitter = train_sentence_splitter(texts)

    stats = PreprocessStats()
    with _indexed_dataset_builder(output_prefix, tokenizer.vocab_size) as builder:
        for line_number, text in _documents(input_path, json_key, stats, "tokenize", progress):
            pieces = [text] if splitter is None else _sentences(text, splitter)
            sequences = [ids for ids in map(tokenizer.tokenize, pieces) if len(ids) > 0]
            if not sequences:
                stats.skip("without any token", line_number)
                continue
            if append_eod:
                sequences[-1] = list(sequences[-1]) + [tokenizer.eod]
            lengths = [len(ids) for ids in sequences]
            builder.add_document([token for ids in sequences for token in ids], lengths)
            stats.documents += 1
            stats.sequences += len(sequences)
            stats.tokens += sum(lengths)
        if stats.documents == 0:
            raise DataError(
                f"{input_path}: no documents, nothing written ({stats.describe_skips() or 'the file has no text'})"
            )
    return stats


class Terminated(BaseException):
    """SIGTERM, raised where the process is (BaseException: no `except Exception` swallows it)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """`megatron-delta preprocess`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="megatron-delta preprocess",
        description="Tokenize text (*.txt: one document per blank-line-separated paragraph) or JSON lines "
        "(*.jsonl) into a Megatron indexed dataset PREFIX.bin/PREFIX.idx.",
        epilog="exit status: 0 written (skipped JSONL lines are counted on stderr), 2 bad input or command "
        "line (nothing written), 130/143 interrupted by SIGINT/SIGTERM (temporary files removed)",
    )
    parser.add_argument("--input", required=True, help="*.txt or *.jsonl file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the document (default: text)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    parser.add_argument("--tokenizer-path", help="local Hugging Face tokenizer directory (--tokenizer huggingface)")
    parser.add_argument(
        "--split-sentences", action="store_true", help="one sequence per sentence (nltk Punkt trained on the input)"
    )
    parser.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # SIGTERM (kill, a job scheduler) would end the process without unwinding; as an exception it
    # runs the builder's cleanup of its temporary files, like Ctrl-C (KeyboardInterrupt) does.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_path)
        stats = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            json_key=args.json_key,
            split_sentences=args.split_sentences,
            append_eod=args.append_eod,
            progress=not args.no_progress,
        )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as stop:
        print(f"interrupted: nothing written to {args.output_prefix}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stats.skipped:
        print(f"skipped {sum(stats.skipped.values())} lines: {stats.describe_skips()}", file=sys.stderr)
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.sequences} sequences, "
        f"{stats.tokens} tokens"
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# demo corpus and training datasets


def ensure_demo_corpus(cfg: DataConfig) -> list[str]:
    """Build (once) the demo indexed dataset in cfg.cache_dir and return its blend, [prefix].

    The corpus is the Python documentation in the standard library module `pydoc_data.topics`
    (every topic of `help()`), byte-tokenized with an end-of-document token after each paragraph:
    ~2.6k documents, ~470k tokens, built in about a second. Safe when many ranks or jobs start at
    once: a file lock makes one process per machine build while the others wait, and the files
    appear by rename, so processes on other machines sharing the directory never see half a dataset.
    """
    prefix = os.path.join(cfg.cache_dir, f"pydoc-topics-py{sys.version_info.major}{sys.version_info.minor}-byte")
    if IndexedDataset.exists(prefix):
        return [prefix]
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "data.blend is empty, but this Python lacks the standard library's pydoc_data module that the demo "
            "corpus is made from; set data.blend to a dataset made with `megatron-delta preprocess`"
        ) from None
    os.makedirs(cfg.cache_dir, exist_ok=True)
    with open(prefix + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not IndexedDataset.exists(prefix):
            with tempfile.TemporaryDirectory(dir=cfg.cache_dir) as scratch:
                text_path = os.path.join(scratch, "pydoc-topics.txt")
                with open(text_path, "w", encoding="utf-8") as text_file:
                    text_file.writelines(topics[name].strip("\n") + "\n\n" for name in sorted(topics))
                preprocess(text_path, prefix, load_tokenizer("byte"), append_eod=True, progress=False)
    return [prefix]


def _open_indexed_dataset(prefix: str) -> IndexedDataset:
    """IndexedDataset(prefix), with a damaged or mismatched .idx/.bin pair a DataError: the .idx
    must parse, and the .bin must hold exactly the tokens that the .idx points at."""
    remake = f"re-create it with `megatron-delta preprocess --output-prefix {prefix} ...`"
    try:
        dataset = IndexedDataset(prefix)
        index = dataset.index
        expected = (int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
                    if len(index) else 0)
        consistent = (len(index.document_indices) > 0 and index.document_indices[-1] == len(index)
                      and (index.sequence_lengths >= 0).all())
    except (AssertionError, ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise DataError(f"data.blend: {prefix}.idx is not a valid Megatron index ({e}); {remake}") from None
    if not consistent:
        raise DataError(f"data.blend: {prefix}.idx is not a valid Megatron index (inconsistent tables); {remake}")
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(
            f"data.blend: {prefix}.bin has {actual} bytes but {prefix}.idx describes {expected}: truncated, or the "
            f"two files come from different preprocess runs; {remake}"
        )
    return dataset


def data_identity(prefixes: list[str]) -> str:
    """A short hash of the data files (path, size, modification time of every .bin/.idx): the
    index cache is keyed by it, so that new data written under an old prefix gets a new index."""
    stamps = []
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            info = os.stat(prefix + suffix)
            stamps.append((os.path.realpath(prefix + suffix), info.st_size, info.st_mtime_ns))
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def _check_splits(prefix: str, split_matrix: list, split: str) -> None:
    """Fail early on a damaged dataset or on a split without tokens (GPTDataset would loop forever)."""
    dataset = _open_indexed_dataset(prefix)  # keep it referenced: its lengths are a view of its mmap
    lengths = dataset.sequence_lengths
    for part, bounds in zip(Split, split_matrix):
        if bounds is None:
            continue
        # the same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits
        begin, end = (int(round(bound * float(len(lengths)))) for bound in bounds)
        if lengths[begin:end].sum() == 0:
            raise DataError(
                f"data.split={split!r} gives the {part.name} split of {prefix} {end - begin} of its {len(lengths)} "
                f"sequences and no tokens; give that split weight 0 (e.g. '98,2,0') or add documents"
            )


def build_datasets(cfg: DataConfig, tokenizer, seq_length: int, num_samples: tuple, seed: int):
    """(train, valid, test) GPTDatasets (BlendedDatasets for a weighted blend) via megatron.core.

    num_samples: samples to draw per split; a split whose weight in cfg.split is 0 comes back None.
    Call on every rank: under torch.distributed, BlendedMegatronDatasetBuilder builds the index
    cache (cfg.cache_dir/index-cache/<data identity>) on rank 0 first and the other ranks then load it. Without
    torch.distributed it builds in the one process, caching beside each dataset (PREFIX_DIR/cache).
    """
    prefixes, weights = (ensure_demo_corpus(cfg), None) if cfg.blend is None else get_blend_from_list(check_blend(cfg.blend))
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise DataError(
                f"data.blend: no indexed dataset {prefix}.bin/.idx; "
                f"make one with `megatron-delta preprocess --input FILE --output-prefix {prefix}`"
            )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        # Keyed by the data files' identity (data_identity). megatron-core 0.16's BlendedDataset
        # calls torch.distributed.get_rank() on an index-cache miss, so a single process (tests,
        # notebooks) leaves the caching to GPTDataset's default: a cache/ folder beside each
        # dataset, which is not keyed by the data (the trainer always has a process group).
        path_to_cache=(os.path.join(cfg.cache_dir, "index-cache", data_identity(prefixes))
                       if torch.distributed.is_initialized() else None),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.create_attention_mask,
    )
    for prefix in prefixes:
        _check_splits(prefix, config.split_matrix, cfg.split)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test
