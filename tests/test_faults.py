"""Bad input and careless use: every case exits with a one-line message naming the fix, and deletes or
half-writes nothing (issue: never lose a user's files, never train on NaN, never load silently wrong)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import upcycle
from upcycle.cli import main
from upcycle.fsutil import clean_stale


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len([x for x in err.strip().splitlines() if "error:" in x]) == 1


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_convert_never_deletes_other_files_and_overwrite_keeps_them(capsys, dense_dir, workdir):
    models = workdir / "models"
    (models / "other").mkdir(parents=True)
    (models / "other" / "notes.txt").write_text("mine")
    (models / "README.md").write_text("also mine")
    before = _tree(models)
    rc, err = _run(capsys, "convert", "--model", dense_dir, "--out", models)
    assert rc == 2 and "--overwrite" in err and "not a checkpoint" in err and _one_line(err)
    assert _tree(models) == before
    rc, _ = _run(capsys, "convert", "--model", dense_dir, "--out", models, "--overwrite")
    assert rc == 0
    assert (models / "other" / "notes.txt").read_text() == "mine" and (models / "README.md").read_text() == "also mine"
    assert upcycle.load(models) is not None


@pytest.mark.parametrize("target", ["model", "inside", "parent", "cwd", "dot"])
def test_convert_refuses_to_replace_its_input_or_the_current_directory(capsys, dense_dir, workdir, tmp_path, target):
    import shutil

    src = workdir / "parent" / "dense"
    shutil.copytree(dense_dir, src)
    before = _tree(workdir / "parent")
    out = {"model": src, "inside": src / "sub", "parent": workdir / "parent", "cwd": workdir, "dot": "."}[target]
    rc, err = _run(capsys, "convert", "--model", src, "--out", out)
    assert rc == 2 and _one_line(err), err
    assert ("current directory" if target in ("cwd", "dot") else "replace the input") in err
    assert _tree(workdir / "parent") == before


def test_convert_onto_a_file_refuses_then_replaces_it_with_overwrite(capsys, dense_dir, workdir):
    f = workdir / "out.bin"
    f.write_bytes(b"precious")
    rc, err = _run(capsys, "convert", "--model", dense_dir, "--out", f)
    assert rc == 2 and "existing file" in err and f.read_bytes() == b"precious"
    assert _run(capsys, "convert", "--model", dense_dir, "--out", f, "--overwrite")[0] == 0
    assert (f / "config.json").exists()


def test_replacing_a_previous_checkpoint_is_allowed_and_atomic(capsys, dense_dir, workdir):
    out = workdir / "sparse"
    assert _run(capsys, "convert", "--model", dense_dir, "--out", out)[0] == 0
    assert _run(capsys, "convert", "--model", dense_dir, "--out", out, "--keep", "8")[0] == 0
    assert json.loads((out / "config.json").read_text())["upcycle"]["bank_sparse"]["keep"] == 8


def test_os_errors_are_one_line_naming_the_path_and_cause(capsys, dense_dir, workdir, monkeypatch):
    blocker = workdir / "afile"
    blocker.write_text("x")
    rc, err = _run(capsys, "convert", "--model", dense_dir, "--out", blocker / "sub")
    assert rc == 2 and _one_line(err) and "afile" in err, err
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK | os.X_OK) or os.geteuid() == 0:
        rc, err = _run(capsys, "convert", "--model", dense_dir, "--out", "/sys/upcycle-test-out")
        assert rc == 2 and _one_line(err) and "/sys/upcycle-test-out" in err, err
    import errno

    import upcycle.fsutil as fsutil

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "_fsync_tree", full)
    rc, err = _run(capsys, "convert", "--model", dense_dir, "--out", workdir / "o")
    assert rc == 2 and "disk is full" in err and _one_line(err) and not (workdir / "o").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".o.")]  # no temp dir left


def test_stale_temp_dirs_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    dead = tmp_path / ".model.tmp-999999999-0123abcd"  # a PID that does not run
    legacy = tmp_path / ".step_00000003.tmp-89abcdef"
    mine = tmp_path / f".other.tmp-{os.getpid()}-fedcba98"  # a writer that is alive: kept
    user = tmp_path / ".config.tmp-notes"  # not ours
    for d in (dead, legacy, mine, user):
        d.mkdir()
    os.utime(legacy, (0, 0))  # old
    model = upcycle.convert(_tiny(), progress=False)
    upcycle.save(model, tmp_path / "model")
    assert not dead.exists() and not legacy.exists() and mine.exists() and user.exists()
    assert clean_stale(tmp_path) == []


def _tiny():
    from upcycle.testing import tiny_model

    return tiny_model(vocab_size=64)


def test_save_pretrained_keeps_other_files_like_plain_transformers(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "notes.md").write_text("keep me")
    upcycle.convert(_tiny(), progress=False).save_pretrained(d)
    assert (d / "notes.md").read_text() == "keep me" and upcycle.load(d) is not None


@pytest.mark.parametrize("edit, message", [
    ({"keep": 99}, "keep=99 must lie in"),
    ({"keep": "16"}, "keep='16' is not int"),
    ({"keep": 16.5}, "keep=16.5 is not int"),
    ({"bank_size": 48}, "divi"),
    ({"predictor_budget": "lots"}, "predictor_budget='lots'"),
    ({"layers": [0, 7]}, "layers [7]"),
])
def test_edited_config_json_is_refused_by_load_info_and_eval(capsys, sparse_dir, tmp_path, edit, message):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(sparse_dir, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["upcycle"]["bank_sparse"].update(edit)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(upcycle.CheckpointError, match="config.json"):
        upcycle.load(ck)
    for argv in (["info", ck], ["eval", "--model", ck, "--task", "niah", "--lengths", "300"]):
        rc, err = _run(capsys, *argv)
        assert rc == 2 and message in err and "config.json" in err and _one_line(err), (argv, err)


def test_eval_blames_the_real_problem(capsys, sparse_dir, tmp_path, text_file):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(sparse_dir, ck)
    (ck / "config.json").write_text("{garbage")
    rc, err = _run(capsys, "eval", "--model", ck, "--data", text_file)
    assert rc == 2 and "not valid JSON" in err and "tokenizer" not in err
    gguf = tmp_path / "random.gguf"
    gguf.write_bytes(os.urandom(4096))
    rc, err = _run(capsys, "eval", "--model", gguf, "--data", text_file)
    assert rc == 2 and "not a readable GGUF file" in err and _one_line(err)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + os.urandom(64))
    rc, err = _run(capsys, "eval", "--model", fake, "--data", text_file)
    assert rc == 2 and "not a readable GGUF file" in err and _one_line(err), err


def test_binary_data_is_refused_by_eval_and_train(capsys, sparse_dir, tmp_path):
    blob = tmp_path / "data.txt"
    blob.write_bytes(os.urandom(200_000))
    rc, err = _run(capsys, "eval", "--model", sparse_dir, "--data", blob)
    assert rc == 2 and "data.txt is not UTF-8 text" in err and _one_line(err)
    rc, err = _run(capsys, "train", "--model", sparse_dir, "--data", blob, "--out", tmp_path / "run", "--steps", 1,
                   "--no-progress", "--no-tensorboard")
    assert rc == 2 and "data.txt is not UTF-8 text" in err
    jl = tmp_path / "data.jsonl"
    jl.write_bytes(b'{"text": "a"}\n' + os.urandom(5000))
    rc, err = _run(capsys, "train", "--model", sparse_dir, "--data", jl, "--out", tmp_path / "run2", "--steps", 1,
                   "--no-progress", "--no-tensorboard")
    assert rc == 2 and "data.jsonl is not UTF-8 text" in err


def _train_argv(model, data, out, *extra):
    argv = ["train", "--model", model, "--data", data, "--out", out, "--seq-len", "32", "--batch-size", "2",
            "--no-progress", "--no-tensorboard", "--num-threads", "1", "--eval-every", "0", "--val-max-sequences", "2",
            *extra]
    return [str(a) for a in argv]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numeric_flags_are_refused(capsys, sparse_dir, text_file, tmp_path, value):
    rc, err = _run(capsys, *_train_argv(sparse_dir, text_file, tmp_path / "r", "--steps", 2, f"--lr={value}"))
    assert rc == 2 and "not a finite number" in err and "--lr" in err and not (tmp_path / "r").exists()


def test_diverging_training_stops_without_a_final_model(capsys, sparse_dir, text_file, tmp_path):
    rc, err = _run(capsys, *_train_argv(sparse_dir, text_file, tmp_path / "r", "--steps", 12, "--lr", "1e30",
                                        "--max-nonfinite-steps", 2, "--save-every", 0))
    assert rc == 3 and "not finite" in err and "--lr" in err
    assert not (tmp_path / "r" / "model").exists()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_nonfinite"] == 3


def test_resuming_a_finished_run_with_fewer_steps_changes_nothing(capsys, sparse_dir, text_file, tmp_path):
    out = tmp_path / "r"
    assert _run(capsys, *_train_argv(sparse_dir, text_file, out, "--steps", 4, "--save-every", 2))[0] == 0
    assert (out / "checkpoints" / "step_00000004").exists()  # the final checkpoint is the last step's
    before = _tree(out)
    for steps in (4, 2):
        assert main(_train_argv(sparse_dir, text_file, out, "--steps", steps, "--resume")) == 0
        assert _tree(out) == before
    assert main(_train_argv(sparse_dir, text_file, out, "--steps", 6, "--resume")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_loads_no_pickle(sparse_dir, text_file, tmp_path, tiny_train_config_factory):
    import pickle

    from upcycle.train import train
    from upcycle.train.checkpoint import SafeFileSystemReader, list_checkpoints

    cfg = tiny_train_config_factory(sparse_dir, [text_file], tmp_path / "r", steps=2, save_every=1)
    train(cfg)
    ck = list_checkpoints(tmp_path / "r")[-1]
    assert not list(ck.rglob("*.pt")) and (ck / "rng_rank0.safetensors").exists()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (ck / "state" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        SafeFileSystemReader(str(ck / "state")).read_metadata()
    with pytest.raises(Exception, match="refusing"):
        train(cfg.replace(resume=True, steps=3))
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def tiny_train_config_factory():
    from upcycle.train import TrainConfig

    def make(model, data, out, **kw):
        base = dict(model=str(model), data=[str(d) for d in data], out=str(out), seq_len=32, batch_size=2,
                    lr=3e-3, eval_every=0, progress=False, tensorboard=False, num_threads=1, val_max_sequences=2)
        return TrainConfig.from_dict({**base, **kw})

    return make


def test_plain_transformers_never_loads_a_converted_checkpoint_as_dense_silently(sparse_dir, tmp_path):
    """Without upcycle's classes registered, transformers refuses the unknown model type."""
    import subprocess
    import sys

    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept Exception as e:\n"
            "    print('REFUSED', type(e).__name__); sys.exit(0)\nprint('LOADED'); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code, str(sparse_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "REFUSED" in r.stdout, r.stdout + r.stderr[-2000:]
    ids = torch.randint(0, 64, (1, 6))
    from transformers import AutoModelForCausalLM  # upcycle is imported here: the sparse model loads

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(sparse_dir).eval()(ids).logits,
                           upcycle.load(sparse_dir)(ids).logits)
