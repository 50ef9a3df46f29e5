"""One client's local training in one round: a fresh optimizer, a fixed number of seeded steps.

With ``training.proximal_mu`` > 0 the objective adds FedProx's proximal term (Li et al., "Federated
Optimization in Heterogeneous Networks", MLSys 2020), mu/2 ||w - w_global||^2 over the trained tensors the
client sends.

Without privacy, each step takes the next batch of a seeded shuffle. With DP-SGD (``dp`` given), each step
takes a Poisson sample of the shard and the optimizer clips per-example gradients and adds noise
(:class:`fedlora_cli.privacy.DPSGD`); everything else is the same loop.

A step's batch is the logical batch (``training.batch_size``, under DP-SGD its expected size). A site may split
it into micro-batches (``training.gradient_accumulation_steps``), one forward and backward pass each, one
optimizer step at the end: without privacy each micro-batch's loss is weighted by its share of the logical batch,
so the accumulated gradient is the logical batch's; under DP-SGD each micro-batch's per-example gradients are
clipped and summed, and the logical step adds noise once (Opacus' skipped steps, as its BatchMemoryManager
does). Either way the step, and what the privacy ledger counts, is the logical one. The micro-batches are cut
from the logical batch sorted by length, so each pads only to its own longest example: the step's gradient is
a sum over the logical batch's examples, which no order changes, so this saves padded compute without touching
which examples a step trains on (Poisson sampling stays exactly as the accountant assumes).

The loss of a step (:func:`batch_loss`) follows the task: the model's cross-entropy over the classes for
sequence-classification; for causal-lm the mean over the batch's examples of each example's mean
cross-entropy over its response tokens. Every example weighs the same, whatever its length, which is also
what DP-SGD needs: a token mean over the whole batch would make each example's gradient depend on the other
examples' lengths, and the per-example clipping bound would no longer bound one example's influence.

With ``training.logit_adjustment`` (tau) > 0, a sequence classifier trains on the logit-adjusted loss (Menon et
al., "Long-tail learning via logit adjustment", ICLR 2021; in federated learning FedLC, Zhang et al., ICML 2022):
cross-entropy of logits + tau log(pi), where pi is the label distribution of the shard the client trains on this
round (:func:`label_prior`). Under label skew each client's head and adapter would otherwise learn its own label
prior, and the average of such models is biased; with the prior added in the loss, the plain logits (which
evaluation and export read) learn the class-conditional part only. Every example's loss is still the mean
cross-entropy of its own (adjusted) logits, so micro-batches and length-sorting give the same gradient as one
batch. The prior is computed in :func:`local_train`, the one place every path (``simulate``, ``train-client``,
the Flower ClientApp and resident worker) trains a client through.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlora_cli.adapters.methods import Plan
from fedlora_cli.data.examples import CausalExamples, Examples, batch_schedule, lengths_of, steps_for
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import chunks
from fedlora_cli.model.workbench import Workbench, seeded
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM

# progress(step_done, total_steps, loss)
Progress = Callable[[int, int, float], None]


@dataclass(kw_only=True)
class TrainResult:
    steps: int
    loss: float  # mean training loss over the round's steps
    num_examples: int  # distinct examples the client trained on this round
    seconds: float
    threads: int = 0  # torch's CPU threads while it trained (training.threads, or the process's own count)


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    # Noise and Poisson sampling an attacker can regenerate protect nothing, so by default both draw from the
    # operating system's secure random source; a fixed seed is for tests only.
    secret_seed: int | None = None


def round_seed(seed: int, client_id: str, round_: int) -> int:
    """A seed for one client's round: reproducible, and different across clients and rounds."""
    import hashlib

    digest = hashlib.sha256(f"{seed}|{client_id}|{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def causal_token_losses(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Per-token cross-entropy of the response tokens of a causal-LM batch, and the mask of those tokens.

    Both are (batch, positions) over the positions from the first response token of any row to the end; the
    LM head runs only on those positions (``logits_to_keep``), which spares the (batch x length x vocabulary)
    logits of the prompts.
    """
    import torch

    from fedlora_cli.data.examples import IGNORE_INDEX

    labels = batch["labels"]
    has_loss = labels != IGNORE_INDEX
    first = max(1, int(has_loss.int().argmax(dim=1).min()))
    keep = labels.shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = labels[:, first:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses, targets != IGNORE_INDEX


def label_prior(labels: Any, classes: int) -> Any:
    """The Laplace-smoothed label distribution of a shard, (count + 1) / (n + classes): a class the shard lacks
    gets a small probability, so its log (the logit adjustment) is finite."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)
    return (counts + 1) / (counts.sum() + classes)


def logit_offsets(bench: Workbench, examples: Examples | CausalExamples) -> Any:
    """tau log(pi) over the classes for the shard ``examples`` (a float32 tensor on the site's device), or None
    when ``training.logit_adjustment`` is 0: the plain cross-entropy, computed exactly as before."""
    import numpy as np
    import torch

    tau = bench.recipe.training.logit_adjustment
    if tau == 0:
        return None
    if bench.recipe.privacy is not None:  # validation refuses this recipe; a recipe built past it still may not
        raise FedloraError("training.logit_adjustment cannot be used with DP-SGD: the shard's label prior would "
                           "make each example's loss depend on the others' labels")
    prior = label_prior(examples.labels, bench.model.config.num_labels)
    return torch.as_tensor(tau * np.log(prior), dtype=torch.float32, device=bench.site.device)


def batch_loss(model: Any, batch: dict[str, Any], task: str, offsets: Any = None) -> Any:
    """The training loss of one batch for the recipe's task (see the module docstring); ``offsets`` (from
    :func:`logit_offsets`) are added to a classifier's logits before its cross-entropy."""
    import torch

    if task != TASK_CAUSAL_LM:
        if offsets is None:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits + offsets, batch["labels"])
    losses, mask = causal_token_losses(model, batch)
    per_example = (losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_example.mean()


def make_optimizer(bench: Workbench, params: list):
    import torch

    t = bench.recipe.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def local_train(
    bench: Workbench,
    plan: Plan,
    examples: Examples | CausalExamples,
    seed: int,
    progress: Progress | None = None,
    dp: DPSettings | None = None,
) -> TrainResult:
    """One round of local training; dropout draws from torch's generators seeded with ``seed``, which the process
    gets back as they were (as it gets back its warning filters)."""
    import numpy as np
    import torch

    t = bench.recipe.training
    started = time.perf_counter()
    params = bench.set_trainable(plan)
    optimizer = make_optimizer(bench, params)
    steps = steps_for(len(examples), t.batch_size, t.local_steps, t.local_epochs)
    with bench.site.cpu_threads(), seeded(seed, bench.site.device), warnings.catch_warnings():
        # Opacus' hooks fire on modules whose inputs need no gradient (frozen layers below the adapter): harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        anchor = _proximal_anchor(bench, plan) if t.proximal_mu > 0 else None
        batches, engine = _schedule(bench, optimizer, examples, steps=steps, seed=seed, dp=dp)
        losses = _run_steps(bench, optimizer, params, examples, batches, engine=engine, anchor=anchor,
                            offsets=logit_offsets(bench, examples), progress=progress)
        threads = torch.get_num_threads()
    seen = np.unique(np.concatenate(batches)) if batches else np.empty(0)
    return TrainResult(
        steps=steps, loss=float(np.mean(losses)) if losses else float("nan"), num_examples=int(seen.size),
        seconds=time.perf_counter() - started, threads=threads,
    )


def _run_steps(
    bench: Workbench, optimizer: Any, params: list, examples: Examples | CausalExamples, batches: list, *,
    engine: Any, anchor: list[tuple[Any, Any]] | None, offsets: Any, progress: Progress | None,
) -> list[float]:
    """Every step of the round in train mode; the losses of the steps that had examples."""
    import numpy as np

    model, optimizer = (bench.model, optimizer) if engine is None else (engine.module, engine.optimizer)
    scaler = bench.site.grad_scaler()
    lengths = np.asarray(lengths_of(examples)) if bench.site.accumulation_steps > 1 else None
    # from_pretrained leaves models in eval mode; dropout (and Opacus' hooks) need train mode.
    model.train()
    losses = []
    try:
        for step, rows in enumerate(batches, start=1):
            if len(rows) == 0:
                _noise_only_step(optimizer, params)
                loss = float("nan")
            else:
                loss = _step(bench, model, optimizer, params, examples, rows, anchor, private=engine is not None,
                             scaler=scaler, lengths=lengths, offsets=offsets)
                losses.append(loss)
            if progress is not None:
                progress(step, len(batches), loss)
    finally:
        if engine is not None:
            engine.close()
        bench.model.eval()
    return losses


def _schedule(bench: Workbench, optimizer: Any, examples: Examples | CausalExamples, *, steps: int, seed: int,
              dp: DPSettings | None) -> tuple[list, Any]:
    """Each step's rows, and the DP-SGD engine around the model and optimizer (None without privacy)."""
    import numpy as np

    from fedlora_cli.privacy.dp_sgd import DPSGD, poisson_batches

    t, n = bench.recipe.training, len(examples)
    if dp is None:
        lengths = lengths_of(examples) if t.group_by_length else None
        return batch_schedule(n, t.batch_size, steps, np.random.default_rng(seed), lengths), None
    # Poisson sampling, never grouped by length: the accountant assumes every example is drawn independently.
    secret = dp.secret_seed if dp.secret_seed is not None else secrets.randbits(63)
    batches = list(poisson_batches(n, dp.sample_rate, steps, np.random.default_rng(secret)))
    expected = max(1, round(dp.sample_rate * n))
    engine = DPSGD(bench.model, optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                   expected_batch=expected, seed=secret + 1, device=bench.site.device)
    return batches, engine


def _noise_only_step(optimizer: Any, params: list) -> None:
    """An empty Poisson sample (probability (1-q)^n). The accountant counts the step, so it must release what the
    analysis assumes: noise alone, as Opacus does for an empty batch. Skipping it would leave the parameters
    exactly unchanged, an output the analysis does not cover."""
    import torch

    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _proximal_anchor(bench: Workbench, plan: Plan) -> list[tuple[Any, Any]]:
    """FedProx's anchor: each trained tensor the client sends, with its value at the start of the round (the
    global's). Tensors the client keeps (FedSA's B, a local head) are its own and are not pulled anywhere."""
    return [(p, p.detach().clone()) for name, p in bench.model.named_parameters() if p.requires_grad and plan.sends(name)]


def _step(bench: Workbench, model: Any, optimizer: Any, params: list, examples: Examples | CausalExamples,
          rows: Any, anchor: list[tuple[Any, Any]] | None = None, private: bool = False, scaler: Any = None,
          lengths: Any = None, offsets: Any = None) -> float:
    """One optimizer step on the logical batch ``rows``, in micro-batches of the site's size (cut from ``rows``
    sorted by ``lengths`` when given); returns its task loss (logit-adjusted by ``offsets`` when given; without
    FedProx's proximal term)."""
    import numpy as np
    import torch

    if lengths is not None and len(rows) > 1:
        rows = np.asarray(rows)[np.argsort(-lengths[rows], kind="stable")]
    pieces = list(chunks(rows, bench.site.micro_batch(bench.recipe.training.batch_size)))
    total = 0.0
    for i, piece in enumerate(pieces):
        batch = bench.batch(examples, piece)
        with bench.site.autocast():
            loss = batch_loss(model, batch, bench.recipe.model.task, offsets)
        total += float(loss.detach()) * len(piece)
        last = i == len(pieces) - 1
        if private:
            # Opacus turns each micro-batch's mean loss back into per-example gradients; they are clipped and
            # summed here, and only the last micro-batch's step adds the noise and moves the parameters.
            loss.backward()
            if not last:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            continue
        objective = loss * (len(piece) / len(rows))
        if anchor and last:
            mu = bench.recipe.training.proximal_mu
            objective = objective + mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in anchor)
        (objective if scaler is None else scaler.scale(objective)).backward()
    max_grad_norm = bench.recipe.training.max_grad_norm
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(rows)
