"""`scripts/make_fixtures.py` writes a set laid out like the recorded one, at the sizes it is asked for."""
import json
import subprocess
import sys

from tests.utils import DEFAULT_FIXTURES, REPO_ROOT

# Draws of the reference's own training forward that this package's forward does not make.
REFERENCE_ONLY = {"context_changed_after_forward", "decoder_norm_input", "context_rows_zeroed_after_forward",
                  "mask_rate", "orders", "cond_drop_randn"}


def test_make_fixtures_writes_every_recorded_file_and_tensor(tmp_path):
    out = tmp_path / "set"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_fixtures.py"), "--out", str(out),
                    "--patch-nums", "1,2,3,5", "--padding-side", "right"], check=True, capture_output=True, timeout=300)
    recorded = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
    made = json.loads((out / "manifest.json").read_text())
    assert set(recorded) <= set(made), sorted(set(recorded) - set(made))
    for name, entry in recorded.items():
        missing = set(entry.get("tensors", {})) - set(made[name].get("tensors", {})) - REFERENCE_ONLY
        assert not missing, f"{name}: {sorted(missing)}"
    patch_nums = json.loads((out / "ckpt" / "llm" / "config.json").read_text())["patch_nums"]
    assert tuple(patch_nums) == (1, 2, 3, 5)
