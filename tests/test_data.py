"""megatron_delta.data: preprocess (text/JSONL -> .bin/.idx), tokenizers, demo corpus, GPT datasets.

Fast and single-process, except test_two_ranks_build_the_same_datasets (torchrun, 2 gloo ranks).
"""

import contextlib
import importlib.util
import json
import os
import random
import re
import signal
import sys

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from nltk.tokenize.punkt import PunktSentenceTokenizer

from megatron_delta import data
from megatron_delta.compat import detokenize
from megatron_delta.data import DataConfig, DataError

import launcher

torch.set_num_threads(1)

PARAGRAPHS = [
    "Plain ASCII paragraph.\nIts second line.",
    "    indented code line\n        more indented",
    "Unicode: café, 日本語, emoji \U0001f600.",
]


@pytest.fixture(scope="module")
def byte_tokenizer():
    return data.build_tokenizer(DataConfig())


def read_documents(prefix):
    """The token ids of every document (all of its sequences joined) and the sequence count."""
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    documents = [
        numpy.concatenate([dataset[i] for i in range(begin, end)]).tolist() for begin, end in zip(bounds, bounds[1:])
    ]
    return documents, len(dataset)


def files_in(directory):
    return sorted(os.listdir(directory))


def write_lines(path, lines):
    with open(path, "wb") as stream:
        stream.write(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")


def test_byte_round_trip_text_to_idx_to_text(tmp_path, byte_tokenizer, capsys):
    source = tmp_path / "corpus.txt"
    # blank, whitespace-only and repeated blank lines all separate paragraphs; a BOM is dropped
    source.write_text("\ufeff\n" + "\n\n  \n\n".join(PARAGRAPHS) + "\n\n\n", encoding="utf-8")
    prefix = str(tmp_path / "out" / "corpus")

    assert data.main(["--input", str(source), "--output-prefix", prefix, "--append-eod", "--no-progress"]) == 0
    assert "3 documents, 3 sequences" in capsys.readouterr().out

    documents, _ = read_documents(prefix)
    assert IndexedDataset(prefix).index.dtype == numpy.uint16
    assert len(documents) == len(PARAGRAPHS)
    for ids, paragraph in zip(documents, PARAGRAPHS):
        assert ids[-1] == byte_tokenizer.eod == 256
        assert bytes(ids[:-1]).decode("utf-8") == paragraph  # byte-exact
        assert detokenize(byte_tokenizer, ids) == paragraph  # EOD is dropped on the way back
    assert byte_tokenizer.vocab_size == 258 and byte_tokenizer.pad == 257
    assert files_in(tmp_path / "out") == ["corpus.bin", "corpus.idx"]


def test_jsonl_bad_lines_are_counted_and_skipped(tmp_path, byte_tokenizer, capsys):
    source = tmp_path / "docs.jsonl"
    write_lines(
        source,
        [
            b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode(),  # a byte-order mark is no error
            b'{"text": "broken',  # line 2: invalid JSON
            json.dumps({"body": "no text key"}),  # line 3
            b'{"text": "caf\xe9"}',  # line 4: latin-1 byte, invalid UTF-8
            json.dumps({"text": 42}),  # line 5
            b"",  # blank line: not a record, not counted
            json.dumps({"text": "  \n"}),  # line 7: blank text
            json.dumps({"text": "second", "id": 2}),
            json.dumps(["not", "an", "object"]),  # line 9
            json.dumps({"text": "third \u00e9"}),
        ],
    )
    prefix = str(tmp_path / "docs")
    stats = data.preprocess(str(source), prefix, byte_tokenizer, progress=False)
    assert (stats.documents, stats.sequences, stats.tokens) == (3, 3, len("firstsecondthird ") + 2)
    assert stats.skipped == {
        "invalid JSON": 1,
        "without key 'text'": 2,
        "invalid UTF-8": 1,
        "'text' not a string": 1,
        "blank text": 1,
    }
    assert stats.first_skipped_line == {
        "invalid JSON": 2,
        "without key 'text'": 3,
        "invalid UTF-8": 4,
        "'text' not a string": 5,
        "blank text": 7,
    }
    documents, _ = read_documents(prefix)
    assert [bytes(ids).decode() for ids in documents] == ["first", "second", "third \u00e9"]

    # the command reports the skips on stderr and still succeeds (exit 0)
    assert data.main(["--input", str(source), "--output-prefix", prefix, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped 6 lines" in err and "1 invalid JSON (first at line 2)" in err

    # --json-key reads another field
    stats = data.preprocess(str(source), prefix, byte_tokenizer, json_key="body", progress=False)
    assert stats.documents == 1 and stats.skipped["without key 'body'"] == 6


def test_text_file_with_invalid_utf8_is_an_error_naming_the_line(tmp_path, capsys):
    source = tmp_path / "latin1.txt"
    write_lines(source, [b"good paragraph", b"", b"caf\xe9 au lait"])
    assert data.main(["--input", str(source), "--output-prefix", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt:3: not valid UTF-8 (byte 0xe9 at column 4)" in err
    assert files_in(tmp_path) == ["latin1.txt"]


@pytest.mark.parametrize(
    "name, content",
    [("empty.txt", b""), ("blank.txt", b"\n  \n\n"), ("empty.jsonl", b""), ("bad.jsonl", b"nope\n{}\n")],
)
def test_no_documents_is_an_error_and_writes_nothing(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    assert data.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no documents, nothing written" in capsys.readouterr().err
    assert files_in(tmp_path) == [name]


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    cases = [
        (["--input", str(tmp_path / "a.csv"), "--output-prefix", "o"], "unknown format"),
        (["--input", str(tmp_path / "missing.txt"), "--output-prefix", "o"], "no such file"),
        (["--input", str(tmp_path / "a.txt"), "--output-prefix", "o.bin"], "without .bin/.idx"),
        (["--input", str(tmp_path / "a.txt"), "--output-prefix", "o", "--tokenizer", "huggingface"], "tokenizer path"),
    ]
    for argv, message in cases:
        assert data.main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage_error:
        data.main(["--input", str(tmp_path / "a.txt")])  # --output-prefix missing
    assert usage_error.value.code == 2


class FailingTokenizer:
    """The byte tokenizer, raising on its third document (an interrupted preprocess)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod

    def tokenize(self, text):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.tokenizer.tokenize(text)


def test_interrupted_write_leaves_no_partial_files(tmp_path, byte_tokenizer):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(f"paragraph {i}" for i in range(10)))
    prefix = str(tmp_path / "corpus")

    with pytest.raises(KeyboardInterrupt):
        data.preprocess(str(source), prefix, FailingTokenizer(byte_tokenizer), progress=False)
    assert files_in(tmp_path) == ["corpus.txt"]

    # an interrupted rewrite keeps the previous dataset intact
    data.preprocess(str(source), prefix, byte_tokenizer, progress=False)
    before = {suffix: open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")}
    source.write_text("\n\n".join(f"Other text {i}. Second sentence." for i in range(10)))
    with pytest.raises(KeyboardInterrupt):
        data.preprocess(str(source), prefix, FailingTokenizer(byte_tokenizer), split_sentences=True, progress=False)
    assert files_in(tmp_path) == ["corpus.bin", "corpus.idx", "corpus.txt"]
    assert {suffix: open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")} == before


def test_sentence_splitting_gives_one_sequence_per_sentence(tmp_path, byte_tokenizer):
    rng = random.Random(0)
    words = "time people year way day thing man world life hand part child eye woman place work week".split()

    def sentence():
        sentence_words = [rng.choice(words) for _ in range(rng.randint(5, 10))]
        if rng.random() < 0.5:  # "Dr." ends no sentence: Punkt has to learn that from this corpus
            sentence_words.insert(rng.randint(1, len(sentence_words) - 1), "Dr. Smith")
        return " ".join(sentence_words).capitalize().replace("dr. smith", "Dr. Smith") + "."

    sentences = [[sentence() for _ in range(3)] for _ in range(40)]
    paragraphs = [" ".join(paragraph) for paragraph in sentences]
    assert sum(p.count("Dr. ") for p in paragraphs) == 60
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(paragraphs))

    whole = data.preprocess(str(source), str(tmp_path / "whole"), byte_tokenizer, append_eod=True, progress=False)
    split = data.preprocess(
        str(source), str(tmp_path / "split"), byte_tokenizer, append_eod=True, split_sentences=True, progress=False
    )
    assert (whole.documents, whole.sequences) == (40, 40)
    assert (split.documents, split.sequences) == (40, 120)
    untrained = PunktSentenceTokenizer()  # cuts after "Dr." too: the training on the corpus is what helps
    assert sum(len(data._sentences(paragraph, untrained)) for paragraph in paragraphs) == 120 + 60
    assert split.tokens == whole.tokens
    # the sentences of a document concatenate back to the whole document, EOD only at the end
    whole_documents, _ = read_documents(str(tmp_path / "whole"))
    split_documents, _ = read_documents(str(tmp_path / "split"))
    assert split_documents == whole_documents
    stored = IndexedDataset(str(tmp_path / "split"))
    assert [bytes(stored[i].tolist()).decode() for i in range(2)] == [sentences[0][0] + " ", sentences[0][1] + " "]


def write_letters_corpus(path, letters, documents, seed):
    rng = random.Random(seed)
    with open(path, "w") as stream:
        stream.write("\n\n".join("".join(rng.choices(letters, k=rng.randint(20, 80))) for _ in range(documents)))


def test_blend_of_two_prefixes_follows_the_weights(tmp_path, byte_tokenizer):
    prefixes = {}
    for name, letters in (("abc", "abc"), ("xyz", "xyz")):
        write_letters_corpus(tmp_path / f"{name}.txt", letters, 300, seed=len(prefixes))
        prefixes[name] = str(tmp_path / name)
        data.preprocess(str(tmp_path / f"{name}.txt"), prefixes[name], byte_tokenizer, append_eod=True, progress=False)

    cfg = DataConfig(blend=[0.25, prefixes["abc"], 0.75, prefixes["xyz"]], split="1,0,0", cache_dir=str(tmp_path))
    train, valid, test = data.build_datasets(cfg, byte_tokenizer, seq_length=32, num_samples=(800, 0, 0), seed=7)
    assert valid is None and test is None  # weight-0 splits
    assert len(train) == 800

    seen = {0: 0, 1: 0}
    for index in range(len(train)):
        sample = train[index]
        seen[int(sample["dataset_id"])] += 1
        letters = set(bytes(t for t in sample["tokens"].tolist() if t < 256).decode())
        assert letters <= set("abc" if sample["dataset_id"] == 0 else "xyz")
    assert seen[0] / 800 == pytest.approx(0.25, abs=0.01)
    assert seen[1] / 800 == pytest.approx(0.75, abs=0.01)


@contextlib.contextmanager
def fail_after(seconds):
    """GPTDataset loops forever on an empty split: turn a regression into a failure, not a hang."""

    def on_alarm(*_):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_empty_split_is_a_clear_error(tmp_path, byte_tokenizer):
    write_letters_corpus(tmp_path / "small.txt", "ab", 10, seed=0)
    prefix = str(tmp_path / "small")
    data.preprocess(str(tmp_path / "small.txt"), prefix, byte_tokenizer, progress=False)

    cfg = DataConfig(blend=[prefix], split="969,30,1", cache_dir=str(tmp_path))
    with fail_after(60), pytest.raises(DataError, match=r"the valid split of .*small 0 of its 10 sequences"):
        data.build_datasets(cfg, byte_tokenizer, seq_length=16, num_samples=(10, 2, 0), seed=1)
    # the suggested fix works
    cfg = DataConfig(blend=[prefix], split="8,2,0", cache_dir=str(tmp_path))
    with fail_after(60):
        train, valid, test = data.build_datasets(cfg, byte_tokenizer, seq_length=16, num_samples=(10, 2, 0), seed=1)
    assert len(train) >= 10 and len(valid) >= 2 and test is None


def test_missing_prefix_is_a_clear_error(tmp_path, byte_tokenizer):
    cfg = DataConfig(blend=[str(tmp_path / "nothing")], cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="no indexed dataset .*nothing.bin/.idx; make one with"):
        data.build_datasets(cfg, byte_tokenizer, seq_length=16, num_samples=(1, 1, 1), seed=1)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tokenizer="bpe"), "data.tokenizer='bpe' is unknown"),
        (dict(tokenizer="huggingface", blend=["x"]), "needs data.tokenizer_path"),
        (dict(tokenizer="huggingface", tokenizer_path="/tok"), "selects the byte-tokenized demo corpus"),
        (dict(split="90,10,0,0"), "data.split"),
        (dict(split="a,b"), "data.split"),
        (dict(split="0,1,0"), "data.split"),
        (dict(blend=[]), "data.blend"),
        (dict(blend=[-1, "a", 2, "b"]), "every weight must be > 0"),
        (dict(num_workers=-1), "data.num_workers"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(DataError, match=re.escape(message)):
        DataConfig(**fields)


def test_demo_corpus_builds_once_and_trains(tmp_path, byte_tokenizer):
    from pydoc_data.topics import topics

    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    [prefix] = data.ensure_demo_corpus(cfg)
    documents, sequences = read_documents(prefix)
    tokens = sum(map(len, documents))
    assert tokens > 100_000 and len(documents) > 1000 and sequences == len(documents)
    assert all(ids.count(byte_tokenizer.eod) == 1 and ids[-1] == byte_tokenizer.eod for ids in documents)
    first_topic = topics[sorted(topics)[0]].strip("\n")
    assert bytes(documents[0][:-1]).decode() == first_topic[: first_topic.index("\n\n")]
    modified = os.stat(prefix + ".idx").st_mtime_ns
    assert data.ensure_demo_corpus(cfg) == [prefix]
    assert os.stat(prefix + ".idx").st_mtime_ns == modified  # not rebuilt

    corpus = "\n".join(topics.values())
    train, valid, test = data.build_datasets(cfg, byte_tokenizer, seq_length=64, num_samples=(64, 8, 8), seed=3)
    assert len(train) >= 64 and len(valid) >= 8 and len(test) >= 8
    for dataset in (train, valid, test):
        sample = dataset[0]
        assert sample["tokens"].shape == sample["labels"].shape == (64,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        # every piece between end-of-document tokens is documentation text
        for piece in split_at(sample["tokens"].tolist(), byte_tokenizer.eod):
            assert bytes(piece).decode("utf-8", errors="ignore") in corpus  # ignore: a cut multi-byte char


def split_at(ids, separator):
    piece = []
    for token in ids:
        if token == separator:
            yield piece
            piece = []
        else:
            piece.append(token)
    yield piece


def test_huggingface_tokenizer_from_a_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the HF tokenizer test needs `pip install transformers`")
    transformers = pytest.importorskip("transformers", reason="the HF tokenizer test needs `pip install transformers`")
    texts = ["the cat sat on the mat", "a dog ran home", "the dog sat"]
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    word_level.train_from_iterator(
        texts, tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<pad>"])
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(tmp_path / "tokenizer")

    cfg = DataConfig(tokenizer="huggingface", tokenizer_path=str(tmp_path / "tokenizer"), blend=["x"])
    tokenizer = data.build_tokenizer(cfg)
    vocabulary = {"<unk>", "<eos>", "<pad>"} | set(" ".join(texts).split())
    assert tokenizer.vocab_size == len(vocabulary) == 12
    assert tokenizer.eod == word_level.token_to_id("<eos>") == 1

    source = tmp_path / "docs.jsonl"
    write_lines(source, [json.dumps({"text": text}) for text in texts + ["the bird sat"]])
    prefix = str(tmp_path / "docs")
    argv = ["--input", str(source), "--output-prefix", prefix, "--append-eod", "--no-progress"]
    assert data.main(argv + ["--tokenizer", "huggingface", "--tokenizer-path", cfg.tokenizer_path]) == 0
    documents, _ = read_documents(prefix)
    assert [len(ids) for ids in documents] == [7, 5, 4, 4]
    assert all(ids[-1] == tokenizer.eod for ids in documents)
    assert [detokenize(tokenizer, ids) for ids in documents] == texts + ["the sat"]  # "bird" is unknown
    assert documents[3][1] == word_level.token_to_id("<unk>") == 0


def test_huggingface_tokenizer_path_must_exist(tmp_path):
    cfg = DataConfig(tokenizer="huggingface", tokenizer_path=str(tmp_path / "missing"), blend=["x"])
    with pytest.raises(DataError, match="tokenizer path .*missing' is not a directory"):
        data.build_tokenizer(cfg)


def test_two_ranks_build_the_same_datasets(tmp_path, byte_tokenizer):
    """Two gloo ranks start on an empty cache at once: one demo corpus, one index cache, equal samples."""
    script = os.path.join(os.path.dirname(__file__), "data_fixtures", "build_datasets_dist.py")
    spec = importlib.util.spec_from_file_location("build_datasets_dist", script)
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    cache = tmp_path / "cache"
    result = launcher.torchrun(2, script, str(cache), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) digest ([0-9a-f]{16})", result.stdout))
    assert sorted(digests) == ["0", "1"], result.stdout

    # the same samples as one process reading its own copy
    cfg = DataConfig(cache_dir=str(tmp_path / "single"))
    single = data.build_datasets(cfg, byte_tokenizer, fixture.SEQ_LENGTH, fixture.NUM_SAMPLES, fixture.SEED)
    assert digests["0"] == digests["1"] == fixture.samples_digest(single)
    # one dataset, no temporaries; one index per split, built once
    corpus = "pydoc-topics-py%d%d-byte" % sys.version_info[:2]
    assert sorted(os.listdir(cache)) == ["index-cache", f"{corpus}.bin", f"{corpus}.idx", f"{corpus}.lock"]
    (identity,) = os.listdir(cache / "index-cache")  # keyed by the data files (data.data_identity)
    assert len([name for name in os.listdir(cache / "index-cache" / identity) if name.endswith("shuffle_index.npy")]) == 3
