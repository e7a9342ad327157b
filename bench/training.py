"""Throughput of the project's DPO trainer against TRL's DPOTrainer on the same pairs, model and settings.

Each trainer runs in its own subprocess so their peak memories are separate. TRL is configured as in
../shared/gpu/trl_dpo_baseline.py (reference model passed explicitly) and fed the pairs in the order
our trainer uses, with a sequential sampler, so both see the same batches and their losses compare.
Prints one JSON line per trainer and a summary line with the ratio ours/TRL of pairs/s.

    python bench/training.py                       # SmolLM2-135M, 64 HH pairs, batch 4, max_length 256
    python bench/training.py --random-init 1b      # GPU: a random Llama of that shape, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fixtures.hh import HH_PATH  # noqa: E402 - after the path insert

SIZES = {  # hidden, intermediate, layers, heads, kv_heads (as trl_dpo_baseline.py)
    "tiny": (64, 128, 2, 4, 2),
    "135m": (576, 1536, 30, 9, 3),
    "360m": (960, 2560, 32, 15, 5),
    "1b": (2048, 8192, 16, 32, 8),
}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", nargs="?", default=str(HH_PATH))
    parser.add_argument("--model", default=str(ROOT / "data/models/smollm2-135m-instruct"))
    parser.add_argument(
        "--random-init", choices=sorted(SIZES), help="random Llama of this shape (tokenizer: --model)"
    )
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-7)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, help="torch threads in each trainer (default: torch's choice)")
    parser.add_argument("--trainers", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--run", choices=["ours", "trl"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _pairs(args: argparse.Namespace):
    from tests.fixtures.training import load_hh_pairs

    rows = load_hh_pairs(Path(args.data))
    return (rows * (args.pairs // len(rows) + 1))[: args.pairs]


def _params(args: argparse.Namespace):
    from cai_dpo.core.training_params import TrainParams

    return TrainParams(
        learning_rate=args.learning_rate,
        beta=args.beta,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=0.0,  # TRL's default: no warmup, linear decay
        epochs=1,
        eval_fraction=0.0,
    )


def _prepare_model(args: argparse.Namespace, target: Path) -> Path:
    """The model folder both trainers load: the given one, or a seeded random Llama saved once."""
    if not args.random_init:
        return Path(args.model)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hidden, inter, layers, heads, kv = SIZES[args.random_init]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(args: argparse.Namespace, model_dir: Path) -> dict:
    from cai_dpo.workers.training.trainer import run_training

    pairs, params = _pairs(args), _params(args)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_training(
            params, model_path=model_dir, train_pairs=pairs, eval_pairs=[], output_dir=Path(out)
        )
        wall = time.perf_counter() - started
        history = [json.loads(line) for line in (Path(out) / "model/metrics.jsonl").read_text().splitlines()]
    timed = (
        "tokenize_s",
        "reference_s",
        "train_s",
    )  # what TRL's train() covers: its reference pass is in its steps
    seconds = sum(result.timings[key] for key in timed)
    return {
        "pairs": len(pairs),
        "steps": result.step,
        "seconds": seconds,
        "tokens": result.data["train_tokens"],
        "final_loss": history[-1]["loss"],
        "mean_loss": sum(row["loss"] for row in history) / len(history),
        "timings": {key: round(value, 2) for key, value in result.timings.items()},
        "wall_with_load_and_save_s": round(wall, 2),
    }


def run_trl(args: argparse.Namespace, model_dir: Path) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cai_dpo.workers.training.trainer import pairs_for_step

    pairs, params = _pairs(args), _params(args)
    order = [
        i
        for step in range(-(-len(pairs) // args.batch_size))
        for i in pairs_for_step(step, len(pairs), args.batch_size, params.seed)
    ]
    rows = [
        {
            "prompt": pairs[i].prompt,
            "chosen": [{"role": "assistant", "content": pairs[i].chosen}],
            "rejected": [{"role": "assistant", "content": pairs[i].rejected}],
        }
        for i in order
    ]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        beta=args.beta,
        max_length=args.max_length,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=2 if cuda else 0,  # on 2 CPU cores, loader processes would only compete
        train_sampling_strategy="sequential",
    )
    ref = copy.deepcopy(model).eval()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    steps = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "tokens": steps[-1]["num_tokens"],
        "final_loss": steps[-1]["loss"],
        "mean_loss": sum(row["loss"] for row in steps) / len(steps),
    }


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_ours if args.run == "ours" else run_trl
    numbers = run(args, Path(args.model_dir))
    seconds = numbers.pop("seconds")
    line = {
        "trainer": args.run,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "model": args.random_init or Path(args.model).name,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(numbers["pairs"] / seconds, 4),
        "tokens_per_s": round(numbers["tokens"] / seconds, 1),
        "peak_memory_gib": round(_peak_memory_gib(), 3),
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "max_rss",
        **numbers,
    }
    print("RESULT " + json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.run:
        _child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _prepare_model(args, Path(scratch) / "model")
        for trainer in args.trainers.split(","):
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            command += ["--run", trainer, "--model-dir", str(model_dir)]
            env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"{trainer} failed with exit code {done.returncode}")
            results[trainer] = json.loads(lines[-1].removeprefix("RESULT "))
            print(json.dumps(results[trainer]), flush=True)
    if {"ours", "trl"} <= results.keys():
        ours, trl = results["ours"], results["trl"]
        summary = {
            "summary": "ours/trl",
            "pairs_per_s_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
            "tokens_per_s_ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
            "peak_memory_ratio": round(ours["peak_memory_gib"] / trl["peak_memory_gib"], 3),
            "final_loss": {"ours": ours["final_loss"], "trl": trl["final_loss"]},
            "mean_loss": {"ours": ours["mean_loss"], "trl": trl["mean_loss"]},
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
