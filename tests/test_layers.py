"""The stage packages keep their import rules at run time too (``lint-imports`` checks them statically)."""

from __future__ import annotations

import subprocess
import sys


def test_headers_checkpoints_and_the_plan_load_without_torch_or_ray():
    code = (
        "import sys; import distmerge.inputs.header, distmerge.inputs.checkpoint, distmerge.plan.merge_plan; "
        "bad = {'torch', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def test_the_public_api_is_still_at_the_top():
    import distmerge

    assert callable(distmerge.merge) and distmerge.MergeReport.__name__ == "MergeReport"
    assert callable(distmerge.load_state_dict_from_safetensors) and callable(distmerge.merge_lora_into_state_dict)
    assert issubclass(distmerge.FormatError, distmerge.DistmergeError)
