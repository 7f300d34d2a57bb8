"""The `spacetime` command line end to end (tiny model, a few steps) and its error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion import cli
from diffusion.cli import main, prompt_slug, sample_stems

PROMPTS = ["the digit 3 moving up", "the digit 7 moving down and to the left"]


def run_cli(*argv: str) -> int:
    return main(["--threads", "1", "-q", *argv])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run on the embedded data, shared by the tests below."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("cli") / "run"
    try:
        assert run_cli("train", "--preset", "debug", "--out", str(run), "--set", "trainer.train_num_steps=2") == 0
    finally:
        torch.set_num_threads(threads)
    return run


# --- train -> sample -> eval ----------------------------------------------------------------


def test_train_writes_a_complete_run_folder(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["unet_preset"] is None and config["model"]["dim"] == 8  # U-Net written out in full
    assert config["trainer"]["results_folder"] == str(trained_run)
    assert config["trainer"]["train_num_steps"] == 2
    assert (trained_run / "latest").read_text().strip() == "checkpoint-final"
    assert (trained_run / "checkpoint-final" / "ema.safetensors").is_file()
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert (trained_run / "loss.png").stat().st_size > 0
    assert (trained_run / "final.gif").is_file() and (trained_run / "1.gif").is_file()


def test_sample_then_eval(trained_run, tmp_path, capsys):
    samples = tmp_path / "samples"
    code = run_cli("sample", "--checkpoint", str(trained_run), *[a for p in PROMPTS for a in ("--prompt", p)],
                   "--num-samples", "2", "--steps", "2", "--seed", "1", "--out", str(samples))
    assert code == 0
    gifs = sorted(p.name for p in samples.glob("*.gif"))
    assert gifs == ["000-the-digit-3-moving-up.gif", "001-the-digit-3-moving-up.gif",
                    "002-the-digit-7-moving-down-and-to-the-left.gif",
                    "003-the-digit-7-moving-down-and-to-the-left.gif"]
    assert (samples / "002-the-digit-7-moving-down-and-to-the-left.txt").read_text().strip() == PROMPTS[1]

    capsys.readouterr()
    assert run_cli("eval", str(samples), "--out", str(tmp_path / "eval.json")) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["num_videos"] == 4
    assert 0.0 <= results["direction_accuracy"] <= 1.0 and 0.0 <= results["digit_accuracy"] <= 1.0
    assert "direction accuracy" in capsys.readouterr().out

    # Same seed, same samples; an existing sample folder needs --overwrite.
    first = (samples / "000-the-digit-3-moving-up.gif").read_bytes()
    assert run_cli("sample", "--checkpoint", str(trained_run), "--prompt", PROMPTS[0], "--steps", "2",
                   "--seed", "1", "--out", str(samples)) == 2
    assert run_cli("sample", "--checkpoint", str(trained_run / "checkpoint-final"),
                   *[a for p in PROMPTS for a in ("--prompt", p)], "--num-samples", "2", "--steps", "2",
                   "--seed", "1", "--out", str(samples), "--overwrite") == 0
    assert (samples / "000-the-digit-3-moving-up.gif").read_bytes() == first
    assert len(list(samples.glob("*.gif"))) == 4


def test_sample_names_are_sanitised(trained_run, tmp_path):
    out = tmp_path / "out"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# a comment\n../../etc/passwd\n\n" + "x" * 500 + "\n")
    assert run_cli("sample", "--checkpoint", str(trained_run), "--prompts-file", str(prompts_file),
                   "--prompt", "C:\\Windows\\..\\nul", "--steps", "1", "--out", str(out)) == 0
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path)
    assert names == sorted(["000-c-windows-nul.gif", "000-c-windows-nul.txt", "001-etc-passwd.gif",
                            "001-etc-passwd.txt", f"002-{'x' * 80}.gif", f"002-{'x' * 80}.txt"])
    assert (out / "001-etc-passwd.txt").read_text().strip() == "../../etc/passwd"


def test_resume_continues_and_a_used_folder_needs_resume(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    capsys.readouterr()
    assert run_cli("train", "--preset", "debug", "--out", str(run)) == 2
    assert "--resume" in capsys.readouterr().err
    # The saved config is reused; --set extends the run.
    assert run_cli("train", "--out", str(run), "--resume", "--set", "trainer.train_num_steps=3") == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_folder_data_through_the_console_script(tmp_path):
    """`spacetime data` writes gif + txt pairs; a run trains on them via the installed script."""
    data = tmp_path / "data"
    assert run_cli("data", "moving-digits", "--out", str(data), "--num-videos", "4", "--image-size", "8",
                   "--num-frames", "4", "--digit-size", "4", "--speed", "1") == 0
    assert len(list(data.glob("*.gif"))) == 4 and len(list(data.glob("*.txt"))) == 4

    script = shutil.which("spacetime", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("console script not installed: pip install -e . --no-deps")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  kind: folder\n  folder: {json.dumps(str(data))}\ntrainer:\n  train_num_steps: 1\n")
    run = tmp_path / "run"
    result = subprocess.run(
        [script, "--threads", "1", "-q", "train", "--preset", "debug", "--config", str(config), "--out", str(run),
         "--set", "trainer.save_and_sample_every=1000", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "trained 1 steps" in result.stdout
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == {"kind": "folder", "folder": str(data)}
    assert (run / "checkpoint-final" / "model.safetensors").is_file()


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("trainer.learning_rate=1e-3", ["unknown trainer key 'learning_rate'", "train_lr"]),
        ("trainer.train_lr=fast", ["trainer.train_lr must be a number", "'fast'"]),
        ("trainer.train_num_steps=-3", ["trainer.train_num_steps must be an int >= 0", "-3"]),
        ("diffusion.num_frames=0", ["diffusion.num_frames must be an int >= 1", "got 0"]),
        ("diffusion.image_size=6", ["diffusion.image_size must be a multiple of 4", "got 6"]),
    ],
)
def test_config_errors_print_one_line_and_exit_2(override, fragments, tmp_path, capsys):
    code = run_cli("train", "--preset", "debug", "--out", str(tmp_path / "r"), "--set", override)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spacetime: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "r").exists()


def test_usage_errors(tmp_path, capsys):
    assert run_cli("train", "--out", str(tmp_path / "r")) == 2
    assert "give --preset NAME or --config FILE" in capsys.readouterr().err
    assert run_cli("train", "--preset", "moving-digit") == 2
    assert "did you mean 'moving-digits'" in capsys.readouterr().err
    assert run_cli("sample", "--checkpoint", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("eval", str(tmp_path)) == 2
    assert "no videos found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["sample", "--checkpoint", "x", "--steps", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("spacetime: error: ") and err.count("\n") == 1 and "--steps" in err


def test_print_config(capsys):
    assert run_cli("train", "--preset", "debug", "--set", "trainer.train_lr=3e-4", "--print-config") == 0
    config = json.loads(capsys.readouterr().out)
    assert config["trainer"]["train_lr"] == 3e-4 and config["diffusion"]["channels"] == 1


def test_bench_runs_the_script_or_says_it_is_missing(capsys):
    script = Path(cli.__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    if script.is_file():
        assert run_cli("bench", "attention", "--help") == 0
    else:
        assert run_cli("bench", "attention") == 2
        err = capsys.readouterr().err
        assert "benchmark script" in err and "attention.py is missing" in err


# --- pieces ------------------------------------------------------------------------------


@given(st.text(max_size=300), st.integers(1, 100))
def test_prompt_slug_is_a_safe_bounded_file_name(prompt, max_length):
    slug = prompt_slug(prompt, max_length)
    assert 1 <= len(slug) <= max(max_length, len("sample"))
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert not slug.startswith("-") and not slug.endswith("-")
    assert Path(slug).name == slug and ".." not in slug


@given(st.lists(st.sampled_from(["a", "A", "", "../a", "a/"]), min_size=1, max_size=12), st.integers(1, 3))
def test_sample_stems_are_unique_and_ordered(prompts, count):
    stems = sample_stems(prompts, count)
    assert len(stems) == len(prompts) * count == len(set(stems))
    assert stems == sorted(stems)


# --- resuming --------------------------------------------------------------------------------


def test_resume_refuses_settings_the_checkpoint_cannot_honour(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = (run / "config.json").read_text()
    capsys.readouterr()
    assert run_cli("train", "--out", str(run), "--resume", "--set", "trainer.train_lr=0.5") == 2
    err = capsys.readouterr().err
    assert "--resume cannot change trainer.train_lr (0.0001 -> 0.5)" in err and err.count("\n") == 1
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--resume", "--set", "model.dim=16") == 2
    assert "model.dim (8 -> 16)" in capsys.readouterr().err
    assert (run / "config.json").read_text() == saved  # nothing written


def test_an_empty_run_needs_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # A run killed before its first checkpoint: metrics and a partial checkpoint folder.
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (run / "checkpoint-1").mkdir()
    for argv in (("--resume",), ()):
        assert run_cli("train", "--preset", "debug", "--out", str(run), *argv) == 2
        err = capsys.readouterr().err
        assert "without a complete checkpoint" in err and "--fresh" in err and "metrics.jsonl" in err
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--fresh",
                   "--set", "trainer.train_num_steps=1", "--set", "trainer.save_and_sample_every=1000") == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0]  # the stale record is gone, step 0 trained again
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--fresh") == 2
    assert "holds checkpoint-final" in capsys.readouterr().err


def test_a_config_json_edited_after_the_checkpoint_is_one_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["dim"] = 16
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_cli("train", "--out", str(run), "--resume", "--set", "trainer.train_num_steps=3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json no longer matches the weights" in err
    assert run_cli("sample", "--checkpoint", str(run), "--prompt", "a", "--steps", "1") == 2
    assert "config.json no longer matches the weights" in capsys.readouterr().err


def test_same_command_trains_the_same_model(tmp_path):
    """The initial weights come from the run's seed: the same command gives the same losses,
    another seed other ones (before, only the steps were seeded and every run differed)."""
    threads = torch.get_num_threads()

    def losses(name: str, seed: int) -> list[float]:
        run = tmp_path / name
        args = ("train", "--preset", "debug", "--out", str(run), "--set", "trainer.train_num_steps=3",
                "--set", "trainer.log_every=1", "--set", f"trainer.seed={seed}")
        try:
            assert run_cli(*args) == 0
        finally:
            torch.set_num_threads(threads)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    first, again, other = losses("a", 0), losses("b", 0), losses("c", 1)
    assert len(first) == 3 and first == again
    assert first[0] != other[0]


# --- samplers and flow matching -------------------------------------------------------------


def test_sample_takes_every_sampler_and_reports_steps_per_second(trained_run, tmp_path, capsys):
    from diffusion.samplers import available

    for name in available():
        capsys.readouterr()
        steps = () if name == "ddpm" else ("--steps", "2")
        assert run_cli("sample", "--checkpoint", str(trained_run), "--prompt", PROMPTS[0], "--sampler", name,
                       *steps, "--out", str(tmp_path / name)) == 0, name
        out = capsys.readouterr().out
        assert f"sampling: {name}, {20 if name == 'ddpm' else 2} steps, " in out and " steps/s " in out
        assert len(list((tmp_path / name).glob("*.gif"))) == 1


def test_the_flow_preset_trains_and_samples(tmp_path, capsys):
    from diffusion import FlowMatching, load_run

    run = tmp_path / "flow"
    threads = torch.get_num_threads()
    try:
        code = run_cli("train", "--preset", "moving-digits-flow", "--out", str(run),
                       "--set", "trainer.train_num_steps=2", "--set", "trainer.train_batch_size=2",
                       "--set", "trainer.save_and_sample_every=1000", "--set", "trainer.num_sample_rows=1",
                       "--set", "data.num_videos=8", "--set", "trainer.sample_kwargs={\"sampler\": \"euler\", \"steps\": 2}")
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["diffusion"]["process"] == "flow"
    flow = load_run(run)
    # The trainer's integer draws resolve the time distribution in 1000 quantiles.
    assert isinstance(flow, FlowMatching) and flow.num_timesteps == 1000
    capsys.readouterr()
    assert run_cli("sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--sampler", "heun", "--steps", "2",
                   "--out", str(tmp_path / "samples")) == 0
    assert "sampling: heun, 2 steps" in capsys.readouterr().out
    assert run_cli("sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--sampler", "ddim", "--steps", "2",
                   "--out", str(tmp_path / "refused")) == 2
    assert "sampler must be one of ('euler', 'heun')" in capsys.readouterr().err
