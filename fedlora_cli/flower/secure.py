"""A round under secure aggregation on Flower: Flower 1.42's SecAgg+ carries the sites' vectors, fedlora none.

SecAgg+ runs only in Flower's legacy workflow, so the coordinator's side is :func:`secure_round`: a
``SecAggPlusWorkflow`` over a ``LegacyContext`` whose legacy strategy (:class:`_Capture`) asks exactly the round's
clients and keeps what the workflow hands it after unmasking: the weighted mean (the only thing unmasked), who took
part, the weights they sent in the clear, and the counts they sent beside them (summed on receipt: only the totals
are kept). The global checkpoint travels in the round's training message as :mod:`.transport` packs it (added to
the workflow's FitIns records as it is built, :class:`_Workflow`). The four stages (setup, share keys, collect
masked vectors, unmask) are four TRAIN messages to each site; the site trains in the third, inside
``secaggplus_mod``, and replies the legacy FitRes the mod masks (:func:`site_reply`).

A stage that leaves any site with fewer than ``reconstruction_threshold`` live neighbours halts the protocol: the
round fails in one line and nothing is written. Nothing of one site's update is logged or tracked here; Flower's
own log says how many replied at each stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.federation import secure
from fedlora_cli.federation.common import Global

if TYPE_CHECKING:
    from flwr.serverapp import Grid

_STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


class _Capture(Strategy):
    """The legacy strategy SecAgg+ drives: it asks the round's nodes and keeps the unmasked result."""

    def __init__(self, nodes: list[int], grid: Grid) -> None:
        self.nodes, self.grid = nodes, grid
        # The unmasked mean, each node's weight, and each node's counts (summed by secure_round, then dropped).
        self.result: tuple[list[Any], dict[int, int], dict[int, dict[str, Any]]] | None = None
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return [(GridClientProxy(node, self.grid, 0), FitIns(Parameters([], ""), {})) for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        # Every FitRes carries the same unmasked mean (the workflow puts it in each); the weights came in the clear.
        self.failures = [first_line(f if isinstance(f, Exception) else Exception(str(f))) for f in failures]
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            self.result = (arrays, {proxy.node_id: int(res.num_examples) for proxy, res in results},
                           {proxy.node_id: dict(res.metrics) for proxy, res in results})
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ with the global checkpoint's records added to each site's training message, run stage by stage so
    a halt names its stage."""

    def __init__(self, records: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records = dict(records)
        self.halted: str | None = None

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        for content in state.nid_to_fitins.values():
            for key, record in self.records.items():
                content[key] = record
        return ok

    def __call__(self, grid: Any, context: Any) -> None:
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        state = WorkflowState()
        steps = (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage)
        for name, step in zip(_STAGES, steps):
            if not step(grid, context, state):
                self.halted = name
                return


class Counting:
    """A Grid that counts the payload bytes of the replies it receives (arrays, bytes and text in records)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.received = grid, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        self.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a RecordDict's arrays and of the bytes and text values of its config records."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes) else len(item.encode()) if isinstance(item, str) else 8
    return total


def secure_round(grid: Grid, g: Global, node_of: Mapping[str, int], records: Mapping[str, Any], timeout: float,
                 say: Callable[[int, str], None]) -> secure.SecureSum:
    """One round through SecAgg+ with the clients ``node_of`` names; the unmasked weighted mean and who took part.
    Fails in one line (nothing written) when the protocol halts or no site's vector is summed."""
    r, recipe = g.manifest.round + 1, g.recipe
    s = recipe.federation.secure_aggregation
    arith = secure.Arithmetic.of(recipe)
    capture, halted = run_secagg(grid, r, sorted(node_of.values()), records, arith, s.num_shares,
                                 s.reconstruction_threshold, timeout)
    for failure in capture.failures:
        say(WARNING, f"round {r}: a site dropped out of secure aggregation ({failure})")
    if halted is not None or capture.result is None:
        where = f"at its '{halted}' stage" if halted else "with no vector summed"
        raise FedloraError(
            f"round {r}: secure aggregation halted {where}: fewer than reconstruction_threshold = "
            f"{s.reconstruction_threshold} sites took part or answered; nothing written")
    arrays, by_node, counts = capture.result
    client_of = {node: cid for cid, node in node_of.items()}
    weights = {client_of[node]: w for node, w in by_node.items() if node in client_of}
    say(INFO, f"round {r}: SecAgg+ unmasked the weighted sum of {len(weights)} site(s): {', '.join(sorted(weights))}")
    names = sorted(n for n in g.header if g.plan.sends(n))
    coordinates = sum(int(a.size) for a in arrays)
    tally, expected = secure.Tally(), secure.expected_counts(recipe)
    for node in sorted(n for n in by_node if n in client_of):  # a summed site that sent no counts is left out too
        tally, why = tally.add(counts.get(node, {}), coordinates, client_of[node], expected)
        if why is not None:
            say(WARNING, f"round {r}: {why}")
    return secure.SecureSum.of(names, arrays, weights, arith, tally=tally)


def run_secagg(grid: Grid, round_: int, nodes: list[int], records: Mapping[str, Any], arith: secure.Arithmetic,
               num_shares: int, threshold: int, timeout: float | None) -> tuple[_Capture, str | None]:
    """Flower's SecAgg+ workflow over ``nodes`` for one round, with ``records`` added to each training message;
    what the legacy strategy captured, and the stage the protocol halted at (None: it completed)."""
    from flwr.app import ArrayRecord

    capture = _Capture(nodes, grid)
    workflow = _Workflow(records, num_shares=num_shares, reconstruction_threshold=threshold,
                         max_weight=arith.max_weight, clipping_range=arith.clipping_range,
                         quantization_range=arith.quantization_range, modulus_range=secure.MODULUS_RANGE,
                         timeout=timeout)
    state = RecordDict()
    state[MAIN_CONFIGS_RECORD] = _config(round_)
    state[MAIN_PARAMS_RECORD] = ArrayRecord()
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=capture, client_manager=SimpleClientManager())
    workflow(grid, context)
    return capture, workflow.halted


def _config(round_: int) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})


def site_reply(vector: secure.SiteVector, counts: Mapping[str, int]) -> RecordDict:
    """A site's legacy FitRes for ``secaggplus_mod``: its vector (float64, in tensor-name order), its weight and
    its counts (:meth:`fedlora_cli.federation.secure.SiteVector.counts`, in the clear as the weight is); the mod
    weights, quantises and masks the vector, and clears the arrays before the reply leaves the site."""
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector.arrays), vector.weight, dict(counts))
    return fitres_to_recorddict(fitres, keep_input=False)
