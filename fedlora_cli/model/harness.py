"""lm-evaluation-harness (EleutherAI's ``lm-eval``) over a workbench's model: the global model, or a site's
personalised one (its PEFT adapter over the base, not merged), scored on lm-eval tasks.

Tasks are named as lm-eval names them (``hellaswag``, ``arc_easy``, a group such as ``mmlu``, a glob such as
``mmlu_*``: those download their data from the Hub), or given as task YAML files, or found in folders of task
YAML files (``include``) whose data may be local files (``dataset_path: json`` with ``dataset_kwargs.data_files``),
so that they run offline. Tasks are loaded, and their data read, before any model is, so a bad name fails at once.

The run is lm-eval's own: :class:`lm_eval.models.huggingface.HFLM` around the already-built model and tokenizer,
and :func:`lm_eval.evaluator.evaluate` with the settings ``simple_evaluate`` (lm-eval's CLI) uses by default: the
tasks' own few-shot counts (0 where a task sets none), the few-shot seed 1234, the random seeds 0 / 1234 / 1234
(python / numpy / torch, set before the tasks are loaded, as lm-eval's CLI sets them; the process's own generators
are restored after each step), 100,000 bootstrap iterations for the standard errors of metrics that need them, and
few-shot examples as earlier turns when the chat template is asked for; so the scores are those
``lm_eval --model hf`` prints for the same model (checked on SmolLM2 with ``peft=`` a global checkpoint).
fedlora calls ``evaluate`` rather than ``simple_evaluate``, which also records the git commit of the working
directory (a ``git`` subprocess that prints "fatal: not a git repository" outside one) and the machine's
environment, neither of which belongs in fedlora's result.

Checked with lm-eval 0.4.13 on transformers 5 and peft 0.21 (the ``lmeval`` extra pins it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM

EXTRA = "lmeval"
# lm-eval's defaults (lm_eval.defaults), as its CLI runs them.
RANDOM_SEED, OTHER_SEED = 0, 1234
BOOTSTRAP_ITERS = 100_000


@dataclass(frozen=True)
class Request:
    """What to run: ``tasks`` (names, globs or YAML files; comma-separated lists are split), ``include`` (folders of
    task YAML files indexed beside lm-eval's own), ``limit`` (the first N documents of each task, lm-eval's
    ``--limit``: for a quick look, not for a score to report), ``num_fewshot`` (overrides the tasks' own, except
    where a task fixes 0) and ``chat_template`` (lm-eval's ``--apply_chat_template``: each prompt, few-shot
    examples as earlier turns, through the tokenizer's chat template, as an instruct model was tuned to read it;
    default off, as in lm-eval)."""

    tasks: tuple[str, ...]
    include: tuple[Path, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    chat_template: bool = False

    @classmethod
    def of(cls, tasks: Sequence[str], include: Sequence[Path] = (), limit: int | None = None,
           num_fewshot: int | None = None, chat_template: bool = False) -> Request:
        names = tuple(dict.fromkeys(t.strip() for spec in tasks for t in spec.split(",") if t.strip()))
        if not names:
            raise FedloraError("--lm-eval names no task")
        for folder in include:
            if not Path(folder).is_dir():
                raise FedloraError(f"--lm-eval-include: no folder {folder}")
        if limit is not None and limit < 1:
            raise FedloraError(f"--lm-eval-limit must be at least 1, got {limit}")
        if num_fewshot is not None and num_fewshot < 0:
            raise FedloraError(f"--lm-eval-fewshot must be at least 0, got {num_fewshot}")
        return cls(names, tuple(Path(f) for f in include), limit, num_fewshot, chat_template)


@dataclass
class Loaded:
    """A request's tasks as lm-eval built them (their data read), ready to run once."""

    request: Request
    tasks: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)
    group_map: dict[str, Any] = field(default_factory=dict)
    # Python's and numpy's generator states as loading left them, for the run to go on from (see _generators).
    generators: tuple[Any, Any] | None = None


def require() -> str:
    """lm-eval's version; a one-line error when the extra is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FedloraError(
            f"--lm-eval needs lm-evaluation-harness, which is not installed: pip install 'fedlora[{EXTRA}]'"
        ) from None
    from importlib.metadata import version

    return version("lm_eval")


def check_task(task: str) -> None:
    """lm-eval scores language models: a federation of another task has none to give it."""
    if task != TASK_CAUSAL_LM:
        raise FedloraError(f"--lm-eval scores a causal-lm federation; this one is {task}")


def load(request: Request) -> Loaded:
    """Index lm-eval's tasks and the request's folders, and build each requested task (reading its data)."""
    require()
    loaded = Loaded(request)
    with quiet_lm_eval(), _generators(loaded):
        manager = _manager(request)
        for spec in request.tasks:
            for name in _expand(manager, spec):
                try:
                    built = manager.load([name])
                except Exception as exc:  # lm-eval raises what its loaders raise: datasets', the Hub client's, ...
                    raise FedloraError(f"lm-eval task '{name}': cannot load it: {first_line(exc)}") from None
                loaded.tasks.update(built["tasks"])
                loaded.groups.update(built["groups"])
                loaded.group_map.update(built["group_map"])
    return loaded


def _manager(request: Request) -> Any:
    """lm-eval's task index: of the request's folders alone when they (or YAML files) hold every task asked for, as
    indexing lm-eval's own ~15,000 tasks takes seconds; else of lm-eval's tasks and the folders (the folders' win)."""
    from lm_eval.tasks import TaskManager

    include = [str(f) for f in request.include] or None
    local = TaskManager(include_path=include, include_defaults=False)
    # A glob may match lm-eval's names as well as the folders': it is matched over the whole index.
    if all(spec in local.all_tasks or Path(spec).is_file() for spec in request.tasks):
        return local
    return TaskManager(include_path=include)


def _names(manager: Any, spec: str) -> list[str]:
    """The tasks ``spec`` names in the manager's index: itself (a name, or a YAML file), or a glob's matches."""
    if spec in manager.all_tasks or Path(spec).is_file():
        return [spec]
    return manager.match_tasks([spec]) if any(c in spec for c in "*?[") else []


def _expand(manager: Any, spec: str) -> list[str]:
    """A task, group or tag name, a YAML file, or a glob over the index; a one-line error for anything else."""
    names = _names(manager, spec)
    if names:
        return names
    where = (" or in --lm-eval-include folders" if manager.include_path
             else " (--lm-eval-include adds folders of task YAML files)")
    raise FedloraError(f"lm-eval task '{spec}' not found: no task, group or tag of that name in lm-eval{where}, "
                       "and no such YAML file")


def run(bench: Any, loaded: Loaded) -> dict[str, Any]:
    """lm-eval's scores of the workbench's model (in eval mode, as it is) on the loaded tasks: see :func:`summary`."""
    from lm_eval.evaluator import evaluate

    from fedlora_cli.model.workbench import seeded

    request = loaded.request
    with quiet_lm_eval(), _generators(loaded), seeded(OTHER_SEED, bench.site.device), bench.site.autocast():
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=bench.model, tokenizer=bench.tokenizer, batch_size=bench.recipe.training.eval_batch_size)
        for task in loaded.tasks.values():
            _set_fewshot(task, request.num_fewshot)
        try:
            results = evaluate(
                lm=lm, task_dict={"tasks": loaded.tasks, "groups": loaded.groups, "group_map": loaded.group_map},
                limit=request.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                apply_chat_template=request.chat_template, fewshot_as_multiturn=True,
            )
        except ValueError as exc:  # lm-eval's refusals: a task marked unsafe (code execution), a multimodal task
            raise FedloraError(f"lm-eval: {first_line(exc)}") from None
    return summary(results, request)


def _set_fewshot(task: Any, num_fewshot: int | None) -> None:
    """As lm-eval's simple_evaluate: ``num_fewshot`` over the task's own (never over a 0 the task fixes), 0 where
    the task sets none, and the few-shot examples drawn with lm-eval's default seed."""
    own = task.get_config("num_fewshot")
    if num_fewshot is not None and own != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif own is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=OTHER_SEED)


def summary(results: dict[str, Any], request: Request) -> dict[str, Any]:
    """lm-eval's results as fedlora reports them: per task (and group) its ``metrics`` and their ``stderr`` (None
    where lm-eval computed none), ``samples`` scored and ``n_shot``. A metric read through a filter other than
    lm-eval's ``none`` is named ``metric/filter`` (``exact_match/strict-match``)."""
    from importlib.metadata import version

    def scores(name: str, row: dict[str, Any]) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in row.items():
            # Scores are "metric,filter" keys; "alias", "sample_len" and the like are not, nor are their stderrs.
            if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_ = key.split(",", 1)
            label = metric if filter_ == "none" else f"{metric}/{filter_}"
            metrics[label] = float(value)
            err = row.get(f"{metric}_stderr,{filter_}")
            stderr[label] = float(err) if isinstance(err, (int, float)) else None
        samples = results.get("n-samples", {}).get(name, {}).get("effective")
        return {"metrics": metrics, "stderr": stderr, "samples": samples, "n_shot": results.get("n-shot", {}).get(name)}

    groups = results.get("groups", {})
    return {
        "version": version("lm_eval"), "limit": request.limit, "num_fewshot": request.num_fewshot,
        "chat_template": request.chat_template,
        "tasks": {name: scores(name, row) for name, row in results["results"].items() if name not in groups},
        "groups": {name: scores(name, row) for name, row in groups.items()},
    }


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's notices (passing a built model, the seeds, each stage) off, as transformers' are; its progress bars
    (on stderr) stay, as a run over a real task takes minutes to hours."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _generators(loaded: Loaded) -> Iterator[None]:
    """Python's and numpy's generators as lm-eval's simple_evaluate has them: seeded before the tasks are loaded
    (a task may shuffle its documents with them), and going on from there in the run; the process's own states are
    back after each. (torch's is seeded for the run by the caller, on the model's device.)"""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    if loaded.generators is None:
        random.seed(RANDOM_SEED)
        np.random.seed(OTHER_SEED)
    else:
        random.setstate(loaded.generators[0])
        np.random.set_state(loaded.generators[1])
    try:
        yield
    finally:
        loaded.generators = (random.getstate(), np.random.get_state())
        random.setstate(python_state)
        np.random.set_state(numpy_state)
