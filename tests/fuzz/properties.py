"""The properties the fuzz tests and benchmarks/fuzz.py check, one function per reader of what others write.

Each takes one generated input and a fresh empty folder, and returns "accepted" or "refused". It fails (an
AssertionError, or the reader's own exception) when the reader answers any other way than accepting the input or
refusing it with a one-line :class:`FedloraError`, takes longer than :data:`TIME_LIMIT`, writes anything but its
intended output, or leaves anything behind when it refuses.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import types
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fedlora_cli.errors import FedloraError
from . import strategies as s

TIME_LIMIT = 10.0  # seconds; every reader here answers a hostile input in well under one


class Hang(Exception):
    """A reader took longer than TIME_LIMIT."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def verdict(call: Callable[[], Any]) -> tuple[str, Any]:
    """("accepted", the value) or ("refused", the message); anything else propagates as a failure."""
    try:
        with time_limit(TIME_LIMIT):
            return "accepted", call()
    except FedloraError as exc:
        message = str(exc)
        assert message.strip() and len(message.strip().splitlines()) == 1, f"a refusal not in one line: {message!r}"
        return "refused", message


def read_only(folder: Path, call: Callable[[], Any]) -> tuple[str, Any]:
    """The verdict of a reader, which must leave ``folder`` as it found it."""
    before = files_under(folder)
    result = verdict(call)
    assert files_under(folder) == before, "a reader wrote into the folder it read"
    return result


# --- manifests --------------------------------------------------------------------------------------------------

_COUNTS = ("round", "num_examples", "shard_examples", "steps", "bytes")


def conforms(value: Any, annotation: str) -> bool:
    """Whether a JSON value is of a manifest field's annotation all the way down (``dict[str, str]``'s values
    too); an independent reading of the annotations, not the reader's."""
    options = _split(annotation, "|")
    return any(_conforms_one(value, option) for option in options)


def _conforms_one(value: Any, annotation: str) -> bool:
    head, _, rest = annotation.partition("[")
    args = _split(rest[:-1], ",") if rest else []
    if head == "None":
        return value is None
    if head == "Any":
        return True
    if isinstance(value, bool):
        return head == "bool"
    plain = {"int": int, "float": (int, float), "str": str, "bool": bool}
    if head in plain:
        return isinstance(value, plain[head])
    if head == "list":
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if head == "dict":
        return isinstance(value, dict) and (not args or all(conforms(v, args[1]) for v in value.values()))
    raise AssertionError(f"unknown annotation {annotation}")


def _split(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def check_manifest_fields(manifest: Any) -> None:
    for f in fields(manifest):
        value = getattr(manifest, f.name)
        assert conforms(value, str(f.type)), f"accepted {f.name}={value!r:.80}, not a {f.type}"
        if f.name in _COUNTS:
            assert value >= 0, f"accepted a negative {f.name}: {value}"


def checkpoint_files(folder: Path) -> None:
    """The files beside a global checkpoint's manifest that reading it requires (their contents are read only when
    the tensors are): the adapter config and the adapter weights its tensor digests list."""
    from fedlora_cli import storage

    (folder / storage.ADAPTER_CONFIG).write_text("{}")
    (folder / storage.ADAPTER_WEIGHTS).write_bytes(b"")


def global_manifest(document: bytes, folder: Path) -> str:
    from fedlora_cli import storage

    (folder / storage.GLOBAL_MANIFEST).write_bytes(document)
    checkpoint_files(folder)
    outcome, value = read_only(folder, lambda: storage.read_global(folder))
    if outcome == "accepted":
        check_manifest_fields(value.manifest)
        # What every site and the coordinator read next: its recipe, and the plan of its method, head and adapter.
        from fedlora_cli.federation.common import Global

        from fedlora_cli.privacy.report import server_entry

        g = Global.of(value)
        outcome = read_only(folder, lambda: (g.recipe, g.plan, server_entry(value)))[0]
    return outcome


def update_manifest(document: bytes, folder: Path) -> str:
    from fedlora_cli import storage

    (folder / storage.UPDATE_MANIFEST).write_bytes(document)
    outcome, value = read_only(folder, lambda: storage.read_update(folder))
    if outcome == "accepted":
        check_manifest_fields(value.manifest)
        spent = value.manifest.privacy
        # The round table takes the largest epsilon of a round's updates (federation.rounds).
        assert spent is None or isinstance(spent["epsilon"], (int, float)) and spent["epsilon"] >= 0, spent
    return outcome


def state_manifest(document: bytes, folder: Path) -> str:
    from fedlora_cli import storage

    (folder / "round-002").mkdir()
    (folder / "round-002" / storage.STATE_MANIFEST).write_bytes(document)
    outcome, value = read_only(folder, lambda: storage.latest_state(folder))
    if outcome == "accepted":
        check_manifest_fields(value.manifest)
        if value.manifest.privacy is not None:  # what the client reads next: its ledger
            from fedlora_cli.privacy import Ledger

            outcome = read_only(folder, lambda: Ledger.from_dict(value.manifest.privacy))[0]
    return outcome


# --- safetensors ------------------------------------------------------------------------------------------------

def mapped_reader(data: bytes, folder: Path) -> str:
    """The coordinator's own parser (storage.mapped): a layout it accepts maps and reads back whole, and is a file
    the safetensors library reads too, with the same tensors."""
    from fedlora_cli.storage import mapped, tensor_header

    path = folder / "update.safetensors"
    path.write_bytes(data)
    outcome, layout = read_only(folder, lambda: mapped.read_layout(path, "client update"))
    if outcome == "refused":
        return outcome
    arrays = read_only(folder, lambda: mapped.read_tensors(path, "client update"))[1]
    assert {n: a.shape for n, a in arrays.items()} == {n: e[1] for n, e in layout.entries.items()}
    assert all(layout.read(n) is not None for n in layout.entries)
    header = read_only(folder, lambda: tensor_header(path, "client update"))[1]
    library_outcome, tensors = library_verdict(path, folder)
    assert library_outcome == "accepted", f"storage.mapped accepted a file the safetensors library refuses: {tensors}"
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {n: h[1] for n, h in header.items()}
    return outcome


def library_verdict(path: Path, folder: Path) -> tuple[str, Any]:
    from fedlora_cli.storage import load_tensors

    return read_only(folder, lambda: load_tensors(path, "client update"))


def library_reader(data: bytes, folder: Path) -> str:
    """The readers through the safetensors library (storage.files): whole, one tensor, and checked against
    digests (which cannot match: every accepted read must then be refused by its digest check)."""
    from fedlora_cli.storage import load_verified, read_tensor

    path = folder / "update.safetensors"
    path.write_bytes(data)
    outcome, tensors = library_verdict(path, folder)
    names = list(tensors) if outcome == "accepted" else ["a"]
    for name in names[:2]:
        read_only(folder, lambda name=name: read_tensor(path, name, "client update"))
    digests = {name: "xxh128:" + "0" * 32 for name in names}
    for framework in ("pt", "numpy"):
        verified, _ = read_only(folder, lambda fw=framework: load_verified(path, digests, "client update", fw))
        assert verified == "refused" or not digests, "a tensor passed a digest that is not its own"
    return outcome


# --- Flower transport records -----------------------------------------------------------------------------------

def transport_unpack(entries: tuple[dict[str, Any], dict[str, Any]], folder: Path) -> str:
    """transport.unpack writes the folder a message carries, whole, or refuses it and writes nothing."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedlora_cli.flower import transport

    arrays, text = entries
    try:
        content = RecordDict({"update.files": ArrayRecord(arrays), "update.text": ConfigRecord(text)})
    except (TypeError, ValueError):
        return "refused"  # Flower's own records refuse it before fedlora sees it
    out = folder / "received" / "update"
    outcome, _ = verdict(lambda: transport.unpack(content, "update", out))
    if outcome == "refused":
        assert files_under(folder) == {}, f"a refused message left {files_under(folder)}"
    else:
        assert set(files_under(folder)) == {f"received/update/{name}" for name in (*arrays, *text)}
    return outcome


# --- recipes ----------------------------------------------------------------------------------------------------

def recipe_file(text: str | bytes, folder: Path) -> str:
    from fedlora_cli import recipe

    path = folder / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return read_only(folder, lambda: recipe.load(path))[0]


def recipe_mapping(raw: Any, folder: Path) -> str:
    from fedlora_cli import recipe

    return read_only(folder, lambda: recipe.from_dict(raw))[0]


# --- a SuperNode's node config, and the site worker's socket ----------------------------------------------------

def node_config(config: dict[str, Any], folder: Path) -> str:
    """A node config is accepted or refused as a site, and its site settings as settings of a recipe."""
    from fedlora_cli import recipe
    from fedlora_cli.flower.site import SiteConfig

    outcome, site = read_only(folder, lambda: SiteConfig.from_node_config(config))
    if outcome == "accepted":
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", site.client_id), f"accepted {site.client_id!r}"
        base = recipe.from_dict(s.valid_recipe())
        outcome = read_only(folder, lambda: recipe.with_site(base, site.settings))[0]
    return outcome


def worker_frame(data: bytes, folder: Path) -> str:
    """One frame off the worker's socket, as channel.read_frame parses it."""
    from fedlora_cli.flower import channel

    return read_only(folder, lambda: channel.read_frame(io.BytesIO(data)))[0]


class StubBenches:
    """Benches that build no model: the worker's requests are fuzzed, not its training."""

    loads = 0

    def get(self, *_args: Any) -> Any:
        site = types.SimpleNamespace(describe=lambda: "cpu, float32")
        return types.SimpleNamespace(fingerprint="f" * 64, site=site)


def worker_request(request: dict[str, Any], folder: Path) -> str:
    """Worker.handle answers every request with {"ok": ...} or {"error": one line} from a FedloraError: never
    raises, never reaches its "the site worker failed" branch for internal errors."""
    from fedlora_cli.flower import channel, site as sites, worker

    lines: list[str] = []
    site = sites.SiteConfig.from_node_config(site_node_config(folder))
    if request.get("node-config") == "own":
        request = {**request, "node-config": site_node_config(folder)}
    answer = verdict(lambda: worker.Worker(site, StubBenches(), lines.append).handle(request))[1]
    assert set(answer) in ({"ok"}, {"error"}), answer
    channel.write_frame(io.BytesIO(), answer)  # the answer fits in one frame: the relay gets it
    assert not any(" failed: " in line for line in lines), lines
    if "error" in answer:
        assert len(answer["error"].splitlines()) == 1, answer
    return "accepted" if "ok" in answer else "refused"


def site_node_config(folder: Path) -> dict[str, Any]:
    return {"client-id": "site-a", "state-dir": str(folder / "state"), "data": str(folder / "a.csv"), "device": "cpu"}


# --- the inputs each property reads -----------------------------------------------------------------------------

def _records() -> st.SearchStrategy[tuple[dict[str, Any], dict[str, Any]]]:
    import numpy as np
    from flwr.app import Array

    names = st.one_of(st.sampled_from(["update.safetensors", "update.json", "adapter_config.json", "../x.json",
                                       "a/b.json", ".x.json", "x.txt", "x.json\n", "update.safetensors.json"]),
                      st.text(max_size=12))

    def array(data: bytes, kind: str) -> Any:
        raw = np.frombuffer(data, dtype=np.uint8)
        return Array({"bytes": raw, "float": raw.astype(np.float32), "2d": raw.reshape(1, -1)}[kind])

    arrays = st.dictionaries(names, st.builds(array, s.tensor_files(), st.sampled_from(["bytes", "bytes", "float", "2d"])),
                             max_size=2)
    texts = st.one_of(s.json_documents(s.valid_manifests()["update"]).map(lambda b: b.decode("utf-8", "replace")),
                      st.text(max_size=20), st.integers(), st.binary(max_size=8), st.lists(st.integers(), max_size=2))
    return st.tuples(arrays, st.dictionaries(names, texts, max_size=2))


def _yaml_documents() -> st.SearchStrategy[str | bytes]:
    import yaml

    valid = s.valid_recipe()
    changed = s.mutated(valid).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    hostile = st.one_of(
        st.integers(1, 3000).map(lambda depth: "model: " + "[" * depth + "]" * depth),
        st.integers(4000, 20_000).map(lambda digits: "name: x\nmodel:\n  base: m\ntraining:\n  seed: " + "9" * digits),
        st.integers(2, 6).map(alias_bomb),
        st.sampled_from(["model: {base: 2026-12-07}", "name: 2026-12-07\nmodel: {base: m}", "model: !!binary aGk=",
                         "model: !!set {a, b}", "model: !!python/object:os.system {}", "? [a, b]\n: c", "- a",
                         "model: &a [*a]", "\t", "model: {base: m}\ntraining: {lr: .nan}", "%YAML 9.9\n---\na: 1"]),
    )
    return st.one_of(changed, changed, changed, hostile, st.text(max_size=200), st.binary(max_size=100))


def alias_bomb(levels: int) -> str:
    """A recipe whose YAML anchors expand to 10**levels values (a "billion laughs" at 9 levels)."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "name: bomb\nmodel: {base: m}\nfederation:\n" + "".join(f"  {line}\n" for line in lines)


def _node_configs() -> st.SearchStrategy[dict[str, Any]]:
    from fedlora_cli.flower.site import SITE_SETTINGS

    valid = {"client-id": "site-a", "state-dir": "/var/fedlora/a", "data": "/data/a.csv", "device": "cpu",
             "worker": "off", "accumulation-steps": 2}
    values = st.one_of(s.JUNK, st.binary(max_size=6), st.sampled_from(["", "site-a\n", "../x", "a" * 65, "auto"]))
    keys = st.one_of(st.sampled_from(sorted({*valid, *SITE_SETTINGS, "work-dir", "test-data", "base", "split"})),
                     st.text(max_size=8))
    one_changed = st.builds(lambda key, value: {**valid, key: value}, keys, values)
    return st.one_of(s.mutated(valid), one_changed, st.dictionaries(keys, values, max_size=6))


def _worker_requests() -> st.SearchStrategy[dict[str, Any]]:
    """Requests as a relay (or anything that can open the socket) sends them: mostly one field wrong."""
    valid_manifest = json.dumps(s.valid_manifests()["global"])
    manifest = s.json_documents(s.valid_manifests()["global"]).map(lambda b: b.decode("utf-8", "replace"))
    valid = {"protocol": 1, "op": "query", "node-config": "own", "manifest": valid_manifest}
    base = st.fixed_dictionaries({
        "protocol": st.one_of(st.just(1), st.just(1), st.just(1), s.JUNK),
        "op": st.one_of(st.sampled_from(["query", "query", "train", "evaluate", "handle", "__init__", "_check"]), s.JUNK,
                        st.integers(100_000, 300_000).map(lambda n: "\x7f" * n)),  # 1 byte in JSON, 4 in a repr
        "node-config": st.one_of(st.just("own"), st.just("own"), st.just("own"), s.JUNK),
        "manifest": st.one_of(st.just(valid_manifest), manifest, s.JUNK),
        "round": st.one_of(st.integers(-2, 5), s.JUNK),
        "digest": st.one_of(st.just(s.valid_manifests()["global"]["digest"]), s.JUNK),
    })
    return st.one_of(base, s.mutated(valid), s.mutated(valid))


def _frames() -> st.SearchStrategy[bytes]:
    lines = st.one_of(st.binary(max_size=100), s.json_documents({"protocol": 1, "op": "query"}))
    return st.one_of(lines.map(lambda b: b.replace(b"\n", b" ") + b"\n"), lines,
                     st.integers(1 << 20, (1 << 20) + 10).map(lambda n: b"x" * n + b"\n"))


def PROPERTIES() -> dict[str, tuple[st.SearchStrategy[Any], Callable[[Any, Path], str]]]:
    """name -> (the inputs, the property): what tests/fuzz and benchmarks/fuzz.py run."""
    manifests = s.valid_manifests()
    return {
        "global manifest": (s.json_documents(manifests["global"]), global_manifest),
        "update manifest": (s.json_documents(manifests["update"]), update_manifest),
        "state manifest": (s.json_documents(manifests["state"]), state_manifest),
        "safetensors (storage.mapped)": (s.tensor_files(), mapped_reader),
        "safetensors (library)": (s.tensor_files(), library_reader),
        "transport records": (_records(), transport_unpack),
        "recipe YAML": (_yaml_documents(), recipe_file),
        "recipe mapping": (s.mutated(s.valid_recipe()), recipe_mapping),
        "node config": (_node_configs(), node_config),
        "worker frame": (_frames(), worker_frame),
        "worker request": (_worker_requests(), worker_request),
    }


PROPERTIES_BY_NAME: dict[str, Callable[[Any, Path], str]] = {
    "global manifest": global_manifest, "update manifest": update_manifest, "state manifest": state_manifest,
    "safetensors (storage.mapped)": mapped_reader, "safetensors (library)": library_reader,
    "transport records": transport_unpack, "recipe YAML": recipe_file, "recipe mapping": recipe_mapping,
    "node config": node_config, "worker frame": worker_frame, "worker request": worker_request,
}
