"""MicroAdam in the Hugging Face ``transformers.Trainer``.

    python examples/hf_trainer.py                          # tiny: about a minute on a CPU
    python examples/hf_trainer.py --steps 2000 --layers 6 --width 256 --seq-len 256

A GPT-2 language model, randomly initialised from a ``GPT2Config`` (nothing is
downloaded: no weights, no tokenizer), learns to predict the bytes of the Python sources
of the installed ``microadam`` and ``torch.optim`` packages, one token per byte. The
optimizer is handed to the Trainer ready-made, with a warmup-then-cosine schedule::

    optimizer = MicroAdam(model.parameters(), lr=..., weight_decay=..., density=...)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, scheduler))

``Trainer(..., optimizer_cls_and_kwargs=(MicroAdam, {...}))`` works as well and lets the
Trainer build the scheduler from ``TrainingArguments``. Needs ``transformers`` and
``accelerate`` (``pip install 'transformers[torch]'``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
import transformers

import microadam
from microadam import MicroAdam


def local_text_bytes() -> bytes:
    """The bytes of some Python sources that are on every machine that runs this."""
    roots = [Path(microadam.__file__).parent, Path(torch.optim.__file__).parent]
    files = sorted(p for root in roots for p in root.rglob("*.py"))
    return b"\n".join(p.read_bytes() for p in files)


class ByteChunks(torch.utils.data.Dataset):
    """Consecutive ``seq_len``-byte windows of ``data``, as causal LM examples."""

    def __init__(self, data: bytes, seq_len: int):
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.tokens[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": chunk, "labels": chunk.clone()}  # the model shifts the labels


class LossLog(transformers.TrainerCallback):
    """Keeps and prints the training losses the Trainer logs."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            lr = logs.get("learning_rate", float("nan"))
            print(f"step {state.global_step:5d}  loss {logs['loss']:.4f}  lr {lr:.2e}", flush=True)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--output-dir", default=None, help="Trainer output (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    transformers.set_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=256,  # one token per byte
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
    )
    model = transformers.GPT2LMHeadModel(config)
    data = ByteChunks(local_text_bytes(), args.seq_len)

    optimizer = MicroAdam(model.parameters(), lr=args.lr, weight_decay=0.01, density=args.density)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps
    )
    with tempfile.TemporaryDirectory() as tmp:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            logging_steps=args.log_every,
            save_strategy="no",
            report_to="none",  # no wandb, tensorboard, ...
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        log = LossLog()
        trainer = transformers.Trainer(
            model=model,
            args=training_args,
            train_dataset=data,
            optimizers=(optimizer, scheduler),
            callbacks=[log],
        )
        trainer.train()
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{n} parameters; optimizer state {microadam.state_bytes(optimizer) / n:.2f} bytes per "
        f"parameter; loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}"
    )
    return log.losses


if __name__ == "__main__":
    main()
