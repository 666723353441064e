"""Export and predict after a real 2-process run with row-wise sharded tables: the exported model,
in one process without torch.distributed, scores the val split exactly as the run's evaluation did."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.metrics import auc
from tests.conftest import REPO, run_command
from tests.integration.test_train import NO_READERS, check, records, script_in_process, tiny


def script(name: str, *args: str):
    return [sys.executable, str(REPO / "scripts" / name), *map(str, args)]


def test_the_exported_model_scores_the_val_split_as_the_run_did(row_wise_run, tmp_path):
    # The session's run of one epoch with sharding=row_wise on 2 ranks (tests/integration/conftest.py).
    run_dir = row_wise_run.run_dir
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"row_wise"}  # every table split over 2 ranks
    final_eval = records(run_dir, "eval")[-1]

    exported = check(run_command(script("export.py", run_dir, "--out", tmp_path / "exported"), cwd=tmp_path))
    step = final_eval["step"]
    assert f"exported step {step} of {run_dir.resolve() / 'checkpoints' / f'step_{step:08d}'}:" in exported

    val = row_wise_run.dataset / "val"
    predictions = tmp_path / "predictions.parquet"
    printed = check(
        run_command(
            script("predict.py", "--model", tmp_path / "exported", "--data", val, "--out", predictions), cwd=tmp_path
        )
    )
    assert "is_fx_tracing" not in printed  # torch's note to library authors stays off the console
    metrics = {name: float(value) for name, value in re.findall(r"\b(AUC|logloss|NE) ([0-9.]+)", printed)}
    assert metrics["AUC"] == pytest.approx(final_eval["auc"], abs=1e-6)  # printed to 6 decimals
    assert metrics["logloss"] == pytest.approx(final_eval["logloss"], abs=1e-6)
    assert metrics["NE"] == pytest.approx(final_eval["ne"], abs=1e-6)

    # One row per val row, in file order, and the AUC of what was written is the run's: exactly, but
    # for pairs of rows whose logits differ and whose float32 probabilities do not (a tie counts half).
    table = pq.read_table(predictions)
    assert table.schema == pa.schema([("prediction", pa.float32()), ("label", pa.float32())])
    labels = np.concatenate(
        [pq.read_table(f, columns=["label"])["label"].to_numpy() for f in sorted(val.glob("*.parquet"))]
    )
    assert table.num_rows == len(labels) == final_eval["samples"]
    assert np.array_equal(table["label"].to_numpy(), labels)
    scores = torch.from_numpy(table["prediction"].to_numpy().copy())
    _, where, counts = np.unique(scores.numpy(), return_inverse=True, return_counts=True)
    positives_at = np.bincount(where, weights=labels, minlength=len(counts))
    tied_pairs = float((positives_at * (counts - positives_at)).sum())
    positives = labels.sum()
    ties_weigh = 0.5 * tied_pairs / (positives * (len(labels) - positives))
    assert auc(scores, torch.from_numpy(labels)) == pytest.approx(final_eval["auc"], abs=1e-9 + ties_weigh)

    missing = script_in_process("predict.py", "--model", tmp_path / "nowhere", "--data", val, "--out", predictions)
    assert missing.returncode == 2 and f"error: {tmp_path / 'nowhere'}: no such directory" in missing.stderr


def test_predict_scores_an_fp16_run_in_its_precision_as_its_validation_did(tmp_path):
    """trainer.precision=fp16 (bf16 takes the same path, but this CPU may refuse it for training):
    predict computes the dense part under the run's autocast, so its metrics are the final
    evaluation's to the printed decimals (scored in fp32 they differed: AUC 0.666927 vs 0.666948
    after the epoch; 0.555293 vs 0.555319 after the 5 steps trained here, so 5 are enough)."""
    overrides = ["trainer.precision=fp16", "trainer.max_steps=5", NO_READERS]
    check(run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, *overrides)], cwd=REPO))
    run_dir = tmp_path / "outputs" / "tiny"
    final_eval = records(run_dir, "eval")[-1]
    # Both scripts in this process: their launches are proven by the test above.
    exported = check(script_in_process("export.py", run_dir, "--out", tmp_path / "exported"))
    assert "predict.py computes its dense part in fp16, the run's trainer.precision" in exported

    val = next((tmp_path / "data").iterdir()) / "val"
    out = tmp_path / "predictions.parquet"
    printed = check(script_in_process("predict.py", "--model", tmp_path / "exported", "--data", val, "--out", out))
    assert "the dense part computed in fp16 (the run's trainer.precision" in printed
    printed_metrics = dict(re.findall(r"\b(AUC|logloss|NE) ([0-9.]+)", printed))
    assert printed_metrics == {
        name: f"{final_eval[key]:.6f}" for name, key in (("AUC", "auc"), ("logloss", "logloss"), ("NE", "ne"))
    }


def _edited_copy(source, target, name: str, edit) -> None:
    """A copy of the directory `source` at `target` whose JSON file `name` has its "config" edited."""
    import shutil

    shutil.copytree(source, target)
    data = json.loads((target / name).read_text())
    edit(data["config"])
    (target / name).write_text(json.dumps(data))


def test_configs_in_received_files_are_plain_data_and_unknown_keys_exit_2(one_process_run, tmp_path, monkeypatch):
    # An export or a checkpoint someone sent: its config is data. '${oc.env:...}' in it is that
    # string, never a value from this machine's environment (nor a crash where it is unset), and a
    # key this version does not know is refused naming the file, as resume refuses it.
    # The scripts run in this process (script_in_process): what they say and their exit codes are
    # the commands', and the test above launches both for real.
    monkeypatch.setenv("BATCH", "64")
    monkeypatch.delenv("UNSET_VAR", raising=False)

    # A finished run: a copy of the session's shared one of 5 steps (tests/integration/conftest.py).
    one_process_run.copy_to(tmp_path)
    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "step_00000005"
    check(script_in_process("export.py", checkpoint, "--out", tmp_path / "exported"))
    val = next((tmp_path / "data").iterdir()) / "val"

    def predict(model):
        return script_in_process("predict.py", "--model", model, "--data", val, "--out", tmp_path / "p.parquet")

    unset = tmp_path / "unset"  # a string key: kept as the string
    _edited_copy(tmp_path / "exported", unset, "config.json", lambda c: c.update(run_name="${oc.env:UNSET_VAR}"))
    check(predict(unset))
    from_env = tmp_path / "from_env"  # an integer key: the string is not an integer
    _edited_copy(
        tmp_path / "exported", from_env, "config.json", lambda c: c["data"].update(eval_batch_size="${oc.env:BATCH}")
    )
    result = predict(from_env)
    assert result.returncode == 2 and result.stderr == (
        f"error: {from_env / 'config.json'}: its config is not one this version of rectrain can use: "
        "data.eval_batch_size: Value '${oc.env:BATCH}' of type 'str' could not be converted to Integer\n"
    ), result.stderr[-3000:]
    unknown = tmp_path / "unknown"
    _edited_copy(tmp_path / "exported", unknown, "config.json", lambda c: c["optim"].update(lrr=0.1))
    result = predict(unknown)
    assert result.returncode == 2 and result.stderr == (
        f"error: {unknown / 'config.json'}: its config is not one this version of rectrain can use: 'optim.lrr' is "
        "not a config key: 'optim' has no field 'lrr'. Did you mean 'optim.lr'? `python -m app.train --cfg job` "
        "prints every key.\n"
    ), result.stderr[-3000:]

    # A checkpoint whose meta.json has a key this version does not know: export refuses it as resume does.
    foreign = tmp_path / "foreign" / "step_00000005"
    _edited_copy(checkpoint, foreign, "meta.json", lambda c: c["trainer"].update(epochz=3))
    result = script_in_process("export.py", foreign, "--out", tmp_path / "exported_foreign")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = f"error: {foreign / 'meta.json'}: its config is not one this version of rectrain can use: "
    said += "'trainer.epochz' is not a config key"
    # On a line of its own (after the verification's progress bar, which ends in a carriage return).
    assert any(line.startswith(said) for line in result.stderr.splitlines()), result.stderr[-3000:]
    resumed = run_command(
        [
            sys.executable,
            "-m",
            "app.train",
            *tiny(tmp_path, "trainer.max_steps=4", "run_name=other", f"checkpoint.load_from={foreign}"),
        ],
        cwd=REPO,
    )
    assert resumed.returncode == 2 and "'trainer.epochz' is not a config key" in resumed.stderr, resumed.stderr[-3000:]
