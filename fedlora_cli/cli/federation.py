"""The commands of a round run by hand: ``init``, ``train-client``, ``aggregate``, ``evaluate``, ``inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _load_recipe, app, command
from fedlora_cli.cli.options import (
    SITE_DATA, AccumulationOpt, BaseModelOpt, CheckpointingOpt, DeviceOpt, DtypeOpt, JsonOpt, MixedPrecisionOpt,
    OverwriteOpt, QuantizationOpt, ReportToOpt, SetOpt, SplitOpt, ThreadsOpt, TrackingDirOpt, site_settings,
)
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import Site


@command(app, "init")
def init_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file or shipped recipe name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the round-0 global checkpoint.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Partition folder (gives the label names).")] = None,
    sets: SetOpt = None,
    base_model: BaseModelOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the round-0 global checkpoint: the adapter with its seeded random A, a folder PEFT loads."""
    from fedlora_cli import federation
    from fedlora_cli.cli import ui
    from fedlora_cli.data import partition as partitions

    r = _load_recipe(recipe, sets)
    part = partitions.read_manifest(data) if data is not None else None
    with ui.err.status(f"loading {r.model.base}"):
        ckpt = federation.init(r, out, partition=part, base_override=base_model, overwrite=overwrite)
    _show_global(ckpt, as_json)


def _show_global(ckpt, as_json: bool) -> None:
    from dataclasses import asdict

    from fedlora_cli.cli import ui

    m = ckpt.manifest
    if as_json:
        ui.print_json({"path": str(ckpt.path), **{k: v for k, v in asdict(m).items() if k != "tensor_digests"}})
        return
    rows = [
        ["round", m.round], ["method", m.method], ["adapter", f"{m.adapter_kind} r={m.recipe['adapter']['r']}"],
        ["aggregation", m.recipe["federation"].get("aggregation", "mean")], ["head", m.head], ["base model", m.base_model],
        ["tensors", len(m.tensor_digests)], ["digest", m.digest[:16]],
        ["frozen digest", (m.frozen_digest or "-")[:16]], ["clients", ", ".join(m.clients) or "-"],
    ]
    ui.out.print(ui.table(f"global checkpoint {ckpt.path}", ["field", "value"], rows))


@command(app, "sample")
def sample_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="The current global checkpoint folder.")],
    as_json: JsonOpt = False,
) -> None:
    """The clients the next round asks to train (all of them unless the recipe sets federation.clients_per_round).

    The draw is seeded, so the coordinator, the sites and 'aggregate' (which refuses updates from clients that
    were not asked) agree on it.
    """
    from fedlora_cli import federation
    from fedlora_cli.cli import ui
    from fedlora_cli.federation import sampling

    g = federation.Global.of(global_checkpoint)
    f, round_ = g.recipe.federation, g.manifest.round + 1
    asked = sampling.asked(f, g.recipe.training.seed, round_)
    how = "every client" if f.clients_per_round is None else f"{f.sampling}, {f.clients_per_round} of {f.clients}"
    need = sampling.needed(f, len(asked), g.recipe.server_privacy is not None)
    outcome = "trained" if need else "skipped" if need is None else "noise-only"
    if as_json:
        ui.print_json({"round": round_, "sampling": how, "sample_rate": sampling.sample_rate(f), "asked": asked,
                       "round_is": outcome})
        return
    ui.out.print(ui.table(f"round {round_} asks ({how})", ["client"], [[c] for c in asked]))
    if outcome != "trained":
        what = "skipped: the global is carried forward" if need is None else "a noise-only DP-FedAvg release"
        ui.err.print(f"round {round_} asks fewer than {sampling.fewest_named(f)}, so it is {what} "
                     f"(fedlora aggregate {global_checkpoint} --out NEXT, with no client updates)")


@command(app, "train-client")
def train_client_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="The current global checkpoint folder.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help=f"This client's data: its shard from fedlora partition, or {SITE_DATA}.")
    ],
    state: Annotated[Path, typer.Option("--state", help="This client's private state folder (created if new).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the client update to send.")],
    client_id: Annotated[Optional[str], typer.Option("--client-id", help="Client id; default: the state folder's name.")] = None,
    split: SplitOpt = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
    mixed_precision: MixedPrecisionOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    accumulation_steps: AccumulationOpt = None,
    threads: ThreadsOpt = None,
    report_to: ReportToOpt = None,
    tracking_dir: TrackingDirOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train this client for one round; write the client update (sent) and the client state (kept).

    How this site runs the model (device, base precision, a 4-bit or 8-bit base, memory) is its own choice:
    the options override the recipe's site settings and other sites may choose differently. So is tracking:
    --report-to logs this client's loss per step and its round (upload, epsilon) to its own trackers, in its state
    folder; under DP-SGD too, since that loss is what this client sees anyway.

    Example: [cyan]fedlora train-client global/round-002 --data our-reviews.csv --state state --out update[/]
    """
    from fedlora_cli import federation, tracking
    from fedlora_cli.cli import ui
    from fedlora_cli.federation import secure

    g = federation.Global.of(global_checkpoint)
    # An update made for the by-hand path would travel in the clear (and spend DP-SGD budget for a round no
    # coordinator may aggregate from it).
    secure.refuse_in_the_clear(g.recipe, "to train an update for the by-hand path")
    trackers = tracking.resolve(report_to, g.recipe)
    cid = client_id or state.resolve().name
    round_ = g.manifest.round + 1
    with tracking.open_run(trackers, state, g.recipe.name, tracking_dir) as tracked, \
            ui.step_progress(f"training {cid}") as progress:
        # Asked again for a round it has answered (a script re-run after a crash), a client sends what it made.
        written = federation.site_round(
            g, data, state, out, cid, resend=not overwrite, overwrite=overwrite, base_override=base_model,
            progress=tracking.step_logger(tracked.log_metrics, cid, round_, progress),
            site=site_settings(device=device, dtype=dtype, quantization=quantization, mixed_precision=mixed_precision,
                               gradient_checkpointing=gradient_checkpointing, accumulation_steps=accumulation_steps,
                               threads=threads),
            split=split,
        )
        tracking.log_client_round(tracked, round_, written)
    if written.resent:
        ui.err.print(f"{out} already holds client '{cid}''s update of round {round_} from this global checkpoint: "
                     "not trained again (--overwrite trains it again)", soft_wrap=True)
    _show_update(written.update, written.state.manifest.loss, as_json, written.state.manifest.privacy)


def _show_update(update, local_loss: float | None, as_json: bool, ledger: dict | None = None) -> None:
    """The client update written: JSON, or a one-row table, where it ran and its privacy spending (and, from the
    client's own ledger, which stays at home, the noise multiplier of the round)."""
    from dataclasses import asdict

    from fedlora_cli.cli import ui

    m = update.manifest
    if as_json:
        ui.print_json({"path": str(update.path), **{k: v for k, v in asdict(m).items() if k != "tensor_digests"},
                       "local_loss": local_loss})
        return
    rows = [[m.client_id, m.round, m.num_examples, m.steps, ui.fmt(local_loss), f"{m.seconds:.1f}",
             ui.fmt_bytes(m.bytes, compact=True)]]
    ui.out.print(ui.table(f"client update {update.path}", ["client", "round", "examples", "steps", "loss", "seconds", "upload"], rows))
    if m.site is not None:
        ui.out.print(f"ran on: {Site(**m.site).describe()}")
    if m.privacy is not None:
        p = m.privacy
        budget = f" of {p['budget']:g} (remaining {p['remaining']:.3f})" if p["budget"] is not None else ""
        sigma = f", noise multiplier {ledger['history'][-1][0]:.4f} this round" if ledger and ledger["history"] else ""
        ui.out.print(f"privacy: epsilon {p['epsilon']:.3f}{budget} at delta {p['delta']:g}, {p['accountant']} "
                     f"accountant{sigma}")


# aggregate's options: this round's settings over the recipe's.
_WeightingOpt = Annotated[
    Optional[str],
    typer.Option(help="examples (trained this round), shard (shard size) or uniform; default: the recipe's."),
]
_StrategyOpt = Annotated[
    Optional[str],
    typer.Option(help="mean, svd, exact, median or trimmed-mean; default: the recipe's federation.aggregation."),
]
_TrimFractionOpt = Annotated[
    Optional[float], typer.Option(help="trimmed-mean: fraction of clients dropped at each end of every coordinate.")
]
_NormBoundOpt = Annotated[
    Optional[float],
    typer.Option(help="Clip or reject client updates whose difference from the global is larger than this L2 norm."),
]
_NormBoundActionOpt = Annotated[Optional[str], typer.Option(help="clip or reject (with --norm-bound).")]
_DPClipOpt = Annotated[
    Optional[float], typer.Option(help="DP-FedAvg: clip each client's update to this L2 norm (with --dp-noise).")
]
_DPNoiseOpt = Annotated[Optional[float], typer.Option(help="DP-FedAvg: noise multiplier (std = noise * clip / clients).")]
_DPDeltaOpt = Annotated[float, typer.Option(help="DP-FedAvg: delta of the client-level guarantee.")]
_ServerLedgerOpt = Annotated[
    Optional[Path],
    typer.Option(help="DP-FedAvg: the coordinator's ledger of releases [default: dp-fedavg-ledger-*.json beside GLOBAL_CHECKPOINT]."),
]


@command(app, "aggregate")
def aggregate_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="The global checkpoint the clients trained from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the next global checkpoint.")],
    updates: Annotated[Optional[list[Path]], typer.Argument(
        help="Client update folders of this round (none for a round its sample skips: see fedlora sample).")] = None,
    weighting: _WeightingOpt = None,
    strategy: _StrategyOpt = None,
    trim_fraction: _TrimFractionOpt = None,
    norm_bound: _NormBoundOpt = None,
    norm_bound_action: _NormBoundActionOpt = None,
    dp_clip: _DPClipOpt = None,
    dp_noise: _DPNoiseOpt = None,
    dp_delta: _DPDeltaOpt = 1e-5,
    server_ledger: _ServerLedgerOpt = None,
    report_to: ReportToOpt = None,
    tracking_dir: TrackingDirOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate the client updates and combine them into the next global checkpoint.

    --strategy svd or exact also reports, per layer, how far averaging A and B apart would have been from
    the weighted mean of the products B_k A_k. With --dp-clip and --dp-noise (or a server_privacy recipe
    section) it runs DP-FedAvg and reports the client-level epsilon spent so far, counting every release
    recorded in the coordinator's ledger (a round aggregated twice counts twice). --report-to logs each client's
    weight, update norm, upload and training loss (none from a DP-SGD client: its update carries none) and the
    DP-FedAvg epsilon, in the run the global checkpoints belong to.

    Example: [cyan]fedlora aggregate global/round-002 updates/round-003/* --out global/round-003 --strategy median[/]
    """
    from fedlora_cli import federation, recipe as recipes, tracking
    from fedlora_cli.cli import ui

    if (dp_clip is None) != (dp_noise is None):
        raise FedloraError("--dp-clip and --dp-noise go together")
    # Validated with the recipe it joins, like the other overrides.
    server_privacy = None if dp_clip is None else recipes.ServerPrivacySection(dp_clip, dp_noise, dp_delta)
    g = federation.Global.of(global_checkpoint)
    trackers = tracking.resolve(report_to, g.recipe)
    with ui.err.status("aggregating"):
        result = federation.aggregate_round(
            g, updates or [], out, weighting=weighting, server_privacy=server_privacy, overwrite=overwrite,
            strategy=strategy, norm_bound=norm_bound, norm_bound_action=norm_bound_action, trim_fraction=trim_fraction,
            server_ledger=server_ledger,
        )
    with tracking.open_run(trackers, tracking.coordinator_home(global_checkpoint), g.recipe.name, tracking_dir) as tracked:
        tracked.log_metrics(result.checkpoint.manifest.round, tracking.aggregate_metrics(result))
    if as_json:
        _print_aggregate_json(result)
    else:
        _show_aggregate(result)


def _print_aggregate_json(result) -> None:
    from dataclasses import asdict

    from fedlora_cli.cli import ui

    m = result.checkpoint.manifest
    ui.print_json({"path": str(result.checkpoint.path), "round": m.round, "digest": m.digest,
                   "server_epsilon": result.server_epsilon, "aggregation": m.aggregation,
                   "server_ledger": None if result.server_ledger is None else str(result.server_ledger),
                   "clients": [asdict(r) for r in result.clients]})


# evaluate's lm-eval options.
_LmEvalOpt = Annotated[
    Optional[list[str]],
    typer.Option("--lm-eval", help="causal-lm: lm-evaluation-harness tasks to score: lm-eval's names (arc_easy, mmlu, "
                 "'mmlu_*'; their data comes from the Hub), task YAML files, or tasks of --lm-eval-include folders. "
                 "Repeat it or separate with commas."),
]
_LmEvalIncludeOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--lm-eval-include", help="A folder of lm-eval task YAML files (their data may be local files, "
                 "for offline use), indexed beside lm-eval's own; repeatable."),
]
_LmEvalLimitOpt = Annotated[
    Optional[int], typer.Option("--lm-eval-limit", help="Score the first N documents of each task only (a quick look, "
                                "not a score to report).")
]
_LmEvalChatOpt = Annotated[
    bool, typer.Option("--lm-eval-chat-template", help="Prompts through the tokenizer's chat template (few-shot examples "
                       "as earlier turns), as lm-eval's --apply_chat_template; for instruct models.")
]
_LmEvalFewshotOpt = Annotated[
    Optional[int], typer.Option("--lm-eval-fewshot", help="Few-shot examples per prompt; default: each task's own (0 "
                                "where it sets none).")
]

# evaluate's data and causal-lm generation options.
_TestDataOpt = Annotated[
    Optional[str],
    typer.Option("--data", "-d", help=f"Test data: a partition folder (its test split; its validation split is "
                                      f"scored too), a shard, or {SITE_DATA}."),
]
_ValidationDataOpt = Annotated[
    Optional[str], typer.Option("--validation-data", help="Validation data (this site's own, any data --data "
                                "takes); default: the validation split of a --data partition folder.")
]
_MaxNewTokensOpt = Annotated[
    Optional[int], typer.Option(help="causal-lm: cap on generated tokens; default: the recipe's evaluation.max_new_tokens.")
]
_GenerateExamplesOpt = Annotated[
    Optional[int], typer.Option(help="causal-lm: generate for the first N test examples only (loss uses all).")
]
_AnswerOpt = Annotated[
    Optional[str], typer.Option(help="causal-lm: 'number' (exact match on the final number) or 'none' (loss only).")
]


@command(app, "evaluate")
def evaluate_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="Global checkpoint folder.")],
    data: _TestDataOpt = None,
    validation_data: _ValidationDataOpt = None,
    state: Annotated[Optional[Path], typer.Option("--state", help="Evaluate personalised: this client's state folder.")] = None,
    client_id: Annotated[Optional[str], typer.Option("--client-id", help="Client id of --state (checked).")] = None,
    max_new_tokens: _MaxNewTokensOpt = None,
    generate_examples: _GenerateExamplesOpt = None,
    answer: _AnswerOpt = None,
    lm_eval: _LmEvalOpt = None,
    lm_eval_include: _LmEvalIncludeOpt = None,
    lm_eval_limit: _LmEvalLimitOpt = None,
    lm_eval_fewshot: _LmEvalFewshotOpt = None,
    lm_eval_chat_template: _LmEvalChatOpt = False,
    split: SplitOpt = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
    threads: ThreadsOpt = None,
    report_to: ReportToOpt = None,
    tracking_dir: TrackingDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Metrics of the global model, or personalised for one client (global + its state, no merge).

    With --data, the recipe's metrics, on the test data and on the validation data (a partition folder's
    validation split, or --validation-data). sequence-classification: accuracy, macro-F1 and loss. causal-lm: loss and
    perplexity per response token, and with an answer extractor, exact match of greedy generations. With --lm-eval
    (causal-lm, 'pip install fedlora\\[lmeval]'), lm-evaluation-harness's scores on its tasks, as lm-eval's own
    CLI computes them; both at once load the model once. --report-to logs them at the checkpoint's round, under
    simulate's names (round/global_accuracy, round/global_lm_eval/TASK/METRIC, ...): in the global checkpoints'
    run, or with --state in the client's.

    Example: [cyan]fedlora evaluate global/round-003 --lm-eval arc_easy,hellaswag --lm-eval-limit 100[/]
    Offline: [cyan]fedlora evaluate global/round-003 --lm-eval my_task --lm-eval-include my-tasks/[/]
    """
    from fedlora_cli import federation, tracking
    from fedlora_cli.cli import ui

    request = _harness_request(lm_eval, lm_eval_include, lm_eval_limit, lm_eval_fewshot, lm_eval_chat_template)
    if data is None and request is None:
        raise FedloraError("nothing to evaluate on: give --data (test data), --lm-eval (lm-eval tasks) or both")
    g = federation.Global.of(global_checkpoint)
    trackers = tracking.resolve(report_to, g.recipe)
    settings = _evaluation_settings(g.recipe, max_new_tokens, generate_examples, answer)
    with ui.step_progress("evaluating") as progress:
        metrics = federation.evaluate_splits(
            g, data, validation_data, state_dir=state, client_id=client_id, base_override=base_model,
            progress=lambda done, total: progress(done, total), settings=settings, split=split,
            site=site_settings(device=device, dtype=dtype, quantization=quantization, threads=threads),
            lm_eval=request,
        )
    tracking.log_evaluation(trackers, metrics, global_checkpoint, state, g.recipe.name, tracking_dir)
    if as_json:
        ui.print_json(metrics)
        return
    _show_evaluation(metrics, global_checkpoint, state)


def _evaluation_settings(recipe, max_new_tokens: int | None, generate_examples: int | None, answer: str | None):
    """evaluate's options over the recipe's evaluation section, or None when none is given (causal-lm only)."""
    from fedlora_cli import recipe as recipes

    overrides = {"evaluation.max_new_tokens": max_new_tokens, "evaluation.generate_examples": generate_examples,
                 "evaluation.answer": answer}
    if all(v is None for v in overrides.values()):
        return None
    if recipe.model.task != recipes.TASK_CAUSAL_LM:
        raise FedloraError("--max-new-tokens, --generate-examples and --answer apply to a causal-lm federation")
    return recipes.override(recipe, overrides, _EVALUATION_FLAGS).evaluation


def _show_evaluation(metrics: dict, global_checkpoint: Path, state: Path | None) -> None:
    """evaluate's table of the recipe's metrics (a row per split: test, validation) and lm-eval's table (the model
    and the paths in their titles, so the cells stay short), and where it ran."""
    from fedlora_cli.cli import ui

    who = "personalised" if state else "global"
    of = f"{global_checkpoint} (round {metrics['round']})" + (f" with the state {state}" if state else "")
    if "examples" in metrics:
        _show_metrics(metrics, f"{who} model: evaluation of {of}")
    if "lm_eval" in metrics:
        _show_harness(metrics["lm_eval"], f"lm-eval {metrics['lm_eval']['version']} scores of the {who} model {of}")
    ui.out.print(f"ran on: {Site(**metrics['site']).describe()}")


def _show_metrics(metrics: dict, title: str) -> None:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.cli import ui

    splits = [("test", metrics)] + ([("validation", metrics["validation"])] if "validation" in metrics else [])
    if metrics["task"] == recipes.TASK_CAUSAL_LM:
        rows = [[split, m["examples"], ui.fmt(m["loss"]), ui.fmt(m["perplexity"], 2), ui.fmt(m["exact_match"]),
                 m["scored"] if m["generated"] else "-", m["hit_cap"] if m["generated"] else "-"] for split, m in splits]
        columns = ["split", "examples", "loss /\ntoken", "perplexity", "exact\nmatch", "scored", "hit\ntoken cap"]
    else:
        rows = [[split, m["examples"], ui.fmt(m["accuracy"]), ui.fmt(m["macro_f1"]), ui.fmt(m["loss"])]
                for split, m in splits]
        columns = ["split", "examples", "accuracy", "macro-F1", "loss"]
    ui.out.print(ui.table(title, columns, rows))


def _show_harness(scores: dict, title: str) -> None:
    """One row per task (or group) and metric, as lm-eval's own table: value, standard error, documents scored."""
    from fedlora_cli.cli import ui

    rows = []
    for kind, entries in (("", scores["tasks"]), (" (group)", scores["groups"])):
        for name, entry in entries.items():
            for metric, value in entry["metrics"].items():
                err = entry["stderr"].get(metric)
                documents = entry["samples"] if entry["samples"] is not None else "-"
                rows.append([name + kind, entry["n_shot"], metric, ui.fmt(value), "-" if err is None else ui.fmt(err),
                             documents])
    if scores["limit"] is not None:
        title += f"; first {scores['limit']} documents of each task only"
    if scores["chat_template"]:
        title += "; prompts through the chat template"
    ui.out.print(ui.table(title, ["task", "shots", "metric", "value", "stderr", "documents"], rows))


def _harness_request(tasks, include, limit, fewshot, chat_template: bool):
    """evaluate's --lm-eval options as one request, or None without --lm-eval (then none of the others may be given)."""
    from fedlora_cli.model import harness

    if not tasks:
        options = (("--lm-eval-include", include), ("--lm-eval-limit", limit), ("--lm-eval-fewshot", fewshot),
                   ("--lm-eval-chat-template", chat_template or None))
        given = [flag for flag, value in options if value not in (None, [])]
        if given:
            raise FedloraError(f"{given[0]} goes with --lm-eval")
        return None
    return harness.Request.of(tasks, include or (), limit, fewshot, chat_template)




# How evaluate's options name the evaluation keys they override, in messages.
_EVALUATION_FLAGS = {"evaluation.max_new_tokens": "--max-new-tokens",
                     "evaluation.generate_examples": "--generate-examples", "evaluation.answer": "--answer"}


def _show_aggregate(result) -> None:
    """The round's table of client updates, the per-layer errors (svd, exact) and the DP-FedAvg spending."""
    from fedlora_cli import privacy
    from fedlora_cli.cli import ui

    m = result.checkpoint.manifest
    clients = result.clients
    # The shard size is folded into the examples (trained / shard) when some client trained on part of its shard,
    # and left out otherwise; the training loss is left out when no client sent one (under DP-SGD it stays home).
    partial = any(r.shard_examples != r.num_examples for r in clients)
    columns = ["client", "examples\n/ shard" if partial else "examples", "weight", "update\nnorm", "upload"]
    rows = [[r.client_id, f"{r.num_examples}/{r.shard_examples}" if partial else r.num_examples, f"{r.weight:.4f}",
             f"{r.update_norm:.4f}", ui.fmt_bytes(r.bytes, compact=True)] for r in clients]
    if any(r.loss is not None for r in clients):
        columns.append("train\nloss")
        for row, r in zip(rows, clients):
            row.append(ui.fmt(r.loss))
    if any(r.rank is not None for r in clients) and len({r.rank for r in clients}) > 1:
        columns.append("rank")
        for row, r in zip(rows, clients):
            row.append(r.rank)
    if m.aggregation and m.aggregation.get("norm_bound") is not None:
        columns.append("norm\nbound")
        for row, r in zip(rows, clients):
            row.append(r.bound or "kept")
    title = f"round {m.round} ({result.strategy}) -> {result.checkpoint.path}"
    ui.out.print(ui.table(title, columns, rows))
    if result.layers:
        prefix, names = ui.common_prefix(list(result.layers))
        svd = result.strategy == "svd"
        layer_rows = [[name, ui.fmt(r.mean_error), *([ui.fmt(r.truncation_error), ui.fmt(r.rank)] if svd else [])]
                      for name, r in zip(names, result.layers.values())]
        ui.out.print(ui.table(
            f"per layer ({prefix}.*): error of plain averaging ||avg(B) avg(A) - avg(BA)|| / ||avg(BA)||"
            + ("; svd error of the rank-r result; rank of avg(BA)" if svd else ""),
            ["layer", "mean error", *(["svd error", "rank"] if svd else [])], layer_rows,
        ))
    if result.server_epsilon is not None:
        releases = len(m.server_privacy_ledger)
        ui.out.print(f"DP-FedAvg: client-level epsilon spent so far {result.server_epsilon:.3f} "
                     f"({releases} release{'s' if releases != 1 else ''}, {privacy.SERVER_ACCOUNTANT} accountant, "
                     f"ledger {result.server_ledger})")
