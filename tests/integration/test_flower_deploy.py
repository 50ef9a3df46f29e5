"""Real Flower deployments on 127.0.0.1 (tests/integration/flower_deploy.py) as the README tells a federation to run.

- TLS and SuperNode authentication made by the README's own commands, read from README.md here so that the README
  cannot drift from what is tested: its openssl and ssh-keygen lines make the certificates and the sites' keys, its
  ``flwr supernode register`` registers two of them, and the SuperLink and SuperNodes start with the TLS and
  authentication options its commands give. Two rounds with a resident worker at each site; each global checkpoint
  is the one ``fedlora aggregate`` writes from the same update folders. A SuperNode whose key was not registered is
  refused, never becomes a node, and exits with status 1. The SuperLink refuses authentication without TLS.
- A restart of everything, the SuperLink first: a registered key is refused the same way until the SuperLink's
  record of its node lapses (about a minute), then admitted.
- Sampling and evaluation at the sites through Flower: 3 sites, ``federation.clients_per_round: 2``: only the sites
  ``fedlora sample`` names train each round (their state folders and the global manifests say so), and with
  ``--client-evaluation`` each round's metrics file has each site's scores of the global on its own test data.

Every process started here (and every child it started) is ended by its PID when the test ends, passed or not.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import QuietReporter, recipe_dict

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.data.partition import shard_name
from fedlora_cli.federation import sampling, simulate
from fedlora_cli.flower.app_folder import node_config, write_app
from fedlora_cli.storage.run_layout import RunLayout

from .flower_deploy import BIN, ROOT, Deployment, state_of, wait_until

pytestmark = pytest.mark.integration
README = ROOT / "README.md"


# -- the README's TLS and authentication commands -------------------------------------------------------------------
def readme_tls_steps() -> dict[int, list[str]]:
    """The commands of the README's TLS block (the bash block with ssh-keygen) by step: a '# N. ...' comment starts
    step N; continuation lines are joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if "ssh-keygen" in b]
    assert len(found) == 1, "README.md should have one bash block with the ssh-keygen command"
    steps: dict[int, list[str]] = {}
    step, pending = 0, ""
    for line in found[0].splitlines():
        if m := re.match(r"# (\d+)\. ", line):
            step = int(m[1])
            steps[step] = []
        elif line.strip() and not line.startswith("#"):
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1]
            else:
                steps.setdefault(step, []).append(pending)
                pending = ""
    return steps


def readme_command(steps: dict[int, list[str]], step: int, *program: str) -> list[str]:
    """Step ``step``'s command whose first words are ``program``, as words (comments dropped)."""
    words = [shlex.split(c, comments=True) for c in steps.get(step, [])]
    found = [w for w in words if w[:len(program)] == list(program)]
    assert len(found) == 1, f"README.md's TLS step {step} should have one '{' '.join(program)}': {steps.get(step)}"
    return found[0]


def options(words: list[str], *, drop: tuple[str, ...], files: Path, rename: dict[str, str]) -> list[str]:
    """A README command's options except ``drop`` (which the test sets itself): values renamed by ``rename`` and, when
    a file of that name is in ``files``, made absolute."""
    out, i = [], 1
    while i < len(words):
        option = words[i]
        has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
        value = words[i + 1] if has_value else None
        i += 2 if has_value else 1
        if option in drop:
            continue
        out.append(option)
        if value is not None:
            value = rename.get(value, value)
            out.append(str(files / value) if (files / value).exists() else value)
    return out


class ReadmeTLS:
    """The README's TLS block, run: the credentials its commands make (in ``certs``), the SuperLink's and a
    SuperNode's TLS and authentication options as its commands give them, and its key registration."""

    def __init__(self, certs: Path, keys: list[str]) -> None:
        """Step 1 (the CA and the SuperLink's certificate) run by bash in ``certs`` as the README gives it; step 3's
        ssh-keygen once per key name (the README's 'site-a' renamed)."""
        self.steps, self.certs = readme_tls_steps(), certs
        certs.mkdir()
        assert any(c.startswith("openssl ") for c in self.steps.get(1, [])), self.steps.get(1)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(self.steps[1])], cwd=certs,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        keygen = readme_command(self.steps, 3, "ssh-keygen")
        for key in keys:
            done = subprocess.run([key if w == "site-a" else w for w in keygen], cwd=certs, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert (certs / key).is_file() and (certs / f"{key}.pub").is_file()

    def superlink_options(self) -> list[str]:
        found = options(readme_command(self.steps, 2, "flower-superlink"), files=self.certs, rename={},
                        drop=("--host", "--port", "--database", "--disable-runtime-dependency-installation"))
        assert sorted(o for o in found if o.startswith("--")) == [
            "--enable-supernode-auth", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"], found
        return found

    def supernode_options(self, key: str) -> list[str]:
        found = options(readme_command(self.steps, 4, "flower-supernode"), files=self.certs, rename={"site-a": key},
                        drop=("--superlink", "--port", "--node-config"))
        assert sorted(o for o in found if o.startswith("--")) == [
            "--auth-supernode-private-key", "--root-certificates"], found
        return found

    def register(self, deployment: Deployment, key: str) -> None:
        """Step 3's ``flwr supernode register`` of ``key``'s public key, over the connection 'local'."""
        words = readme_command(self.steps, 3, "flwr", "supernode", "register")
        done = deployment.flwr(*[str(self.certs / f"{key}.pub") if w == "site-a.pub" else "local" if w == "fed" else w
                                 for w in words[1:]], timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def recipe_file(tmp_path: Path, tiny_model_dir: Path, reviews_csv: Path, **federation_keys) -> Path:
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(**federation_keys)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def log_of(deployment: Deployment, name: str) -> str:
    return (deployment.logs / f"{name}.log").read_text()


def test_tls_and_supernode_authentication_made_by_the_readmes_commands(deployment, tmp_path, tiny_model_dir,
                                                                        reviews_csv, partition_dir):
    """site-a and site-b registered, each with a worker (worker="required": the round fails without one); site-x's
    key made the same way but never registered."""
    sites, stranger = ["site-a", "site-b"], "site-x"
    started = time.monotonic()
    tls = ReadmeTLS(tmp_path / "certs", [*sites, stranger])
    deployment.connect(root_certificates=tls.certs / "ca.crt")
    deployment.superlink(*tls.superlink_options())
    for site in sites:
        tls.register(deployment, site)
    run = tmp_path / "run"
    app = write_app(recipe_file(tmp_path, tiny_model_dir, reviews_csv, clients=2, client_ids=sites), tmp_path / "app",
                    run, round_timeout=240).parent
    configs = {site: node_config(site, str(partition_dir / shard_name(f"client-{i}")), str(tmp_path / "sites" / site),
                                 worker="required") for i, site in enumerate([*sites, stranger])}
    deployment.workers({site: (configs[site], tmp_path / "sites" / site) for site in sites})
    supernodes = {site: deployment.supernode(configs[site], site, *tls.supernode_options(site),
                                             home=tmp_path / "sites" / f"{site}-flwr-home")
                  for site in [*sites, stranger]}
    refused = supernodes[stranger]

    log = deployment.run(app)
    statuses = deployment.statuses()
    listed = deployment.flwr("supernode", "list", "local", "--format", "json", timeout=60)
    wait_until(lambda: refused.poll() is not None, 120, "the SuperNode with an unregistered key did not exit")
    deployment.end()
    seconds = time.monotonic() - started

    layout = RunLayout(run)
    assert statuses == ["finished:completed"], log[-3000:]
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"], log[-3000:]
    for round_ in (1, 2):
        updates = [layout.update(round_, cid) for cid in sites]
        again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), updates, tmp_path / f"again-{round_}")
        assert storage.read_global(layout.global_checkpoint(round_)).manifest.digest == again.checkpoint.manifest.digest
    for site in sites:
        assert storage.state_rounds(state_of(tmp_path / "sites" / site, layout)) == [1, 2]
    # The stranger: refused at the SuperLink, so never asked who it is, and its SuperNode exits.
    assert stranger not in log
    assert refused.returncode == 1, (refused.returncode, log_of(deployment, stranger)[-2000:])
    assert "Exit Code: 305" in log_of(deployment, stranger), log_of(deployment, stranger)[-2000:]
    assert len(json.loads(listed.stdout)["nodes"]) == len(sites), listed.stdout
    # A SuperNode installs the run's app under its own FLWR_HOME (~/.flwr by default), fedlora installed or not.
    for site in sites:
        assert list((tmp_path / "sites" / f"{site}-flwr-home").glob("apps/*/pyproject.toml")), site
    assert deployment.all_ended()
    print(f"flower deployment, TLS + SuperNode authentication, 2 rounds with workers: {seconds:.1f} s")



def test_the_superlink_refuses_supernode_authentication_without_tls(deployment):
    """README: 'the SuperLink refuses --enable-supernode-auth together with --insecure'."""
    link = deployment.start("superlink", "flower-superlink", "--insecure", "--enable-supernode-auth", "--host",
                            "127.0.0.1", "--port", str(deployment.link), "--disable-runtime-dependency-installation",
                            "--health-server-address", f"127.0.0.1:{deployment.health}")
    assert link.wait(timeout=60) == 1
    assert "`--enable-supernode-auth` flag requires encrypted TLS" in log_of(deployment, "superlink")
    deployment.end()
    assert deployment.all_ended()


def node_statuses(deployment: Deployment) -> list[str]:
    listed = deployment.flwr("supernode", "list", "local", "--format", "json", timeout=60)
    try:
        return [node["status"] for node in json.loads(listed.stdout)["nodes"]]
    except (ValueError, KeyError):
        return []


def test_a_registered_key_is_refused_until_the_restarted_superlinks_record_of_it_lapses(deployment, tmp_path):
    """Everything restarts, the SuperLink first (so its node never signed off) and with its --database: the key
    stays registered, but the SuperLink still counts the node online, and refuses the restarted SuperNode (exit
    status 1, 305 in its log) until that record lapses with the node's heartbeat (about a minute); then it is
    admitted. README: 'a registered key is refused for about a minute after a restart'."""
    tls = ReadmeTLS(tmp_path / "certs", ["site-a"])
    database = str(tmp_path / "superlink.db")
    config = node_config("site-a", None, str(tmp_path / "sites" / "site-a"))
    deployment.connect(root_certificates=tls.certs / "ca.crt")
    link = deployment.superlink(*tls.superlink_options(), "--database", database)
    tls.register(deployment, "site-a")
    node = deployment.supernode(config, "site-a", *tls.supernode_options("site-a"))
    wait_until(lambda: node_statuses(deployment) == ["online"], 90, "site-a's SuperNode was not online")
    deployment.stop(link)
    deployment.stop(node)
    deployment.superlink(*tls.superlink_options(), "--database", database, name="superlink-again")
    restarted = time.monotonic()
    assert node_statuses(deployment) == ["online"], "the restarted SuperLink should still count site-a online"
    # Each start of the SuperNode: (seconds after the restart, its exit status; None: still up 8 s later).
    tries: list[tuple[float, int | None]] = []
    while not tries or tries[-1][1] is not None:
        assert time.monotonic() - restarted < 150, f"site-a's SuperNode was refused for 150 s: {tries}"
        name, at = f"site-a-try-{len(tries)}", time.monotonic() - restarted
        again = deployment.supernode(config, name, *tls.supernode_options("site-a"))
        try:
            again.wait(timeout=8)
        except subprocess.TimeoutExpired:
            tries.append((at, None))
        else:
            tries.append((at, again.returncode))
            assert again.returncode == 1 and "Exit Code: 305" in log_of(deployment, name), log_of(deployment, name)
            time.sleep(2)
    wait_until(lambda: node_statuses(deployment) == ["online"], 60, "site-a's SuperNode was not online")
    deployment.end()
    refused_for = tries[-1][0]
    assert len(tries) > 1 and 20 < refused_for < 120, tries
    assert deployment.all_ended()
    print(f"flower deployment restarted: the registered key refused {len(tries) - 1} time(s), admitted when started "
          f"{refused_for:.1f} s after the restart")


def test_two_of_three_sites_sampled_each_round_and_the_sites_evaluate(deployment, tmp_path, tiny_model_dir,
                                                                      reviews_csv, partition_dir):
    """federation.clients_per_round: 2 of 3 (fixed-size sampling; with training.seed 0 each round leaves another
    site out). With --client-evaluation each site evaluates each round's global on its own test data (here its own
    shard, so that the sites' scores differ), with a worker or without one. Each global is bit for bit the one
    ``simulate`` writes from the same recipe, shards and seeds; every site and simulate trained with the recipe's
    training.threads (1, whatever count each process would take by itself), as each update records."""
    clients = ["client-0", "client-1", "client-2"]
    recipe = recipe_file(tmp_path, tiny_model_dir, reviews_csv, clients=3, clients_per_round=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["training"]["threads"] = 1
    recipe.write_text(yaml.safe_dump(raw))
    loaded = recipes.load(recipe)
    expected = {n: sampling.asked(loaded.federation, loaded.training.seed, n) for n in (1, 2)}
    assert expected[1] != expected[2], "each round should leave another site out, so that the rounds differ"
    run = tmp_path / "run"
    app = write_app(recipe, tmp_path / "app", run, round_timeout=240, client_evaluation=True).parent
    # client-0 does its work in Flower's fresh ClientApp processes (worker "off"), the others through their workers.
    configs = {cid: node_config(cid, str(partition_dir / shard_name(cid)), str(tmp_path / "sites" / cid),
                                worker="off" if cid == "client-0" else "required",
                                **{"test-data": str(partition_dir / shard_name(cid))}) for cid in clients}
    started = time.monotonic()
    deployment.superlink()
    deployment.workers({cid: (configs[cid], tmp_path / "sites" / cid) for cid in clients[1:]})
    for cid in clients:
        deployment.supernode(configs[cid], cid)
    log = deployment.run(app)
    statuses = deployment.statuses()
    deployment.end()
    seconds = time.monotonic() - started

    layout = RunLayout(run)
    assert statuses == ["finished:completed"], log[-3000:]
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"], log[-3000:]
    for n in (1, 2):
        said = subprocess.run([str(BIN / "fedlora"), "sample", str(layout.global_checkpoint(n - 1)), "--json"],
                              capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(said.stdout)["asked"] == expected[n]
        manifest = storage.read_global(layout.global_checkpoint(n)).manifest
        assert manifest.asked == expected[n]
        assert sorted(manifest.clients) == expected[n]
        assert f"round {n}: sending the global checkpoint to {', '.join(expected[n])} (" in log, log[-3000:]
        assert sorted(p.name for p in layout.update(n, clients[0]).parent.iterdir()) == expected[n]
        again = federation.aggregate_round(layout.global_checkpoint(n - 1), [layout.update(n, c) for c in expected[n]],
                                           tmp_path / f"again-{n}")
        assert manifest.digest == again.checkpoint.manifest.digest
        assert {storage.read_update(layout.update(n, c)).manifest.site["threads"] for c in expected[n]} == {1}
    # simulate of the same recipe on the same shards (a copy of the partition the sites were given).
    shutil.copytree(partition_dir, tmp_path / "simulate" / "data")
    simulate.simulate(loaded, tmp_path / "simulate", QuietReporter())
    simulated = RunLayout(tmp_path / "simulate")
    assert [storage.read_global(simulated.global_checkpoint(n)).manifest.digest for n in (0, 1, 2)] == \
        [storage.read_global(layout.global_checkpoint(n)).manifest.digest for n in (0, 1, 2)]
    for cid in clients:
        assert storage.state_rounds(state_of(tmp_path / "sites" / cid, layout)) == [n for n in (1, 2)
                                                                                  if cid in expected[n]], cid

    # Every site online evaluates each round's global, asked to train that round or not.
    for n in (1, 2):
        metrics = json.loads(layout.metrics(n).read_text())
        assert sorted(metrics["sites"]) == clients, metrics
        for cid in clients:
            mine = federation.evaluate(layout.global_checkpoint(n), str(partition_dir / shard_name(cid)))
            assert metrics["sites"][cid]["global.accuracy"] == pytest.approx(mine["accuracy"], abs=1e-9), (cid, n)
            assert metrics["sites"][cid]["global.loss"] == pytest.approx(mine["loss"], rel=1e-5), (cid, n)
    assert len({metrics["sites"][cid]["global.loss"] for cid in clients}) == 3, "each site's own data"
    assert deployment.all_ended()
    print(f"flower deployment, 2 of 3 sites sampled, client evaluation: {seconds:.1f} s")
