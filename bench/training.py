"""Throughput of the project's DPO trainer against TRL's DPOTrainer on the same pairs, model and settings.

Each trainer runs in its own subprocess so their peak memories are separate. TRL is configured as in
../shared/gpu/trl_dpo_baseline.py (reference model passed explicitly) and fed the pairs in the order
our trainer uses, with a sequential sampler, so both see the same batches and their losses compare.
Prints one JSON line per trainer (appended to --out too) and a summary line with the ratio
ours/TRL of pairs/s; `--table FILE` prints a Markdown table of such a file's lines.

    python bench/training.py                       # SmolLM2-135M, 64 HH pairs, batch 4, max_length 256
    python bench/training.py --random-init 1b --pairs 512 --batch-size 8 --max-length 512  # GPU

The pairs are the single-turn HH-RLHF pairs of the test excerpt (tests/data), parsed by the
import code, repeated to --pairs. Counting:
- pairs/s and tokens/s: over the timed region, TRL's `train()`; ours tokenizes, scores the
  reference once and trains. tokens/s counts both sequences of a pair (its prompt twice), as TRL
  counts tokens, for both trainers.
- MFU (GPU): model FLOPs over the timed region / the card's dense bf16 peak; 6N per trained token
  and 2N per reference token, N the parameter count, each trainer's own tokens (TRL runs the
  prompt twice, ours once).
- On a GPU our trainer first runs a short warm-up (--warmup-pairs, six steps) in the same
  process, so the timed run does not include most of the one-off compilation (FlexAttention,
  torch.compile); its cost is reported as `warmup_s`. `steady_pairs_per_s` is the median step's
  rate after the first two steps; `slowest_steps` gives the five slowest steps' seconds.
- Checkpoints: none in the timed region on either side (TRL runs with save_strategy="no"; ours with
  checkpoint_steps beyond the run) unless `--checkpoint-steps N` asks ours for one every N steps.
- `--json PATH`: the results as one JSON list, one object per configuration and trainer (appended
  to the list already in PATH): device, model, trainer (`cai-dpo` or `trl`), pairs_per_step,
  pairs_per_s (whole timed run), median_step_s, max_step_s, mfu (whole run), peak_allocated_gib
  (CUDA's max allocated; null on a CPU), mean_loss, and the rest of the result line under `detail`.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HH_DATA = ROOT / "tests" / "data" / "hh-rlhf-harmless-test-800.jsonl.gz"
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
    parser.add_argument("data", nargs="?", default=str(HH_DATA), help="HH-RLHF JSONL(.gz) file")
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
    parser.add_argument("--max-tokens-per-batch", type=int, help="our trainer's token budget per forward")
    parser.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"])
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile our decoder layers (default: the trainer's own, on a GPU yes)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora", type=int, metavar="RANK", help="LoRA of this rank (both trainers)")
    parser.add_argument(
        "--warmup-pairs", type=int, default=None, help="our warm-up run on a GPU (default 24; 0: none)"
    )
    parser.add_argument("--label", default="", help="a name for this configuration in the output")
    parser.add_argument("--out", help="append each result line (JSON) to this file")
    parser.add_argument("--json", metavar="PATH", help="add one object per trainer to the JSON list in PATH")
    parser.add_argument(
        "--checkpoint-steps",
        type=int,
        default=None,
        help="our checkpoint every N steps in the timed run (default: none, as TRL's side)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per trainer process")
    parser.add_argument("--table", metavar="FILE", help="print a Markdown table of a results file and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the packed FlexAttention log-probs (and, on a GPU, their gradients) against the "
        "model's own forward and the padded SDPA path on --pairs pairs, print one JSON line, exit",
    )
    parser.add_argument(
        "--trl-micro-batch",
        type=int,
        help="TRL's per-device batch, the rest of --batch-size by gradient accumulation (the token-budget "
        "configuration: ours packs --batch-size pairs into micro-batches of --max-tokens-per-batch)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steady steps of our timed run (torch.profiler, after 3 steps and 1 of "
        "warm-up): GPU-busy fraction, kernel launches per step, the top kernels; slows those steps",
    )
    parser.add_argument(
        "--gemm-probe",
        action="store_true",
        help="time the model shape's GEMMs at the run's rows per micro-batch against the card's peak, "
        "print one JSON line, exit",
    )
    parser.add_argument(
        "--gemm-rows",
        default="1024,8192",
        help="--gemm-probe's rows (tokens of a micro-batch): batch 8 of HH pairs packs ~1,000, the "
        "token budget 8,192",
    )
    parser.add_argument("--run", choices=["ours", "trl"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_pairs(path: Path, n: int) -> list:
    """Single-turn HH pairs of the file, parsed by the import code, repeated to `n`."""
    from cai_dpo.core.pair_import import parse_pair
    from workers.training.data import PairExample

    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as handle:
        for line in handle:
            if line.strip():
                pair = parse_pair(json.loads(line))
                if len(pair.prompt) == 1:
                    rows.append(PairExample(pair.prompt, pair.chosen, pair.rejected))
    return (rows * (n // len(rows) + 1))[:n]


def _params(args: argparse.Namespace, **overrides):
    from cai_dpo.core.training_params import LoraParams, TrainParams

    values = dict(
        learning_rate=args.learning_rate,
        beta=args.beta,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=0.0,  # TRL's default: no warmup, linear decay
        epochs=1,
        eval_fraction=0.0,
        save_dtype="bfloat16",  # the saved folder is not timed; half the bytes to write
        max_tokens_per_batch=args.max_tokens_per_batch,
        attention=args.attention,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=LoraParams(r=args.lora, alpha=2 * args.lora) if args.lora else None,
    )
    return TrainParams(**(values | overrides))


def _prepare_model(args: argparse.Namespace, target: Path) -> Path:
    """The model folder both trainers load: the given one, or a seeded random Llama saved once (bf16)."""
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
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # initialising 1B weights on a GPU takes a second
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if cuda else torch.float32).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _parameter_count(model_dir: Path) -> int:
    """N of the MFU: the saved tensors' elements (a tied LM head is saved once)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += sum(prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    return total


NO_CHECKPOINT = 10**9  # checkpoint_steps beyond any run: no checkpoint in the timed region


class StepProfile:
    """torch.profiler over `steps` steady optimizer steps, driven by the trainer's on_step hook (called
    once per step, with the step before's metrics: the window is still `steps` whole steps).

    What it answers: is a step host-bound (the GPU idle between kernels while Python dispatches) or
    arithmetic-bound, and which kernels take the time."""

    WAIT, WARMUP = 3, 1

    def __init__(self, steps: int):
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.steps, self.marks = steps, []
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=self.WAIT, warmup=self.WARMUP, active=steps, repeat=1),
        )
        self.profiler.start()

    def on_step(self, step: int, total: int, metrics: dict) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's edges are the GPU's, not only the host's
        self.marks.append(time.perf_counter())
        if len(self.marks) <= self.WAIT + self.WARMUP + self.steps:
            self.profiler.step()
        if len(self.marks) == self.WAIT + self.WARMUP + self.steps + 1:
            self.profiler.stop()

    def summary(self) -> dict:
        from torch.autograd import DeviceType

        first = self.WAIT + self.WARMUP
        if len(self.marks) <= first + self.steps:
            return {
                "error": f"the run had {len(self.marks)} steps, the profile needs {first + self.steps + 1}"
            }
        window = self.marks[first + self.steps] - self.marks[first]
        events = self.profiler.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        launches = sum(
            1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        by_name: dict[str, float] = {}
        for event in kernels:
            by_name[event.name] = by_name.get(event.name, 0.0) + event.time_range.elapsed_us()
        if not kernels:  # a CPU run: the operators that take the host's time instead
            for row in self.profiler.key_averages():
                by_name[row.key] = row.self_cpu_time_total
        top = sorted(by_name.items(), key=lambda item: -item[1])[:8]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        return {
            "steps": self.steps,
            "step_s": round(window / self.steps, 4),
            # Kernel time over the window's wall time (streams rarely overlap in this trainer).
            "gpu_busy_fraction": round(busy_us / 1e6 / window, 3) if kernels else None,
            "kernel_launches_per_step": round(launches / self.steps) if kernels else None,
            "top_ms_per_step": {name[:80]: round(us / 1e3 / self.steps, 3) for name, us in top},
        }


def gemm_probe(args: argparse.Namespace) -> dict:
    """The achieved FLOP/s of the model shape's GEMMs (attention projections, MLP, LM head) at the rows
    a micro-batch has (`--gemm-rows`), against the card's peak: the ceiling MFU can reach at that
    size, whatever the trainer."""
    import torch

    from workers.training.model import peak_flops

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    hidden, inter, _, heads, kv = SIZES[args.random_init or "tiny"]
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(args.model))  # the random models' vocabulary (_prepare_model)
    kv_width = hidden // heads * kv
    rows_options = [int(rows) for rows in args.gemm_rows.split(",")]
    shapes = {"qkv": (hidden, hidden + 2 * kv_width), "o": (hidden, hidden), "gate_up": (hidden, 2 * inter)}
    shapes |= {"down": (inter, hidden), "lm_head": (hidden, vocab)}
    peak = peak_flops(device)
    out: dict = {
        "gemm_probe": True,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_tflops": peak and peak / 1e12,
    }
    repeats = 20 if cuda else 2
    for rows in rows_options:
        for name, (k, n) in shapes.items():
            a = torch.randn(rows, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            for _ in range(2):
                a @ b
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / repeats
            tflops = 2 * rows * k * n / seconds / 1e12
            out[f"{rows}x{name}"] = {
                "tflops": round(tflops, 2),
                "of_peak": round(tflops * 1e12 / peak, 3) if peak else None,
            }
    return out


def run_ours(args: argparse.Namespace, model_dir: Path) -> dict:
    import torch

    from workers.training.loop import TrainHooks, run_training
    from workers.training.schedule import pairs_for_step

    cuda = torch.cuda.is_available()
    pairs, params = load_pairs(Path(args.data), args.pairs), _params(args)
    warmup = {}
    # Enough pairs for several reference batches and six steps of different lengths: most row widths
    # FlexAttention compiles for (with and without gradients) are met before the timed run.
    warmup_pairs = args.warmup_pairs if args.warmup_pairs is not None else (160 if cuda else 0)
    if warmup_pairs:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            warm = load_pairs(Path(args.data), warmup_pairs)
            run_training(
                _params(args, max_steps=6), model_path=model_dir, train_pairs=warm, eval_pairs=[],
                output_dir=Path(out), checkpoint_steps=NO_CHECKPOINT,
            )  # fmt: skip
            warmup = {"warmup_s": round(time.perf_counter() - started, 2)}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    profile = StepProfile(args.profile_steps) if args.profile_steps else None
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_training(
            params, model_path=model_dir, train_pairs=pairs, eval_pairs=[], output_dir=Path(out),
            checkpoint_steps=args.checkpoint_steps or NO_CHECKPOINT,
            hooks=TrainHooks(on_step=profile.on_step) if profile else None,
        )  # fmt: skip
        wall = time.perf_counter() - started
        history = [json.loads(line) for line in (Path(out) / "model/metrics.jsonl").read_text().splitlines()]
    # What TRL's train() covers: its reference forwards are in its steps.
    seconds = sum(result.timings[key] for key in ("tokenize_s", "reference_s", "train_s"))
    packed = result.data["train_packed_tokens"]
    steady = [row["pairs_per_s"] for row in history[2:]] or [row["pairs_per_s"] for row in history]
    # Seconds of each step (its pairs over its rate): where a timed run loses time (recompilations).
    step_seconds = [
        len(pairs_for_step(row["step"] - 1, len(pairs), params.pairs_per_step, params.seed))
        / row["pairs_per_s"]
        for row in history
    ]
    slowest = sorted(range(len(step_seconds)), key=lambda i: -step_seconds[i])[:5]
    numbers = {
        "pairs": len(pairs),
        "steps": result.step,
        "seconds": seconds,
        "tokens": result.data["train_tokens"],
        # 6N per trained token + 2N per reference token; ours runs each token once (shared prompt).
        "model_flops": 8 * _parameter_count(model_dir) * packed,
        "steady_pairs_per_s": round(statistics.median(steady), 3),
        "median_step_s": round(statistics.median(step_seconds), 4),
        "max_step_s": round(max(step_seconds), 4),
        "pairs_per_step": params.pairs_per_step,
        "checkpoint_steps": args.checkpoint_steps,
        "slowest_steps": {str(i + 1): round(step_seconds[i], 3) for i in slowest},
        "final_loss": history[-1]["loss"],
        "mean_loss": sum(row["loss"] for row in history) / len(history),
        # Graphs torch.compile made during the timed steps (recompilations; 0 on an uncompiled path).
        "compiled_graphs": sum(row.get("compiled_graphs", 0) for row in history),
        "timings": {key: round(value, 2) for key, value in result.timings.items()},
        "wall_with_load_and_save_s": round(wall, 2),
        "attention_used": result.data.get("attention"),
        **warmup,
    }
    if result.data.get("flex_failed"):
        numbers["flex_failed"] = result.data["flex_failed"]
    if profile:
        numbers["profile"] = profile.summary()
    if result.data.get("checkpoints"):  # per checkpoint: the training thread's share, and until in place
        numbers["checkpoints"] = result.data["checkpoints"]
    if "mfu" in history[-1]:
        numbers["step_mfu_median"] = round(statistics.median(row["mfu"] for row in history[2:] or history), 4)
    return numbers


def run_trl(args: argparse.Namespace, model_dir: Path) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from workers.training.schedule import pairs_for_step

    pairs, params = load_pairs(Path(args.data), args.pairs), _params(args)
    if args.trl_micro_batch and args.batch_size % args.trl_micro_batch:
        raise SystemExit("--batch-size must be a multiple of --trl-micro-batch")
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
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.trl_micro_batch or args.batch_size,
        gradient_accumulation_steps=args.batch_size // (args.trl_micro_batch or args.batch_size),
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
        gradient_checkpointing=args.gradient_checkpointing,
    )
    ref = None if args.lora else copy.deepcopy(model).eval()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    step_ends: list[float] = []
    trainer.add_callback(_StepClock(step_ends))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    # Each step's seconds, end to end (its loss is logged every step, so each end waits for the GPU).
    step_seconds = [b - a for a, b in zip([started, *step_ends], step_ends, strict=False)]
    steps = [row for row in trainer.state.log_history if "loss" in row]
    tokens = steps[-1]["num_tokens"]
    return {
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "tokens": tokens,
        # A trained forward and backward plus a reference forward per token, prompt twice (as run).
        "model_flops": 8 * _parameter_count(model_dir) * tokens,
        "final_loss": steps[-1]["loss"],
        "mean_loss": sum(row["loss"] for row in steps) / len(steps),
        "pairs_per_step": args.batch_size,
        "median_step_s": round(statistics.median(step_seconds), 4) if step_seconds else None,
        "max_step_s": round(max(step_seconds), 4) if step_seconds else None,
    }


def _StepClock(ends: list[float]):  # noqa: N802 - a class made where transformers is imported
    """A TrainerCallback appending the time of each step's end to `ends`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    return StepClock()


def json_record(line: dict) -> dict:
    """The --json object of a result line: the fields every configuration has, the rest as detail."""
    keys = ("device", "model", "pairs_per_step", "pairs_per_s", "median_step_s", "max_step_s", "mfu")
    record = {"trainer": "cai-dpo" if line["trainer"] == "ours" else "trl"}
    record |= {key: line.get(key) for key in keys}
    cuda = line.get("peak_memory_kind") == "cuda_max_allocated"
    record["peak_allocated_gib"] = line["peak_memory_gib"] if cuda else None
    record["mean_loss"] = line["mean_loss"]
    record["label"] = line.get("label", "")
    record["detail"] = line
    return record


def append_json(path: Path, records: list[dict]) -> None:
    """Add `records` to the JSON list in `path` (a new list where there is none), replaced whole."""
    existing = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else []
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(existing + records, indent=1) + "\n")
    staging.replace(path)


def _child(args: argparse.Namespace) -> None:
    import torch

    from workers.training.model import peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_ours if args.run == "ours" else run_trl
    numbers = run(args, Path(args.model_dir))
    seconds = numbers.pop("seconds")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak = peak_flops(device)
    flops = numbers.pop("model_flops")
    line = {
        "trainer": args.run,
        "label": args.label,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.random_init or Path(args.model).name,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(numbers["pairs"] / seconds, 4),
        "tokens_per_s": round(numbers["tokens"] / seconds, 1),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "peak_memory_gib": round(_peak_memory_gib(), 3),
        "peak_memory_kind": "cuda_max_allocated" if cuda else "max_rss",
        **numbers,
    }
    if args.run == "ours":
        line |= {
            "attention": args.attention,
            "compile": args.compile,
            "max_tokens_per_batch": args.max_tokens_per_batch,
        }
    print("RESULT " + json.dumps(line), flush=True)


def _summary(ours: dict, trl: dict) -> dict:
    return {
        "summary": "ours/trl",
        "label": ours.get("label", ""),
        "model": ours["model"],
        "pairs_per_s_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
        "peak_memory_ratio": round(ours["peak_memory_gib"] / trl["peak_memory_gib"], 3),
        "final_loss": {"ours": ours["final_loss"], "trl": trl["final_loss"]},
        "mean_loss": {"ours": ours["mean_loss"], "trl": trl["mean_loss"]},
        "mean_loss_difference": round(abs(ours["mean_loss"] - trl["mean_loss"]), 6),
    }


def table(path: Path) -> str:
    """A Markdown table of a results file: one row per trainer run, then the ratios."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [row for row in rows if "trainer" in row]
    head = "| model | trainer | config | pairs/s | steady pairs/s | tokens/s | MFU | peak GiB | mean loss"
    head += " | final loss |"
    lines = [head, "|" + "---|" * 10]
    for row in runs:
        config = row.get("label") or ""
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else "-"
        lines.append(
            f"| {row['model']} | {row['trainer']} | {config} | {row['pairs_per_s']:.2f} | "
            f"{row.get('steady_pairs_per_s', '-')} | {row['tokens_per_s']:.0f} | {mfu} | "
            f"{row['peak_memory_gib']:.2f} | {row['mean_loss']:.6f} | {row['final_loss']:.6f} |"
        )
    for row in rows:
        if row.get("gemm_probe"):
            lines.append(f"\nGEMM probe: {json.dumps(row)}")
        if row.get("profile"):
            lines.append(f"\nprofile of {row['model']} {row.get('label', '')}: {json.dumps(row['profile'])}")
        if row.get("check"):
            lines.append(f"\ncheck: {json.dumps(row)}")
        if row.get("summary"):
            lines.append(
                f"\n{row['model']} {row.get('label', '')}: ours/TRL pairs/s {row['pairs_per_s_ratio']}x, "
                f"peak memory {row['peak_memory_ratio']}x, mean loss difference {row['mean_loss_difference']}"
            )
    return "\n".join(lines)


def check(args: argparse.Namespace, model_dir: Path) -> dict:
    """The packed FlexAttention path against the model's own forward (fp32) and the padded SDPA path.

    On a GPU in bf16, with gradients of the summed log-probs: FlexAttention's backward runs only
    there. On a CPU: the forward only, FlexAttention uncompiled.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.data import collate, collate_packed, tokenize_pairs
    from workers.training.dpo import mask_windows, packed_logps, sequence_logps

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_pairs(tokenizer, load_pairs(Path(args.data), args.pairs), args.max_length)
    pad = tokenizer.pad_token_id
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device)
    batch = {k: v.to(device) for k, v in collate(pairs, pad).items()}
    with torch.no_grad():
        exact = sequence_logps(model, **batch)  # fp32, the model's own masks
    model.to(dtype)

    def run(fn) -> tuple[torch.Tensor, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(cuda):
            logps = fn().float()
        if not cuda:
            return logps, None
        logps.sum().backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return logps.detach(), grad

    sdpa, sdpa_grad = run(lambda: sequence_logps(model, **batch))
    if not cuda:
        from torch.nn.attention.flex_attention import flex_attention
        from transformers.integrations import flex_attention as transformers_flex

        transformers_flex.compile_friendly_flex_attention = (
            lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs)
        )
    model.set_attn_implementation("flex_attention")
    flat = {k: v.to(device) for k, v in collate_packed(pairs, pad).items()}
    flex, flex_grad = run(lambda: packed_logps(model, flat, mask_windows(model.config)))
    scale = exact.abs().mean().item()
    result = {
        "check": "flex packing",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype),
        "pairs": len(pairs),
        "mean_abs_logp": round(scale, 3),
        "flex_vs_exact_max_abs": round((flex - exact).abs().max().item(), 4),
        "sdpa_vs_exact_max_abs": round((sdpa - exact).abs().max().item(), 4),
        "flex_vs_sdpa_max_abs": round((flex - sdpa).abs().max().item(), 4),
    }
    if cuda:
        cosine = torch.nn.functional.cosine_similarity(flex_grad, sdpa_grad, dim=0).item()
        result |= {
            "grad_cosine_flex_sdpa": round(cosine, 6),
            "grad_norm_ratio_flex_sdpa": round((flex_grad.norm() / sdpa_grad.norm()).item(), 6),
        }
    # bf16 paths differ from fp32 by rounding; a wrong mask would be off by whole nats per sequence.
    result["ok"] = result["flex_vs_exact_max_abs"] <= max(0.02 * scale, 0.05) and (
        not cuda or result["grad_cosine_flex_sdpa"] > 0.99
    )
    return result


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.table:
        print(table(Path(args.table)))
        return
    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            line = check(args, _prepare_model(args, Path(scratch) / "model"))
        print(json.dumps(line), flush=True)
        if args.out:
            with Path(args.out).open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return
    if args.gemm_probe:
        line = gemm_probe(args)
        print(json.dumps(line), flush=True)
        if args.out:
            with Path(args.out).open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return
    if args.run:
        _child(args)
        return
    results = {}
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _prepare_model(args, Path(scratch) / "model")
        for trainer in args.trainers.split(","):
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            command += ["--run", trainer, "--model-dir", str(model_dir)]
            env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout
                )
            except subprocess.TimeoutExpired as exc:
                sys.stderr.write(f"{trainer} ran past {args.timeout} s\n{(exc.stderr or '')[-4000:]}\n")
                continue
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-6000:])
                sys.stderr.write(f"\n{trainer} failed with exit code {done.returncode}\n")
                continue
            results[trainer] = json.loads(lines[-1].removeprefix("RESULT "))
            print(json.dumps(results[trainer]), flush=True)
            if out:
                with out.open("a") as handle:
                    handle.write(json.dumps(results[trainer]) + "\n")
    if args.json and results:
        append_json(Path(args.json), [json_record(line) for line in results.values()])
    if {"ours", "trl"} <= results.keys():
        summary = _summary(results["ours"], results["trl"])
        print(json.dumps(summary), flush=True)
        if out:
            with out.open("a") as handle:
                handle.write(json.dumps(summary) + "\n")
    if not results:
        raise SystemExit("no trainer finished")


if __name__ == "__main__":
    main()
