"""One client's local training in one round: a fresh optimizer, a fixed number of seeded steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedlora_cli.data import Examples, batch_schedule, encode, steps_for
from fedlora_cli.methods import Plan
from fedlora_cli.modeling import Workbench

# progress(step_done, total_steps, loss)
Progress = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    steps: int
    loss: float  # mean training loss over the round's steps
    num_examples: int  # distinct examples the client trained on this round
    seconds: float


def round_seed(seed: int, client_id: str, round_: int) -> int:
    """A seed for one client's round: reproducible, and different across clients and rounds."""
    import hashlib

    digest = hashlib.sha256(f"{seed}|{client_id}|{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def local_train(
    bench: Workbench, plan: Plan, examples: Examples, seed: int, progress: Progress | None = None
) -> TrainResult:
    import numpy as np
    import torch

    t = bench.recipe.training
    started = time.perf_counter()
    params = bench.set_trainable(plan)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    steps = steps_for(len(examples), t.batch_size, t.local_steps, t.local_epochs)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches = batch_schedule(len(examples), t.batch_size, steps, rng)
    seen = np.unique(np.concatenate(batches))
    model = bench.model
    # from_pretrained leaves models in eval mode; dropout (and Opacus' hooks) need train mode.
    model.train()
    losses = []
    for step, rows in enumerate(batches, start=1):
        batch = encode(bench.tokenizer, examples, rows, bench.recipe.data.max_length)
        loss = model(**batch).loss
        loss.backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, steps, losses[-1])
    model.eval()
    return TrainResult(steps, float(np.mean(losses)), int(seen.size), time.perf_counter() - started)
