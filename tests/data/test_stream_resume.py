"""data=stream resumed inside an epoch through Lightning's checkpoint (the loader's position ``{"epoch", "batch"}``
is saved with it): a run that crashed mid-epoch and was resumed ends bit-identical to an uninterrupted one, so no
batch was trained twice or skipped (with DataLoader workers: tests/data/test_stream.py)."""

from __future__ import annotations

import pytest

from mtl_experiments.checkpoints import load
from mtl_experiments.pipeline import train
from tests.test_resume import RESUMABLE, final_state, same


def test_crashed_stream_run_resumes_exactly(make_cfg, tiny_data, tmp_path):
    # 1,500 rows, about 1,200 for training: 19 steps of 64 per epoch; a checkpoint every 7 steps; crash at 10
    common = ["data=stream", *tiny_data("stream"), *RESUMABLE, "trainer.max_epochs=2",
              "trainer.enable_model_summary=false", "~callbacks.progress_bar"]  # fmt: skip
    train(make_cfg(*common, f"paths.output_dir={tmp_path / 'reference'}", "experiment_name=reference", tiny=False))
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*common, "+callbacks.crash._target_=tests.test_resume.CrashAt", "+callbacks.crash.step=10",
                       f"paths.output_dir={tmp_path / 'run'}", tiny=False))  # fmt: skip
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = load(checkpoint)
    assert state["global_step"] == 7
    loops = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loops[0]["epoch"] == 0 and loops[0]["batch"] == 7  # the stream position rides in the checkpoint
    train(make_cfg(*common, f"resume={checkpoint}", f"paths.output_dir={tmp_path / 'resumed'}", tiny=False))
    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "run")
    assert [k for k in reference if not same(resumed[k], reference[k])] == []
