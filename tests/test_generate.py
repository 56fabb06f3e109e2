"""KV-cache inference, `megatron-delta generate` / `evaluate`, and the export of a model trained
from scratch (megatron_delta.generate, megatron_delta.evaluate, megatron_delta.convert export).

- Every variant, TP=1: incremental decoding with Megatron's StaticInferenceContext gives the
  full-sequence forward's logits at every position (fp32, 1e-5 relative), and 32 greedy tokens
  are identical with and without the KV cache (a batch of prompts of different lengths, each
  equal to generating it alone).
- TP=2: the same checks in two real processes over gloo (torchrun; this file is the worker), and
  `megatron-delta generate` under torchrun prints what one process prints.
- A real `megatron-delta train` run's checkpoint: `evaluate` reproduces the trainer's validation
  loss; `convert export` writes a transformers directory (byte tokenizer, no HF source) whose
  logits equal Megatron's and whose greedy generate(), with and without cache, equals
  `megatron-delta generate`; without trust_remote_code it refuses to load.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_delta import DeltaResidualConfig, convert, generate
from megatron_delta.run_config import (
    ModelConfig,
    ParallelConfig,
    RunConfig,
    build_model_chunk,
    build_transformer_config,
)
import launcher
from test_train import launch

TOLERANCE = 1e-5  # relative (max |diff| / max |reference|), fp32
VOCAB = 96
VARIANTS = {
    "standard": DeltaResidualConfig("standard"),
    "delta": DeltaResidualConfig("delta"),
    "delta_block": DeltaResidualConfig("delta_block", num_blocks=2, init="identity"),
    "attnres_block": DeltaResidualConfig("attnres_block", num_blocks=2),
    "attnres_full": DeltaResidualConfig("attnres_full"),
}
PROMPTS = [[5, 17, 3, 60, 22, 9, 41], [70, 2, 33]]


def run_config(delta: DeltaResidualConfig, tp: int = 1) -> RunConfig:
    # GQA, q/k norms; a large init_method_std so that greedy decoding is not one repeated token.
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        seq_length=64, vocab_size=VOCAB, qk_layernorm=True, init_method_std=0.3)
    return RunConfig(model=model, delta=delta, parallel=ParallelConfig(tensor_model_parallel_size=tp))


def build(delta: DeltaResidualConfig, tp: int = 1, seed: int = 0):
    """The model of run_config(delta, tp), this rank's TP slice of the same weights (CPU init
    slices the full master weights), with nonzero gates so that identity-init routing is live."""
    cfg = run_config(delta, tp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_model_chunk(cfg, build_transformer_config(cfg, on_gpu=False), VOCAB, pre_process=True,
                              post_process=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.fill_(0.8)
    return model.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


@torch.no_grad()
def cache_vs_full(model) -> dict:
    """{"error": max relative error of the incremental logits at every position (prefill of 5,
    then one token at a time), "greedy": [32 greedy tokens with cache, without cache, each
    prompt alone]}."""
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(20).expand(2, -1)
    full = model(tokens, positions, None, runtime_gather_output=True)
    context = StaticInferenceContext(2, 20)
    prefill = 5
    steps = [model(tokens[:, :prefill], positions[:, :prefill], None, inference_context=context,
                   runtime_gather_output=True)]
    context.sequence_len_offset += prefill
    for t in range(prefill, 20):
        steps.append(model(tokens[:, t:t + 1], positions[:, t:t + 1], None, inference_context=context,
                           runtime_gather_output=True))
        context.sequence_len_offset += 1
    incremental = torch.cat([s[:, -1:] for s in steps], dim=1)  # prefill returns the last position only
    greedy = generate.Sampling()
    return {
        "error": relative_error(incremental, full[:, prefill - 1:]),
        "greedy": [generate.generate_tokens(model, PROMPTS, 32, greedy, VOCAB, use_cache=True),
                   generate.generate_tokens(model, PROMPTS, 32, greedy, VOCAB, use_cache=False),
                   [generate.generate_tokens(model, [p], 32, greedy, VOCAB)[0] for p in PROMPTS]],
    }


def check_cache_vs_full(result: dict) -> None:
    assert result["error"] < TOLERANCE, result["error"]
    cached, uncached, alone = result["greedy"]
    assert cached == uncached == alone
    assert all(len(c) == 32 and len(set(c)) > 3 for c in cached), cached  # not a degenerate repetition


# ---------------------------------------------------------------------------------------------- TP=1

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_the_full_forward(single_process_world, variant):
    check_cache_vs_full(cache_vs_full(build(VARIANTS[variant])))


def test_sampling_options():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)

    def draw(seed=0, **options):
        sampling = generate.Sampling(seed=seed, **options)
        return sampling.sample(logits, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(temperature=0.0), greedy)
    assert torch.equal(draw(temperature=5.0, top_k=1), greedy)
    assert torch.equal(draw(temperature=5.0, top_p=1e-6), greedy)
    assert torch.equal(draw(seed=1, temperature=5.0), draw(seed=1, temperature=5.0))
    samples = torch.stack([draw(seed=s, temperature=1.0, top_k=3) for s in range(200)])
    top3 = logits.topk(3).indices
    assert all(set(samples[:, row].tolist()) == set(top3[row].tolist()) for row in range(4))
    for options, message in [(dict(temperature=-1.0), "--temperature"), (dict(top_p=0.0), "--top-p"),
                             (dict(top_k=-2), "--top-k")]:
        with pytest.raises(generate.GenerateError, match=message):
            generate.Sampling(**options)


# ---------------------------------------------------------------------------------------------- TP=2

def _tp2_worker(out_dir: str) -> None:
    """Runs under torchrun with 2 ranks: every variant's cache-vs-full checks at TP=2."""
    from megatron_delta import mesh

    mesh.start_world()  # a process of its own (the CPU shim: tests/conftest.py does not run here)
    mesh.init_model_parallel(tp=2)
    results = {variant: cache_vs_full(build(delta, tp=2)) for variant, delta in VARIANTS.items()}
    if mesh.is_logging_rank():
        with open(os.path.join(out_dir, "tp2.json"), "w") as f:
            json.dump(results, f)
    mesh.stop_world()


def test_tp2_kv_cache_decoding_equals_the_full_forward_and_tp1(single_process_world, tmp_path):
    result = launcher.torchrun(2, os.path.join("tests", "test_generate.py"), "--tp2-worker", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    tp2 = json.load(open(tmp_path / "tp2.json"))
    for variant, delta in VARIANTS.items():
        check_cache_vs_full(tp2[variant])
        # Same weights as one process (sliced master weights): the same greedy continuations.
        tp1 = generate.generate_tokens(build(delta), PROMPTS, 32, generate.Sampling(), VOCAB)
        assert tp2[variant]["greedy"][0] == tp1, variant


# ---------------------------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step `megatron-delta train` run of the tiny delta_block model (byte tokenizer, demo corpus)."""
    root = tmp_path_factory.mktemp("trained")
    launch(str(root / "run"), str(root / "data"), ["training.train_iters=4", "training.lr_decay_iters=4"])
    return root


def cli(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc > 1:
        return launcher.torchrun(nproc, "-m", "megatron_delta.cli", *args)
    return launcher.run(launcher.cli_command(*args), timeout=300)


def test_generate_command_one_process_and_tp2(trained_run, tmp_path):
    checkpoint = str(trained_run / "run" / "checkpoints")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def "}\n{"prompt": "The Python "}\n')
    one = cli("generate", "--checkpoint", checkpoint, "--prompts-file", str(prompts), "--max-new-tokens", "24")
    assert one.returncode == 0, one.stderr[-3000:]
    lines = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == ["def ", "The Python "]
    two = cli("generate", "--checkpoint", checkpoint, "--prompts-file", str(prompts), "--max-new-tokens", "24",
              nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")] == lines


def test_generate_reports_an_unusable_checkpoint(trained_run, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    # A checkpoint whose run config does not describe its weights (hidden size 96, not 64).
    mismatched = tmp_path / "mismatched"
    shutil.copytree(convert.resolve_checkpoint(str(trained_run / "run" / "checkpoints")), mismatched)
    config = (mismatched / "run_config.yaml").read_text()
    (mismatched / "run_config.yaml").write_text(config.replace("hidden_size: 64", "hidden_size: 96"))
    for checkpoint, message in [(empty, "is not a dist-checkpoint"), (mismatched, "do not fit the model")]:
        result = cli("generate", "--checkpoint", str(checkpoint), "--prompt", "x")
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("megatron-delta generate: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_evaluate_reproduces_the_trainers_validation_loss(trained_run, tmp_path):
    metrics = [json.loads(line) for line in open(trained_run / "run" / "metrics.jsonl")]
    val_loss = [m["val_loss"] for m in metrics if "val_loss" in m][-1]  # after the last step, as saved
    prefix = str(trained_run / "data" / "pydoc-topics-py311-byte")
    # The trainer evaluates eval_iters (2) global batches (8) of the validation split of 64-token sequences.
    out = tmp_path / "eval.json"
    result = cli("evaluate", "--checkpoint", str(trained_run / "run" / "checkpoints"), "--data-prefix", prefix,
                 "--split", "valid", "--max-samples", "16", "--output-json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.load(open(out))
    assert evaluated["seq_length"] == 64 and evaluated["samples"] == 16 and evaluated["tokens"] == 16 * 64
    assert abs(evaluated["loss"] - val_loss) / val_loss < TOLERANCE, (evaluated["loss"], val_loss)
    assert "perplexity" in result.stdout


@pytest.fixture(scope="module")
def scratch_export(trained_run, tmp_path_factory):
    """(trainer checkpoint, its `convert export` directory)."""
    exported = str(tmp_path_factory.mktemp("exported") / "hf")
    checkpoint = str(trained_run / "run" / "checkpoints")
    assert convert.main(["export", "--checkpoint", checkpoint, "--output", exported]) == 0
    return convert.resolve_checkpoint(checkpoint), exported


def load_trained(checkpoint: str):
    record = convert.read_checkpoint_record(checkpoint)
    cfg = generate.inference_run_config(record, checkpoint)
    return generate.load_model_for_inference(checkpoint, cfg, build_transformer_config(cfg, on_gpu=False))


def test_from_scratch_export_runs_in_transformers(scratch_export, single_process_world, tmp_path):
    import transformers

    from megatron_delta.data import load_tokenizer

    checkpoint, exported = scratch_export
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["model_type"] == "delta_llama" and config["delta"]["variant"] == "delta_block"
    assert config["vocab_size"] == 258 and config["eos_token_id"] == 256  # the byte tokenizer's
    tokenizer = load_tokenizer("byte")
    text = "def read_file(path):\n    with open(path) as f:  # héllo"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    assert hf_tokenizer(text)["input_ids"] == tokenizer.tokenize(text) and hf_tokenizer.eos_token_id == tokenizer.eod

    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    model = load_trained(checkpoint)
    tokens = torch.tensor([tokenizer.tokenize(text)])
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)[..., :258]
        theirs = hf(tokens).logits
    assert relative_error(theirs, ours) < TOLERANCE

    prompt = tokens[:, :12]
    ours = generate.generate_tokens(model, prompt.tolist(), 32, generate.Sampling(), 258, tokenizer.eod)[0]
    for use_cache in (True, False):
        out = hf.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=use_cache)[0, 12:].tolist()
        assert (out[: out.index(tokenizer.eod)] if tokenizer.eod in out else out) == ours, use_cache

    # import(export(checkpoint)): every parameter of the trained model, routing included, bit for bit.
    again = str(tmp_path / "again")
    convert.import_hf(exported, again)
    restored = load_trained(again)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), restored.named_parameters()):
        if n1 == "embedding.word_embeddings.weight":  # the padding rows are no part of the HF vocabulary
            p1, p2 = p1[:258], p2[:258]
        assert n1 == n2 and torch.equal(p1, p2), n1


LM_EVAL_TASK = """task: megatron_delta_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-evaluation-harness is not installed (pip install lm_eval)")
def test_lm_eval_harness_scores_the_export(scratch_export, single_process_world, tmp_path):
    """lm-evaluation-harness (`--model hf ... trust_remote_code=True`) on a task file written here:
    its log-likelihoods are the Megatron model's."""
    from megatron_delta.data import load_tokenizer

    checkpoint, exported = scratch_export
    # (lm_eval moves a context's trailing whitespace into the continuation: these contexts have none)
    docs = [{"context": "import os\nimport", "continuation": " sys"},
            {"context": "The Python", "continuation": " language"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "docs.jsonl"))
    run = launcher.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={exported},trust_remote_code=True",
         "--tasks", "megatron_delta_tiny", "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "1",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        timeout=600, cwd=str(tmp_path), extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    samples_file = next(p for p in (tmp_path / "out").rglob("samples_megatron_delta_tiny*.jsonl"))
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])

    model, tokenizer = load_trained(checkpoint), load_tokenizer("byte")
    for doc, sample in zip(docs, samples):
        context, continuation = tokenizer.tokenize(doc["context"]), tokenizer.tokenize(doc["continuation"])
        tokens = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)[0, :, :258]
        log_probs = logits.double().log_softmax(-1)[len(context) - 1: -1]
        ours = log_probs.gather(-1, torch.tensor(continuation).unsqueeze(-1)).sum().item()
        theirs = float(sample["resps"][0][0][0])
        assert abs(theirs - ours) <= TOLERANCE * abs(ours), (doc, theirs, ours)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tp2-worker"]:
        _tp2_worker(sys.argv[2])
