"""fedlora_cli.storage.files: tensor digests (xxh3-128, named by a prefix; bare sha256 from before still read) and
safetensors files read and checked against them."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch
from conftest import legacy_tensor_digest

from fedlora_cli import storage
from fedlora_cli.errors import FedloraError

# What fedlora wrote for torch.arange(6.).reshape(2, 3) before xxh128 (sha256, bare hex), and writes now. Pinned:
# a digest written once must verify with every later fedlora, so neither the hashed bytes nor the form may drift.
ARANGE_SHA256 = "6fa8cc27caf0bad3be1d4a001ed46270dd716ac45cd3c727ad441966fc7cb742"
ARANGE_XXH128 = "xxh128:d682ef9ff82ad76c7a9c7a724a2f359d"


def arange() -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).reshape(2, 3)


def written(tmp_path, tensors: dict[str, torch.Tensor]):
    path = tmp_path / "t.safetensors"
    storage.save_tensors(path, tensors)
    return path


def flip_bit(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


# Digests ------------------------------------------------------------------------------------------------------


def test_a_new_digest_names_its_algorithm_and_verifies():
    t = arange()

    digest = storage.tensor_digest(t)

    assert digest == ARANGE_XXH128 and storage.DIGEST_ALGORITHM == "xxh128"
    assert re.fullmatch(r"xxh128:[0-9a-f]{32}", digest)
    assert storage.digest_algorithm(digest) == "xxh128"
    assert storage.digest_matches(t, digest)


def test_an_old_sha256_digest_still_verifies():
    t = arange()

    assert legacy_tensor_digest(t) == ARANGE_SHA256  # the tests' copy of the old writer is the old writer
    assert storage.digest_algorithm(ARANGE_SHA256) == "sha256"
    assert storage.digest_matches(t, ARANGE_SHA256)
    assert not storage.digest_matches(t + 1, ARANGE_SHA256)


@pytest.mark.parametrize("other", [
    pytest.param(lambda t: t.reshape(3, 2), id="same bytes, another shape"),
    pytest.param(lambda t: t.view(torch.int32), id="same bytes, another dtype"),
    pytest.param(lambda t: torch.nextafter(t, t + 1), id="every value one ulp up"),
    pytest.param(lambda t: torch.cat([t.reshape(-1), torch.zeros(1)]).reshape(7), id="one value more"),
])
def test_a_digest_tells_dtype_shape_and_bytes_apart(other):
    t = arange()

    assert storage.tensor_digest(other(t)) != storage.tensor_digest(t)
    assert not storage.digest_matches(other(t), storage.tensor_digest(t))


def test_a_strided_tensor_has_the_digest_of_its_contiguous_copy():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not t.is_contiguous()

    assert storage.tensor_digest(t) == storage.tensor_digest(t.contiguous())


@pytest.mark.parametrize("digest, needles", [
    ("blake9:" + "0" * 64, ["unknown algorithm 'blake9'", "xxh128, sha256", "newer fedlora"]),
    ("0" * 63, ["malformed digest", "xxh128:<hex>"]),
    ("xxh128:", ["malformed digest"]),
    (12, ["malformed digest"]),
])
def test_an_unknown_or_malformed_digest_is_one_clear_line(digest, needles):
    with pytest.raises(FedloraError) as caught:
        storage.digest_matches(arange(), digest, "client update u: tensor 'w'")

    message = str(caught.value)
    assert "\n" not in message and message.startswith("client update u: tensor 'w' has a")
    for needle in needles:
        assert needle in message


# Files read and verified --------------------------------------------------------------------------------------


def two_tensors() -> dict[str, torch.Tensor]:
    return {"a": arange(), "b": torch.linspace(-1, 1, 64).reshape(8, 8)}


@pytest.mark.parametrize("digest", [storage.tensor_digest, legacy_tensor_digest], ids=["xxh128", "old sha256"])
def test_load_verified_reads_what_was_written(tmp_path, digest):
    tensors = two_tensors()
    path = written(tmp_path, tensors)

    loaded = storage.load_verified(path, {n: digest(t) for n, t in tensors.items()}, "client update tensors")

    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


@pytest.mark.parametrize("digest", [storage.tensor_digest, legacy_tensor_digest], ids=["xxh128", "old sha256"])
def test_a_flipped_bit_in_a_tensor_file_is_detected(tmp_path, digest):
    tensors = two_tensors()
    path = written(tmp_path, tensors)
    digests = {n: digest(t) for n, t in tensors.items()}
    flip_bit(path, 5)  # in the data of the tensor stored last

    with pytest.raises(FedloraError, match=r"tensor 'b' does not match the digest in its manifest") as caught:
        storage.load_verified(path, digests, "client update tensors")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_tensor_file_is_refused(tmp_path):
    tensors = two_tensors()
    path = written(tmp_path, tensors)
    digests = {n: storage.tensor_digest(t) for n, t in tensors.items()}
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(FedloraError, match="not a readable safetensors file"):
        storage.load_verified(path, digests, "client update tensors")


def test_a_file_with_other_tensors_than_its_manifest_is_refused(tmp_path):
    tensors = two_tensors()
    path = written(tmp_path, tensors)
    digests = {n: storage.tensor_digest(t) for n, t in tensors.items()}

    with pytest.raises(FedloraError, match="holds tensor 'b', which has no digest in its manifest"):
        storage.load_verified(path, {"a": digests["a"]}, "client update tensors")
    with pytest.raises(FedloraError, match="lacks tensor 'c', which its manifest has a digest for"):
        storage.load_verified(path, {**digests, "c": digests["a"]}, "client update tensors")


def test_an_unknown_algorithm_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    tensors = two_tensors()
    path = written(tmp_path, tensors)
    digests = {"a": storage.tensor_digest(tensors["a"]), "b": "blake9:" + "0" * 64}

    def no(*args, **kwargs):
        raise AssertionError("read a tensor")

    monkeypatch.setattr("safetensors.safe_open", no)
    with pytest.raises(FedloraError, match=r"t.safetensors: tensor 'b' has a digest of unknown algorithm 'blake9'"):
        storage.load_verified(path, digests, "client update tensors")


def test_identities_stay_sha256_of_the_digest_strings():
    # A global checkpoint's identity hashes the digest strings as recorded, whatever algorithm each names: so
    # a checkpoint's identity, once written, never depends on which fedlora reads it.
    digests = {"b": storage.tensor_digest(arange()), "a": ARANGE_SHA256}

    identity = storage.global_digest(digests)

    assert re.fullmatch(r"[0-9a-f]{64}", identity)
    assert identity == storage.combined_digest(dict(reversed(digests.items())))
    assert identity == hashlib.sha256(f"a={ARANGE_SHA256};b={ARANGE_XXH128};".encode()).hexdigest()


# The numpy round's side of the same files ------------------------------------------------------------------


@pytest.mark.parametrize("tensor", [
    pytest.param(arange, id="float32"),
    pytest.param(lambda: arange().double(), id="float64"),
    pytest.param(lambda: arange().half(), id="float16"),
    pytest.param(lambda: torch.tensor(1.5), id="0-d"),
    pytest.param(lambda: torch.zeros(0, 3), id="empty"),
    pytest.param(lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), id="strided"),
])
def test_an_array_has_the_digest_of_its_tensor(tensor):
    t = tensor()
    a = t.numpy()

    assert storage.tensor_digest(a) == storage.tensor_digest(t)
    assert storage.tensor_digest(a, "sha256") == storage.tensor_digest(t, "sha256")
    assert storage.digest_matches(a, storage.tensor_digest(t)) and storage.digest_matches(a, legacy_tensor_digest(t))


def test_the_pinned_digests_hold_for_an_array():
    a = arange().numpy()

    assert storage.tensor_digest(a) == ARANGE_XXH128 and storage.digest_matches(a, ARANGE_SHA256)


def test_arrays_and_tensors_write_the_same_file(tmp_path):
    tensors = {**two_tensors(), "c": torch.arange(4, dtype=torch.float64)}
    arrays = {name: t.numpy() for name, t in tensors.items()}

    assert storage.is_arrays(arrays) and not storage.is_arrays(tensors) and not storage.is_arrays({})
    storage.save_tensors(tmp_path / "a.safetensors", arrays)
    storage.save_tensors(tmp_path / "t.safetensors", tensors)

    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


@pytest.mark.parametrize("digest", [storage.tensor_digest, legacy_tensor_digest], ids=["xxh128", "old sha256"])
def test_load_verified_reads_arrays_without_torch_and_refuses_a_flipped_bit(tmp_path, digest):
    tensors = two_tensors()
    path = written(tmp_path, tensors)
    digests = {n: digest(t) for n, t in tensors.items()}

    loaded = storage.load_verified(path, digests, "client update tensors", framework="numpy")

    assert all(type(a).__module__ == "numpy" and (a == tensors[n].numpy()).all() for n, a in loaded.items())
    flip_bit(path, 5)
    with pytest.raises(FedloraError, match=r"tensor 'b' does not match the digest in its manifest"):
        storage.load_verified(path, digests, "client update tensors", framework="numpy")


def test_arrays_and_tensors_are_views_of_each_other():
    tensors = two_tensors()

    arrays = storage.as_arrays(tensors)
    back = storage.as_tensors(arrays)

    assert all(arrays[n].ctypes.data == t.data_ptr() == back[n].data_ptr() for n, t in tensors.items())
    assert storage.as_tensors({}) == {}


def test_a_temporary_folder_left_by_a_killed_writer_is_removed_and_a_running_writers_is_not(tmp_path):
    """A process killed mid-write (a ServerApp SIGKILLed while it aggregates) leaves `.NAME.tmp-PID`; the next write
    of NAME removes it once PID no longer runs, and leaves a running writer's alone."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    final = tmp_path / "round-001"
    abandoned = tmp_path / f".round-001.tmp-{int(gone.stdout)}"
    abandoned.mkdir()
    (abandoned / "adapter_model.safetensors").write_bytes(b"half")
    busy = tmp_path / f".round-001.tmp-{os.getppid()}"  # a process that runs: the one that started this test
    busy.mkdir()
    left_file = tmp_path / f".metrics.tmp-{int(gone.stdout)}.json"
    left_file.write_text("{")
    with storage.atomic_dir(final) as tmp:
        (tmp / "x").write_text("whole")
    with storage.atomic_file(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, "metrics.json", "round-001"])
