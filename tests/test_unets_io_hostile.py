"""`unets.load` on folders a careless or hostile user handed over: never a hang, never a
RecursionError or a 2 TB allocation, always one ValueError naming the file."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unets
from unets.guards import BadFileError
from unets.io import CONFIG_NAME, WEIGHTS_NAME, check_model_size, model_bytes


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet")
    unets.build("space_time_unet", preset="debug").save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir(exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (out / name).write_bytes((saved / name).read_bytes())
    return out


class _Alarm:
    """Fail instead of hanging: SIGALRM after `seconds`."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def timeout(signum, frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_round_trip_still_loads(saved):
    model = unets.load(saved)
    assert model.config.dim == unets.build("space_time_unet", preset="debug").config.dim


def test_a_loaded_model_saves_over_its_own_folder(saved, tmp_path):
    """`unets.load` leaves the weights mapped from the file; in-place changes stay in the
    process, and saving over the same folder (written beside, then renamed) keeps both the
    model and the new files whole."""
    folder = _copy(saved, tmp_path)
    model = unets.load(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    # the file still holds the saved weights
    assert torch.equal(next(iter(unets.load(folder).parameters())), next(iter(unets.load(saved).parameters())))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(folder)
    back = unets.load(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]) and torch.equal(back.state_dict()[key], expected[key]), key


def test_tied_weights_are_copied_into_and_stay_tied():
    from unets.io import load_weights

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    state = {"a.weight": torch.ones(3, 3), "b.weight": torch.ones(3, 3)}
    load_weights(model, state, assign=True)
    assert model.a.weight is model.b.weight and torch.equal(model.a.weight, torch.ones(3, 3))
    assert model.a.weight.data_ptr() != state["a.weight"].data_ptr()


def test_model_bytes_matches_the_built_model(saved):
    model = unets.load(saved)
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert model_bytes(model.config.to_dict()) == real


@pytest.mark.parametrize("dim", [10**12, 2**20])
def test_absurd_size_is_refused_before_allocating(saved, tmp_path, dim):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["dim"] = dim
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with _Alarm(60), pytest.raises(ValueError, match=rf"config\.json.*dim={dim}.*(memory|any machine)"):
        unets.load(folder)


def test_check_model_size_takes_a_limit(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    check_model_size(config)  # fits this machine
    with pytest.raises(ValueError, match="dim="):
        check_model_size(config, limit=1000)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_fifo_in_place_of_a_file_does_not_hang(saved, tmp_path, name):
    folder = _copy(saved, tmp_path)
    os.remove(folder / name)
    os.mkfifo(folder / name)
    with _Alarm(20), pytest.raises(BadFileError, match=rf"{name}.*FIFO"):
        unets.load(folder)


def test_missing_and_dangling_files(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    os.remove(folder / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        unets.load(folder)
    os.symlink(tmp_path / "nowhere", folder / WEIGHTS_NAME)
    with pytest.raises(BadFileError, match="symlink to a missing file"):
        unets.load(folder)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("\udcff", "UTF-8"),
    ],
)
def test_bad_config_text_is_one_named_error(saved, tmp_path, text, match):
    folder = _copy(saved, tmp_path)
    (folder / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with _Alarm(20), pytest.raises(ValueError, match=match) as info:
        unets.load(folder)
    assert CONFIG_NAME in str(info.value)


def test_huge_config_file_is_refused_unread(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    with open(folder / CONFIG_NAME, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros without writing them
    with pytest.raises(BadFileError, match="bytes"):
        unets.load(folder)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_weights_are_named(saved, tmp_path, data):
    folder = _copy(saved, tmp_path)
    blob = bytearray((saved / WEIGHTS_NAME).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        # the 8-byte header length and the JSON header: where corruption cannot go unnoticed
        header = 8 + int.from_bytes(blob[:8], "little")
        for position in data.draw(st.lists(st.integers(0, min(header, len(blob)) - 1), min_size=1, max_size=8)):
            blob[position] ^= data.draw(st.integers(1, 255))
    (folder / WEIGHTS_NAME).write_bytes(bytes(blob))
    with _Alarm(30):
        try:
            unets.load(folder)
        except ValueError as err:  # BadFileError, or load_weights naming keys / shapes
            assert WEIGHTS_NAME in str(err) or "checkpoint does not fit" in str(err)


def test_one_tensor_under_two_keys_is_not_tied_by_assigning():
    from unets.io import load_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    shared = torch.zeros(2, 2)
    load_weights(model, {"0.weight": shared, "1.weight": shared}, assign=True)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(model[1].weight, torch.zeros(2, 2))
